"""TX packet builder: one header beat + a payload stream -> one complete Ethernet/IPv4/TCP frame.

``TxBuilder`` takes a ``TX_HEADER`` (``hw.metadata``) on ``header`` and, for each one,
emits on ``o`` one Ethernet II + IPv4 (IHL 5, DF as given) + TCP frame:

- TCP options in Linux's order: MSS; then SACK-permitted + timestamps, or NOP NOP
  timestamps, or NOP NOP SACK-permitted; then NOP + window scale. The data offset
  follows the options (header length 54..74 bytes).
- ``payload_length`` bytes taken from ``payload``: exactly ceil(payload_length / (W/8))
  beats are consumed (none when it is 0), whatever their ``keep``. The bytes are
  realigned behind the header by a byte rotation at line rate. When the payload's
  ``last`` is not on the expected beat the frame is still framed by
  ``payload_length`` and ``payload_mismatch`` counts it.
- Frames shorter than 60 bytes are zero-padded to 60 (the IP total length excludes
  the padding).
- Both checksums are right: the assembled frame is summed as it enters a
  ``PatchBuffer`` (store and forward, one maximum frame deep) and the checksum bytes
  are written as the frame leaves.
- A frame longer than ``max_frame_bytes`` is not sent: its payload beats are consumed
  and dropped and ``oversize_drops`` counts it.

Latency: header accepted -> first output beat = frame beats + 2 cycles (store and forward).
Throughput: 1 output beat per cycle for back-to-back frames of any size, header-only ones
included (the next header is taken in the cycle the current frame's last beat is built).

Ports: ``header`` (In, stream of ``TX_HEADER``), ``payload`` and ``o`` (packet streams,
``hw.stream``), ``payload_mismatch`` and ``oversize_drops`` (Out, 32-bit counters).
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from hw.ones_complement import fold, word_sum
from hw.patch_buffer import PATCH, PatchBuffer
from hw.headers import (ETHERNET, IPV4, TCP, TCP_OPTIONS, ETH_LEN, IPV4_MIN_LEN, TCP_MIN_LEN,
                        MIN_FRAME_BYTES, MAX_FRAME_BYTES, EtherType, IpProto, TcpOption)
from hw.metadata import TX_HEADER
from hw.stream import packet_signature, beat_bytes

__all__ = ["TxBuilder", "linux_option_bytes", "header_length", "OPTION_COMBOS",
           "L3_OFFSET", "L4_OFFSET", "FIXED_HEADER_BYTES"]

L3_OFFSET = ETH_LEN                          # the builder never adds a VLAN tag
L4_OFFSET = ETH_LEN + IPV4_MIN_LEN           # IHL is always 5
FIXED_HEADER_BYTES = L4_OFFSET + TCP_MIN_LEN

#: The 16 option combinations as (mss, sack_perm, timestamps, wscale) flags; the index
#: is Cat(mss_valid, sack_perm, ts_valid, wscale_valid) of the header.
OPTION_COMBOS = [tuple(bool(index >> bit & 1) for bit in range(4)) for index in range(16)]


def _put(buf, base, field, value):
    """OR the bytes of ``field`` = ``value`` into the byte list ``buf`` at header ``base``."""
    for index, _mask, byte in field.bytes_of(value):
        buf[base + index] = buf[base + index] | byte


def _option(kind, **values):
    """The bytes of one TCP option: kind, length, then its value fields."""
    decl = TCP_OPTIONS[kind]
    buf = [Const(kind, 8), Const(decl.length[0], 8)] + [Const(0, 8)] * decl.header.size
    for name, value in values.items():
        _put(buf, 2, decl.header.fields[name], value)
    return buf


def linux_option_bytes(opt, mss, sack_perm, timestamps, wscale):
    """TCP option bytes in the order Linux writes them, for one flag combination.

    ``opt`` holds the values (the ``opt`` part of a ``TX_HEADER``); the flags are Python
    bools, so each combination is a fixed byte layout.
    """
    nop = [Const(TcpOption.NOP, 8)]
    out = []
    if mss:
        out += _option(TcpOption.MSS, mss=opt.mss)
    ts = _option(TcpOption.TIMESTAMP, tsval=opt.tsval, tsecr=opt.tsecr) if timestamps else []
    if sack_perm and timestamps:
        out += _option(TcpOption.SACK_PERM) + ts
    elif timestamps:
        out += nop + nop + ts
    elif sack_perm:
        out += nop + nop + _option(TcpOption.SACK_PERM)
    if wscale:
        out += nop + _option(TcpOption.WSCALE, shift=opt.wscale)
    assert len(out) % 4 == 0
    return out


def _option_length(mss, sack_perm, timestamps, wscale):
    class _Values:                            # any values will do for the length
        mss = tsval = tsecr = wscale = 0
    return len(linux_option_bytes(_Values, mss, sack_perm, timestamps, wscale))


def header_length(mss, sack_perm, timestamps, wscale):
    """Bytes of Ethernet + IPv4 + TCP header the builder writes for these option flags."""
    return FIXED_HEADER_BYTES + _option_length(mss, sack_perm, timestamps, wscale)


OPTIONS_MAX_BYTES = max(_option_length(*combo) for combo in OPTION_COMBOS)
HEADER_MAX_BYTES = FIXED_HEADER_BYTES + OPTIONS_MAX_BYTES


def _one_of(choices):
    """The value whose condition holds, 0 if none: an OR of Muxes over (condition, value).

    Used instead of a combinational ``Switch``: Icarus never evaluates a Switch block
    whose inputs do not change after time 0, which would leave its outputs X.
    """
    out = Const(0, 1)
    for condition, value in choices:
        out = out | Mux(condition, value, 0)
    return out


def _combo_index(opt):
    return Cat(opt.mss_valid, opt.sack_perm, opt.ts_valid, opt.wscale_valid)


class TxBuilder(wiring.Component):
    """Builds one Ethernet/IPv4/TCP frame per header beat (see the module docstring).

    ``TxBuilder(width=64, max_frame_bytes=1518)``; ``width`` is the datapath width W.
    """

    #: Buffer beats on top of one maximum frame (the summing adds no latency of its own).
    SLACK_BEATS = 8

    def __init__(self, width=64, max_frame_bytes=MAX_FRAME_BYTES):
        self.width = width
        self.max_frame_bytes = max_frame_bytes
        super().__init__({
            "header": In(stream.Signature(TX_HEADER)),
            "payload": In(packet_signature(width)),
            "o": Out(packet_signature(width)),
            "payload_mismatch": Out(32),
            "oversize_drops": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        nbytes = beat_bytes(self.width)
        lane_bits = nbytes.bit_length() - 1
        depth = -(-self.max_frame_bytes // nbytes) + self.SLACK_BEATS
        m.submodules.buffer = buffer = PatchBuffer(self.width, depth=depth)
        wiring.connect(m, buffer.o, wiring.flipped(self.o))

        # --- Per-frame state, loaded when a header is taken ----------------------------
        hdr = Signal(TX_HEADER)
        hdr_len = Signal(range(HEADER_MAX_BYTES + 1))
        frame_end = Signal(17)         # header + payload bytes
        frame_len = Signal(17)         # frame_end, padded to the minimum frame
        last_beat = Signal(17 - lane_bits)
        payload_left = Signal(17 - lane_bits)   # payload beats still to consume
        dropping = Signal()            # oversize frame: consume, do not send
        active = Signal()
        beat = Signal(17 - lane_bits)  # index of the beat being built
        prev = Signal(self.width)      # the payload beat consumed before this one
        mismatch_seen = Signal()

        # --- Header bytes from the registered header -------------------------------------
        buf = [Const(0, 8)] * FIXED_HEADER_BYTES
        _put(buf, 0, ETHERNET.dst, hdr.eth.dst)
        _put(buf, 0, ETHERNET.src, hdr.eth.src)
        _put(buf, 0, ETHERNET.ethertype, EtherType.IPV4)
        ip_fields = {
            "version": 4, "ihl": IPV4_MIN_LEN // 4, "dscp": hdr.ip.dscp, "ecn": hdr.ip.ecn,
            "total_length": (hdr_len - L3_OFFSET + hdr.payload_length)[:16],
            "identification": hdr.ip.identification, "df": hdr.ip.df, "ttl": hdr.ip.ttl,
            "protocol": IpProto.TCP, "src": hdr.ip.src, "dst": hdr.ip.dst,
        }                              # checksum left 0: patched on the way out
        for name, value in ip_fields.items():
            _put(buf, L3_OFFSET, IPV4.fields[name], value)
        tcp_fields = {
            "sport": hdr.tcp.sport, "dport": hdr.tcp.dport, "seq": hdr.tcp.seq,
            "ack": hdr.tcp.ack, "data_offset": (hdr_len - L4_OFFSET)[2:6],
            "flags": hdr.tcp.flags, "window": hdr.tcp.window,
        }                              # checksum and urgent pointer 0
        for name, value in tcp_fields.items():
            _put(buf, L4_OFFSET, TCP.fields[name], value)

        # Each option byte is selected from the 16 fixed layouts.
        combo = _combo_index(hdr.opt)
        layouts = [linux_option_bytes(hdr.opt, *flags) for flags in OPTION_COMBOS]
        option_bytes = [_one_of((combo == index, layout[i])
                                for index, layout in enumerate(layouts) if i < len(layout))
                        for i in range(OPTIONS_MAX_BYTES)]
        header_bytes = buf + option_bytes + [Const(0, 8)] * (-HEADER_MAX_BYTES % nbytes)

        # --- Build one beat -----------------------------------------------------------------
        header_part = Signal(self.width)
        m.d.comb += header_part.eq(_one_of(
            (beat == k, Cat(*header_bytes[k * nbytes:(k + 1) * nbytes]))
            for k in range(len(header_bytes) // nbytes)))

        # Output beat h + j (h = hdr_len // B) holds the tail of payload beat j - 1 ("prev")
        # below lane s = hdr_len % B and the head of payload beat j from lane s on. Only the
        # rotations that the possible header lengths need are built.
        aligned = Signal(self.width)
        both = Cat(prev, self.payload.payload.data)
        rotations = sorted({header_length(*flags) % nbytes for flags in OPTION_COMBOS})
        m.d.comb += aligned.eq(_one_of(
            (hdr_len[:lane_bits] == s, both[8 * (nbytes - s):8 * (2 * nbytes - s)]) for s in rotations))

        pos = Cat(Const(0, lane_bits), beat)    # frame byte offset of lane 0
        beat_data = Signal(self.width)
        keep = Signal(nbytes)
        for lane in range(nbytes):
            at = pos + lane
            in_payload = (at >= hdr_len) & (at < frame_end)
            m.d.comb += [
                beat_data[8 * lane:8 * lane + 8].eq(
                    header_part[8 * lane:8 * lane + 8] | Mux(in_payload, aligned[8 * lane:8 * lane + 8], 0)),
                keep[lane].eq(at < frame_len),
            ]

        consume = (beat >= hdr_len[lane_bits:]) & (payload_left != 0)
        is_last = beat == last_beat
        beat_valid = active & (~consume | self.payload.valid)
        m.d.comb += [
            buffer.i.payload.data.eq(beat_data),
            buffer.i.payload.keep.eq(keep),
            buffer.i.payload.last.eq(is_last),
            buffer.i.valid.eq(beat_valid & ~dropping & (~is_last | buffer.patch.ready)),
            buffer.patch.valid.eq(beat_valid & ~dropping & is_last & buffer.i.ready),
        ]
        advance = beat_valid & (dropping | (buffer.i.ready & (~is_last | buffer.patch.ready)))
        m.d.comb += self.payload.ready.eq(advance & consume)

        # --- Checksums of the beats as they are stored --------------------------------------
        # Words below L4_OFFSET are IPv4 header words, the rest TCP segment words; zero
        # padding adds nothing, and both checksum fields are still 0.
        ip_lanes = Signal(nbytes // 2)
        tcp_lanes = Signal(nbytes // 2)
        for j in range(nbytes // 2):
            at = pos + 2 * j
            m.d.comb += [ip_lanes[j].eq((at >= L3_OFFSET) & (at < L4_OFFSET)),
                         tcp_lanes[j].eq(at >= L4_OFFSET)]
        ip_acc = Signal(32)
        tcp_acc = Signal(32)
        ip_total = Signal(32)          # the sums including this beat
        tcp_total = Signal(32)
        tcp_length = (hdr_len - L4_OFFSET + hdr.payload_length)[:16]
        pseudo_header = Signal(19)
        tcp_final = Signal(32)
        m.d.comb += [
            ip_total.eq(ip_acc + word_sum(beat_data, ip_lanes)),
            tcp_total.eq(tcp_acc + word_sum(beat_data, tcp_lanes)),
            pseudo_header.eq(hdr.ip.src[16:] + hdr.ip.src[:16] + hdr.ip.dst[16:] + hdr.ip.dst[:16]
                             + int(IpProto.TCP) + tcp_length),
            tcp_final.eq(tcp_total + pseudo_header),
        ]
        patch = Signal(PATCH)
        m.d.comb += [
            patch.ip.enable.eq(1),
            patch.ip.offset.eq(L3_OFFSET + IPV4.checksum.byte_offset),
            patch.ip.value.eq(~fold(ip_total)),
            patch.tcp.enable.eq(1),
            patch.tcp.offset.eq(L4_OFFSET + TCP.checksum.byte_offset),
            patch.tcp.value.eq(~fold(tcp_final)),
            buffer.patch.payload.eq(patch),
        ]

        # --- Advance ----------------------------------------------------------------------------
        with m.If(advance):
            m.d.sync += [
                beat.eq(beat + 1),
                ip_acc.eq(Mux(is_last, 0, ip_total)),
                tcp_acc.eq(Mux(is_last, 0, tcp_total)),
            ]
            with m.If(is_last):
                m.d.sync += active.eq(0)
            with m.If(dropping & is_last):
                m.d.sync += self.oversize_drops.eq(self.oversize_drops + 1)
            with m.If(consume):
                expected_last = payload_left == 1
                wrong_last = self.payload.payload.last != expected_last
                m.d.sync += [prev.eq(self.payload.payload.data), payload_left.eq(payload_left - 1)]
                with m.If(expected_last):
                    m.d.sync += mismatch_seen.eq(0)
                    with m.If(mismatch_seen | wrong_last):
                        m.d.sync += self.payload_mismatch.eq(self.payload_mismatch + 1)
                with m.Elif(wrong_last):
                    m.d.sync += mismatch_seen.eq(1)

        # --- Take the next header (in the same cycle as the current frame's last beat) -------
        new = self.header.payload
        new_hdr_len = Signal.like(hdr_len)
        header_lengths = [header_length(*flags) for flags in OPTION_COMBOS]
        m.d.comb += new_hdr_len.eq(Cat(*[Const(n, len(new_hdr_len)) for n in header_lengths])
                                   .word_select(_combo_index(new.opt), len(new_hdr_len)))
        new_end = new_hdr_len + new.payload_length
        new_len = Mux(new_end < MIN_FRAME_BYTES, MIN_FRAME_BYTES, new_end)
        m.d.comb += self.header.ready.eq(~active | (advance & is_last))
        with m.If(self.header.valid & self.header.ready):
            m.d.sync += [
                hdr.eq(new),
                hdr_len.eq(new_hdr_len),
                frame_end.eq(new_end),
                frame_len.eq(new_len),
                last_beat.eq((new_len - 1) >> lane_bits),
                payload_left.eq((new.payload_length + nbytes - 1) >> lane_bits),
                dropping.eq(new_len > self.max_frame_bytes),
                beat.eq(0),
                active.eq(1),
                ip_acc.eq(0),
                tcp_acc.eq(0),
            ]
        return m
