"""Splice engine: relays an L7 proxy's two TCP connections on the NIC (AccelTCP's splicing).

A proxy has accepted a connection from peer A (side ``a``) and opened one to peer B
(side ``b``). With a SPLICE command the host hands both to the NIC: from then on every
segment from A leaves towards B rewritten as if the proxy had sent it on connection b,
and every segment from B leaves towards A as if sent on connection a, with no DMA. The
engine decides per received frame; ``hw.splice_rewrite.SpliceRewriter`` rewrites it.

The SPLICE command (``SPLICE_COMMAND``: a ``tag`` chosen by the host, and per side the
connection as the host sees it, ``SPLICE_SIDE``):

* ``peer_*``/``local_*``: MACs, IPs and ports of the connection (peer = the remote end);
* ``snd_nxt``: the host's next sequence number on the connection. **Hand-over rule:**
  the host issues SPLICE only when all it has sent on both connections is acknowledged
  (``snd_una == snd_nxt``), so nothing of its own is left to retransmit;
* ``rcv_nxt``: the next sequence number the host expects from the peer (all the data
  before it was received and acknowledged by the host);
* ``ts_ok``, ``ts_recent`` (the peer's last TSval), ``ts_now`` (the TSval the host would
  send on the connection now); ``wscale_ok``, ``peer_wscale`` (the shift the peer applies
  to the windows it sends), ``local_wscale`` (the shift the peer applies to ours);
* ``ttl``: the TTL of frames sent to this peer; 0 means the arriving TTL - 1 (forwarding).

From these the engine computes, per direction (A -> B shown; B -> A is symmetric), the
``REWRITE`` parameters: Ethernet, IPs and ports of connection b as the proxy sends them,
``seq_delta = b.snd_nxt - a.rcv_nxt``, ``ack_delta = b.rcv_nxt - a.snd_nxt`` (also for
SACK edges), ``tsval_delta = b.ts_now - a.ts_recent`` (B sees one clock that continues
the proxy's), ``tsecr_delta = b.ts_recent - a.ts_now`` (B gets back its own TSvals), and
the window rescaled from A's shift to b's local shift. Sequence numbers before the
splice point map to ones the receiver already acknowledged, so a late retransmission of
old data is harmless and nothing needs trimming.

Checks, in order, each answered with a SPLICE_STATUS event (``SpliceStatus``): both
sides name the same 4-tuple (SAME_FLOW); one side uses timestamps and not the other
(TS_MISMATCH: the rewriter cannot add or remove options); no free slot (NO_SLOT); then
side a's and side b's flows go into the connection table as ``FlowKind.SPLICED`` (value
slot ``2 * slot + side``); a flow the NIC established (``HOST``) is switched with UPDATE;
a flow spliced or closing already gives ALREADY, a full table TABLE_FULL, anything else
TABLE_ERROR, and side a is then put back as it was. OK: the NIC relays both from the
moment the table answers; frames looked up before that go to the host, which relays
them in software with the same rewrite (``sim.splice_model``) until the OK event.

Per received frame whose table entry is SPLICED (``claimed``), in one pass, one frame
per cycle: the frame is relayed (``to_splice``, with its ``REWRITE`` on ``desc``) when
it is IPv4/TCP without VLAN tag or IP options, has no parser error other than a bad
checksum (it is relayed with its checksums updated, so it stays bad), no SYN, no option
of an unknown kind, a TTL above 1 when the TTL is decremented, its 4-tuple is the one
the slot holds (a slot reused since the lookup) and the splice is active. Any other
claimed frame goes to the host (``to_host``; counted by reason). For relayed frames the
engine keeps, per direction: segments and payload bytes; the first FIN's end (in the
receiver's sequence space) and whether the other side has acknowledged it; the highest
ACK sent. The splice ends:

* NORMAL: once both FINs are acknowledged, ``linger`` ticks later (the last ACKs and
  retransmitted FINs still pass meanwhile);
* RESET: on an RST whose sequence number (rewritten) equals the highest ACK the other
  side sent, at once (RFC 5961's exact match; other RSTs are relayed, the receiver
  decides, and the splice ends at the idle timeout);
* IDLE: ``idle_timeout`` ticks after the last relayed segment.

A sweeper reads one slot per cycle and finds ended splices (``now`` past the deadline);
the engine then deletes both flows from the table, stops relaying, and reports
SPLICE_DONE (``SpliceEnd``; segments and bytes per direction; side a's 4-tuple; tag).

Latency: record in -> verdict and descriptor out: 6 cycles. Throughput: one record per
cycle. Commands: a few cycles plus two table commands each (four to finish a splice).

Ports
  rx          In(stream of FLOW_RECORD)      every received frame's record, in order
  verdict     Out(stream of SPLICE_VERDICT)  one per record, in order
  desc        Out(stream of REWRITE)         one per relayed frame, in order
  command     In(stream of SPLICE_COMMAND)   the host's SPLICE commands
  event       Out(stream of EVENT)           SPLICE_STATUS and SPLICE_DONE
  table_cmd   Out / table_resp In            the connection table's control port
  now         In(32)                         the time in ticks; idle_timeout, linger In(32)
  spliced     Out                            active splices
  counters    Out(32 * len(SpCounter))
"""

import enum

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from hw.conn_table import FLOW_KEY, Geometry, Op, Status, command_layout, response_layout
from hw.free_list import FreeList
from hw.headers import TcpFlags
from hw.metadata import (EVENT, FLOW_RECORD, FLOW_VALUE, PARSER_ERRORS, EventKind, FlowKind,
                         FrameClass, SpliceEnd, SpliceStatus)
from hw.splice_rewrite import REWRITE
from hw.stream import struct_value
from hw.timer_scan import deadline_passed

__all__ = ["SPLICE_SIDE", "SPLICE_COMMAND", "SPLICE_VERDICT", "SpCounter", "SpliceEngine",
           "splice_params", "DIRECTION_STATE", "SLOT_STATE"]

#: One side of a SPLICE command: the connection as the host sees it (module docstring).
SPLICE_SIDE = data.StructLayout({
    "ingress": 8,
    "peer_mac": 48, "local_mac": 48,
    "peer_ip": 32, "local_ip": 32, "peer_port": 16, "local_port": 16,
    "snd_nxt": 32, "rcv_nxt": 32,
    "ts_ok": 1, "ts_recent": 32, "ts_now": 32,
    "wscale_ok": 1, "peer_wscale": 4, "local_wscale": 4,
    "ttl": 8,
})

SPLICE_COMMAND = data.StructLayout({"tag": 16, "a": SPLICE_SIDE, "b": SPLICE_SIDE})

#: The engine's decision for one record: ``claimed`` = 0: not a spliced flow's frame (the
#: other engines decide); else the frame goes to the rewriter or to the host.
SPLICE_VERDICT = data.StructLayout({"claimed": 1, "to_host": 1, "to_splice": 1})

#: What a direction's slot entry holds: the key its frames must carry, and the rewrite.
_PARAMS = data.StructLayout({"key": FLOW_KEY, "tag": 16, "rewrite": REWRITE})
#: Its key and tag, kept in a memory of their own: the control machine reads them to end
#: a splice, and a second read port on a narrow memory costs fewer block RAMs.
_KEYS = data.StructLayout({"key": FLOW_KEY, "tag": 16})

#: Per direction, updated by every relayed frame.
DIRECTION_STATE = data.StructLayout({
    "packets": 32, "bytes": 48,
    "fin_seen": 1, "fin_end": 32,     # the first FIN's end, in the receiver's sequence space
    "fin_acked": 1,                   # the other direction acknowledged it
    "acked_ok": 1, "acked": 32,       # the highest ACK sent in this direction
})

#: Per splice slot: both directions, the deadline (ticks) and how it ends.
SLOT_STATE = data.StructLayout({
    "dir": data.ArrayLayout(DIRECTION_STATE, 2),
    "deadline": 32,
    "end": 2,                         # 0: not ended yet; else SpliceEnd.NORMAL or RESET
})


class SpCounter(enum.IntEnum):
    """The engine's counters (one 32-bit field each in ``counters``)."""
    RELAYED = 0             # frames sent to the rewriter
    TO_HOST_FORMAT = 1      # claimed, to the host: VLAN, IP options, parser error, SYN, options
    TO_HOST_TTL = 2         # claimed, to the host: TTL would reach 0
    TO_HOST_STALE = 3       # claimed, to the host: the slot holds another flow or is inactive
    SPLICE_OK = 4           # SPLICE commands answered OK
    SPLICE_REFUSED = 5      # SPLICE commands answered with an error
    ENDED_NORMAL = 6
    ENDED_RESET = 7
    ENDED_IDLE = 8
    DELETE_FAILED = 9       # a table DELETE at the end did not answer OK (never expected)


def splice_params(src, dst, tag):
    """The parameters (a dict in ``_PARAMS``'s shape, Amaranth values) of the direction
    from side ``src``'s peer to side ``dst``'s peer (``SPLICE_SIDE`` views)."""
    ts = src.ts_ok & dst.ts_ok
    shift_in = Mux(src.wscale_ok, src.peer_wscale, 0)
    shift_out = Mux(dst.wscale_ok, dst.local_wscale, 0)
    return {
        "key": {"port": src.ingress, "src": src.peer_ip, "dst": src.local_ip,
                "sport": src.peer_port, "dport": src.local_port},
        "tag": tag,
        "rewrite": {
            "eth": {"dst": dst.peer_mac, "src": dst.local_mac},
            "ip": {"src": dst.local_ip, "dst": dst.peer_ip, "ttl": dst.ttl},
            "tcp": {"sport": dst.local_port, "dport": dst.peer_port},
            "seq_delta": (dst.snd_nxt - src.rcv_nxt)[:32],
            "ack_delta": (dst.rcv_nxt - src.snd_nxt)[:32],
            "tsval_delta": Mux(ts, dst.ts_now - src.ts_recent, 0)[:32],
            "tsecr_delta": Mux(ts, dst.ts_recent - src.ts_now, 0)[:32],
            "window_left": Mux(shift_in > shift_out, shift_in - shift_out, 0)[:4],
            "window_right": Mux(shift_out > shift_in, shift_out - shift_in, 0)[:4],
        },
    }


class _Step(enum.IntEnum):
    """The control machine's table commands (one TABLE/TABLE_WAIT pass each)."""
    PUT_A = 0           # INSERT side a's flow
    UPDATE_A = 1        # ... it was the host's (HOST): switch it with UPDATE
    PUT_B = 2
    UPDATE_B = 3
    UNDO_A = 4          # side b failed: side a back as it was
    DELETE_A = 5        # the end of a splice: both flows out of the table
    DELETE_B = 6


def _after_or_at(a, b):
    """``a`` is at or after ``b`` in 32-bit sequence space."""
    return ~(a - b)[31]


class SpliceEngine(wiring.Component):
    def __init__(self, slots=512, table=None):
        assert slots & (slots - 1) == 0, "slots must be a power of two"
        self.slots = slots
        self.geo = table if table is not None else Geometry(4096, stash=4, max_moves=256)
        assert 2 * slots <= 1 << FLOW_VALUE["slot"].width
        super().__init__({
            "rx": In(stream.Signature(FLOW_RECORD)),
            "verdict": Out(stream.Signature(SPLICE_VERDICT)),
            "desc": Out(stream.Signature(REWRITE)),
            "command": In(stream.Signature(SPLICE_COMMAND)),
            "event": Out(stream.Signature(EVENT)),
            "table_cmd": Out(stream.Signature(command_layout(self.geo, FLOW_VALUE.size))),
            "table_resp": In(stream.Signature(response_layout(self.geo, FLOW_VALUE.size))),
            "now": In(32), "idle_timeout": In(32), "linger": In(32),
            "spliced": Out(range(slots + 1)),
            "counters": Out(32 * len(SpCounter)),
        })

    def elaborate(self, platform):
        m = Module()
        slots = self.slots
        m.submodules.pool = pool = FreeList(slots)
        m.submodules.rewrites = rewrites = Memory(shape=REWRITE, depth=2 * slots, init=[])
        m.submodules.keys = keys = Memory(shape=_KEYS, depth=2 * slots, init=[])
        m.submodules.state = state = Memory(shape=SLOT_STATE, depth=slots, init=[])
        m.submodules.active = active = Memory(shape=1, depth=slots, init=[])
        rewrite_w, keys_w = rewrites.write_port(), keys.write_port()
        rewrite_rd, keys_rd = rewrites.read_port(), keys.read_port()   # the frame pipeline
        keys_ctl = keys.read_port()                                    # the control machine
        state_w = state.write_port()
        state_rd = state.read_port(transparent_for=(state_w,))
        state_scan = state.read_port()             # the sweeper and the control machine
        active_w = active.write_port()
        active_rd = active.read_port(transparent_for=(active_w,))
        active_scan = active.read_port(transparent_for=(active_w,))

        counters = [Signal(32, name=f"count_{c.name.lower()}") for c in SpCounter]
        m.d.comb += self.counters.eq(Cat(*counters))
        bump = Signal(len(SpCounter))
        for c, counter in enumerate(counters):
            with m.If(bump[c]):
                m.d.sync += counter.eq(counter + 1)

        # ============================================================ the frame pipeline
        # Stage 0: the record is taken; its slot entry's parameters are addressed.
        # Stage 1: the parameters are here: key check, TTL check, the descriptor;
        #          the slot's state and active bit are addressed.
        # Stage 2: the state and the active bit are here: the relay decision, registered,
        #          and the state as the record sees it, registered too (or the update
        #          being written in stage 4, when that record is of the same slot).
        # Stage 3: the update's sequence comparisons, registered (against stage 4's
        #          update when the record ahead is of the same slot).
        # Stage 4: update the state (written at the end of the cycle; the record three
        #          behind, in stage 1, reads it through: transparent port).
        # Stage 5: the verdict and the descriptor are registered into their FIFOs.
        # (A read-modify-write over three cycles: the block RAM's output, the comparisons
        # and the update's logic are in different cycles, and one record per cycle still
        # sees every update before it.)
        # In the NIC the verdicts wait for the handshake engine's (about 30 cycles more),
        # and the descriptors for their frames: the FIFOs hold that many at one per cycle.
        OUT_DEPTH = 64
        m.submodules.verdicts = verdicts = SyncFIFOBuffered(width=SPLICE_VERDICT.size,
                                                            depth=OUT_DEPTH)
        m.submodules.descs = descs = SyncFIFOBuffered(width=REWRITE.size, depth=OUT_DEPTH)
        for port, fifo in ((self.verdict, verdicts), (self.desc, descs)):
            m.d.comb += [port.valid.eq(fifo.r_rdy), port.payload.eq(fifo.r_data),
                         fifo.r_en.eq(port.ready)]

        s1_valid, s2_valid, s3_valid, s4_valid, s5_valid = (Signal(name=f"s{k}_valid")
                                                            for k in range(1, 6))
        in_flight = s1_valid + s2_valid + s3_valid + s4_valid + s5_valid
        room = Signal()
        m.d.comb += room.eq((verdicts.level + in_flight < OUT_DEPTH - 1)
                            & (descs.level + in_flight < OUT_DEPTH - 1))
        ctl_state_write = Signal()      # the control machine wants the state memory's port
        take = self.rx.valid & room & ~ctl_state_write
        m.d.comb += self.rx.ready.eq(room & ~ctl_state_write)

        rec = self.rx.payload
        meta = rec.meta
        entry = rec.value.slot[:(2 * slots - 1).bit_length()]
        m.d.comb += [rewrite_rd.addr.eq(entry), keys_rd.addr.eq(entry)]

        r1 = Signal(FLOW_RECORD)
        r1_claimed, r1_format_ok = Signal(), Signal()
        m.d.sync += s1_valid.eq(take)
        # Loaded in every cycle (used only with s1_valid): `take`, which depends on the FIFO
        # levels, then drives one flip-flop instead of the enable of the whole record.
        flags = meta.tcp.flags
        errors = meta.errors.as_value() & ~Cat(*[
            Const(name in ("bad_ip_checksum", "bad_tcp_checksum"), 1)
            for name, _ in PARSER_ERRORS])
        m.d.sync += [
            r1.eq(rec),
            r1_claimed.eq(rec.hit & (rec.value.kind == FlowKind.SPLICED)),
            r1_format_ok.eq((meta.frame_class == FrameClass.TCP) & ~meta.eth.vlan_valid
                            & (meta.ip.ihl == 5) & (errors == 0)
                            & ~(flags & TcpFlags.SYN).any() & ~meta.opt.unknown),
        ]

        # Stage 1.
        p = struct_value(_PARAMS, {"key": _KEYS(keys_rd.data).key, "rewrite": rewrite_rd.data})
        p = _PARAMS(p)
        m1 = r1.meta
        key = struct_value(FLOW_KEY, {"port": r1.ingress, "src": m1.ip.src, "dst": m1.ip.dst,
                                      "sport": m1.tcp.sport, "dport": m1.tcp.dport})
        m.d.comb += [state_rd.addr.eq(r1.value.slot[1:]), active_rd.addr.eq(r1.value.slot[1:])]
        r2 = Signal(data.StructLayout({
            "claimed": 1, "format_ok": 1, "ttl_ok": 1, "key_eq": FLOW_KEY.size // 2,
            "slot": range(slots),
            "side": 1, "flags": 8, "ack": 32, "length": 16,
            # seq and its delta from the block RAM, added a stage later (seq_out, in
            # stage 3); the FIN's end a stage after that (fin_end, in stage 4).
            "seq": 32, "seq_delta": 32, "seq_out": 32, "fin_end": 32}))
        r2_desc = Signal(REWRITE)
        m.d.sync += [
            s2_valid.eq(s1_valid),
            r2.eq(struct_value(r2.shape(), {
                "claimed": r1_claimed, "format_ok": r1_format_ok,
                "ttl_ok": (p.rewrite.ip.ttl != 0) | (m1.ip.ttl > 1),
                # In 2-bit parts (one LUT level after the block RAM), all true in stage 2.
                "key_eq": Cat(*[p.key.as_value()[i:i + 2] == key[i:i + 2]
                                for i in range(0, FLOW_KEY.size, 2)]),
                "slot": r1.value.slot[1:], "side": r1.value.slot[0],
                "flags": m1.tcp.flags, "ack": m1.tcp.ack, "length": m1.payload_length,
                "seq": m1.tcp.seq, "seq_delta": p.rewrite.seq_delta})),
            r2_desc.eq(struct_value(REWRITE, {
                **{name: p.rewrite[name] for name, _ in REWRITE
                   if name not in ("ts_offset", "sack_offset", "sack_blocks")},
                "ts_offset": m1.opt.ts_offset, "sack_offset": m1.opt.sack_offset,
                "sack_blocks": m1.opt.sack_blocks})),
        ]

        # Stage 2: decide; the state from the block RAM, or the update being written in
        # stage 4 when that record (two ahead) is of the same slot (its write is too late
        # for this record's read).
        key_ok = r2.key_eq.all()
        relay_2 = s2_valid & r2.claimed & r2.format_ok & r2.ttl_ok & key_ok & active_rd.data
        r3 = Signal(r2.shape())
        r4 = Signal(r2.shape())
        r3_desc = Signal(REWRITE)
        r4_desc = Signal(REWRITE)
        relay3 = Signal()               # registered: the record in stage 3 is relayed
        relay = Signal()                # the record in stage 4 is relayed
        # A slot's state as a record sees it: `mine` (the direction the record travels)
        # and `other`, so that no direction select sits in the update's loop.
        seen_mine, seen_other = Signal(DIRECTION_STATE), Signal(DIRECTION_STATE)   # stage 3
        seen_deadline, seen_end = Signal(32), Signal(2)
        mine, other = Signal(DIRECTION_STATE), Signal(DIRECTION_STATE)             # stage 4
        st_deadline, st_end = Signal(32), Signal(2)
        new_state = Signal(SLOT_STATE)  # the state after stage 4's record (written if relayed)
        mine_new, other_new = Signal(DIRECTION_STATE), Signal(DIRECTION_STATE)
        read = SLOT_STATE(state_rd.data)

        # Which records ahead are of the same slot, and travel the same way, compared a
        # cycle early and registered: stage 2's with stage 4's, stage 3's with stage 4's.
        r1_slot = r1.value.slot[1:1 + (slots - 1).bit_length()]
        r1_side = r1.value.slot[0]
        slot_2_4, side_2_4, slot_3_4, side_3_4 = Signal(), Signal(), Signal(), Signal()
        m.d.sync += [slot_2_4.eq(r3.slot == r1_slot), side_2_4.eq(r3.side == r1_side),
                     slot_3_4.eq(r3.slot == r2.slot), side_3_4.eq(r3.side == r2.side)]

        def turned(same):
            """Stage 4's update as a record travelling the `same` way or not sees it."""
            return Mux(same, mine_new, other_new), Mux(same, other_new, mine_new)

        m.d.sync += [s3_valid.eq(s2_valid), r3.eq(r2), r3_desc.eq(r2_desc), relay3.eq(relay_2),
                     r3.seq_out.eq(r2.seq + r2.seq_delta)]
        with m.If(relay & slot_2_4):
            fwd_mine, fwd_other = turned(side_2_4)
            m.d.sync += [seen_mine.eq(fwd_mine), seen_other.eq(fwd_other),
                         seen_deadline.eq(new_state.deadline), seen_end.eq(new_state.end)]
        with m.Else():
            m.d.sync += [seen_mine.eq(Mux(r2.side, read.dir[1], read.dir[0])),
                         seen_other.eq(Mux(r2.side, read.dir[0], read.dir[1])),
                         seen_deadline.eq(read.deadline), seen_end.eq(read.end)]
        # Counted in stage 3, from the registered decision (two cycles before the verdict
        # leaves).
        with m.If(s3_valid & r3.claimed):
            m.d.comb += [bump[SpCounter.RELAYED].eq(relay3),
                         bump[SpCounter.TO_HOST_FORMAT].eq(~r3.format_ok),
                         bump[SpCounter.TO_HOST_TTL].eq(r3.format_ok & ~r3.ttl_ok),
                         bump[SpCounter.TO_HOST_STALE].eq(r3.format_ok & r3.ttl_ok & ~relay3)]

        # Stage 3: the update's three sequence comparisons, registered for stage 4 (no
        # carry chain in the update's loop): `c_newer` (the ACK is at or after
        # mine.acked), `c_fin` (at or after other.fin_end), `c_rst` (seq_out is
        # other.acked); against the state seen, or stage 4's update when that record (one
        # ahead) is of the same slot: its fields are then registers of stage 4.
        c_newer, c_fin, c_rst = Signal(), Signal(), Signal()
        fin, rst, ack = r4.flags[0], r4.flags[2], r4.flags[4]   # TcpFlags FIN, RST, ACK bits
        assert (TcpFlags.FIN, TcpFlags.RST, TcpFlags.ACK) == (1, 4, 16)
        fin_first = fin & ~mine.fin_seen            # mine_new.fin_end is r4.fin_end
        newer_ack = ack & (~mine.acked_ok | c_newer)
        ge = _after_or_at
        forward = relay & slot_3_4
        m.d.sync += [s4_valid.eq(s3_valid), r4.eq(r3), r4_desc.eq(r3_desc), relay.eq(relay3),
                     r4.fin_end.eq(r3.seq_out + r3.length + 1)]
        with m.If(forward):
            fwd_mine, fwd_other = turned(side_3_4)
            m.d.sync += [mine.eq(fwd_mine), other.eq(fwd_other),
                         st_deadline.eq(new_state.deadline), st_end.eq(new_state.end)]
        with m.Else():
            m.d.sync += [mine.eq(seen_mine), other.eq(seen_other),
                         st_deadline.eq(seen_deadline), st_end.eq(seen_end)]
        with m.If(forward & side_3_4):              # it sees mine_new, other_new
            m.d.sync += [c_newer.eq(Mux(newer_ack, ge(r3.ack, r4.ack), ge(r3.ack, mine.acked))),
                         c_fin.eq(ge(r3.ack, other.fin_end)),
                         c_rst.eq(r3.seq_out == other.acked)]
        with m.Elif(forward):                       # it sees other_new, mine_new
            m.d.sync += [c_newer.eq(ge(r3.ack, other.acked)),
                         c_fin.eq(Mux(fin_first, ge(r3.ack, r4.fin_end),
                                      ge(r3.ack, mine.fin_end))),
                         c_rst.eq(Mux(newer_ack, r3.seq_out == r4.ack,
                                      r3.seq_out == mine.acked))]
        with m.Else():
            m.d.sync += [c_newer.eq(ge(r3.ack, seen_mine.acked)),
                         c_fin.eq(ge(r3.ack, seen_other.fin_end)),
                         c_rst.eq(r3.seq_out == seen_other.acked)]

        # Stage 4: the update.
        m.d.comb += mine_new.eq(struct_value(DIRECTION_STATE, {
            "packets": mine.packets + 1, "bytes": mine.bytes + r4.length,
            "fin_seen": mine.fin_seen | fin,
            "fin_end": Mux(fin_first, r4.fin_end, mine.fin_end),
            "fin_acked": mine.fin_acked,
            "acked_ok": mine.acked_ok | ack,
            "acked": Mux(newer_ack, r4.ack, mine.acked)}))
        other_fin_acked = other.fin_acked | (ack & other.fin_seen & c_fin)
        m.d.comb += other_new.eq(struct_value(DIRECTION_STATE, {
            **{name: other[name] for name, _ in DIRECTION_STATE if name != "fin_acked"},
            "fin_acked": other_fin_acked}))
        exact_rst = rst & other.acked_ok & c_rst
        both_done = mine.fin_acked & other_fin_acked
        # The deadlines a segment may set, a cycle old (a tick lasts many cycles).
        at_idle, at_linger = Signal(32), Signal(32)
        m.d.sync += [at_idle.eq(self.now + self.idle_timeout), at_linger.eq(self.now + self.linger)]
        m.d.comb += new_state.eq(struct_value(SLOT_STATE, {
            "dir": Mux(r4.side, Cat(other_new, mine_new), Cat(mine_new, other_new)),
            "deadline": Mux(st_end != 0, st_deadline,
                            Mux(exact_rst, self.now, Mux(both_done, at_linger, at_idle))),
            "end": Mux(st_end != 0, st_end,
                       Mux(exact_rst, SpliceEnd.RESET,
                           Mux(both_done, SpliceEnd.NORMAL, 0)))}))

        # The control machine's state writes (new splices) use the same port, in cycles
        # with no record in stages 2 to 4 (it holds the input first).
        ctl_write = Signal()            # registered: the control machine writes a state
        slot = Signal(range(slots))     # the control machine's slot
        with m.If(relay):
            m.d.comb += [state_w.addr.eq(r4.slot), state_w.data.eq(new_state),
                         state_w.en.eq(1)]
        with m.Elif(ctl_write):
            # A new splice's state: nothing relayed yet, the idle deadline from now.
            m.d.comb += [state_w.addr.eq(slot),
                         state_w.data.eq(struct_value(SLOT_STATE, {"deadline": at_idle})),
                         state_w.en.eq(1)]

        # Stage 5.
        s5_verdict = Signal(SPLICE_VERDICT)
        s5_relay = Signal()
        s5_desc = Signal(REWRITE)
        m.d.sync += [s5_valid.eq(s4_valid), s5_relay.eq(relay), s5_desc.eq(r4_desc),
                     s5_verdict.eq(struct_value(SPLICE_VERDICT, {
                         "claimed": r4.claimed, "to_host": r4.claimed & ~relay,
                         "to_splice": relay}))]
        m.d.comb += [verdicts.w_en.eq(s5_valid), verdicts.w_data.eq(s5_verdict),
                     descs.w_en.eq(s5_valid & s5_relay), descs.w_data.eq(s5_desc)]

        # ============================================================ sweeper
        # Three steps, each from registers: address slot `sweep`; register its active bit,
        # deadline and end; decide `due`. While a splice is being ended (the control
        # machine not idle) the sweep stops and the slots in its first two steps are
        # dropped (looked at again on the next round, at most `slots` cycles later).
        sweep = Signal(range(slots))
        ctl_idle = Signal()
        due = Signal()                  # registered: slot `due_slot` has ended
        due_slot = Signal(range(slots))
        due_end = Signal(2)
        moving = ctl_idle & ~due
        scan = SLOT_STATE(state_scan.data)
        scan_addr = Signal(range(slots))
        m.d.comb += [state_scan.addr.eq(scan_addr), active_scan.addr.eq(scan_addr)]
        read_valid, read_slot = Signal(), Signal(range(slots))      # the ports hold it
        seen_valid, seen_slot = Signal(), Signal(range(slots))      # registered
        seen_active, seen_deadline, seen_end = Signal(), Signal(32), Signal(2)
        with m.If(moving):
            m.d.sync += sweep.eq(sweep + 1)
        m.d.sync += [
            read_valid.eq(moving), read_slot.eq(sweep),
            seen_valid.eq(read_valid & moving), seen_slot.eq(read_slot),
            seen_active.eq(active_scan.data), seen_deadline.eq(scan.deadline),
            seen_end.eq(scan.end),
            due.eq(seen_valid & moving & seen_active
                   & deadline_passed(self.now, seen_deadline)),
            due_slot.eq(seen_slot),
            due_end.eq(Mux(seen_end != 0, seen_end, SpliceEnd.IDLE)),
        ]

        # ============================================================ control machine
        cmd = Signal(SPLICE_COMMAND)
        status = Signal(4)
        ending = Signal(2)                       # SpliceEnd of the splice being finished
        a_was_host = Signal()
        key_a, key_b = Signal(FLOW_KEY), Signal(FLOW_KEY)
        tag = Signal(16)
        done_state = Signal(SLOT_STATE)
        # The keys' control read port is addressed from registers only (not from the
        # state decode): side a's entry in END_KEYS, side b's in END_KEY_A.
        end_side = Signal()
        m.d.comb += keys_ctl.addr.eq(Cat(end_side, slot))
        cmd_layout = command_layout(self.geo, FLOW_VALUE.size)
        resp = self.table_resp.payload
        resp_kind = FLOW_VALUE(resp.value).kind

        def table(op, key, side_bit=0):
            return struct_value(cmd_layout, {
                "op": op, "key": key,
                "value": struct_value(FLOW_VALUE, {"kind": FlowKind.SPLICED,
                                                   "slot": Cat(side_bit, slot)})})

        def refused(code):
            return Mux(resp.status == Status.FULL, SpliceStatus.TABLE_FULL,
                       Mux((resp.status == Status.DUPLICATE) & (resp_kind != FlowKind.HOST),
                           SpliceStatus.ALREADY, code))

        spliced = Signal(range(slots + 1))
        m.d.comb += self.spliced.eq(spliced)
        step = Signal(_Step)

        def side_key(side):
            return struct_value(FLOW_KEY, {"port": side.ingress, "src": side.peer_ip,
                                           "dst": side.local_ip, "sport": side.peer_port,
                                           "dport": side.local_port})
        side_key_a, side_key_b = side_key(cmd.a), side_key(cmd.b)
        # CHECK's tests, registered with the command (the 104-bit compare is then not in
        # front of the free list's read).
        same_flow, ts_mismatch = Signal(), Signal()
        event = Signal(EVENT)
        m.d.comb += self.event.payload.eq(event)
        host_value = struct_value(FLOW_VALUE, {"kind": FlowKind.HOST})
        table_cmd = Signal(cmd_layout)
        with m.Switch(step):
            for case, command in {
                    _Step.PUT_A: table(Op.INSERT, side_key_a, 0),
                    _Step.UPDATE_A: table(Op.UPDATE, side_key_a, 0),
                    _Step.PUT_B: table(Op.INSERT, side_key_b, 1),
                    _Step.UPDATE_B: table(Op.UPDATE, side_key_b, 1),
                    # side a back to what it was: the host's flow, or no entry
                    _Step.UNDO_A: Mux(a_was_host, struct_value(cmd_layout, {
                        "op": Op.UPDATE, "key": side_key_a, "value": host_value}),
                        table(Op.DELETE, side_key_a)),
                    _Step.DELETE_A: table(Op.DELETE, key_a),
                    _Step.DELETE_B: table(Op.DELETE, key_b)}.items():
                with m.Case(case):
                    m.d.comb += table_cmd.eq(command)

        # The event and the memory writes are selected by registers (`ending_splice`,
        # `write_b`), not by the machine's state: its state bits then drive few loads.
        ending_splice = Signal()        # the machine is finishing a splice (SPLICE_DONE)
        write_b = Signal()              # WRITE: side b's entries (else side a's)
        m.d.comb += event.eq(Mux(ending_splice,
            struct_value(EVENT, {
                "kind": EventKind.SPLICE_DONE, "status": ending, "tag": tag,
                "ingress": key_a.port, "peer_ip": key_a.src,
                "local_ip": key_a.dst, "peer_port": key_a.sport,
                "local_port": key_a.dport,
                "packets_a": done_state.dir[0].packets,
                "bytes_a": done_state.dir[0].bytes,
                "packets_b": done_state.dir[1].packets,
                "bytes_b": done_state.dir[1].bytes}),
            struct_value(EVENT, {
                "kind": EventKind.SPLICE_STATUS, "status": status,
                "tag": cmd.tag, "ingress": cmd.a.ingress,
                "eth": {"peer": cmd.a.peer_mac, "local": cmd.a.local_mac},
                "peer_ip": cmd.a.peer_ip, "local_ip": cmd.a.local_ip,
                "peer_port": cmd.a.peer_port, "local_port": cmd.a.local_port})))
        side_shape = SPLICE_COMMAND["a"].shape
        src = side_shape(Mux(write_b, cmd.b.as_value(), cmd.a.as_value()))
        dst = side_shape(Mux(write_b, cmd.a.as_value(), cmd.b.as_value()))
        values = splice_params(src, dst, cmd.tag)
        m.d.comb += [
            rewrite_w.addr.eq(Cat(write_b, slot)),
            rewrite_w.data.eq(struct_value(REWRITE, values["rewrite"])),
            keys_w.addr.eq(Cat(write_b, slot)),
            keys_w.data.eq(struct_value(_KEYS, {"key": values["key"], "tag": values["tag"]}))]

        # The scan port reads the sweep's slot, or the slot being ended (from STOP to
        # COUNTS; the sweep stands still meanwhile): chosen by a register.
        m.d.comb += scan_addr.eq(Mux(ending_splice, slot, sweep))

        # Registered: only this machine allocates and releases slots, and it passes
        # through ANSWER and IDLE between a release and the next CHECK.
        no_free = Signal()
        m.d.sync += no_free.eq(pool.free == 0)
        with m.FSM(name="control"):
            with m.State("IDLE"):
                m.d.comb += ctl_idle.eq(1)
                with m.If(due):
                    m.d.sync += [slot.eq(due_slot), ending.eq(due_end), end_side.eq(0),
                                 ending_splice.eq(1)]
                    m.next = "END_KEYS"
                with m.Elif(self.command.valid):
                    m.d.comb += self.command.ready.eq(1)
                    new = self.command.payload
                    m.d.sync += [cmd.eq(new), a_was_host.eq(0), ending_splice.eq(0),
                                 same_flow.eq(side_key(new.a) == side_key(new.b)),
                                 ts_mismatch.eq(new.a.ts_ok != new.b.ts_ok)]
                    m.next = "CHECK"

            # ---------------------------------------------------- a SPLICE command
            with m.State("CHECK"):
                with m.If(same_flow):
                    m.d.sync += status.eq(SpliceStatus.SAME_FLOW)
                    m.next = "ANSWER"
                with m.Elif(ts_mismatch):
                    m.d.sync += status.eq(SpliceStatus.TS_MISMATCH)
                    m.next = "ANSWER"
                with m.Elif(no_free):
                    m.d.sync += status.eq(SpliceStatus.NO_SLOT)
                    m.next = "ANSWER"
                with m.Else():
                    # Ready whether or not a slot is there (after a reset the pool fills
                    # first): the free list's read does not wait for its own valid.
                    m.d.comb += pool.alloc.ready.eq(1)
                    with m.If(pool.alloc.valid):
                        m.d.sync += [slot.eq(pool.alloc.payload), status.eq(SpliceStatus.OK),
                                     write_b.eq(0)]
                        m.next = "WRITE"
            with m.State("WRITE"):                 # side a's entries, then side b's
                m.d.comb += [rewrite_w.en.eq(1), keys_w.en.eq(1)]
                m.d.sync += write_b.eq(1)
                with m.If(write_b):
                    m.next = "INIT"
            with m.State("INIT"):
                # Hold the record input until stages 2 to 4 are empty; the state and the
                # active bit are written in the next cycle (stage 4 is still empty then),
                # from registers: `ctl_write` next to the memory, the deadline `at_idle`.
                m.d.comb += ctl_state_write.eq(1)
                with m.If(~s2_valid & ~s3_valid & ~s4_valid):
                    m.d.sync += ctl_write.eq(1)
                    m.next = "INIT_WRITE"
            with m.State("INIT_WRITE"):
                m.d.comb += [ctl_state_write.eq(1),
                             active_w.addr.eq(slot), active_w.data.eq(1), active_w.en.eq(1)]
                m.d.sync += [ctl_write.eq(0), step.eq(_Step.PUT_A)]
                m.next = "TABLE"
            with m.State("TABLE"):
                m.d.comb += [self.table_cmd.valid.eq(1), self.table_cmd.payload.eq(table_cmd)]
                with m.If(self.table_cmd.ready):
                    m.next = "TABLE_WAIT"
            with m.State("TABLE_WAIT"):
                # Each table step's answer decides the next step (see _Step).
                m.d.comb += self.table_resp.ready.eq(1)
                ok = resp.status == Status.OK
                host_flow = (resp.status == Status.DUPLICATE) & (resp_kind == FlowKind.HOST)
                with m.If(self.table_resp.valid):
                    with m.Switch(step):
                        with m.Case(_Step.PUT_A):
                            with m.If(ok):
                                m.d.sync += step.eq(_Step.PUT_B)
                                m.next = "TABLE"
                            with m.Elif(host_flow):
                                m.d.sync += [step.eq(_Step.UPDATE_A), a_was_host.eq(1)]
                                m.next = "TABLE"
                            with m.Else():
                                m.d.sync += status.eq(refused(SpliceStatus.TABLE_ERROR))
                                m.next = "DEACTIVATE"
                        with m.Case(_Step.UPDATE_A):
                            with m.If(ok):
                                m.d.sync += step.eq(_Step.PUT_B)
                                m.next = "TABLE"
                            with m.Else():
                                m.d.sync += [status.eq(SpliceStatus.TABLE_ERROR), a_was_host.eq(0)]
                                m.next = "DEACTIVATE"
                        with m.Case(_Step.PUT_B):
                            with m.If(ok):
                                m.next = "ANSWER"
                            with m.Elif(host_flow):
                                m.d.sync += step.eq(_Step.UPDATE_B)
                                m.next = "TABLE"
                            with m.Else():
                                m.d.sync += [status.eq(refused(SpliceStatus.TABLE_ERROR)),
                                             step.eq(_Step.UNDO_A)]
                                m.next = "TABLE"
                        with m.Case(_Step.UPDATE_B):
                            with m.If(ok):
                                m.next = "ANSWER"
                            with m.Else():
                                m.d.sync += [status.eq(SpliceStatus.TABLE_ERROR),
                                             step.eq(_Step.UNDO_A)]
                                m.next = "TABLE"
                        with m.Case(_Step.UNDO_A):
                            m.next = "DEACTIVATE"
                        with m.Case(_Step.DELETE_A):
                            m.d.comb += bump[SpCounter.DELETE_FAILED].eq(~ok)
                            m.d.sync += step.eq(_Step.DELETE_B)
                            m.next = "TABLE"
                        with m.Case(_Step.DELETE_B):
                            m.d.comb += bump[SpCounter.DELETE_FAILED].eq(~ok)
                            m.next = "STOP"
            with m.State("DEACTIVATE"):
                m.d.comb += [active_w.addr.eq(slot), active_w.data.eq(0), active_w.en.eq(1),
                             pool.release.valid.eq(1), pool.release.payload.eq(slot)]
                m.next = "ANSWER"
            with m.State("ANSWER"):
                m.d.comb += self.event.valid.eq(1)
                with m.If(self.event.ready):
                    m.d.comb += [bump[SpCounter.SPLICE_OK].eq(status == SpliceStatus.OK),
                                 bump[SpCounter.SPLICE_REFUSED].eq(status != SpliceStatus.OK)]
                    with m.If(status == SpliceStatus.OK):
                        m.d.sync += spliced.eq(spliced + 1)
                    m.next = "IDLE"

            # ---------------------------------------------------- the end of a splice
            with m.State("END_KEYS"):              # reads side a's key
                m.d.sync += end_side.eq(1)
                m.next = "END_KEY_A"
            with m.State("END_KEY_A"):             # reads side b's key
                m.d.sync += [key_a.eq(_KEYS(keys_ctl.data).key), tag.eq(_KEYS(keys_ctl.data).tag)]
                m.next = "END_KEY_B"
            with m.State("END_KEY_B"):
                m.d.sync += [key_b.eq(_KEYS(keys_ctl.data).key), step.eq(_Step.DELETE_A)]
                m.next = "TABLE"
            with m.State("STOP"):
                # From here on the slot's frames go to the host; its counts are final once
                # the frames past the active bit's read (stages 2 to 4) have updated them.
                m.d.comb += [active_w.addr.eq(slot), active_w.data.eq(0), active_w.en.eq(1)]
                m.next = "DRAIN"
            with m.State("DRAIN"):
                m.next = "DRAIN_2"
            with m.State("DRAIN_2"):
                m.next = "COUNTS"
            with m.State("COUNTS"):              # (the scan port reads `slot`)
                m.next = "COUNTS_READ"
            with m.State("COUNTS_READ"):
                m.d.sync += done_state.eq(state_scan.data)
                m.next = "REPORT"
            with m.State("REPORT"):
                m.d.comb += self.event.valid.eq(1)
                with m.If(self.event.ready):
                    m.d.comb += [pool.release.valid.eq(1), pool.release.payload.eq(slot),
                                 bump[SpCounter.ENDED_NORMAL].eq(ending == SpliceEnd.NORMAL),
                                 bump[SpCounter.ENDED_RESET].eq(ending == SpliceEnd.RESET),
                                 bump[SpCounter.ENDED_IDLE].eq(ending == SpliceEnd.IDLE)]
                    m.d.sync += [spliced.eq(spliced - 1), ending_splice.eq(0)]
                    m.next = "IDLE"
        return m

