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
- Both checksums are right: the assembled frame is summed (a pipelined adder tree
  behind the beat builder) as it enters a ``PatchBuffer`` (store and forward, one
  maximum frame deep) and the checksum bytes are written as the frame leaves.
- A frame longer than ``max_frame_bytes`` is not sent: its payload beats are consumed
  and dropped and ``oversize_drops`` counts it.

Latency: header accepted -> first output beat = frame beats + 11 cycles at W=64 (19 for a
60-byte frame), frame beats + 15 at W=512: two header stages, then store and forward
while the checksum pipeline (``checksum_stages``, which grows with W) sums the frame.
Throughput: 1 output beat per cycle for back-to-back frames of any size, header-only ones
included (the next frame is taken in the cycle the current frame's last beat is built).

Ports: ``header`` (In, stream of ``TX_HEADER``), ``payload`` and ``o`` (packet streams,
``hw.stream``), ``payload_mismatch`` and ``oversize_drops`` (Out, 32-bit counters).
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from hw.ones_complement import beat_words
from hw.patch_buffer import PATCH, PatchBuffer
from hw.headers import (ETHERNET, IPV4, TCP, TCP_OPTIONS, ETH_LEN, IPV4_MIN_LEN, TCP_MIN_LEN,
                        MIN_FRAME_BYTES, MAX_FRAME_BYTES, EtherType, IpProto, TcpOption)
from hw.metadata import TX_HEADER
from hw.pipeline import Pipeline, adder_tree
from hw.stream import packet_layout, packet_signature, beat_bytes, struct_value

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


def _table(values, index, width):
    """``values[index]`` for a small constant table, as one expression."""
    return Cat(*[Const(v, width) for v in values]).word_select(index, width)


def _lanes_below(count, lanes):
    """Lane mask with the lanes ``0 .. count - 1`` set (``count`` may exceed ``lanes``)."""
    return Cat(*[count > lane for lane in range(lanes)])


class TxBuilder(wiring.Component):
    """Builds one Ethernet/IPv4/TCP frame per header beat (see the module docstring).

    ``TxBuilder(width=64, max_frame_bytes=1518)``; ``width`` is the datapath width W.

    Inside, five parts run one after the other, each from registers:

    1. ``n0``: the accepted header, with its header length and the sums of lengths
       that depend on the option flags (one table look-up and one adder each).
    2. ``n1``: everything the frame needs, precomputed: the header bytes (options laid
       out), the lane masks of the first beat, beat counts, the pseudo-header sums.
    3. the beat builder (one beat per cycle): header bytes are shifted out of a
       register, payload bytes are rotated behind them, lane masks come from
       registers that count down.
    4. ``s1``: the built beat, registered; it is written into the ``PatchBuffer``
       and summed by a never-stalling pipeline (adder tree, per-frame accumulator,
       fold), whose result is the frame's patch.
    5. the ``PatchBuffer`` (frames and patches), kept from overflowing with credit
       counters, so that nothing downstream of the beat builder ever stalls.
    """

    #: Buffer beats on top of one maximum frame: they cover the beats that enter while
    #: the previous frame waits for its checksums, so that back-to-back maximum frames
    #: flow without a bubble. At W=64 they come for free in the block RAMs.
    SLACK_BEATS = 32
    #: Patches the buffer can hold: more than the frames in flight between the beat
    #: builder and the output at line rate (one-beat frames at W=512).
    PATCH_DEPTH = 32

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

    @property
    def checksum_stages(self):
        """Cycles from a beat in ``s1`` to its frame's patch (when it is the last beat)."""
        leaves = self.width // 16 + 3          # words + three pseudo-header terms
        return (leaves - 1).bit_length() + 3   # adder tree, accumulate, fold, fold

    def elaborate(self, platform):
        m = Module()
        nbytes = beat_bytes(self.width)
        nwords = nbytes // 2
        lane_bits = nbytes.bit_length() - 1
        beat_bits = 17 - lane_bits
        ones = (1 << nbytes) - 1
        depth = -(-self.max_frame_bytes // nbytes) + self.SLACK_BEATS
        m.submodules.buffer = buffer = PatchBuffer(self.width, depth=depth,
                                                   patch_depth=self.PATCH_DEPTH)
        wiring.connect(m, buffer.o, wiring.flipped(self.o))

        header_lengths = [header_length(*flags) for flags in OPTION_COMBOS]
        image_beats = -(-HEADER_MAX_BYTES // nbytes)
        image_bytes = image_beats * nbytes

        # --- n0: the accepted header and its lengths ---------------------------------------
        new = self.header.payload
        new_combo = _combo_index(new.opt)
        n0_valid = Signal()
        n0 = Signal(TX_HEADER)
        n0_end = Signal(17)            # header + payload bytes
        n0_pay_beats = Signal(beat_bits)
        n0_total_length = Signal(16)   # IPv4 total length
        n0_tcp_len6 = Signal(17)       # TCP length + protocol: the pseudo-header's small terms
        n1_ready = Signal()
        n0_ready = ~n0_valid | n1_ready
        m.d.comb += self.header.ready.eq(n0_ready)
        with m.If(n0_ready):
            m.d.sync += [
                n0_valid.eq(self.header.valid),
                n0.eq(new),
                n0_end.eq(_table(header_lengths, new_combo, 7) + new.payload_length),
                n0_pay_beats.eq((new.payload_length + nbytes - 1) >> lane_bits),
                n0_total_length.eq(_table([n - L3_OFFSET for n in header_lengths], new_combo, 7)
                                   + new.payload_length),
                n0_tcp_len6.eq(((_table([n - L4_OFFSET for n in header_lengths], new_combo, 7)
                                 + new.payload_length)[:16]) + int(IpProto.TCP)),
            ]

        # --- n1: everything the frame needs, from registers ----------------------------------
        combo = _combo_index(n0.opt)
        # Header bytes, options laid out: each option byte is one of the 16 fixed layouts.
        buf = [Const(0, 8)] * FIXED_HEADER_BYTES
        _put(buf, 0, ETHERNET.dst, n0.eth.dst)
        _put(buf, 0, ETHERNET.src, n0.eth.src)
        _put(buf, 0, ETHERNET.ethertype, EtherType.IPV4)
        ip_fields = {
            "version": 4, "ihl": IPV4_MIN_LEN // 4, "dscp": n0.ip.dscp, "ecn": n0.ip.ecn,
            "total_length": n0_total_length,
            "identification": n0.ip.identification, "df": n0.ip.df, "ttl": n0.ip.ttl,
            "protocol": IpProto.TCP, "src": n0.ip.src, "dst": n0.ip.dst,
        }                              # checksum left 0: patched on the way out
        for name, value in ip_fields.items():
            _put(buf, L3_OFFSET, IPV4.fields[name], value)
        tcp_fields = {
            "sport": n0.tcp.sport, "dport": n0.tcp.dport, "seq": n0.tcp.seq,
            "ack": n0.tcp.ack, "flags": n0.tcp.flags, "window": n0.tcp.window,
            "data_offset": _table([(n - L4_OFFSET) // 4 for n in header_lengths], combo, 4),
        }                              # checksum and urgent pointer 0
        for name, value in tcp_fields.items():
            _put(buf, L4_OFFSET, TCP.fields[name], value)
        layouts = [linux_option_bytes(n0.opt, *flags) for flags in OPTION_COMBOS]
        option_bytes = [_one_of((combo == index, layout[i])
                                for index, layout in enumerate(layouts) if i < len(layout))
                        for i in range(OPTIONS_MAX_BYTES)]
        image = Cat(*buf, *option_bytes, Const(0, 8 * (image_bytes - HEADER_MAX_BYTES)))

        # Lane masks over the header beats: payload from byte hdr_len on; IPv4 header
        # words; TCP words (every word from L4_OFFSET on, padding adds nothing).
        starts = [sum(1 << i for i in range(n, image_bytes)) for n in header_lengths]
        ip_words = sum(1 << j for j in range(image_bytes // 2) if L3_OFFSET <= 2 * j < L4_OFFSET)
        tcp_words = sum(1 << j for j in range(image_bytes // 2) if 2 * j >= L4_OFFSET)
        rotations = sorted({n % nbytes for n in header_lengths})
        # Beat index of the first payload byte, and which rotation realigns the payload.
        head_beats = _table([n // nbytes for n in header_lengths], combo, 4)
        rotation = _table([1 << rotations.index(n % nbytes) for n in header_lengths],
                          combo, len(rotations))

        frame_len_small = n0_end < MIN_FRAME_BYTES     # padded to the minimum frame
        last_beat = Mux(frame_len_small, (MIN_FRAME_BYTES - 1) >> lane_bits,
                        (n0_end - 1)[lane_bits:17])
        last_lanes = Mux(frame_len_small, MIN_FRAME_BYTES % nbytes, n0_end[:lane_bits])
        end_beat = n0_end[lane_bits:17]
        tail_mask = _lanes_below(n0_end[:lane_bits], nbytes)

        n1_valid = Signal()
        n1 = {name: Signal(shape, name=f"n1_{name}") for name, shape in {
            "image": image_bytes * 8, "start": image_bytes, "rotation": len(rotations),
            "head_beats": 4, "pay_beats": beat_bits, "last_beat": beat_bits,
            "end_beat": beat_bits, "tail_mask": nbytes, "last_keep": nbytes,
            "dropping": 1, "src_sum": 17, "dst_sum": 17, "tcp_len6": 17,
        }.items()}
        take = Signal()                # the beat builder takes n1's frame
        m.d.comb += n1_ready.eq(~n1_valid | take)
        with m.If(n1_ready):
            m.d.sync += [
                n1_valid.eq(n0_valid),
                n1["image"].eq(image),
                n1["start"].eq(_table(starts, combo, image_bytes)),
                n1["rotation"].eq(rotation),
                n1["head_beats"].eq(head_beats),
                n1["pay_beats"].eq(n0_pay_beats),
                n1["last_beat"].eq(last_beat),
                n1["end_beat"].eq(end_beat),
                n1["tail_mask"].eq(tail_mask),
                n1["last_keep"].eq(Mux(last_lanes == 0, ones, _lanes_below(last_lanes, nbytes))),
                n1["dropping"].eq(n0_end > self.max_frame_bytes),
                n1["src_sum"].eq(n0.ip.src[16:] + n0.ip.src[:16]),
                n1["dst_sum"].eq(n0.ip.dst[16:] + n0.ip.dst[:16]),
                n1["tcp_len6"].eq(n0_tcp_len6),
            ]

        # --- The beat builder: state of the beat being built --------------------------------
        active = Signal()
        hsr = Signal(image_bytes * 8)   # header bytes still to send, from lane 0 of this beat
        start = Signal(image_bytes)     # payload lanes from the payload's start on (1 = payload)
        ip_lanes = Signal(image_bytes // 2)
        tcp_lanes = Signal(image_bytes // 2)
        rot = Signal(len(rotations))
        head_left = Signal(4)           # beats before the first payload beat
        pay_left = Signal(beat_bits)    # payload beats still to consume
        end_left = Signal(beat_bits)    # beats before the beat holding the payload's end
        end_mask = Signal(nbytes)       # lanes below the payload's end, in this beat
        tail_mask = Signal(nbytes)
        last_left = Signal(beat_bits)   # beats before the last one
        is_last = Signal()
        last_keep = Signal(nbytes)
        consume = Signal()              # this beat takes a payload beat
        dropping = Signal()             # oversize frame: consume, do not send
        first = Signal()
        src_sum, dst_sum, tcp_len6 = Signal(17), Signal(17), Signal(17)
        prev = Signal(self.width)       # the payload beat consumed before this one
        mismatch_seen = Signal()

        # Credits: free places in the buffer's frame and patch FIFOs, minus one for safety.
        room = Signal(range(depth + 1), init=depth - 1)
        patch_room = Signal(range(self.PATCH_DEPTH + 1), init=self.PATCH_DEPTH - 1)
        has_room = Signal(init=1)
        has_patch_room = Signal(init=1)

        advance = Signal()
        m.d.comb += advance.eq(active & (~consume | self.payload.valid)
                               & (dropping | (has_room & (~is_last | has_patch_room))))
        m.d.comb += self.payload.ready.eq(advance & consume)
        m.d.comb += take.eq(n1_valid & (~active | (advance & is_last)))

        # Output beat h + j (h = hdr_len // B) holds the tail of payload beat j - 1 ("prev")
        # below lane s = hdr_len % B and the head of payload beat j from lane s on. Only the
        # rotations that the possible header lengths need are built.
        both = Cat(prev, self.payload.payload.data)
        aligned = _one_of((rot[k], both[8 * (nbytes - s):8 * (2 * nbytes - s)])
                          for k, s in enumerate(rotations))
        pay_lanes = start[:nbytes] & end_mask
        beat_data = hsr[:self.width] | (aligned & Cat(*[lane.replicate(8) for lane in pay_lanes]))

        # --- s1: the built beat, registered ------------------------------------------------------
        s1_valid, s1_last, s1_first = Signal(), Signal(), Signal()
        s1_data = Signal(self.width)
        s1_keep = Signal(nbytes)
        s1_ip, s1_tcp = Signal(nwords), Signal(nwords)
        s1_src, s1_dst, s1_len6 = Signal(17), Signal(17), Signal(17)
        m.d.sync += [
            s1_valid.eq(advance & ~dropping),
            s1_last.eq(is_last),
            s1_first.eq(first),
            s1_data.eq(beat_data),
            s1_keep.eq(Mux(is_last, last_keep, ones)),
            s1_ip.eq(ip_lanes[:nwords]),
            s1_tcp.eq(tcp_lanes[:nwords]),
            s1_src.eq(Mux(first, src_sum, 0)),
            s1_dst.eq(Mux(first, dst_sum, 0)),
            s1_len6.eq(Mux(first, tcp_len6, 0)),
        ]
        m.d.comb += [
            buffer.i.valid.eq(s1_valid),
            buffer.i.payload.eq(struct_value(packet_layout(self.width),
                                             {"data": s1_data, "keep": s1_keep, "last": s1_last})),
        ]

        # --- Credits -------------------------------------------------------------------------------
        # A place is given back one cycle after its beat has left (registered, so that
        # the output handshake does not reach the credit adders).
        sent = advance & ~dropping
        out_beat, out_last = Signal(), Signal()
        m.d.sync += [out_beat.eq(buffer.o.valid & buffer.o.ready),
                     out_last.eq(buffer.o.valid & buffer.o.ready & buffer.o.payload.last)]
        room_next = room - sent + out_beat
        patch_room_next = patch_room - (sent & is_last) + out_last
        m.d.sync += [room.eq(room_next), has_room.eq(room_next != 0),
                     patch_room.eq(patch_room_next), has_patch_room.eq(patch_room_next != 0)]

        # --- Checksums: a never-stalling pipeline behind s1 ---------------------------------------
        # Words below L4_OFFSET are IPv4 header words, the rest TCP segment words; zero
        # padding adds nothing, and both checksum fields are still 0. The first beat also
        # carries the pseudo-header.
        pipe = Pipeline(m, "csum", valid=s1_valid)
        pipe.inject("last", s1_last, 0)
        words = beat_words(s1_data)
        ip_at, ip_name = adder_tree(pipe, "ip", [Mux(s1_ip[j], w, 0) for j, w in enumerate(words)],
                                    at=0, width=24)
        tcp_at, tcp_name = adder_tree(
            pipe, "tcp", [Mux(s1_tcp[j], w, 0) for j, w in enumerate(words)]
            + [s1_src, s1_dst, s1_len6], at=0, width=24)
        acc_at = max(ip_at, tcp_at)
        assert acc_at + 3 == self.checksum_stages
        acc_valid, acc_last = pipe.valid(acc_at), pipe.get("last", acc_at)
        for name, beat_sum in (("ip", pipe.get(ip_name, acc_at)), ("tcp", pipe.get(tcp_name, acc_at))):
            acc = Signal(32, name=f"{name}_acc")
            total = acc + beat_sum
            with m.If(acc_valid):
                m.d.sync += acc.eq(Mux(acc_last, 0, total))
            folded = pipe.define(f"{name}_total", total[:32], acc_at)
            half = pipe.define(f"{name}_half", folded[:16] + folded[16:32], acc_at + 1)
            pipe.define(f"{name}_value", ~(half[:16] + half[16])[:16], acc_at + 2)
        done = acc_at + 3
        m.d.comb += [
            buffer.patch.valid.eq(pipe.valid(done) & pipe.get("last", done)),
            buffer.patch.payload.eq(struct_value(PATCH, {
                "ip": {"enable": 1, "offset": L3_OFFSET + IPV4.checksum.byte_offset,
                       "value": pipe.get("ip_value", done)},
                "tcp": {"enable": 1, "offset": L4_OFFSET + TCP.checksum.byte_offset,
                        "value": pipe.get("tcp_value", done)},
            })),
        ]

        # --- Advance to the next beat ---------------------------------------------------------------
        with m.If(advance):
            m.d.sync += [
                hsr.eq(hsr[self.width:]),
                start.eq(Cat(start[nbytes:], Const(ones, nbytes))),
                ip_lanes.eq(ip_lanes[nwords:]),
                tcp_lanes.eq(Cat(tcp_lanes[nwords:], Const((1 << nwords) - 1, nwords))),
                head_left.eq(head_left - (head_left != 0)),
                pay_left.eq(pay_left - consume),
                consume.eq((head_left <= 1) & Mux(consume, pay_left >= 2, pay_left != 0)),
                end_left.eq(end_left - (end_left != 0)),
                end_mask.eq(Mux(end_left == 1, tail_mask, Mux(end_left == 0, 0, ones))),
                last_left.eq(last_left - 1),
                is_last.eq(last_left == 1),
                first.eq(0),
            ]
            with m.If(is_last):
                m.d.sync += active.eq(0)
            with m.If(dropping & is_last):
                m.d.sync += self.oversize_drops.eq(self.oversize_drops + 1)
            with m.If(consume):
                expected_last = pay_left == 1
                wrong_last = self.payload.payload.last != expected_last
                m.d.sync += prev.eq(self.payload.payload.data)
                with m.If(expected_last):
                    m.d.sync += mismatch_seen.eq(0)
                    with m.If(mismatch_seen | wrong_last):
                        m.d.sync += self.payload_mismatch.eq(self.payload_mismatch + 1)
                with m.Elif(wrong_last):
                    m.d.sync += mismatch_seen.eq(1)

        # --- Take the next frame (in the same cycle as the current frame's last beat) ---------
        with m.If(take):
            m.d.sync += [
                active.eq(1),
                first.eq(1),
                hsr.eq(n1["image"]),
                start.eq(n1["start"]),
                ip_lanes.eq(ip_words),
                tcp_lanes.eq(tcp_words),
                rot.eq(n1["rotation"]),
                head_left.eq(n1["head_beats"]),
                pay_left.eq(n1["pay_beats"]),
                consume.eq((n1["head_beats"] == 0) & (n1["pay_beats"] != 0)),
                end_left.eq(n1["end_beat"]),
                end_mask.eq(Mux(n1["end_beat"] == 0, n1["tail_mask"], ones)),
                tail_mask.eq(n1["tail_mask"]),
                last_left.eq(n1["last_beat"]),
                is_last.eq(n1["last_beat"] == 0),
                last_keep.eq(n1["last_keep"]),
                dropping.eq(n1["dropping"]),
                src_sum.eq(n1["src_sum"]),
                dst_sum.eq(n1["dst_sum"]),
                tcp_len6.eq(n1["tcp_len6"]),
            ]
        return m
