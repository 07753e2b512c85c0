"""RX header parser: Ethernet (+802.1Q), IPv4, TCP and TCP options, checksums, at line rate.

``Parser(width, max_frame_bytes)`` watches a packet stream, passes it through unchanged
(combinationally: ``o`` is ``i``), and emits one ``PARSER_META`` record per frame on
``meta``, in frame order, after the frame's last beat.

How it works (details and figures in docs/packet_pipeline.md)
  * Capture: the first ``MAX_HEADER_BYTES`` (138) bytes of every frame are kept in a
    register as the beats go by (the first beat clears the rest); the bytes are counted.
  * Segment checksum: every beat is summed over the bytes of the TCP segment (TCP header
    to the end given by the IPv4 total length). The segment's offsets come from header
    bytes already captured, which always precede the bytes they govern, so the whole
    segment is summed as it streams, one beat per cycle. This path is its own small
    pipeline (offsets, byte masks, an adder tree, the accumulator).
  * Parse pipeline: after the last beat, a fixed-latency pipeline that never stalls
    (``hw.pipeline.Pipeline``) slices the captured bytes into Ethernet, IPv4 and TCP
    fields (with ``hw.headers``), sums the IPv4 header, and parses the TCP options in
    any order: for every option byte position it computes where the next option would
    start, then composes those "next" functions over windows of 2, 4, ..., 64 positions
    (a parallel prefix, one level per stage) to find the positions that start an
    option; the last well-formed option of each kind is selected (as Linux does).
  * Records enter a FIFO (``WideFIFO``: lanes with their own pointers); the input is
    held (``i.ready`` low) only when that FIFO could not take the records of the
    frames in flight.

Latency: ``LATENCY`` cycles from the cycle a frame's last beat is accepted to the cycle
its record is valid on ``meta`` (FIFO empty). Throughput: one beat per cycle for any
frame size, and one record per cycle for back-to-back one-beat frames, while ``o`` and
``meta`` are ready. Every stage is at most a few LUT levels deep, for 156.25 MHz at W=64
on an ECP5.

Ports
  i     In(packet stream)    frames from the MAC
  o     Out(packet stream)   the same frames, unchanged
  meta  Out(PARSER_META)     one record per frame (see ``hw.metadata`` and docs/)

Fields of headers a frame does not have are zero (e.g. ``tcp`` of a UDP frame); bytes
past the end of a short frame read as zero. ``sim.reference.parse_frame`` is the
bit-exact Python model.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .headers import (ETHERNET, VLAN, IPV4, TCP, EtherType, IpProto, TcpOption, TCP_OPTIONS,
                      ETH_LEN, VLAN_LEN, IPV4_MIN_LEN, IPV4_MAX_LEN, TCP_MAX_LEN,
                      TCP_OPTIONS_MAX_LEN, MAX_HEADER_BYTES, MIN_FRAME_BYTES, MAX_FRAME_BYTES)
from .metadata import FrameClass, PARSER_META
from .pipeline import Pipeline, adder_tree
from .stream import packet_signature, struct_value
from .wide_fifo import WideFIFO

__all__ = ["Parser"]

L3_BYTES = IPV4_MAX_LEN + TCP_MAX_LEN          # bytes kept from the start of the IPv4 header
OPT_BYTES = TCP_OPTIONS_MAX_LEN                # 40 option byte positions
SCAN_SPAN = 64                                 # positions covered by the composition tree
STOP = 63                                      # "no further option" (never a real position)
POS_BITS = 17                                  # frame byte positions (saturating)


def _bytes(sig, n):
    return [sig[8 * k:8 * k + 8] for k in range(n)]


def _word(hi, lo):
    return Cat(lo, hi)


def _at_least_5(ihl):
    return Mux(ihl < 5, 5, ihl)


def _select(values, index):
    """``values[index]`` for a short list of equal-width values."""
    out = values[0]
    for k in range(1, len(values)):
        out = Mux(index == k, values[k], out)
    return out


def _any(bits):
    out = Const(0)
    for b in bits:
        out = out | b
    return out


class Parser(wiring.Component):
    #: Pipeline registers between a frame's last beat and the write of its record.
    STAGES = 17

    def __init__(self, width=64, max_frame_bytes=MAX_FRAME_BYTES):
        self.width = width
        self.max_frame_bytes = max_frame_bytes
        super().__init__({
            "i": In(packet_signature(width)),
            "o": Out(packet_signature(width)),
            "meta": Out(stream.Signature(PARSER_META)),
        })

    @property
    def csum_stages(self):
        """Checksum stage holding a frame's segment sum (the adder tree grows with W)."""
        return 3 + (self.width // 16 - 1).bit_length()

    @property
    def latency(self):
        """Cycles from the acceptance of a frame's last beat to its record on ``meta``."""
        return self.STAGES + 4

    @property
    def record_fifo_depth(self):
        """Deep enough for every frame that can be in flight at line rate (minimum frames)."""
        beats = -(-MIN_FRAME_BYTES // (self.width // 8))
        in_flight = -(-(self.STAGES + 3) // beats) + 1
        return 1 << (in_flight + 5).bit_length()

    def elaborate(self, platform):
        m = Module()
        nb = self.width // 8
        cap_beats = -(-MAX_HEADER_BYTES // nb)
        cap_bytes = cap_beats * nb

        # ------------------------------------------------------------ record FIFO, pass-through
        depth = self.record_fifo_depth
        m.submodules.fifo = fifo = WideFIFO(width=PARSER_META.size, depth=depth)
        m.d.comb += [self.meta.valid.eq(fifo.r_rdy), self.meta.payload.eq(fifo.r_data),
                     fifo.r_en.eq(self.meta.ready)]
        # Registered, so it must leave space for a frame entering in this cycle too.
        room = Signal()
        in_flight = Signal(range(self.STAGES + 4))
        m.d.sync += room.eq(fifo.level + in_flight + 3 < depth)
        m.d.comb += [self.o.payload.eq(self.i.payload),
                     self.o.valid.eq(self.i.valid & room),
                     self.i.ready.eq(self.o.ready & room)]
        accept = Signal()
        m.d.comb += accept.eq(self.i.valid & self.i.ready)
        beat = self.i.payload

        # ------------------------------------------------------------ capture
        # The accepted beat is registered first ("d"), so that the wide capture register
        # below is written from flip-flops, not from the input handshake.
        beat_pos = Signal(POS_BITS)                   # frame byte offset of this beat
        length = Signal(16)                           # bytes so far (saturating)
        kept = Signal(range(nb + 1))
        m.d.comb += kept.eq(sum(beat.keep[k] for k in range(nb)))
        new_length = Signal(17)
        m.d.comb += new_length.eq(length + kept)
        saturated = Mux(new_length[16], 0xFFFF, new_length[:16])
        # Which capture slot this beat goes to, one-hot (the top bit: past the capture).
        slot = Signal(cap_beats + 1, init=1)
        d_valid, d_last = Signal(), Signal()
        d_data, d_pos, d_length = Signal(self.width), Signal(POS_BITS), Signal(16)
        d_slot = Signal(cap_beats + 1)
        m.d.sync += d_valid.eq(accept)
        with m.If(accept):
            m.d.sync += [d_last.eq(beat.last), d_pos.eq(beat_pos), d_length.eq(saturated),
                         d_slot.eq(slot),
                         d_data.eq(Cat(*[Mux(beat.keep[k], beat.data[8 * k:8 * k + 8], 0)
                                         for k in range(nb)]))]
            with m.If(beat.last):
                m.d.sync += [beat_pos.eq(0), length.eq(0), slot.eq(1)]
            with m.Else():
                m.d.sync += [beat_pos.eq(Mux(beat_pos >= (1 << POS_BITS) - nb, beat_pos, beat_pos + nb)),
                             length.eq(saturated),
                             slot.eq(Mux(slot[cap_beats], slot, slot << 1))]
        hdr = Signal(8 * cap_bytes)
        with m.If(d_valid):
            for b in range(cap_beats):
                with m.If(d_slot[b]):
                    m.d.sync += hdr[8 * nb * b:8 * nb * (b + 1)].eq(d_data)
                with m.Elif(d_slot[0]):                     # a new frame clears the rest
                    m.d.sync += hdr[8 * nb * b:8 * nb * (b + 1)].eq(0)

        # The beat again, one cycle later: "stage 0" of both pipelines below. In that
        # cycle `hdr` holds the frame's bytes up to and including this beat.
        e_valid, e_last = Signal(), Signal()
        e_data, e_pos, e_length = Signal(self.width), Signal(POS_BITS), Signal(16)
        m.d.sync += [e_valid.eq(d_valid), e_last.eq(d_last), e_data.eq(d_data), e_pos.eq(d_pos),
                     e_length.eq(d_length)]

        # ------------------------------------------------------------ segment checksum
        # Stage 0: segment offsets from the header bytes captured so far.
        hb = _bytes(hdr, cap_bytes)
        outer = ETHERNET.ethertype.extract(lambda k: hb[k])
        vlan_now = Signal()
        m.d.comb += vlan_now.eq(outer == EtherType.VLAN)

        cs = Pipeline(m, "csum", e_valid)
        cs.define("last", e_last, 0)
        cs.define("data", e_data, 0)
        cs.define("pos", e_pos, 0)
        # Both candidate IPv4 headers (with and without a VLAN tag) are registered as they
        # are, so that the EtherType compare and the additions below are in separate cycles.
        cs.define("vlan", vlan_now, 0)
        for tag, at in (("plain", ETH_LEN), ("vlan", ETH_LEN + VLAN_LEN)):
            cs.define(f"ihl_{tag}", IPV4.ihl.extract(lambda k: hb[at + k]), 0)
            cs.define(f"total_length_{tag}", IPV4.total_length.extract(lambda k: hb[at + k]), 0)
        # Stage 1: the segment's byte range [start, end) in the frame.
        def offsets(tag, l3):
            return (l3 + 4 * _at_least_5(cs.get(f"ihl_{tag}", 1)),
                    l3 + cs.get(f"total_length_{tag}", 1))
        plain, tagged = offsets("plain", ETH_LEN), offsets("vlan", ETH_LEN + VLAN_LEN)
        vlan_1 = cs.get("vlan", 1)
        cs.define("start", Mux(vlan_1, tagged[0], plain[0]), 1)
        cs.define("end", Mux(vlan_1, tagged[1], plain[1]), 1)
        # Stage 2: keep the bytes inside [start, end); positions are beat-aligned, so
        # pos + i is pos | i.
        pos, start, end = cs.get("pos", 2), cs.get("start", 2), cs.get("end", 2)
        db = _bytes(cs.get("data", 2), nb)
        inside = [(start <= (pos | i)) & ((pos | i) < end) for i in range(nb)]
        words = [_word(Mux(inside[2 * w], db[2 * w], 0), Mux(inside[2 * w + 1], db[2 * w + 1], 0))
                 for w in range(nb // 2)]
        sum_width = 16 + (nb // 2).bit_length()
        sum_stage, sum_name = adder_tree(cs, "beat_sum", words, at=2, width=sum_width)
        acc_stage = sum_stage
        beat_sum = cs.get(sum_name, acc_stage)
        acc = Signal(32)
        total = Signal(32)
        m.d.comb += total.eq(acc + beat_sum)
        with m.If(cs.valid(acc_stage)):
            m.d.sync += acc.eq(Mux(cs.get("last", acc_stage), 0, total))
        seg_total = Signal(32)                     # valid at stage acc_stage + 1
        m.d.sync += seg_total.eq(total)
        assert acc_stage + 1 == self.csum_stages, (acc_stage, self.csum_stages)

        # ------------------------------------------------------------ parse pipeline
        p = Pipeline(m, "parse", e_valid & e_last)
        p.define("hdr", hdr[:8 * MAX_HEADER_BYTES], 0)
        p.define("vlan", vlan_now, 0)
        p.define("length", e_length, 0)
        p.inject("seg_total", seg_total, self.csum_stages)

        # Stage 1 -> 2: Ethernet, VLAN, the IPv4 header and what follows it.
        b1 = _bytes(p.get("hdr", 1), MAX_HEADER_BYTES)
        vlan = p.get("vlan", 1)
        flen = p.get("length", 1)
        p.define("eth_dst", ETHERNET.dst.extract(lambda k: b1[k]), 1)
        p.define("eth_src", ETHERNET.src.extract(lambda k: b1[k]), 1)
        ethertype = Mux(vlan, VLAN.ethertype.extract(lambda k: b1[ETH_LEN + k]),
                        ETHERNET.ethertype.extract(lambda k: b1[k]))
        p.define("ethertype", ethertype, 1)
        p.define("vlan_pcp", Mux(vlan, VLAN.pcp.extract(lambda k: b1[ETH_LEN + k]), 0), 1)
        p.define("vlan_vid", Mux(vlan, VLAN.vid.extract(lambda k: b1[ETH_LEN + k]), 0), 1)
        p.define("l3", Mux(vlan, Cat(*b1[ETH_LEN + VLAN_LEN:ETH_LEN + VLAN_LEN + L3_BYTES]),
                           Cat(*b1[ETH_LEN:ETH_LEN + L3_BYTES])), 1)
        p.define("l3_offset", Mux(vlan, ETH_LEN + VLAN_LEN, ETH_LEN), 1)
        p.define("eth_short", flen < ETH_LEN, 1)
        p.define("vlan_short", vlan & (flen < ETH_LEN + VLAN_LEN), 1)
        p.define("oversize", flen > self.max_frame_bytes, 1)

        # Stage 2 -> 3: IPv4 fields, the TCP header, first sums, classification inputs.
        l3b = _bytes(p.get("l3", 2), L3_BYTES)
        ip = {f.name: f.extract(lambda k: l3b[k]) for f in IPV4}
        for name in PARSER_META["ip"].shape.members:
            p.define(f"ip_{name}", ip[name], 2)
        et = p.get("ethertype", 2)
        p.define("is_ipv4", (et == EtherType.IPV4) & ~p.get("eth_short", 2), 2)
        p.define("is_arp", et == EtherType.ARP, 2)
        p.define("is_ipv6", et == EtherType.IPV6, 2)
        p.define("version_bad", IPV4.version.extract(lambda k: l3b[k]) != 4, 2)
        p.define("fragment", ip["mf"] | (ip["frag_offset"] != 0), 2)
        p.define("proto_tcp", ip["protocol"] == IpProto.TCP, 2)
        p.define("proto_udp", ip["protocol"] == IpProto.UDP, 2)
        # The TCP header starts 4*IHL bytes in (at 20 when IHL is below 5: flagged
        # bad_ihl). The shift is done in two steps, 16 then 4 bytes at a time.
        ihl_eff = _at_least_5(ip["ihl"])
        coarse = Signal(8 * (TCP_MAX_LEN + 12))
        with m.Switch(ihl_eff[2:4]):
            for n in range(4):
                with m.Case(n):
                    m.d.comb += coarse.eq(Cat(*l3b[16 * n:16 * n + TCP_MAX_LEN + 12]))
        p.define("l4_coarse", coarse, 2)
        p.define("l4_fine", ihl_eff[:2], 2)
        cb = _bytes(p.get("l4_coarse", 3), TCP_MAX_LEN + 12)
        fine = Signal(8 * TCP_MAX_LEN)
        with m.Switch(p.get("l4_fine", 3)):
            for n in range(4):
                with m.Case(n):
                    m.d.comb += fine.eq(Cat(*cb[4 * n:4 * n + TCP_MAX_LEN]))
        p.define("l4", fine, 3)
        l3_offset = p.get("l3_offset", 2)
        p.define("l4_offset", l3_offset + 4 * ihl_eff, 2)
        p.define("ip_end", l3_offset + ip["total_length"], 2)
        p.define("ip_hdr_end", l3_offset + 4 * ip["ihl"], 2)
        p.define("seg_len", (ip["total_length"] - 4 * ihl_eff)[:17], 2)
        p.define("bad_ihl", (ip["ihl"] < 5) | (4 * ip["ihl"] > ip["total_length"]), 2)
        ip_words = [Mux(ip["ihl"] > (w // 2), _word(l3b[2 * w], l3b[2 * w + 1]), 0)
                    for w in range(IPV4_MAX_LEN // 2)]
        ip_sum_stage, ip_sum_name = adder_tree(p, "ip_words", ip_words, at=2, width=21)
        # Pseudo-header: addresses and protocol now, the TCP length (seg_len) once registered.
        pseudo = [ip["src"][16:], ip["src"][:16], ip["dst"][16:], ip["dst"][:16], ip["protocol"]]
        pseudo_stage, pseudo_part = adder_tree(p, "pseudo", pseudo, at=2, width=19)
        p.define("pseudo", p.get(pseudo_part, pseudo_stage) + p.get("seg_len", pseudo_stage)[:16],
                 pseudo_stage)
        pseudo_stage, pseudo_name = pseudo_stage + 1, "pseudo"

        # Stage T -> T+1: TCP fields, per-position option decode, length and class checks.
        T = 4
        l4b = _bytes(p.get("l4", T), TCP_MAX_LEN)
        tcp = {f.name: f.extract(lambda k: l4b[k]) for f in TCP}
        for name in PARSER_META["tcp"].shape.members:
            p.define(f"tcp_{name}", tcp[name], T)
        doff = tcp["data_offset"]
        opt = l4b[TCP.size:] + [Const(0, 8)] * (SCAN_SPAN - OPT_BYTES + 2)
        p.define("opt", Cat(*opt[:OPT_BYTES + 10]), T)
        # Per position: small predicates first (stage T), combined in stage T + 1.
        # The area is 4*doff - 20 bytes long; an option at `pos` with length byte `olen`
        # fits when olen <= 4*doff - 20 - pos, a threshold that depends on doff alone.
        for pos in range(OPT_BYTES):
            kind, olen = opt[pos], opt[pos + 1]
            p.define(f"opt_inside_{pos}", doff > (pos + 20) // 4, T)
            p.define(f"opt_len_inside_{pos}", doff > (pos + 21) // 4, T)
            p.define(f"opt_room_{pos}", Mux(doff > (pos + 20) // 4, 4 * doff - 20 - pos, 0)[:6], T)
            p.define(f"opt_short_{pos}", olen < 2, T)
            p.define(f"opt_eol_{pos}", kind == TcpOption.EOL, T)
            p.define(f"opt_nop_{pos}", kind == TcpOption.NOP, T)
            p.define(f"opt_after_{pos}", (olen + pos)[:6], T)
            wrong_len = Const(0)
            for decl in TCP_OPTIONS.values():
                wrong_len = wrong_len | ((kind == decl.kind) & ~_any(olen == n for n in decl.length))
            p.define(f"opt_wrong_len_{pos}", wrong_len, T)
        opt4 = _bytes(p.get("opt", T + 1), OPT_BYTES + 10)
        for pos in range(OPT_BYTES):
            def q(name):
                return p.get(f"opt_{name}_{pos}", T + 1)
            fits = opt4[pos + 1] <= q("room")
            cut = ~q("len_inside") | q("short") | ~fits
            p.define(f"opt_ends_{pos}", ~q("inside") | q("eol") | (~q("nop") & cut), T + 1)
            p.define(f"opt_bad_{pos}", q("inside") & ~q("eol") & ~q("nop") & (cut | q("wrong_len")), T + 1)
        seg_len = p.get("seg_len", T)
        p.define("bad_doff", (doff < 5) | (4 * doff > seg_len) | seg_len[16], T)
        p.define("payload_offset", p.get("l4_offset", T) + 4 * doff, T)
        p.define("payload_length", Mux((4 * doff > seg_len) | seg_len[16], 0, seg_len - 4 * doff), T)
        flen = p.get("length", T)
        l3_offset = p.get("l3_offset", T)
        ip_end = p.get("ip_end", T)
        p.define("truncated_ip", (flen < l3_offset + IPV4_MIN_LEN) | (flen < p.get("ip_hdr_end", T))
                 | (flen < ip_end), T)
        p.define("length_mismatch", (flen > ip_end) & (flen > MIN_FRAME_BYTES), T)
        frame_class = Signal(FrameClass)
        with m.If(p.get("eth_short", T)):
            m.d.comb += frame_class.eq(FrameClass.OTHER)
        with m.Elif(p.get("is_arp", T)):
            m.d.comb += frame_class.eq(FrameClass.ARP)
        with m.Elif(p.get("is_ipv6", T)):
            m.d.comb += frame_class.eq(FrameClass.IPV6)
        with m.Elif(~p.get("is_ipv4", T)):
            m.d.comb += frame_class.eq(FrameClass.OTHER)
        with m.Elif(p.get("fragment", T)):
            m.d.comb += frame_class.eq(FrameClass.FRAGMENT)
        with m.Elif(p.get("proto_tcp", T)):
            m.d.comb += frame_class.eq(FrameClass.TCP)
        with m.Elif(p.get("proto_udp", T)):
            m.d.comb += frame_class.eq(FrameClass.UDP)
        with m.Else():
            m.d.comb += frame_class.eq(FrameClass.IPV4_OTHER)
        p.define("frame_class", frame_class, T)

        # Stage 4 -> 5: where the next option starts, for each position.
        for pos in range(SCAN_SPAN):
            if pos < OPT_BYTES:
                nxt = Mux(p.get(f"opt_ends_{pos}", T + 2), STOP,
                          Mux(p.get(f"opt_nop_{pos}", T + 2), pos + 1, p.get(f"opt_after_{pos}", T + 2)))
            else:
                nxt = Const(STOP, 6)
            p.define(f"scan_w1_{pos}", Cat(Const(1, 1), nxt), T + 2)   # 1 position: starts, exit

        # Stages 5..10: compose the windows' transfer functions: for window size s and
        # entry e, which positions of the window start an option, and the exit cursor.
        size, stage = 1, T + 3
        while size < SCAN_SPAN:
            for base in range(0, SCAN_SPAN, 2 * size):
                entries = range(2 * size) if 2 * size < SCAN_SPAN else [0]
                for e in entries:
                    if e < size:
                        lo = p.get(f"scan_w{size}_{base + e}", stage)
                        lo_starts, lo_exit = lo[:size], lo[size:]
                        bits = (size - 1).bit_length()          # size is a power of two
                        in_hi = (lo_exit >> bits) == ((base + size) >> bits)
                        his = [p.get(f"scan_w{size}_{base + size + k}", stage) for k in range(size)]
                        hi = _select(his, lo_exit[:bits]) if size > 1 else his[0]
                        starts = Cat(lo_starts, Mux(in_hi, hi[:size], 0))
                        exit_ = Mux(in_hi, hi[size:], lo_exit)
                    else:
                        hi = p.get(f"scan_w{size}_{base + e}", stage)
                        starts = Cat(Const(0, size), hi[:size])
                        exit_ = hi[size:]
                    p.define(f"scan_w{2 * size}_{base + e}", Cat(starts, exit_), stage)
            size, stage = 2 * size, stage + 1
        scan_stage = stage                                   # T + 9
        starts_all = p.get(f"scan_w{SCAN_SPAN}_0", scan_stage)[:OPT_BYTES]
        inside_all = Cat(*[p.get(f"opt_inside_{pos}", scan_stage) for pos in range(OPT_BYTES)])
        bad_all = Cat(*[p.get(f"opt_bad_{pos}", scan_stage) for pos in range(OPT_BYTES)])
        starts = starts_all & inside_all
        p.define("opt_starts", starts, scan_stage)
        p.define("opt_malformed", (starts & bad_all).any(), scan_stage)

        # The well-formed options of each kind, then the last one of each kind.
        decls = {d.kind: d for d in TCP_OPTIONS.values()}
        ob = _bytes(p.get("opt", T + 10), OPT_BYTES + 10)
        starts = p.get("opt_starts", T + 10)
        bad = Cat(*[p.get(f"opt_bad_{pos}", T + 10) for pos in range(OPT_BYTES)])
        for kind, decl in decls.items():
            span = OPT_BYTES - min(decl.length) + 1          # where it can fit at all
            hits = [starts[pos] & (ob[pos] == kind) & _any(ob[pos + 1] == n for n in decl.length) & ~bad[pos]
                    for pos in range(span)]
            p.define(f"hits_{int(kind)}", Cat(*hits), T + 10)
        known = [TcpOption.EOL, TcpOption.NOP] + list(decls)
        p.define("opt_unknown_at", Cat(*[starts[pos] & ~bad[pos] & ~_any(ob[pos] == k for k in known)
                                         for pos in range(OPT_BYTES)]), T + 10)
        p.define("opt_unknown", p.get("opt_unknown_at", T + 11).any(), T + 11)
        for kind in decls:
            hits = p.get(f"hits_{int(kind)}", T + 11)
            last = [hits[pos] & ~hits[pos + 1:].any() if pos + 1 < len(hits) else hits[pos]
                    for pos in range(len(hits))]
            p.define(f"last_{int(kind)}", Cat(*last), T + 11)
            p.define(f"seen_{int(kind)}", hits.any(), T + 11)

        # Option values.
        ob = _bytes(p.get("opt", T + 12), OPT_BYTES + 10)

        def value_of(kind, field_at):
            chosen = p.get(f"last_{int(kind)}", T + 12)
            out = 0
            for pos in range(len(chosen)):
                out = out | Mux(chosen[pos], field_at(pos), 0)
            return out
        mss, ws, ts, sack = (decls[k].header for k in (TcpOption.MSS, TcpOption.WSCALE,
                                                        TcpOption.TIMESTAMP, TcpOption.SACK))
        p.define("opt_mss", value_of(TcpOption.MSS, lambda q: mss.mss.extract(lambda k: ob[q + 2 + k])), T + 12)
        p.define("opt_wscale", value_of(TcpOption.WSCALE, lambda q: ws.shift.extract(lambda k: ob[q + 2 + k])), T + 12)
        p.define("opt_tsval", value_of(TcpOption.TIMESTAMP, lambda q: ts.tsval.extract(lambda k: ob[q + 2 + k])), T + 12)
        p.define("opt_tsecr", value_of(TcpOption.TIMESTAMP, lambda q: ts.tsecr.extract(lambda k: ob[q + 2 + k])), T + 12)
        p.define("opt_sack_blocks", value_of(TcpOption.SACK, lambda q: ((ob[q + 1] - 2) >> 3)[:3]), T + 12)
        p.define("opt_sack_pos", value_of(TcpOption.SACK, lambda q: Const(q + 2 + TCP.size, 7)), T + 12)
        p.define("opt_ts_pos", value_of(TcpOption.TIMESTAMP, lambda q: Const(q + 2 + TCP.size, 7)), T + 12)

        # Checksums: fold the sums (available by stage 8 at the latest) in two steps.
        ck = max(self.csum_stages, ip_sum_stage, pseudo_stage)
        p.define("tcp_wide", p.get("seg_total", ck) + p.get(pseudo_name, ck), ck)
        p.define("ip_wide", p.get(ip_sum_name, ck), ck)
        for name in ("tcp", "ip"):
            wide = p.get(f"{name}_wide", ck + 1)
            p.define(f"{name}_fold1", wide[:16] + wide[16:], ck + 1)
            once = p.get(f"{name}_fold1", ck + 2)
            p.define(f"{name}_sum", (once[:16] + once[16:])[:16], ck + 2)
            p.define(f"{name}_sum_bad", p.get(f"{name}_sum", ck + 3) != 0xFFFF, ck + 3)
        assert ck + 4 <= self.STAGES

        # The last stage: the record, as one expression (see hw.stream.struct_value).
        s = self.STAGES
        def g(name):
            return p.get(name, s)
        cls = g("frame_class")
        is_tcp = Signal()
        is_ipv4 = g("is_ipv4")
        m.d.comb += is_tcp.eq(cls == FrameClass.TCP)
        tcp_sum, ip_sum = g("tcp_sum"), g("ip_sum")

        def when(cond, value):
            return Mux(cond, value, 0)
        seen = {k: g(f"seen_{int(k)}") for k in decls}
        record = struct_value(PARSER_META, {
            "frame_class": cls,
            "frame_length": g("length"),
            "eth": {"dst": g("eth_dst"), "src": g("eth_src"), "ethertype": g("ethertype"),
                    "vlan_valid": g("vlan"), "vlan_pcp": g("vlan_pcp"), "vlan_vid": g("vlan_vid")},
            "l3_offset": g("l3_offset"),
            "errors": {
                "oversize": g("oversize"),
                "truncated": g("eth_short") | g("vlan_short") | (is_ipv4 & g("truncated_ip")),
                "bad_ip_version": is_ipv4 & g("version_bad"),
                "bad_ihl": is_ipv4 & g("bad_ihl"),
                "length_mismatch": is_ipv4 & g("length_mismatch"),
                "bad_ip_checksum": is_ipv4 & g("ip_sum_bad"),
                "bad_data_offset": is_tcp & g("bad_doff"),
                "bad_tcp_checksum": is_tcp & g("tcp_sum_bad"),
                "bad_options": is_tcp & ~g("bad_doff") & g("opt_malformed"),
            },
            "ip": {name: when(is_ipv4, g(f"ip_{name}")) for name in PARSER_META["ip"].shape.members},
            "l4_offset": when(is_ipv4, g("l4_offset")),
            "ip_sum": when(is_ipv4, ip_sum),
            "tcp": {name: when(is_tcp, g(f"tcp_{name}")) for name in PARSER_META["tcp"].shape.members},
            "payload_offset": when(is_tcp, g("payload_offset")),
            "payload_length": when(is_tcp, g("payload_length")),
            "tcp_sum": when(is_tcp, tcp_sum),
            "opt": {
                "mss_valid": is_tcp & seen[TcpOption.MSS], "mss": when(is_tcp, g("opt_mss")),
                "wscale_valid": is_tcp & seen[TcpOption.WSCALE], "wscale": when(is_tcp, g("opt_wscale")),
                "sack_perm": is_tcp & seen[TcpOption.SACK_PERM],
                "ts_valid": is_tcp & seen[TcpOption.TIMESTAMP],
                "tsval": when(is_tcp, g("opt_tsval")), "tsecr": when(is_tcp, g("opt_tsecr")),
                "sack_blocks": when(is_tcp, g("opt_sack_blocks")),
                "sack_offset": when(is_tcp & seen[TcpOption.SACK], g("l4_offset") + g("opt_sack_pos")),
                "ts_offset": when(is_tcp & seen[TcpOption.TIMESTAMP], g("l4_offset") + g("opt_ts_pos")),
                "unknown": is_tcp & g("opt_unknown"),
            },
        })
        m.d.comb += [fifo.w_en.eq(p.valid(s)), fifo.w_data.eq(record)]

        # Frames whose last beat is in the pipeline and whose record is not in the FIFO yet.
        count = Signal.like(in_flight)
        m.d.comb += in_flight.eq(count)
        entering = accept & beat.last
        with m.If(entering & ~fifo.w_en):
            m.d.sync += count.eq(count + 1)
        with m.Elif(~entering & fifo.w_en):
            m.d.sync += count.eq(count - 1)
        return m
