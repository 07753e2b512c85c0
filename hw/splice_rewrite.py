"""Splice rewriter: rewrites the headers of a spliced flow's frames at line rate.

``SpliceRewriter(width)`` takes the frames of spliced flows on ``i`` and, for each frame,
one ``REWRITE`` descriptor on ``desc`` (in frame order; the splice engine makes it from
the flow's splice state and the frame's parser record), and sends the rewritten frame
on ``o``. The frame's length, payload and every byte not named below are unchanged.

Frames it is given must be Ethernet II + IPv4 with IHL 5 (no VLAN tag, no IP options):
the IPv4 header is at byte 14, TCP at byte 34, TCP options at bytes 54..93. (The splice
engine sends any other frame to the host.) Any frame is still handled without harm:
bytes are rewritten only where the frame has them, and a frame shorter than a field
simply ends before it.

What is rewritten, with ``d`` the frame's descriptor (all arithmetic modulo 2^32 or
2^16, fields big-endian as on the wire):

===================  ===================================================================
Ethernet dst, src    ``d.eth.dst``, ``d.eth.src``
IPv4 TTL             ``d.ip.ttl``; when that is 0: the frame's TTL - 1 (0 stays 0)
IPv4 src, dst        ``d.ip.src``, ``d.ip.dst``; the IPv4 identification is kept
TCP sport, dport     ``d.tcp.sport``, ``d.tcp.dport``
TCP seq, ack         ``seq + d.seq_delta``, ``ack + d.ack_delta``
TCP window           ``min(0xFFFF, (window << d.window_left) >> d.window_right)``
TSval, TSecr         ``+ d.tsval_delta``, ``+ d.tsecr_delta``: the 8 bytes at frame offset
                     ``d.ts_offset`` (TSval, then TSecr), when 54 <= ``ts_offset`` <= 86
SACK block edges     ``+ d.ack_delta`` (they are acknowledgment numbers): the
                     ``2 * d.sack_blocks`` 32-bit words from frame offset
                     ``d.sack_offset``, when 1 <= ``sack_blocks`` <= 4, ``sack_offset``
                     >= 54 and ``sack_offset + 8 * sack_blocks`` <= 94
IPv4 checksum        RFC 1624 eqn. 3 over the IPv4 header's words (bytes 14..33, without
                     the checksum word): ``~(~HC + sum ~m + sum m')``
TCP checksum         the same over the pseudo-header's addresses (bytes 26..33) and the
                     TCP header area (bytes 34..93, without the checksum word)
===================  ===================================================================

The timestamp and SACK positions may have any alignment (options can start at any
byte); when both ranges overlap (a descriptor that no parser makes), the SACK bytes
win. A range that is out of bounds is not rewritten at all. The checksums are updated,
never recomputed: a frame whose checksum was wrong leaves with a checksum wrong by the
same amount, and a correct one leaves correct (0x0000, not 0xFFFF, where a full
computation gives 0x0000). The sums cover bytes 34..93 whatever the frame's TCP header
length; bytes that do not change cancel out. Bytes past the end of a short frame count
as zero (the model does the same), and payload bytes are never read twice: only the
first 94 bytes of a frame are summed.

How it works: each frame streams into a beat FIFO while its first 94 bytes are also
captured; when they are in (or the frame has ended), the header and the descriptor go
into a fixed-latency pipeline that never stalls (``HEADER_STAGES`` stages: new fixed
fields and the realigned option words, 32-bit adds on them, write-back, adder trees for
the checksum updates), whose result waits in a small FIFO of rewritten headers. A frame
leaves once its header is ready, the header beats taken from the rewritten header and
the rest straight from the beat FIFO: store-and-forward for the header, cut-through for
the payload. The capture of the next frame's header overlaps the previous frame.

Latency: first beat accepted -> first beat out = (the index of the beat that completes
the capture: ceil(94 / (W/8)) - 1, or the frame's last beat when it is shorter) +
``HEADER_STAGES`` + 2 cycles: 19 to 23 at W=64, 12 to 13 at W=512 (measured by
``tb/test_splice_rewrite.py``'s bench). Throughput: one beat per cycle, frames back to
back, for every frame size (a frame per cycle at W=512 for minimum frames) while
``desc`` keeps up and ``o`` is ready.

Note: the TCP checksum update covers bytes 34..93 whatever the header length, so a
descriptor that points the timestamp or SACK range at padding or payload bytes rewrites
them and leaves a checksum that no longer matches; the parser never gives such positions.

Ports
  i     In(packet stream)          frames of spliced flows
  desc  In(stream of REWRITE)      one per frame, in frame order; taken with the beat
                                   that completes the frame's header capture
  o     Out(packet stream)         the rewritten frames
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from hw.headers import ETHERNET, IPV4, TCP, ETH_LEN, IPV4_MIN_LEN, TCP_MIN_LEN, TCP_MAX_LEN
from hw.pipeline import Pipeline
from hw.stream import beat_bytes, packet_layout, packet_signature

__all__ = ["REWRITE", "SpliceRewriter", "L3", "L4", "OPT", "HEADER_BYTES"]

L3 = ETH_LEN                          # 14: the IPv4 header (no VLAN tag)
L4 = L3 + IPV4_MIN_LEN                # 34: the TCP header (IHL 5)
OPT = L4 + TCP_MIN_LEN                # 54: the TCP options
HEADER_BYTES = L4 + TCP_MAX_LEN       # 94: the bytes the rewriter may change
OPT_BYTES = HEADER_BYTES - OPT        # 40
OPT_WORDS = OPT_BYTES // 4            # 10 32-bit words once realigned

#: One frame's rewrite, as the splice engine computes it (see the module docstring).
REWRITE = data.StructLayout({
    "eth": data.StructLayout({"dst": 48, "src": 48}),
    "ip": data.StructLayout({"src": 32, "dst": 32, "ttl": 8}),
    "tcp": data.StructLayout({"sport": 16, "dport": 16}),
    "seq_delta": 32,
    "ack_delta": 32,                  # also added to SACK block edges
    "tsval_delta": 32,
    "tsecr_delta": 32,
    "window_left": 4,                 # window out = min(0xFFFF, (window << left) >> right)
    "window_right": 4,
    "ts_offset": 8,                   # frame offset of TSval; out of 54..86: no rewrite
    "sack_offset": 8,                 # frame offset of the first SACK block's left edge
    "sack_blocks": 3,                 # 0..4; 0: no SACK rewrite
})


def _byte(value, i):
    return value[8 * i:8 * i + 8]


def _field_bytes(field, value):
    """{header byte index: 8-bit value} of a whole-byte field set to ``value``."""
    first, count = field.byte_span
    assert field.bit_offset % 8 == 0 and field.width == 8 * count, field.name
    return {first + k: value[8 * (count - 1 - k):8 * (count - k)] for k in range(count)}


def _word(byte_list, i):
    """The big-endian 16-bit word made of bytes ``2i`` and ``2i + 1`` of ``byte_list``."""
    return Cat(byte_list[2 * i + 1], byte_list[2 * i])


def _sum_stages(p, name, terms, at, width=24):
    """Sum ``terms`` (readable at stage ``at``), four per adder, one level per stage.
    Returns (the stage at which the sum is readable, its name)."""
    names = []
    for k, term in enumerate(terms):
        names.append(f"{name}_l0_{k}")
        p.inject(names[-1], term, at)
    level, stage = 0, at
    while len(names) > 1:
        level += 1
        grouped = []
        for k in range(0, len(names), 4):
            parts = [p.get(n, stage) for n in names[k:k + 4]]
            total = parts[0]
            for part in parts[1:]:
                total = total + part
            grouped.append(f"{name}_l{level}_{k // 4}")
            p.define(grouped[-1], total[:width], stage)
        names = grouped
        stage += 1
    return stage, names[0]


class SpliceRewriter(wiring.Component):
    #: Cycles from a complete header capture to its rewritten header in the header FIFO.
    HEADER_STAGES = 10

    def __init__(self, width=64):
        self.width = width
        nb = beat_bytes(width)
        self.capture_beats = -(-HEADER_BYTES // nb)
        # Headers between capture and output: enough for a frame per cycle.
        self.header_depth = 1 << (self.HEADER_STAGES + 4).bit_length()
        self.beat_depth = 1 << (self.capture_beats + self.header_depth + 4).bit_length()
        super().__init__({
            "i": In(packet_signature(width)),
            "desc": In(stream.Signature(REWRITE)),
            "o": Out(packet_signature(width)),
        })

    def elaborate(self, platform):
        m = Module()
        nb = beat_bytes(self.width)
        cap_beats = self.capture_beats
        layout = packet_layout(self.width)
        hdr_bits = 8 * HEADER_BYTES

        m.submodules.beats = beats = SyncFIFOBuffered(width=layout.size, depth=self.beat_depth)
        m.submodules.headers = headers = SyncFIFOBuffered(width=hdr_bits, depth=self.header_depth)
        # The beats' `last` bits again, in a FIFO of their own that moves in step with
        # `beats` (same writes and reads): a narrow memory in LUT RAM, whose output is a
        # flip-flop, where `beats`' is a block RAM's output. The output's pops (the header
        # FIFO's read, the beat slot) then start at a register.
        m.submodules.lasts = lasts = SyncFIFOBuffered(width=1, depth=self.beat_depth)

        # ------------------------------------------------------------ input and capture
        beat = self.i.payload
        slot = Signal(cap_beats + 1, init=1)      # one-hot beat index; the top bit: past it
        capturing = ~slot[cap_beats]
        completes = capturing & (slot[cap_beats - 1] | beat.last)
        in_flight = Signal(range(self.header_depth + 1))   # headers captured, not yet sent
        credit = in_flight < self.header_depth
        can_take = beats.w_rdy & (~completes | (self.desc.valid & credit))
        accept = self.i.valid & can_take
        start = accept & completes
        m.d.comb += [
            self.i.ready.eq(can_take),
            beats.w_en.eq(accept),
            beats.w_data.eq(beat.as_value()),
            lasts.w_en.eq(accept),
            lasts.w_data.eq(beat.last),
            self.desc.ready.eq(self.i.valid & beats.w_rdy & completes & credit),
        ]
        with m.If(accept):
            m.d.sync += slot.eq(Mux(beat.last, 1, Mux(slot[cap_beats], slot, slot << 1)))

        # The capture: beat b of a frame into part b of `cap`, loaded whenever beat b is
        # offered (the last load before the slot moves on is the beat taken), so that
        # neither `accept` nor `slot[0]` drives the 752 capture bits; `captured` marks the
        # parts taken from this frame (the rest read as zero).
        kept = Cat(*[Mux(beat.keep[k], _byte(beat.data, k), 0) for k in range(nb)])
        cap = Signal(8 * nb * cap_beats)
        captured = Signal(cap_beats)
        header_now = Signal(8 * nb * cap_beats)   # the capture with this beat in it
        for b in range(cap_beats):
            part = slice(8 * nb * b, 8 * nb * (b + 1))
            m.d.comb += header_now[part].eq(Mux(slot[b], kept, Mux(captured[b], cap[part], 0)))
            with m.If(self.i.valid & slot[b]):
                m.d.sync += cap[part].eq(kept)
        with m.If(accept):
            m.d.sync += captured.eq(Mux(beat.last, 0, captured | slot[:cap_beats]))

        # ------------------------------------------------------------ header pipeline
        p = Pipeline(m, "rewrite", valid=start)
        p.define("h", header_now[:hdr_bits], 0)
        p.define("d", self.desc.payload.as_value(), 0)

        # Stage 1: fixed fields; realigned option words for the timestamp and SACK adds.
        h = p.get("h", 1)
        d = REWRITE(p.get("d", 1))
        old = [_byte(h, i) for i in range(HEADER_BYTES)]
        new = list(old)

        def field(header, base, name):
            return getattr(header, name).extract(lambda i: old[base + i])

        def put(header, base, name, value):
            for i, byte in _field_bytes(getattr(header, name), value).items():
                new[base + i] = byte

        ttl = field(IPV4, L3, "ttl")
        # The window takes two stages (two variable shifts in one would be the slowest
        # path): shifted left here, right and saturated in stage 2.
        p.define("window_left", field(TCP, L4, "window") << d.window_left, 1)
        put(ETHERNET, 0, "dst", d.eth.dst)
        put(ETHERNET, 0, "src", d.eth.src)
        put(IPV4, L3, "ttl", Mux(d.ip.ttl != 0, d.ip.ttl, Mux(ttl != 0, ttl - 1, 0)[:8]))
        put(IPV4, L3, "src", d.ip.src)
        put(IPV4, L3, "dst", d.ip.dst)
        put(TCP, L4, "sport", d.tcp.sport)
        put(TCP, L4, "dport", d.tcp.dport)
        put(TCP, L4, "seq", (field(TCP, L4, "seq") + d.seq_delta)[:32])
        put(TCP, L4, "ack", (field(TCP, L4, "ack") + d.ack_delta)[:32])
        p.define("fixed", Cat(*new[:OPT]), 1)

        options = old[OPT:]

        def realign(offset):
            """The option bytes from ``offset``'s 4-byte alignment on, zero-filled, so that
            the field at ``offset`` starts a word: (bytes, alignment, word index)."""
            rel = (offset - OPT)[:6]
            align = rel[:2]
            shifted = [Mux(align == 0, options[k],
                       Mux(align == 1, options[k + 1] if k + 1 < OPT_BYTES else 0,
                       Mux(align == 2, options[k + 2] if k + 2 < OPT_BYTES else 0,
                           options[k + 3] if k + 3 < OPT_BYTES else 0)))
                       for k in range(OPT_BYTES)]
            return Cat(*shifted), align, rel[2:]

        ts_ok = (d.ts_offset >= OPT) & (d.ts_offset <= HEADER_BYTES - 8)
        ts_bytes, ts_align, ts_word = realign(d.ts_offset)
        sack_ok = ((d.sack_blocks >= 1) & (d.sack_blocks <= 4) & (d.sack_offset >= OPT)
                   & (d.sack_offset + 8 * d.sack_blocks <= HEADER_BYTES))
        sack_bytes, sack_align, sack_word = realign(d.sack_offset)
        for name, value in [("ts_bytes", ts_bytes), ("ts_align", ts_align), ("ts_word", ts_word),
                            ("ts_ok", ts_ok), ("sack_bytes", sack_bytes),
                            ("sack_align", sack_align), ("sack_word", sack_word),
                            ("sack_ok", sack_ok), ("sack_words", 2 * d.sack_blocks),
                            ("options", Cat(*options))]:
            p.define(name, value, 1)

        # Stage 2: the 32-bit adds, with a mask of the words that change.
        def word_of(byte_value, i):           # big-endian word i of a realigned byte string
            return Cat(*[_byte(byte_value, 4 * i + 3 - k) for k in range(4)])

        def bytes_of_word(value):             # its 4 bytes, first on the wire first
            return [value[8 * (3 - k):8 * (4 - k)] for k in range(4)]

        dl = REWRITE(p.get("d", 2))
        tsb, tsw, ts_on = p.get("ts_bytes", 2), p.get("ts_word", 2), p.get("ts_ok", 2)
        skb, skw, sk_on = p.get("sack_bytes", 2), p.get("sack_word", 2), p.get("sack_ok", 2)
        sk_n = p.get("sack_words", 2)
        ts_new, ts_mask, sk_new, sk_mask = [], [], [], []
        for i in range(OPT_WORDS):
            is_val, is_ecr = tsw == i, tsw + 1 == i
            ts_new.append((word_of(tsb, i) + Mux(is_val, dl.tsval_delta,
                                                 Mux(is_ecr, dl.tsecr_delta, 0)))[:32])
            ts_mask.append(ts_on & (is_val | is_ecr))
            sk_new.append((word_of(skb, i) + dl.ack_delta)[:32])
            sk_mask.append(sk_on & (i >= skw) & (i < skw + sk_n))
        scaled = p.get("window_left", 2) >> dl.window_right
        p.define("window", Mux(scaled[16:].any(), 0xFFFF, scaled[:16]), 2)
        p.define("ts_new", Cat(*ts_new), 2)
        p.define("ts_mask", Cat(*ts_mask), 2)
        p.define("sack_new", Cat(*sk_new), 2)
        p.define("sack_mask", Cat(*sk_mask), 2)

        # Stage 3: write the changed words back at their own alignment.
        def write_back(prefix):
            words = p.get(f"{prefix}_new", 3)
            mask = p.get(f"{prefix}_mask", 3)
            align = p.get(f"{prefix}_align", 3)
            flat = [b for i in range(OPT_WORDS) for b in bytes_of_word(words[32 * i:32 * i + 32])]
            out = []
            for j in range(OPT_BYTES):
                hit, value = Const(0, 1), Const(0, 8)
                for a in range(4):
                    if j >= a:
                        k = j - a
                        here = (align == a) & mask[k // 4]
                        hit = hit | here
                        value = value | Mux(here, flat[k], 0)
                out.append((hit, value))
            return out

        original = p.get("options", 3)
        ts_out, sk_out = write_back("ts"), write_back("sack")
        rewritten = []
        for j in range(OPT_BYTES):
            (ts_hit, ts_val), (sk_hit, sk_val) = ts_out[j], sk_out[j]
            rewritten.append(Mux(sk_hit, sk_val, Mux(ts_hit, ts_val, _byte(original, j))))
        p.define("opt_new", Cat(*rewritten), 3)

        # Checksum updates: the old words' complements summed from stage 1, the new
        # words' sums from stage 4, then ~(~HC + both) folded.
        ip_words = [i for i in range(L3 // 2, L4 // 2) if 2 * i != L3 + IPV4.checksum.byte_offset]
        tcp_csum = L4 + TCP.checksum.byte_offset
        tcp_words = ([i for i in range((L3 + IPV4.src.byte_offset) // 2, L4 // 2)]
                     + [i for i in range(L4 // 2, HEADER_BYTES // 2) if 2 * i != tcp_csum])
        old_ip_csum = IPV4.checksum.extract(lambda i: old[L3 + i])
        old_tcp_csum = TCP.checksum.extract(lambda i: old[L4 + i])
        old_ip_at, old_ip = _sum_stages(
            p, "old_ip", [~old_ip_csum] + [~_word(old, i) for i in ip_words], 1)
        old_tcp_at, old_tcp = _sum_stages(
            p, "old_tcp", [~old_tcp_csum] + [~_word(old, i) for i in tcp_words], 1)

        def rewritten(stage):
            """The new header bytes (checksums still the old ones), read at ``stage``."""
            out = [_byte(Cat(p.get("fixed", stage), p.get("opt_new", stage)), i)
                   for i in range(HEADER_BYTES)]
            for i, byte in _field_bytes(TCP.window, p.get("window", stage)).items():
                out[L4 + i] = byte
            return out

        new4 = rewritten(4)
        new_ip_at, new_ip = _sum_stages(p, "new_ip", [_word(new4, i) for i in ip_words], 4)
        new_tcp_at, new_tcp = _sum_stages(p, "new_tcp", [_word(new4, i) for i in tcp_words], 4)
        at = max(old_ip_at, old_tcp_at, new_ip_at, new_tcp_at)
        for name, old_name, new_name in (("ip", old_ip, new_ip), ("tcp", old_tcp, new_tcp)):
            p.define(f"{name}_total", p.get(old_name, at) + p.get(new_name, at), at)
            total = p.get(f"{name}_total", at + 1)
            p.define(f"{name}_fold1", total[:16] + total[16:], at + 1)
            once = p.get(f"{name}_fold1", at + 2)
            p.define(f"{name}_csum", ~(once[:16] + once[16:])[:16], at + 2)
        last = at + 3
        assert last == self.HEADER_STAGES, f"HEADER_STAGES should be {last}"

        out_bytes = rewritten(last)
        for header, base, name in ((IPV4, L3, "ip"), (TCP, L4, "tcp")):
            for i, byte in _field_bytes(header.checksum, p.get(f"{name}_csum", last)).items():
                out_bytes[base + i] = byte
        m.d.comb += [headers.w_data.eq(Cat(*out_bytes)), headers.w_en.eq(p.valid(last))]

        # ------------------------------------------------------------ output
        out_slot = Signal(cap_beats + 1, init=1)
        head = layout(beats.r_data)
        hdr = headers.r_data
        patched = Signal(self.width)
        data_out = head.data
        for b in range(cap_beats):
            lanes = []
            for k in range(nb):
                pos = b * nb + k
                lanes.append(_byte(hdr, pos) if pos < HEADER_BYTES else _byte(head.data, k))
            data_out = Mux(out_slot[b], Cat(*lanes), data_out)
        m.d.comb += patched.eq(data_out)
        go = beats.r_rdy & headers.r_rdy
        head_last = lasts.r_data            # == head.last
        m.d.comb += [
            self.o.valid.eq(go),
            self.o.payload.data.eq(patched),
            self.o.payload.keep.eq(head.keep),
            self.o.payload.last.eq(head.last),
            beats.r_en.eq(self.o.ready & headers.r_rdy),
            lasts.r_en.eq(self.o.ready & headers.r_rdy),
            headers.r_en.eq(self.o.ready & beats.r_rdy & head_last),
        ]
        sent = self.o.valid & self.o.ready
        with m.If(sent):
            m.d.sync += out_slot.eq(Mux(head_last, 1, Mux(out_slot[cap_beats], out_slot,
                                                          out_slot << 1)))
        done = sent & head_last
        m.d.sync += in_flight.eq(in_flight + start - done)
        return m
