"""RX header parser: Ethernet (+802.1Q), IPv4, TCP and TCP options, checksums, at line rate.

``Parser(width, max_frame_bytes)`` watches a packet stream and passes it through
unchanged (combinationally: ``o`` is ``i``), and emits one ``PARSER_META`` record per
frame on ``meta``, in frame order, after the frame's last beat.

How it works
  * Capture: the first ``MAX_HEADER_BYTES`` (138) bytes of every frame are kept in a
    register as the beats go by; the frame length is counted.
  * Checksum: every beat is summed, one cycle after it passes, over the bytes of the
    TCP segment (from the TCP header to the IPv4 total length). The offsets come
    from the header bytes already captured, which always precede the bytes they
    govern. So the TCP checksum covers the whole segment at one beat per cycle.
  * Parse pipeline: after the last beat, a fixed-latency pipeline (no stalls) slices
    the captured bytes into Ethernet, IPv4 and TCP fields (with ``hw.headers``),
    sums the IPv4 header, and parses the TCP options in any order. Options are found
    by a windowed scan: each option byte position knows where the next option would
    start; four-position windows precompute, for every entry point, which positions
    start an option and where the scan leaves the window; the windows are then
    chained, five per stage.
  * The records enter a small FIFO; the input is held (``i.ready`` low) only when that
    FIFO could not take the records of the frames in flight.

Latency: ``LATENCY`` cycles from the cycle the last beat is accepted to the cycle its
record is valid on ``meta`` (FIFO empty). Throughput: one beat per cycle, any frame
size, and one record per cycle for back-to-back one-beat frames, while ``o`` and
``meta`` are ready.

Ports
  i     In(packet stream)    frames from the MAC
  o     Out(packet stream)   the same frames, unchanged
  meta  Out(PARSER_META)     one record per frame (see ``hw.metadata`` and docs/)

Fields of headers a frame does not have are zero (e.g. ``tcp`` of a UDP frame); bytes
past the end of a short frame read as zero. Parsing decisions follow
``sim.reference.parse_frame``, the bit-exact Python model.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .headers import (ETHERNET, VLAN, IPV4, TCP, EtherType, IpProto, TcpOption, TCP_OPTIONS,
                      ETH_LEN, VLAN_LEN, IPV4_MAX_LEN, TCP_MAX_LEN, TCP_OPTIONS_MAX_LEN,
                      MAX_HEADER_BYTES, MIN_FRAME_BYTES, MAX_FRAME_BYTES)
from .metadata import FrameClass, PARSER_META
from .stream import packet_signature

__all__ = ["Parser"]

L3_BYTES = IPV4_MAX_LEN + TCP_MAX_LEN          # bytes kept from the start of the IPv4 header
OPT_BYTES = TCP_OPTIONS_MAX_LEN                # 40
OPT_WINDOW = 4                                 # option positions per scan window
OPT_WINDOWS = OPT_BYTES // OPT_WINDOW          # 10
WINDOWS_PER_STAGE = 5
OPT_STOP = 63                                  # "no further option" cursor value


def _bytes(sig, n):
    return [sig[8 * k:8 * k + 8] for k in range(n)]


def _fold(m, value, name):
    """Fold a wide one's-complement sum to 16 bits (two end-around carries)."""
    once = Signal(18, name=f"{name}_fold1")
    twice = Signal(16, name=f"{name}_fold2")
    m.d.comb += once.eq(value[:16] + value[16:])
    m.d.comb += twice.eq(once[:16] + once[16:])
    return twice


class Parser(wiring.Component):
    #: Cycles from the acceptance of a frame's last beat to its record on ``meta``.
    LATENCY = 11
    #: Pipeline registers between the input and the record FIFO: frames in flight.
    STAGES = 9

    def __init__(self, width=64, max_frame_bytes=MAX_FRAME_BYTES):
        self.width = width
        self.max_frame_bytes = max_frame_bytes
        super().__init__({
            "i": In(packet_signature(width)),
            "o": Out(packet_signature(width)),
            "meta": Out(stream.Signature(PARSER_META)),
        })

    def elaborate(self, platform):
        m = Module()
        nb = self.width // 8
        cap_beats = -(-MAX_HEADER_BYTES // nb)
        cap_bytes = cap_beats * nb

        # ---------------------------------------------------------------- output FIFO
        fifo_depth = 16
        m.submodules.fifo = fifo = SyncFIFOBuffered(width=PARSER_META.size, depth=fifo_depth)
        m.d.comb += [
            self.meta.valid.eq(fifo.r_rdy),
            self.meta.payload.eq(fifo.r_data),
            fifo.r_en.eq(self.meta.ready),
        ]
        # Room for every frame that may be in flight plus the one being accepted.
        room = Signal()
        m.d.comb += room.eq(fifo.level <= fifo_depth - self.STAGES - 2)

        # ---------------------------------------------------------------- pass-through
        m.d.comb += [
            self.o.payload.eq(self.i.payload),
            self.o.valid.eq(self.i.valid & room),
            self.i.ready.eq(self.o.ready & room),
        ]
        accept = Signal()
        m.d.comb += accept.eq(self.i.valid & self.i.ready)
        beat = self.i.payload

        # ---------------------------------------------------------------- capture
        pos_bits = 17
        beat_pos = Signal(pos_bits)                  # frame byte offset of this beat
        length = Signal(16)                          # bytes so far (saturating)
        hdr = Signal(8 * cap_bytes)                  # the first cap_bytes bytes
        kept = Signal(range(nb + 1))
        m.d.comb += kept.eq(sum(beat.keep[k] for k in range(nb)))
        masked_data = Signal(self.width)
        m.d.comb += masked_data.eq(Cat(*[Mux(beat.keep[k], beat.data[8 * k:8 * k + 8], 0)
                                         for k in range(nb)]))
        new_length = Signal(17)
        m.d.comb += new_length.eq(length + kept)
        with m.If(accept):
            with m.If(beat.last):
                m.d.sync += [beat_pos.eq(0), length.eq(0)]
            with m.Else():
                m.d.sync += beat_pos.eq(Mux(beat_pos >= (1 << pos_bits) - nb, beat_pos, beat_pos + nb))
                m.d.sync += length.eq(Mux(new_length[16], 0xFFFF, new_length))
            # The first beat of a frame also clears the rest of the capture, so bytes past
            # the end of a short frame read as zero.
            for b in range(cap_beats):
                with m.If(beat_pos == b * nb):
                    m.d.sync += hdr[8 * nb * b:8 * nb * (b + 1)].eq(masked_data)
                with m.Elif(beat_pos == 0):
                    m.d.sync += hdr[8 * nb * b:8 * nb * (b + 1)].eq(0)

        # Beat seen one cycle ago, for the checksum, with the frame's length so far.
        d_valid = Signal()
        d_last = Signal()
        d_data = Signal(self.width)
        d_pos = Signal(pos_bits)
        d_length = Signal(16)
        m.d.sync += d_valid.eq(accept)
        with m.If(accept):
            m.d.sync += [d_last.eq(beat.last), d_data.eq(masked_data), d_pos.eq(beat_pos),
                         d_length.eq(Mux(new_length[16], 0xFFFF, new_length))]

        # Offsets of the TCP segment, from the captured header bytes (see docstring).
        hb = _bytes(hdr, cap_bytes)
        outer_type = ETHERNET.ethertype.extract(lambda k: hb[k])
        has_vlan = Signal()
        m.d.comb += has_vlan.eq(outer_type == EtherType.VLAN)
        # An IHL below 5 is flagged (bad_ihl); the TCP header is then looked for at 20.
        ihl_plain = _at_least_5(IPV4.ihl.extract(lambda k: hb[ETH_LEN + k]))
        ihl_vlan = _at_least_5(IPV4.ihl.extract(lambda k: hb[ETH_LEN + VLAN_LEN + k]))
        tot_plain = IPV4.total_length.extract(lambda k: hb[ETH_LEN + k])
        tot_vlan = IPV4.total_length.extract(lambda k: hb[ETH_LEN + VLAN_LEN + k])
        seg_start = Signal(pos_bits)
        seg_end = Signal(pos_bits + 1)
        m.d.comb += [
            seg_start.eq(Mux(has_vlan, ETH_LEN + VLAN_LEN + 4 * ihl_vlan, ETH_LEN + 4 * ihl_plain)),
            seg_end.eq(Mux(has_vlan, ETH_LEN + VLAN_LEN + tot_vlan, ETH_LEN + tot_plain)),
        ]
        # Sum of the beat's 16-bit words that lie inside [seg_start, seg_end).
        rel_start = Signal(range(-(1 << pos_bits), 1 << pos_bits))
        rel_end = Signal(range(-(1 << (pos_bits + 1)), 1 << (pos_bits + 1)))
        m.d.comb += [rel_start.eq(seg_start - d_pos), rel_end.eq(seg_end - d_pos)]
        db = _bytes(d_data, nb)
        words = []
        for w in range(nb // 2):
            hi_in = (rel_start <= 2 * w) & (rel_end > 2 * w)
            lo_in = (rel_start <= 2 * w + 1) & (rel_end > 2 * w + 1)
            words.append(Cat(Mux(lo_in, db[2 * w + 1], 0), Mux(hi_in, db[2 * w], 0)))
        beat_sum = Signal(16 + (nb // 2).bit_length())
        m.d.comb += beat_sum.eq(sum(words))
        seg_acc = Signal(32)
        seg_total = Signal(32)
        m.d.comb += seg_total.eq(seg_acc + Mux(d_valid, beat_sum, 0))
        with m.If(d_valid):
            m.d.sync += seg_acc.eq(Mux(d_last, 0, seg_total))

        # ---------------------------------------------------------------- stage 1: snapshot
        # In the cycle after a last beat, `hdr` holds that frame's header bytes.
        s1_valid = Signal()
        s1_hdr = Signal(8 * MAX_HEADER_BYTES)
        s1_len = Signal(16)
        s1_seg = Signal(32)
        m.d.sync += s1_valid.eq(d_valid & d_last)
        m.d.sync += [s1_hdr.eq(hdr[:8 * MAX_HEADER_BYTES]), s1_len.eq(d_length), s1_seg.eq(seg_total)]

        # ---------------------------------------------------------------- stage 2: Ethernet
        s1b = _bytes(s1_hdr, MAX_HEADER_BYTES)
        s2_valid = Signal()
        s2 = Signal(PARSER_META)
        s2_l3 = Signal(8 * L3_BYTES)
        s2_seg = Signal(32)
        vlan2 = Signal()
        m.d.comb += vlan2.eq(ETHERNET.ethertype.extract(lambda k: s1b[k]) == EtherType.VLAN)
        l3_plain = Cat(*s1b[ETH_LEN:ETH_LEN + L3_BYTES])
        l3_vlan = Cat(*s1b[ETH_LEN + VLAN_LEN:ETH_LEN + VLAN_LEN + L3_BYTES])
        m.d.sync += [
            s2_valid.eq(s1_valid),
            s2_seg.eq(s1_seg),
            s2_l3.eq(Mux(vlan2, l3_vlan, l3_plain)),
            s2.frame_length.eq(s1_len),
            s2.errors.oversize.eq(s1_len > self.max_frame_bytes),
            s2.eth.dst.eq(ETHERNET.dst.extract(lambda k: s1b[k])),
            s2.eth.src.eq(ETHERNET.src.extract(lambda k: s1b[k])),
            s2.eth.vlan_valid.eq(vlan2),
            s2.l3_offset.eq(Mux(vlan2, ETH_LEN + VLAN_LEN, ETH_LEN)),
        ]
        with m.If(vlan2):
            m.d.sync += [
                s2.eth.ethertype.eq(VLAN.ethertype.extract(lambda k: s1b[ETH_LEN + k])),
                s2.eth.vlan_pcp.eq(VLAN.pcp.extract(lambda k: s1b[ETH_LEN + k])),
                s2.eth.vlan_vid.eq(VLAN.vid.extract(lambda k: s1b[ETH_LEN + k])),
            ]
        with m.Else():
            m.d.sync += [
                s2.eth.ethertype.eq(ETHERNET.ethertype.extract(lambda k: s1b[k])),
                s2.eth.vlan_pcp.eq(0),
                s2.eth.vlan_vid.eq(0),
            ]

        # ---------------------------------------------------------------- stage 3: IPv4
        l3b = _bytes(s2_l3, L3_BYTES)
        ip = {f.name: f.extract(lambda k: l3b[k]) for f in IPV4}
        s3_valid = Signal()
        s3 = Signal(PARSER_META)
        s3_l4 = Signal(8 * TCP_MAX_LEN)
        s3_version = Signal(4)
        s3_ip_words = Signal(22)
        s3_seg = Signal(32)
        # IPv4 header words, counted only below 4*IHL bytes.
        ip_words = [Mux(ip["ihl"] > (w // 2), Cat(l3b[2 * w + 1], l3b[2 * w]), 0)
                    for w in range(IPV4_MAX_LEN // 2)]
        # The TCP header starts 4*IHL bytes in (at 20 when IHL is below 5: flagged bad_ihl).
        ihl_eff = Signal(4)
        m.d.comb += ihl_eff.eq(_at_least_5(ip["ihl"]))
        l4_cases = {n: Cat(*l3b[4 * n:4 * n + TCP_MAX_LEN]) for n in range(5, 16)}
        l4_sel = Signal(8 * TCP_MAX_LEN)
        with m.Switch(ihl_eff):
            for n, value in l4_cases.items():
                with m.Case(n):
                    m.d.comb += l4_sel.eq(value)
        pseudo = (ip["src"][16:] + ip["src"][:16] + ip["dst"][16:] + ip["dst"][:16]
                  + ip["protocol"] + (ip["total_length"] - 4 * ihl_eff)[:16])
        m.d.sync += [
            s3_valid.eq(s2_valid),
            s3.eq(s2),
            s3_l4.eq(l4_sel),
            s3_version.eq(IPV4.version.extract(lambda k: l3b[k])),
            s3_ip_words.eq(sum(ip_words)),
            s3_seg.eq(s2_seg + pseudo),
            s3.l4_offset.eq(s2.l3_offset + 4 * ihl_eff),
        ]
        for name in s3.ip.shape().members:
            m.d.sync += getattr(s3.ip, name).eq(ip[name])

        # ---------------------------------------------------------------- stage 4: TCP, option decode
        l4b = _bytes(s3_l4, TCP_MAX_LEN)
        tcp = {f.name: f.extract(lambda k: l4b[k]) for f in TCP}
        s4_valid = Signal()
        s4 = Signal(PARSER_META)
        s4_version = Signal(4)
        s4_ip_sum = Signal(16)
        s4_tcp_sum = Signal(16)
        m.d.sync += [s4_valid.eq(s3_valid), s4.eq(s3), s4_version.eq(s3_version),
                     s4_ip_sum.eq(_fold(m, s3_ip_words, "ip_sum")),
                     s4_tcp_sum.eq(_fold(m, s3_seg, "tcp_sum"))]
        for name in s4.tcp.shape().members:
            m.d.sync += getattr(s4.tcp, name).eq(tcp[name])

        # Options area: bytes 20..59 of the TCP header, `opt_len` of them in use.
        opt = l4b[TCP.size:] + [Const(0, 8)] * 10      # padded so values may be read past the end
        opt_len = Signal(range(OPT_BYTES + 1))
        m.d.comb += opt_len.eq(Mux(tcp["data_offset"] < 5, 0, 4 * tcp["data_offset"] - TCP.size))
        # Per position p: where the next option starts if one starts at p, whether an
        # option starting at p is malformed, and what kind it is.
        s4_opt = Signal(8 * (OPT_BYTES + 10))
        s4_next = [Signal(6, name=f"s4_next{p}") for p in range(OPT_BYTES)]
        s4_bad = Signal(OPT_BYTES)
        s4_opt_len = Signal(range(OPT_BYTES + 1))
        m.d.sync += [s4_opt.eq(Cat(*opt)), s4_opt_len.eq(opt_len)]
        for p in range(OPT_BYTES):
            kind, olen = opt[p], opt[p + 1]
            is_eol = kind == TcpOption.EOL
            is_nop = kind == TcpOption.NOP
            inside = opt_len > p
            crosses = (opt_len <= p + 1) | (olen < 2) | ((p + olen) > opt_len)
            wrong_len = Const(0)
            for decl in TCP_OPTIONS.values():
                ok = 0
                for allowed in decl.length:
                    ok = ok | (olen == allowed)
                wrong_len = wrong_len | ((kind == decl.kind) & ~ok)
            ends = ~inside | is_eol | (~is_nop & crosses)
            m.d.sync += s4_next[p].eq(Mux(ends, OPT_STOP, Mux(is_nop, p + 1, p + olen)))
            m.d.sync += s4_bad[p].eq(inside & ~is_eol & ~is_nop & (crosses | wrong_len))

        # ---------------------------------------------------------------- stage 5: window tables
        # For window w and entry e (a start at position 4w+e): which positions of the
        # window start an option, and the cursor on leaving the window.
        s5_valid = Signal()
        s5 = Signal(PARSER_META)
        s5_version, s5_ip_sum, s5_tcp_sum = Signal(4), Signal(16), Signal(16)
        s5_opt, s5_bad = Signal.like(s4_opt), Signal.like(s4_bad)
        s5_opt_len = Signal.like(s4_opt_len)
        s5_starts = [[Signal(OPT_WINDOW, name=f"s5_starts{w}_{e}") for e in range(OPT_WINDOW)]
                     for w in range(OPT_WINDOWS)]
        s5_exit = [[Signal(6, name=f"s5_exit{w}_{e}") for e in range(OPT_WINDOW)]
                   for w in range(OPT_WINDOWS)]
        m.d.sync += [s5_valid.eq(s4_valid), s5.eq(s4), s5_version.eq(s4_version),
                     s5_ip_sum.eq(s4_ip_sum), s5_tcp_sum.eq(s4_tcp_sum),
                     s5_opt.eq(s4_opt), s5_bad.eq(s4_bad), s5_opt_len.eq(s4_opt_len)]
        for w in range(OPT_WINDOWS):
            base = w * OPT_WINDOW
            local_next = s4_next[base:base + OPT_WINDOW]
            for e in range(OPT_WINDOW):
                # Walk inside the window; positions only ever increase.
                cursor = Const(base + e, 6)
                marks = []
                for step in range(OPT_WINDOW - e):
                    here = Signal(OPT_WINDOW, name=f"walk{w}_{e}_{step}")
                    m.d.comb += here.eq(Mux((cursor >= base) & (cursor < base + OPT_WINDOW),
                                            Const(1, OPT_WINDOW) << (cursor - base)[:2], 0))
                    marks.append(here)
                    nxt = Signal(6, name=f"walk_next{w}_{e}_{step}")
                    m.d.comb += nxt.eq(Mux(cursor < base + OPT_WINDOW,
                                           _select(local_next, (cursor - base)[:2]), cursor))
                    cursor = nxt
                m.d.sync += s5_starts[w][e].eq(_or(marks))
                m.d.sync += s5_exit[w][e].eq(cursor)

        # ---------------------------------------------------------------- stages 6, 7: chain the windows
        def chain(first_window, cursor_in, prev):
            starts = []
            cursor = cursor_in
            for w in range(first_window, first_window + WINDOWS_PER_STAGE):
                in_window = (cursor >> 2) == w
                local = cursor[:2]
                st = Signal(OPT_WINDOW, name=f"starts_w{w}")
                m.d.comb += st.eq(Mux(in_window, _select(prev["starts"][w], local), 0))
                starts.append(st)
                nxt = Signal(6, name=f"cursor_w{w}")
                m.d.comb += nxt.eq(Mux(in_window, _select(prev["exit"][w], local), cursor))
                cursor = nxt
            return Cat(*starts), cursor

        s6_valid = Signal()
        s6 = Signal(PARSER_META)
        s6_version, s6_ip_sum, s6_tcp_sum = Signal(4), Signal(16), Signal(16)
        s6_opt, s6_bad, s6_opt_len = Signal.like(s4_opt), Signal.like(s4_bad), Signal.like(s4_opt_len)
        s6_starts_lo = Signal(OPT_WINDOW * WINDOWS_PER_STAGE)
        s6_cursor = Signal(6)
        s6_tables = [[Signal(OPT_WINDOW + 6, name=f"s6_table{w}_{e}") for e in range(OPT_WINDOW)]
                     for w in range(WINDOWS_PER_STAGE, OPT_WINDOWS)]
        lo_starts, lo_cursor = chain(0, Const(0, 6), {"starts": s5_starts, "exit": s5_exit})
        m.d.sync += [s6_valid.eq(s5_valid), s6.eq(s5), s6_version.eq(s5_version),
                     s6_ip_sum.eq(s5_ip_sum), s6_tcp_sum.eq(s5_tcp_sum), s6_opt.eq(s5_opt),
                     s6_bad.eq(s5_bad), s6_opt_len.eq(s5_opt_len),
                     s6_starts_lo.eq(lo_starts), s6_cursor.eq(lo_cursor)]
        for i, w in enumerate(range(WINDOWS_PER_STAGE, OPT_WINDOWS)):
            for e in range(OPT_WINDOW):
                m.d.sync += s6_tables[i][e].eq(Cat(s5_starts[w][e], s5_exit[w][e]))
        hi_tables = {"starts": {}, "exit": {}}
        for i, w in enumerate(range(WINDOWS_PER_STAGE, OPT_WINDOWS)):
            hi_tables["starts"][w] = [t[:OPT_WINDOW] for t in s6_tables[i]]
            hi_tables["exit"][w] = [t[OPT_WINDOW:] for t in s6_tables[i]]
        hi_starts, _ = chain(WINDOWS_PER_STAGE, s6_cursor, hi_tables)

        s7_valid = Signal()
        s7 = Signal(PARSER_META)
        s7_version, s7_ip_sum, s7_tcp_sum = Signal(4), Signal(16), Signal(16)
        s7_opt, s7_bad, s7_opt_len = Signal.like(s4_opt), Signal.like(s4_bad), Signal.like(s4_opt_len)
        s7_starts = Signal(OPT_BYTES)
        m.d.sync += [s7_valid.eq(s6_valid), s7.eq(s6), s7_version.eq(s6_version),
                     s7_ip_sum.eq(s6_ip_sum), s7_tcp_sum.eq(s6_tcp_sum), s7_opt.eq(s6_opt),
                     s7_bad.eq(s6_bad), s7_opt_len.eq(s6_opt_len),
                     s7_starts.eq(Cat(s6_starts_lo, hi_starts))]
        # Only positions inside the options area start options (the scan may stop exactly at its end).
        s7_opt_starts = Signal(OPT_BYTES)
        m.d.comb += s7_opt_starts.eq(s7_starts & Cat(*[s7_opt_len > p for p in range(OPT_BYTES)]))
        s7_starts = s7_opt_starts

        # ---------------------------------------------------------------- stage 8: option values, errors, class
        ob = _bytes(s7_opt, OPT_BYTES + 10)
        s8_valid = Signal()
        s8 = Signal(PARSER_META)
        m.d.sync += [s8_valid.eq(s7_valid), s8.eq(s7),
                     s8.ip_sum.eq(s7_ip_sum), s8.tcp_sum.eq(s7_tcp_sum)]

        def last_of(kind, lengths):
            """One-hot select of the last well-formed option of ``kind``."""
            hits = []
            # An option of this kind can only be well formed where it fits in the area.
            for p in range(OPT_BYTES - min(lengths) + 1):
                ok = 0
                for allowed in lengths:
                    ok = ok | (ob[p + 1] == allowed)
                hit = Signal(name=f"opt{int(kind)}_at{p}")
                m.d.comb += hit.eq(s7_starts[p] & (ob[p] == kind) & ok & ~s7_bad[p])
                hits.append(hit)
            sel = []
            later = Const(0)
            for p in reversed(range(len(hits))):
                chosen = Signal(name=f"opt{int(kind)}_last_at{p}")
                m.d.comb += chosen.eq(hits[p] & ~later)
                sel.append((p, chosen))
                seen = Signal(name=f"opt{int(kind)}_seen_from{p}")
                m.d.comb += seen.eq(later | hits[p])
                later = seen
            return sel, later      # `later` is now "any hit"

        def value_at(sel, field_of):
            out = 0
            for p, s in sel:
                out = out | Mux(s, field_of(p), 0)
            return out

        o = {}
        opts = {d.kind: d for d in TCP_OPTIONS.values()}
        sel, any_mss = last_of(TcpOption.MSS, opts[TcpOption.MSS].length)
        o["mss_valid"], o["mss"] = any_mss, value_at(
            sel, lambda p: opts[TcpOption.MSS].header.mss.extract(lambda k: ob[p + 2 + k]))
        sel, any_ws = last_of(TcpOption.WSCALE, opts[TcpOption.WSCALE].length)
        o["wscale_valid"], o["wscale"] = any_ws, value_at(
            sel, lambda p: opts[TcpOption.WSCALE].header.shift.extract(lambda k: ob[p + 2 + k]))
        _, o["sack_perm"] = last_of(TcpOption.SACK_PERM, opts[TcpOption.SACK_PERM].length)
        sel, any_ts = last_of(TcpOption.TIMESTAMP, opts[TcpOption.TIMESTAMP].length)
        ts = opts[TcpOption.TIMESTAMP].header
        o["ts_valid"] = any_ts
        o["tsval"] = value_at(sel, lambda p: ts.tsval.extract(lambda k: ob[p + 2 + k]))
        o["tsecr"] = value_at(sel, lambda p: ts.tsecr.extract(lambda k: ob[p + 2 + k]))
        sel, any_sack = last_of(TcpOption.SACK, opts[TcpOption.SACK].length)
        o["sack_blocks"] = value_at(sel, lambda p: ((ob[p + 1] - 2) >> 3)[:3])
        o["sack_offset"] = Mux(any_sack, s7.l4_offset + TCP.size + 2 + value_at(sel, lambda p: Const(p, 6)), 0)
        unknown = 0
        known = [TcpOption.EOL, TcpOption.NOP] + list(opts)
        for p in range(OPT_BYTES):
            is_known = 0
            for k in known:
                is_known = is_known | (ob[p] == k)
            unknown = unknown | (s7_starts[p] & ~is_known & ~s7_bad[p])
        o["unknown"] = unknown
        opt_malformed = (s7_starts & s7_bad).any()

        # Classification and error flags (mirrors sim.reference.parse_frame).
        ftype, ipf, flen = s7.eth.ethertype, s7.ip, s7.frame_length
        l3 = s7.l3_offset
        is_ipv4 = Signal()
        eth_short = Signal()
        fragment = Signal()
        frame_class = Signal(FrameClass)
        m.d.comb += [
            is_ipv4.eq((ftype == EtherType.IPV4) & ~eth_short),
            eth_short.eq(flen < ETH_LEN),
            fragment.eq(ipf.mf | (ipf.frag_offset != 0)),
        ]
        with m.If(eth_short):
            m.d.comb += frame_class.eq(FrameClass.OTHER)
        with m.Elif(ftype == EtherType.ARP):
            m.d.comb += frame_class.eq(FrameClass.ARP)
        with m.Elif(ftype == EtherType.IPV6):
            m.d.comb += frame_class.eq(FrameClass.IPV6)
        with m.Elif(ftype != EtherType.IPV4):
            m.d.comb += frame_class.eq(FrameClass.OTHER)
        with m.Elif(fragment):
            m.d.comb += frame_class.eq(FrameClass.FRAGMENT)
        with m.Elif(ipf.protocol == IpProto.TCP):
            m.d.comb += frame_class.eq(FrameClass.TCP)
        with m.Elif(ipf.protocol == IpProto.UDP):
            m.d.comb += frame_class.eq(FrameClass.UDP)
        with m.Else():
            m.d.comb += frame_class.eq(FrameClass.IPV4_OTHER)
        is_tcp = Signal()
        m.d.comb += is_tcp.eq(frame_class == FrameClass.TCP)

        ip_hdr_len = Signal(7)
        tcp_hdr_len = Signal(7)
        seg_len = Signal(17)
        m.d.comb += [ip_hdr_len.eq(4 * ipf.ihl), tcp_hdr_len.eq(4 * s7.tcp.data_offset),
                     seg_len.eq(ipf.total_length - (s7.l4_offset - l3))]
        ip_end = Signal(17)
        bad_doff = Signal()
        truncated_l2 = Signal()
        truncated_ip = Signal()
        m.d.comb += [
            ip_end.eq(l3 + ipf.total_length),
            bad_doff.eq((s7.tcp.data_offset < 5) | (tcp_hdr_len > seg_len) | seg_len[16]),
            truncated_l2.eq(eth_short | (s7.eth.vlan_valid & (flen < ETH_LEN + VLAN_LEN))),
            truncated_ip.eq((flen < l3 + IPV4.size) | (flen < l3 + ip_hdr_len) | (flen < ip_end)),
        ]
        m.d.sync += [
            s8.frame_class.eq(frame_class),
            s8.errors.truncated.eq(truncated_l2 | (is_ipv4 & truncated_ip)),
            s8.errors.bad_ip_version.eq(is_ipv4 & (s7_version != 4)),
            s8.errors.bad_ihl.eq(is_ipv4 & ((ipf.ihl < 5) | (ip_hdr_len > ipf.total_length))),
            s8.errors.length_mismatch.eq(is_ipv4 & (flen > ip_end) & (flen > MIN_FRAME_BYTES)),
            s8.errors.bad_ip_checksum.eq(is_ipv4 & (s7_ip_sum != 0xFFFF)),
            s8.errors.bad_data_offset.eq(is_tcp & bad_doff),
            s8.errors.bad_tcp_checksum.eq(is_tcp & (s7_tcp_sum != 0xFFFF)),
            s8.errors.bad_options.eq(is_tcp & ~bad_doff & opt_malformed),
        ]
        with m.If(is_tcp):
            m.d.sync += [
                s8.payload_offset.eq(s7.l4_offset + tcp_hdr_len),
                s8.payload_length.eq(Mux((tcp_hdr_len > seg_len) | seg_len[16], 0,
                                         seg_len - tcp_hdr_len)),
            ]
            for name, value in o.items():
                m.d.sync += getattr(s8.opt, name).eq(value)
        with m.Else():
            m.d.sync += [s8.tcp.eq(0), s8.opt.eq(0), s8.payload_offset.eq(0),
                         s8.payload_length.eq(0), s8.tcp_sum.eq(0)]
        with m.If(~is_ipv4):
            m.d.sync += [s8.ip.eq(0), s8.l4_offset.eq(0), s8.ip_sum.eq(0)]

        m.d.comb += [fifo.w_en.eq(s8_valid), fifo.w_data.eq(s8.as_value())]
        return m


def _at_least_5(ihl):
    return Mux(ihl < 5, 5, ihl)


def _select(values, index):
    """``values[index]`` for a small list of equal-width values."""
    out = values[0]
    for k in range(1, len(values)):
        out = Mux(index == k, values[k], out)
    return out


def _or(values):
    out = values[0]
    for v in values[1:]:
        out = out | v
    return out
