"""Ethernet/IPv4/TCP frames in plain Python (``struct``): parse, check, build.

The host's TCP stack handles one frame per call, so this is written for speed with
``struct`` and an ``array`` one's-complement sum, not byte by byte like the bit-exact
parser model ``sim.reference.parse_frame`` (which the tests use, with scapy, as the
reference). Header offsets are those of ``hw.headers``.

* ``parse_segment(frame)`` -> ``Segment`` or a ``ParseError`` reason (a string): untagged
  Ethernet II, IPv4 (options skipped), not a fragment, TCP; both checksums verified.
* ``build_segment(...)`` -> one frame, both checksums set, padded to 60 bytes, with the
  timestamp option laid out as Linux and the NIC's builder do (NOP, NOP, TS).
* ``frame_from_header(header, payload)``: the software ``hw.builder.TxBuilder``: a
  ``TX_HEADER`` dict (as ``sim.handshake_model`` returns for its SYN-ACKs) -> the frame.
* Sequence-number arithmetic (``seq_lt`` ...) modulo 2**32 (RFC 9293 3.4).
"""

import array
import struct
import sys
from dataclasses import dataclass

from hw.headers import ETH_LEN, IPV4_MIN_LEN, MIN_FRAME_BYTES, TCP_MIN_LEN, EtherType, \
    IpProto, TcpFlags, TcpOption

__all__ = ["Segment", "parse_segment", "build_segment", "frame_from_header", "ones_sum",
           "seq_lt", "seq_le", "seq_gt", "seq_ge", "seq_diff", "MASK32",
           "TS_OPTION_LENGTH", "REPLY_TTL"]

MASK32 = 0xFFFFFFFF
#: Bytes of the timestamp option as sent (NOP, NOP, kind 8, length 10, TSval, TSecr).
TS_OPTION_LENGTH = 12
#: TTL of the frames we send (Linux's default, and the NIC's ``REPLY_TTL``).
REPLY_TTL = 64

_ETH = struct.Struct("!6s6sH")
_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_TS = struct.Struct("!BBBBII")
_IP_TCP_HEADERS = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")
_LITTLE = sys.byteorder == "little"


def seq_diff(a, b):
    """``a - b`` as a signed 32-bit distance (RFC 9293 sequence space)."""
    return ((a - b + 0x80000000) & MASK32) - 0x80000000


def seq_lt(a, b):
    return seq_diff(a, b) < 0


def seq_le(a, b):
    return seq_diff(a, b) <= 0


def seq_gt(a, b):
    return seq_diff(a, b) > 0


def seq_ge(a, b):
    return seq_diff(a, b) >= 0


def ones_sum(data, start=0):
    """RFC 1071 one's-complement sum of ``data`` (big-endian 16-bit words, an odd last
    byte padded with zero), plus ``start``, folded to 16 bits.

    Summed as native words by ``array`` (the sum is byte-order independent up to a final
    swap, RFC 1071 section 2(B))."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(array.array("H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    if _LITTLE:
        total = ((total & 0xFF) << 8) | (total >> 8)
    total += start
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _mac_bytes(value):
    return value.to_bytes(6, "big")


def _ip_bytes(value):
    return value.to_bytes(4, "big")


@dataclass(slots=True)
class Segment:
    """One received TCP segment, as the connection needs it. Addresses are integers
    (MACs 48 bits, IPv4 addresses 32 bits), as in the ``EVENT`` layout."""
    eth_src: int
    eth_dst: int
    ip_src: int
    ip_dst: int
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int                  # TcpFlags bits
    window: int                 # the window field, unscaled
    payload: bytes
    ts_valid: bool = False      # the segment carries a timestamp option
    tsval: int = 0
    tsecr: int = 0
    mss: int | None = None      # the MSS option, when present (SYNs)
    wscale: int | None = None   # the window-scale option, when present (SYNs)

    @property
    def length(self):
        """Sequence space the segment occupies: payload, plus one for SYN and for FIN."""
        return (len(self.payload) + bool(self.flags & TcpFlags.SYN)
                + bool(self.flags & TcpFlags.FIN))

    def has(self, flag):
        return bool(self.flags & flag)


def _parse_options(options, segment):
    """Fill the option fields of ``segment``; False when the option list is malformed."""
    i, end = 0, len(options)
    while i < end:
        kind = options[i]
        if kind == TcpOption.EOL:
            return True
        if kind == TcpOption.NOP:
            i += 1
            continue
        if i + 1 >= end or options[i + 1] < 2 or i + options[i + 1] > end:
            return False
        length = options[i + 1]
        if kind == TcpOption.TIMESTAMP:
            if length != 10:
                return False
            segment.ts_valid = True
            segment.tsval, segment.tsecr = struct.unpack_from("!II", options, i + 2)
        elif kind == TcpOption.MSS:
            if length != 4:
                return False
            segment.mss = struct.unpack_from("!H", options, i + 2)[0]
        elif kind == TcpOption.WSCALE:
            if length != 3:
                return False
            segment.wscale = options[i + 2]
        i += length
    return True


def parse_segment(frame):
    """``Segment`` for a well-formed untagged Ethernet/IPv4/TCP frame with both
    checksums right; otherwise the reason as a string: ``"not_tcp"`` (another EtherType or
    protocol, a fragment), ``"truncated"`` (shorter than its headers or its IP total
    length, or bad IHL/data offset), ``"bad_ip_checksum"``, ``"bad_tcp_checksum"``,
    ``"bad_options"``."""
    if len(frame) < ETH_LEN + IPV4_MIN_LEN + TCP_MIN_LEN:
        return "truncated" if len(frame) >= ETH_LEN and frame[12:14] == b"\x08\x00" else "not_tcp"
    dst, src, ethertype = _ETH.unpack_from(frame, 0)
    if ethertype != EtherType.IPV4:
        return "not_tcp"
    l3 = ETH_LEN
    (version_ihl, _tos, total_length, _ident, frag, _ttl, protocol, _csum, ip_src,
     ip_dst) = _IP.unpack_from(frame, l3)
    ihl = (version_ihl & 0xF) * 4
    if version_ihl >> 4 != 4 or ihl < IPV4_MIN_LEN:
        return "truncated"
    if protocol != IpProto.TCP or frag & 0x3FFF:
        return "not_tcp"
    if total_length < ihl + TCP_MIN_LEN or l3 + total_length > len(frame):
        return "truncated"
    if ones_sum(frame[l3:l3 + ihl]) != 0xFFFF:
        return "bad_ip_checksum"
    l4 = l3 + ihl
    sport, dport, seq, ack, offset, flags, window, _tcsum, _urg = _TCP.unpack_from(frame, l4)
    data_offset = (offset >> 4) * 4
    tcp_length = total_length - ihl
    if data_offset < TCP_MIN_LEN or data_offset > tcp_length:
        return "truncated"
    segment_bytes = frame[l4:l3 + total_length]
    pseudo = ones_sum(ip_src + ip_dst, IpProto.TCP + tcp_length)
    if ones_sum(segment_bytes, pseudo) != 0xFFFF:
        return "bad_tcp_checksum"
    segment = Segment(int.from_bytes(src, "big"), int.from_bytes(dst, "big"),
                      int.from_bytes(ip_src, "big"), int.from_bytes(ip_dst, "big"),
                      sport, dport, seq, ack, flags, window, bytes(segment_bytes[data_offset:]))
    if data_offset > TCP_MIN_LEN and not _parse_options(segment_bytes[TCP_MIN_LEN:data_offset],
                                                         segment):
        return "bad_options"
    return segment


def _options(mss=None, sack_perm=False, timestamp=None, wscale=None):
    """Option bytes in Linux's order (the NIC builder's): MSS; SACK-permitted + TS, or
    NOP NOP TS, or NOP NOP SACK-permitted; NOP + window scale. ``timestamp`` is
    ``(tsval, tsecr)`` or None."""
    out = b""
    if mss is not None:
        out += struct.pack("!BBH", TcpOption.MSS, 4, mss)
    if timestamp is not None:
        ts = struct.pack("!BBII", TcpOption.TIMESTAMP, 10, *timestamp)
        out += (struct.pack("!BB", TcpOption.SACK_PERM, 2) if sack_perm
                else struct.pack("!BB", TcpOption.NOP, TcpOption.NOP)) + ts
    elif sack_perm:
        out += struct.pack("!BBBB", TcpOption.NOP, TcpOption.NOP, TcpOption.SACK_PERM, 2)
    if wscale is not None:
        out += struct.pack("!BBBB", TcpOption.NOP, TcpOption.WSCALE, 3, wscale)
    return out


def build_segment(*, eth_dst, eth_src, ip_src, ip_dst, sport, dport, seq, ack, flags, window,
                  payload=b"", timestamp=None, mss=None, sack_perm=False, wscale=None,
                  ttl=REPLY_TTL, identification=0, df=True, tos=0):
    """One Ethernet/IPv4/TCP frame (IHL 5, DF, checksums set, zero-padded to 60 bytes).
    Addresses are integers; ``timestamp`` is ``(tsval, tsecr)`` or None."""
    options = _options(mss, sack_perm, timestamp, wscale)
    tcp_length = TCP_MIN_LEN + len(options) + len(payload)
    src, dst = _ip_bytes(ip_src), _ip_bytes(ip_dst)
    ip_header = bytearray(_IP.pack(0x45, tos, IPV4_MIN_LEN + tcp_length, identification,
                                   0x4000 if df else 0, ttl, IpProto.TCP, 0, src, dst))
    struct.pack_into("!H", ip_header, 10, ~ones_sum(ip_header) & 0xFFFF)
    tcp_header = bytearray(_TCP.pack(sport, dport, seq & MASK32, ack & MASK32,
                                     (TCP_MIN_LEN + len(options)) << 2, flags, window, 0, 0))
    tcp_header += options
    pseudo = ones_sum(src + dst, IpProto.TCP + tcp_length)
    checksum = ~ones_sum(payload, ones_sum(tcp_header, pseudo)) & 0xFFFF   # header: even length
    struct.pack_into("!H", tcp_header, 16, checksum)
    frame = _ETH.pack(_mac_bytes(eth_dst), _mac_bytes(eth_src), EtherType.IPV4) \
        + ip_header + tcp_header + payload
    if len(frame) < MIN_FRAME_BYTES:
        frame += bytes(MIN_FRAME_BYTES - len(frame))
    return frame


def frame_from_header(header, payload=b""):
    """The frame ``hw.builder.TxBuilder`` emits for the ``TX_HEADER`` dict ``header``."""
    t, o, ip = header["tcp"], header["opt"], header["ip"]
    return build_segment(
        eth_dst=header["eth"]["dst"], eth_src=header["eth"]["src"], ip_src=ip["src"],
        ip_dst=ip["dst"], sport=t["sport"], dport=t["dport"], seq=t["seq"], ack=t["ack"],
        flags=t["flags"], window=t["window"], payload=payload,
        timestamp=(o["tsval"], o["tsecr"]) if o["ts_valid"] else None,
        mss=o["mss"] if o["mss_valid"] else None, sack_perm=bool(o["sack_perm"]),
        wscale=o["wscale"] if o["wscale_valid"] else None, ttl=ip["ttl"],
        identification=ip["identification"], df=bool(ip["df"]),
        tos=ip["dscp"] << 2 | ip["ecn"])
