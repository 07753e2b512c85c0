"""The single declaration of every packet header the NIC touches.

Each header is an ordered list of fields in network (big-endian, MSB-first) order.
Everything else is derived from these lists: byte and bit offsets, the RTL field
extractors and inserters, the Python pack/unpack used by the testbenches and the
driver, and the tables in ``docs/``. No field offset is written anywhere else.

Bit offsets count from the most significant bit of the header's first byte, as in
the RFC diagrams. Byte 0 of a header is the first byte on the wire, which is
``data[0:8]`` of the stream beat that carries it.
"""

from dataclasses import dataclass
from enum import IntEnum

from amaranth.hdl import Cat, Const, Value

__all__ = [
    "Field", "Header", "ETHERNET", "VLAN", "IPV4", "TCP", "HEADERS",
    "EtherType", "IpProto", "TcpFlags", "TcpOption", "TCP_OPTIONS",
    "ETH_LEN", "VLAN_LEN", "IPV4_MIN_LEN", "IPV4_MAX_LEN", "TCP_MIN_LEN", "TCP_MAX_LEN",
    "TCP_OPTIONS_MAX_LEN", "MAX_HEADER_BYTES", "MIN_FRAME_BYTES", "MAX_FRAME_BYTES",
]


@dataclass(frozen=True)
class Field:
    name: str
    bit_offset: int   # from the MSB of byte 0 of the header
    width: int        # bits

    @property
    def byte_offset(self):
        """Offset of the first byte that holds part of the field."""
        return self.bit_offset // 8

    @property
    def byte_span(self):
        """(first byte, number of bytes) holding the field."""
        first = self.bit_offset // 8
        last = (self.bit_offset + self.width - 1) // 8
        return first, last - first + 1

    @property
    def _shift(self):
        first, nbytes = self.byte_span
        return nbytes * 8 - (self.bit_offset - first * 8) - self.width

    # --- Python side -----------------------------------------------------------------
    def get(self, buf, base=0):
        """Read the field from a bytes-like ``buf`` whose header starts at ``base``."""
        first, nbytes = self.byte_span
        word = int.from_bytes(bytes(buf[base + first:base + first + nbytes]), "big")
        return (word >> self._shift) & ((1 << self.width) - 1)

    def put(self, buf, value, base=0):
        """Write the field into a ``bytearray`` whose header starts at ``base``."""
        first, nbytes = self.byte_span
        lo = base + first
        word = int.from_bytes(bytes(buf[lo:lo + nbytes]), "big")
        mask = ((1 << self.width) - 1) << self._shift
        word = (word & ~mask) | ((int(value) << self._shift) & mask)
        buf[lo:lo + nbytes] = word.to_bytes(nbytes, "big")

    # --- RTL side --------------------------------------------------------------------
    def extract(self, byte_at):
        """Amaranth value of the field; ``byte_at(i)`` returns header byte ``i`` (8 bits)."""
        first, nbytes = self.byte_span
        # Big-endian: the first byte is the most significant, so it goes last in Cat.
        word = Cat(*[byte_at(first + i) for i in reversed(range(nbytes))])
        return word[self._shift:self._shift + self.width]

    def bytes_of(self, value):
        """Split an Amaranth value (or int) of this field into the list of
        ``(byte_index, mask, byte_value)`` it occupies; used by header generators."""
        first, nbytes = self.byte_span
        value = Value.cast(Const(value, self.width) if isinstance(value, int) else value)
        word = Cat(Const(0, self._shift), value, Const(0, nbytes * 8 - self._shift - self.width))
        out = []
        for i in range(nbytes):
            lsb = (nbytes - 1 - i) * 8
            lo = max(self._shift - lsb, 0)
            hi = min(self._shift + self.width - lsb, 8)
            mask = ((1 << hi) - 1) & ~((1 << lo) - 1)
            out.append((first + i, mask, word[lsb:lsb + 8]))
        return out


class Header:
    """An ordered header declaration: ``Header("ipv4", [("version", 4), ...])``."""

    def __init__(self, name, fields, doc=""):
        self.name = name
        self.doc = doc
        self.fields = {}
        offset = 0
        for fname, width in fields:
            assert fname not in self.fields, fname
            self.fields[fname] = Field(fname, offset, width)
            offset += width
        assert offset % 8 == 0, f"{name} is not a whole number of bytes"
        self.size = offset // 8   # fixed part, bytes

    def __getattr__(self, name):
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(f"header {self.__dict__.get('name')!r} has no field {name!r}")

    def __iter__(self):
        return iter(self.fields.values())

    def unpack(self, buf, base=0):
        return {f.name: f.get(buf, base) for f in self}

    def pack(self, **values):
        buf = bytearray(self.size)
        for name, value in values.items():
            self.fields[name].put(buf, value)
        return bytes(buf)


ETHERNET = Header("ethernet", [
    ("dst", 48), ("src", 48), ("ethertype", 16),
], doc="Ethernet II. With an 802.1Q tag, `ethertype` holds the TPID 0x8100 and the VLAN header follows.")

VLAN = Header("vlan", [
    ("pcp", 3), ("dei", 1), ("vid", 12), ("ethertype", 16),
], doc="802.1Q tag control information and the inner EtherType, right after the outer EtherType.")

IPV4 = Header("ipv4", [
    ("version", 4), ("ihl", 4), ("dscp", 6), ("ecn", 2), ("total_length", 16),
    ("identification", 16), ("reserved", 1), ("df", 1), ("mf", 1), ("frag_offset", 13),
    ("ttl", 8), ("protocol", 8), ("checksum", 16),
    ("src", 32), ("dst", 32),
], doc="IPv4 (RFC 791). IHL counts 32-bit words (5..15); options follow the fixed part.")

TCP = Header("tcp", [
    ("sport", 16), ("dport", 16), ("seq", 32), ("ack", 32),
    ("data_offset", 4), ("reserved", 4), ("flags", 8), ("window", 16),
    ("checksum", 16), ("urgent", 16),
], doc="TCP (RFC 9293). Data offset counts 32-bit words (5..15); options follow the fixed part.")

HEADERS = [ETHERNET, VLAN, IPV4, TCP]

ETH_LEN = ETHERNET.size                 # 14
VLAN_LEN = VLAN.size                    # 4
IPV4_MIN_LEN = IPV4.size                # 20
IPV4_MAX_LEN = 15 * 4                   # 60
TCP_MIN_LEN = TCP.size                  # 20
TCP_MAX_LEN = 15 * 4                    # 60
TCP_OPTIONS_MAX_LEN = TCP_MAX_LEN - TCP_MIN_LEN
#: The most header bytes any frame on the offload path can have.
MAX_HEADER_BYTES = ETH_LEN + VLAN_LEN + IPV4_MAX_LEN + TCP_MAX_LEN   # 138
MIN_FRAME_BYTES = 60                    # without FCS
MAX_FRAME_BYTES = 1518                  # without FCS, with one 802.1Q tag


class EtherType(IntEnum):
    IPV4 = 0x0800
    ARP = 0x0806
    VLAN = 0x8100
    IPV6 = 0x86DD


class IpProto(IntEnum):
    ICMP = 1
    TCP = 6
    UDP = 17


class TcpFlags(IntEnum):
    """Bit positions of the 8-bit TCP ``flags`` field (bit 0 is FIN)."""
    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10
    URG = 0x20
    ECE = 0x40
    CWR = 0x80


class TcpOption(IntEnum):
    EOL = 0
    NOP = 1
    MSS = 2
    WSCALE = 3
    SACK_PERM = 4
    SACK = 5
    TIMESTAMP = 8


@dataclass(frozen=True)
class OptionDecl:
    kind: TcpOption
    length: tuple        # allowed total lengths (kind and length bytes included)
    header: Header       # value fields, starting right after the kind and length bytes


#: TCP options: the value fields of each kind, declared once like the headers.
TCP_OPTIONS = {
    TcpOption.MSS: OptionDecl(TcpOption.MSS, (4,), Header("opt_mss", [("mss", 16)])),
    TcpOption.WSCALE: OptionDecl(TcpOption.WSCALE, (3,), Header("opt_wscale", [("shift", 8)])),
    TcpOption.SACK_PERM: OptionDecl(TcpOption.SACK_PERM, (2,), Header("opt_sack_perm", [])),
    TcpOption.SACK: OptionDecl(TcpOption.SACK, (10, 18, 26, 34),
                               Header("opt_sack_block", [("left", 32), ("right", 32)])),
    TcpOption.TIMESTAMP: OptionDecl(TcpOption.TIMESTAMP, (10,),
                                    Header("opt_timestamp", [("tsval", 32), ("tsecr", 32)])),
}
