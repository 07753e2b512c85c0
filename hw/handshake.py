"""The handshake engine: passive open with SYN cookies and active open, at line rate.

``HandshakeEngine(listeners=16, connects=8)`` takes one record per received frame (the parser's
``PARSER_META`` plus the ingress port and the connection-table verdict) and decides,
in frame order, what happens to the frame and whether the NIC answers it:

====================================================  ==========  =======================
segment (IPv4/TCP, no parser error, no VLAN tag,      frame       NIC sends / reports
no connection-table entry)
====================================================  ==========  =======================
no listener, SYN (no ACK, no RST)                     dropped     RST/ACK (as Linux)
no listener, anything else                            host
listener with offload off                             host
offloaded listener, SYN only (FIN clear)              dropped     SYN-ACK, ISS = cookie
offloaded listener, ACK (no SYN, no RST), cookie ok   host if it  *established* event
                                                      carries
                                                      data or FIN
offloaded listener, ACK, cookie bad or expired        dropped     RST (``rst_bad_cookie``)
offloaded listener, SYN+ACK                           dropped     RST (as Linux in LISTEN)
offloaded listener, RST, SYN+FIN, no SYN/ACK/RST      dropped
====================================================  ==========  =======================

Frames that are not IPv4/TCP, carry a parser error flag, have a VLAN tag (the builder
sends untagged frames, so the NIC does not answer tagged ones) or belong to a flow in
the connection table go to the host untouched. Every decision has a ``Reason``; the
``counters`` port counts each one.

The cookie (``hw.syn_cookie``) is SipHash-2-4 under one of two host keys: ``SET_KEY``
on ``control`` writes the other key slot and makes it current; the previous key is
accepted for two more cookie periods. ``cookie_period`` (cycles per tick of the coarse
counter) and ``ts_period`` (cycles per tick of the timestamp clock) are inputs; 0 stops
the counter.

Active open: ``CONNECT`` on ``control`` takes one of ``connects`` slots (none free: a
FAILED event with status BUSY at once) and sends the SYN with the requested options.
A slot's timer is looked at every ``connects`` cycles: the SYN is sent again after
``syn_rto`` cycles, then 2, 4, ... times that, ``syn_retries`` times, then the slot is
freed with a FAILED/TIMEOUT event. Segments of a connecting 4-tuple (matched before the
listeners):

====================================================  =====================================
SYN+ACK acknowledging our ISS                         ACK sent, *established* event, slot freed
SYN+ACK with another ACK number                       RST sent (SEQ = its ACK), slot kept
RST acknowledging our ISS                             FAILED/RESET event, slot freed
anything else (including an unacceptable RST)         dropped
====================================================  =====================================

All of these frames are dropped (not given to the host). A slot freed by its timer while
a segment for it is in the pipeline makes that segment a plain drop (each slot carries
a generation number). The host must not CONNECT a 4-tuple that is already connecting.

Latency: ``latency`` (32) cycles from an accepted record to its verdict, SYN-ACK header
and event on the output streams (the SipHash pipeline is 22 of them).
Throughput: one record per cycle while the outputs are read; ``rx.ready`` is a credit
check (records in flight + FIFO levels), so the pipeline itself never stalls.

Ports
  rx         In(stream of HANDSHAKE_IN)   one record per received frame, in frame order
  verdict    Out(stream of VERDICT)       one per record, in order: to the host or dropped
  tx         Out(stream of TX_HEADER)     SYN-ACKs and RSTs, for ``hw.builder.TxBuilder``
  event      Out(stream of EVENT)         *established* and *failed* events
  control    In(stream of CONTROL)        WRITE_LISTENER, SET_KEY (always ready), CONNECT
                                          (ready unless a SYN or event of the connect
                                          slots is still waiting)
  syn_rto    In(32), syn_retries In(4)    active open: first timeout (cycles), retransmissions
  cookie_period, ts_period   In(32)       cycles per counter tick (0: stopped)
  rst_bad_cookie             In(1)        answer a bad cookie ACK with RST instead of dropping it
  cookie_count, ts_clock     Out(32)      the counters (for tests and diagnostics)
  counters   Out(32 * len(Reason))        frames per ``Reason``: bits 32*r .. 32*r+31 count r
                                          (a flat vector: Yosys' abc9 trips on array ports)
"""

import enum

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from hw.conn_table import FLOW_KEY
from hw.headers import TcpFlags
from hw.listen_table import LISTEN_ENTRY, ListenTable
from hw.metadata import EVENT, PARSER_META, TX_HEADER, EventKind, FailStatus, FrameClass
from hw.pipeline import Pipeline
from hw.siphash import siphash_latency, siphash_pipeline
from hw.stream import lowest_set, one_hot_select, struct_value
from hw.syn_cookie import (COOKIE_ISS, COOKIE_MESSAGE, DEFAULT_MSS, MAX_WSCALE, MSS_TABLE,
                           TS_OPTION_BITS, TS_SACK, WSCALE_NONE)

__all__ = ["HandshakeEngine", "HANDSHAKE_IN", "VERDICT", "Reason", "ControlOp",
           "CONNECT_REQUEST", "DEFAULT_CONNECTS", "DEFAULT_RECENT", "control_layout",
           "REPLY_TTL"]


class Reason(enum.IntEnum):
    """Why a frame went where it went (one counter each)."""
    NOT_TCP = 0             # host: not IPv4/TCP (or a fragment)
    PARSE_ERROR = 1         # host: a parser error flag is set
    VLAN = 2                # host: 802.1Q-tagged
    FLOW = 3                # host: the connection table holds the flow
    NO_LISTENER = 4         # host: no listener, not a SYN
    CLOSED_PORT = 5         # dropped, RST/ACK sent: a SYN to a port with no listener
    NOT_OFFLOADED = 6       # host: the listener does not offload
    SYN_COOKIE = 7          # dropped, SYN-ACK sent
    COOKIE_OK = 8           # established event; the frame to the host if it has data or FIN
    COOKIE_BAD = 9          # dropped (RST sent when rst_bad_cookie)
    LISTEN_DISCARD = 10     # dropped: RST, SYN+FIN, or no SYN/ACK/RST to a listener
    LISTEN_SYNACK = 11      # dropped, RST sent: a SYN+ACK to a listener
    ACTIVE_ESTABLISHED = 12  # dropped, ACK sent, established event: the SYN-ACK of a CONNECT
    ACTIVE_RESET = 13       # dropped, failed event: an acceptable RST to a CONNECT
    ACTIVE_BAD_ACK = 14     # dropped, RST sent: a SYN-ACK to a CONNECT with a wrong ACK
    ACTIVE_DISCARD = 15     # dropped: anything else to a connecting 4-tuple


class ControlOp(enum.IntEnum):
    WRITE_LISTENER = 1      # listen-table entry ``index`` := ``entry``
    SET_KEY = 2             # rotate: ``key`` becomes the current cookie key
    CONNECT = 3             # active open of ``connect``


#: An active open, as the host asks for it. ``window`` is our receive window in bytes
#: (sent unscaled in the SYN, scaled by ``wscale`` afterwards when both sides scale).
CONNECT_REQUEST = data.StructLayout({
    "ingress": 8,
    "peer_mac": 48, "local_mac": 48,
    "local_ip": 32, "peer_ip": 32, "local_port": 16, "peer_port": 16,
    "iss": 32,
    "mss": 16, "wscale_ok": 1, "wscale": 4, "sack_ok": 1, "ts_ok": 1,
    "window": 16,
})

#: A connect slot: the request, and its retransmission state.
_SLOT = data.StructLayout({
    "active": 1, "gen": 4, "retries": 4, "deadline": 32, "rto": 32, "ack_expected": 32,
    "req": CONNECT_REQUEST,
})


#: One record per received frame.
HANDSHAKE_IN = data.StructLayout({
    "meta": PARSER_META,
    "ingress": 8,                     # the port the frame came in on
    "flow_hit": 1,                    # the connection table holds this 4-tuple
})

#: The engine's decision for one frame.
VERDICT = data.StructLayout({
    "to_host": 1,                     # 1: deliver the frame to the host; 0: drop it
    "reason": 4,                      # Reason
})

#: Connect slots (active opens in progress) by default.
DEFAULT_CONNECTS = 8

#: Recently established connections remembered by default.
DEFAULT_RECENT = 16

#: TTL of the segments the NIC sends.
REPLY_TTL = 64


def control_layout(listeners):
    return data.StructLayout({
        "op": 2,                      # ControlOp
        "index": range(listeners),
        "entry": LISTEN_ENTRY,
        "key": 128,
        "connect": CONNECT_REQUEST,
    })


# What a frame is, as far as the engine can tell before the cookie is known.
class _Class(enum.IntEnum):
    PASS = 0            # to the host, reason as computed
    CLOSED_SYN = 1
    SYN = 2
    CHECK_ACK = 3
    DISCARD = 4
    SYNACK = 5
    ACTIVE_EST = 6
    ACTIVE_RST = 7
    ACTIVE_BAD = 8
    ACTIVE_DISCARD = 9


#: A recently established connection and the cycles it is still remembered for.
_RECENT = data.StructLayout({"tuple": FLOW_KEY, "left": 13})

#: Everything stage C (classify) hands to the output stage, carried past the hash in LUT RAM.
_CARRY = data.StructLayout({
    "cls": 4, "reason": 4, "ingress": 8, "listener": 8, "slot_gen": 4, "a_mss": 16,
    "eth_peer": 48, "eth_local": 48,
    "peer_ip": 32, "local_ip": 32, "peer_port": 16, "local_port": 16,
    "seq": 32, "ack": 32, "iss": 32, "fin": 1, "window": 16, "payload_length": 16,
    "tsval": 32, "tsecr": 32, "ts_ok": 1, "ts_options": TS_OPTION_BITS,
    "mss_index": 2, "count_lsb": 1, "key_gen": 1, "key_ok": 1,
    "l_mss": 16, "l_wscale": 4, "l_window": 16,
})


def _eq_parts(a, b, part):
    """Equality of ``a`` and ``b`` per ``part``-bit slice (a bit each): all ones when a == b."""
    return Cat(*[a[i:i + part] == b[i:i + part] for i in range(0, len(a), part)])


def _mss_index(mss):
    return Mux(mss >= MSS_TABLE[3], 3, Mux(mss >= MSS_TABLE[2], 2, Mux(mss >= MSS_TABLE[1], 1, 0)))


def _ticker(m, period, name):
    """A tick every ``period`` cycles (0: none), as a register. ``divider`` counts the
    cycles of the current period (0 .. period - 1) and the tick is set for the cycle in
    which it is ``period - 1``, decided a cycle ahead (from ``divider + 1``): the compare
    with the 32-bit input stays off the paths of the counters that the tick enables.
    (So a new ``period`` is seen a cycle after it is set.)"""
    divider = Signal(32, name=f"{name}_divider")
    tick = Signal(name=f"{name}_tick")
    m.d.sync += [
        divider.eq(Mux(tick | (period == 0), 0, divider + 1)),
        # Next cycle's divider: 0 after a tick, else divider + 1 (>= period - 1 then).
        tick.eq((period != 0) & Mux(tick, period == 1, divider + 2 >= period)),
    ]
    return tick


class HandshakeEngine(wiring.Component):
    #: Depth of each output FIFO (more than the records in flight).
    FIFO_DEPTH = 64

    #: How long a newly established connection's segments bypass the cookie check
    #: (cycles): longer than the connection table takes to insert it (25 cycles
    #: typically, 2077 at worst) plus the records queued before the engine.
    RECENT_CYCLES = 4096

    def __init__(self, listeners=16, connects=DEFAULT_CONNECTS, recent=DEFAULT_RECENT):
        assert listeners <= 256 and 2 <= connects <= 256, "the event's listener field is 8 bits"
        self.listeners = listeners
        self.connects = connects
        self.recent = recent
        super().__init__({
            "rx": In(stream.Signature(HANDSHAKE_IN)),
            "verdict": Out(stream.Signature(VERDICT)),
            "tx": Out(stream.Signature(TX_HEADER)),
            "event": Out(stream.Signature(EVENT)),
            "control": In(stream.Signature(control_layout(listeners))),
            "cookie_period": In(32),
            "ts_period": In(32),
            "rst_bad_cookie": In(1),
            "syn_rto": In(32),
            "syn_retries": In(4),
            "cookie_count": Out(32),
            "ts_clock": Out(32),
            "counters": Out(32 * len(Reason)),
        })

    #: Stage of the hash input (after the input register and the listen table).
    HASH_AT = 1 + ListenTable.LATENCY + 1

    @property
    def decide_at(self):
        return self.HASH_AT + siphash_latency(COOKIE_MESSAGE.size)

    @property
    def latency(self):
        """Cycles from an accepted record to its outputs, valid on the output streams
        (two decision stages, formatting, write the FIFOs, their output register)."""
        return self.decide_at + 5

    def elaborate(self, platform):
        m = Module()
        m.submodules.listen = listen = ListenTable(self.listeners)

        # ------------------------------------------------------------ control and clocks
        keys = [Signal(128, name=f"key_{g}") for g in range(2)]
        gen = Signal()
        key_set = Signal()          # a key has been set since reset: offload may start
        previous_ticks = Signal(2)
        cookie_tick = _ticker(m, self.cookie_period, "cookie")
        count_before = Signal(32, init=2**32 - 1)       # always cookie_count - 1
        with m.If(cookie_tick):
            m.d.sync += [self.cookie_count.eq(self.cookie_count + 1),
                         count_before.eq(self.cookie_count)]
            with m.If(previous_ticks != 0):
                m.d.sync += previous_ticks.eq(previous_ticks - 1)
        with m.If(_ticker(m, self.ts_period, "ts")):
            m.d.sync += self.ts_clock.eq(self.ts_clock + 1)

        ctl = self.control.payload
        control_accept = self.control.valid & self.control.ready
        # Only a CONNECT waits for the side registers (below): the listen table's and
        # the keys' writes do not depend on them.
        m.d.comb += [listen.write.valid.eq(self.control.valid
                                           & (ctl.op == ControlOp.WRITE_LISTENER)),
                     listen.write.payload.index.eq(ctl.index),
                     listen.write.payload.entry.eq(ctl.entry)]
        with m.If(self.control.valid & (ctl.op == ControlOp.SET_KEY)):
            # The all-zero reset key is never "previous": it is public.
            m.d.sync += [gen.eq(~gen), key_set.eq(1), previous_ticks.eq(Mux(key_set, 2, 0))]
            with m.If(gen):
                m.d.sync += keys[0].eq(ctl.key)
            with m.Else():
                m.d.sync += keys[1].eq(ctl.key)

        # ------------------------------------------------------------ output FIFOs, credits
        fifos = {}
        for name, layout in (("verdict", VERDICT), ("tx", TX_HEADER), ("event", EVENT)):
            fifo = fifos[name] = SyncFIFOBuffered(width=layout.size, depth=self.FIFO_DEPTH)
            m.submodules[f"{name}_fifo"] = fifo
            port = getattr(self, name)
            m.d.comb += [port.valid.eq(fifo.r_rdy), port.payload.eq(fifo.r_data),
                         fifo.r_en.eq(port.ready)]
        in_flight = Signal(range(self.latency + 2))
        room = Signal()
        accept = Signal()
        written = Signal()
        m.d.comb += [self.rx.ready.eq(room), accept.eq(self.rx.valid & room)]
        m.d.sync += in_flight.eq(in_flight + accept - written)
        # Registered: leave space for the record accepted in this cycle too, and for one
        # segment or event of the connect slots.
        m.d.sync += room.eq(Cat(*[fifo.level + in_flight + 3 < self.FIFO_DEPTH
                                  for fifo in fifos.values()]).all())

        # ------------------------------------------------------------ connect slots
        # Frames of a connecting 4-tuple are decided by the pipeline below; CONNECT
        # commands and retransmission timers act here, through one-entry "side"
        # registers that the FIFOs take when the pipeline does not write them.
        slots = [Signal(_SLOT, name=f"connect_{k}") for k in range(self.connects)]
        n_slots = self.connects
        active_bits = Cat(*[slot.active for slot in slots])
        now = Signal(32)
        now_next = Signal(32, init=1)           # always now + 1
        m.d.sync += [now.eq(now_next), now_next.eq(now_next + 1)]
        side_tx_valid, side_ev_valid = Signal(), Signal()
        side_tx, side_ev = Signal(TX_HEADER), Signal(EVENT)
        side_tx_taken, side_ev_taken = Signal(), Signal()
        with m.If(side_tx_taken):
            m.d.sync += side_tx_valid.eq(0)
        with m.If(side_ev_taken):
            m.d.sync += side_ev_valid.eq(0)
        side_free = ~side_tx_valid & ~side_ev_valid
        m.d.comb += self.control.ready.eq(side_free | (ctl.op != ControlOp.CONNECT))

        def syn_segment(req):
            return struct_value(TX_HEADER, {
                "eth": {"dst": req.peer_mac, "src": req.local_mac},
                "ip": {"src": req.local_ip, "dst": req.peer_ip, "ttl": REPLY_TTL, "df": 1},
                "tcp": {"sport": req.local_port, "dport": req.peer_port, "seq": req.iss,
                        "ack": 0, "flags": TcpFlags.SYN, "window": req.window},
                "opt": {"mss_valid": 1, "mss": req.mss, "wscale_valid": req.wscale_ok,
                        "wscale": req.wscale, "sack_perm": req.sack_ok,
                        "ts_valid": req.ts_ok, "tsval": self.ts_clock, "tsecr": 0}})

        def failed_event(req, status):
            return struct_value(EVENT, {
                "kind": EventKind.FAILED, "status": status, "active": 1,
                "ingress": req.ingress,
                "eth": {"peer": req.peer_mac, "local": req.local_mac},
                "peer_ip": req.peer_ip, "local_ip": req.local_ip,
                "peer_port": req.peer_port, "local_port": req.local_port, "iss": req.iss})

        # Timers: one slot per cycle (every slot is looked at every `connects` cycles),
        # the scanned slot one-hot in `scan`. What the timer needs of the scanned slot
        # (its request, retries and next deadline) is read a cycle ahead into registers,
        # and whether each slot's deadline has passed is registered too: a slot changes
        # only when the timer acts on it, and then the scan comes back to it `connects`
        # (>= 2) cycles later, or by a CONNECT or a segment, and then the side registers
        # or the busy mask below keep the timer off it in the next cycle.
        scan = Signal(n_slots, init=1)
        scan_next = Cat(scan[-1], scan[:-1])
        m.d.sync += scan.eq(scan_next)
        # `due`: the slot is scanned, its deadline has passed and no segment of it is in
        # the decision stages (`busy_next`, set below); all registered.
        due = Signal(n_slots)
        busy_next = Signal(n_slots)
        m.d.sync += due.eq(scan_next & Cat(*[~(now - slot.deadline)[31] for slot in slots])
                           & ~busy_next)
        scanned_req = Signal(CONNECT_REQUEST)
        scanned_retries = Signal(4)
        next_deadline = Signal(32)              # now + the scanned slot's rto << 1
        m.d.sync += [
            scanned_req.eq(one_hot_select(scan_next, [slot.req.as_value() for slot in slots])),
            scanned_retries.eq(one_hot_select(scan_next, [slot.retries for slot in slots])),
            next_deadline.eq(now_next + (one_hot_select(scan_next,
                                                        [slot.rto for slot in slots]) << 1)[:32]),
        ]
        connect = control_accept & (ctl.op == ControlOp.CONNECT)
        timer_may = side_free & ~connect
        act = Signal()
        retry = Signal()
        m.d.comb += [act.eq(timer_may & (due & active_bits).any()),
                     retry.eq(scanned_retries < self.syn_retries)]

        # CONNECT: the first free slot, or a BUSY failure.
        free = [~slot.active for slot in slots]
        any_free = active_bits != (1 << n_slots) - 1
        free_first = [free[k] & (active_bits[:k].all() if k else 1) for k in range(n_slots)]
        # The side registers load whenever they are empty (their contents matter only
        # while valid): a CONNECT's segment or failure, else the timer's. The choice is
        # made on a CONNECT being offered, not taken: when it is offered and not taken
        # (the other side register is full) neither becomes valid in this cycle, and
        # `control.ready` (from the side registers' valid bits) stays off the select of
        # the 600-odd multiplexed bits (the seed-1 critical path of 7cdbf32).
        connect_offered = self.control.valid & (ctl.op == ControlOp.CONNECT)
        with m.If(~side_tx_valid):
            m.d.sync += side_tx.eq(Mux(connect_offered, syn_segment(ctl.connect),
                                       syn_segment(scanned_req)))
        with m.If(~side_ev_valid):
            m.d.sync += side_ev.eq(Mux(connect_offered,
                                       failed_event(ctl.connect, FailStatus.BUSY),
                                       failed_event(scanned_req, FailStatus.TIMEOUT)))
        with m.If(connect):
            with m.If(any_free):
                m.d.sync += side_tx_valid.eq(1)
            with m.Else():
                m.d.sync += side_ev_valid.eq(1)
        # A free slot takes the request on `control` in every cycle (what it holds matters
        # only once it is active), so that a CONNECT only has to set `active`: the wide
        # write does not wait for the decoded command.
        for k, slot in enumerate(slots):
            with m.If(~slot.active):
                m.d.sync += [slot.retries.eq(0),
                             slot.deadline.eq(now + self.syn_rto), slot.rto.eq(self.syn_rto),
                             slot.req.eq(ctl.connect),
                             slot.ack_expected.eq(ctl.connect.iss + 1)]
            with m.If(connect & free_first[k]):
                m.d.sync += [slot.active.eq(1), slot.gen.eq(slot.gen + 1)]
        with m.If(act):
            with m.If(retry):
                m.d.sync += side_tx_valid.eq(1)
            with m.Else():
                m.d.sync += side_ev_valid.eq(1)
        for k, slot in enumerate(slots):
            with m.If(timer_may & due[k] & slot.active):
                with m.If(retry):
                    m.d.sync += [slot.retries.eq(slot.retries + 1),
                                 slot.rto.eq((slot.rto << 1)[:32]),     # exponential backoff
                                 slot.deadline.eq(next_deadline)]
                with m.Else():
                    m.d.sync += slot.active.eq(0)

        # ------------------------------------------------------------ stage 0 -> 1
        p = Pipeline(m, "hs", accept)
        rec = self.rx.payload
        p.define("rec", rec, 0)

        # Stage 1: listen-table lookup (2 cycles), connect-slot match, the segment's class.
        r1 = HANDSHAKE_IN(p.get("rec", 1))
        m1 = r1.meta
        m.d.comb += [listen.lookup_ip.eq(m1.ip.dst), listen.lookup_port.eq(m1.tcp.dport)]
        flags = m1.tcp.flags
        syn, ack, rst, fin = (flags & f != 0 for f in (TcpFlags.SYN, TcpFlags.ACK, TcpFlags.RST,
                                                        TcpFlags.FIN))
        p.define("is_tcp", m1.frame_class == FrameClass.TCP, 1)
        p.define("errored", m1.errors.as_value().any(), 1)
        p.define("vlan", m1.eth.vlan_valid, 1)
        p.define("syn_only", syn & ~ack & ~rst & ~fin, 1)
        p.define("closed_syn", syn & ~ack & ~rst, 1)
        p.define("cookie_ack", ack & ~syn & ~rst, 1)
        p.define("synack", syn & ack & ~rst, 1)
        p.define("rst", rst, 1)
        p.define("ack_flag", ack, 1)
        p.define("peer_isn", Mux(syn, m1.tcp.seq, m1.tcp.seq - 1)[:32], 1)
        p.define("iss", (m1.tcp.ack - 1)[:32], 1)
        p.define("syn_mss_index", _mss_index(Mux(m1.opt.mss_valid, m1.opt.mss, DEFAULT_MSS)), 1)
        p.define("peer_wscale", Mux(m1.opt.wscale > MAX_WSCALE, MAX_WSCALE, m1.opt.wscale), 1)
        p.define("rst_ack", (m1.tcp.seq + 1 + m1.payload_length + fin)[:32], 1)
        # The connect slots: the 4-tuple and ingress compared in two stages (per field
        # here, all fields and the lowest match in stage 2), the slot's generation as
        # it is now (it changes only when a free slot is taken, so it is the same in
        # stage 2), and whether the ack is the one the slot expects (a matched slot's
        # ack_expected does not change while it is active).
        p.define("slot_fields", Cat(*[
            Cat(slot.active & (slot.req.ingress == r1.ingress)
                & (slot.req.peer_port == m1.tcp.sport),
                slot.req.peer_ip == m1.ip.src, slot.req.local_ip == m1.ip.dst,
                slot.req.local_port == m1.tcp.dport)
            for slot in slots]), 1)
        p.define("slot_gens", Cat(*[slot.gen for slot in slots]), 1)
        p.define("slot_ack_eq", Cat(*[m1.tcp.ack == slot.ack_expected for slot in slots]), 1)
        # Stage 2: the matching slot (the lowest), one-hot and as an index.
        fields_2 = p.get("slot_fields", 2)
        match_2 = [fields_2[4 * k:4 * k + 4].all() for k in range(self.connects)]
        slot_hit, slot_index = lowest_set(match_2)
        slot_oh = Cat(*[match_2[k] & ~Cat(*match_2[:k]).any() if k else match_2[0]
                        for k in range(self.connects)])
        p.define("slot_hit", slot_hit, 2)
        p.define("slot_index", slot_index, 2)
        p.define("slot_oh", slot_oh, 2)
        # Stage 3: its request, generation, and whether the segment acknowledges our SYN.
        # (A slot freed since stage 1 may hold another request by now: its generation,
        # checked in stage D, then makes the segment a plain drop.)
        slot_oh_3 = p.get("slot_oh", 3)
        gens_3 = p.get("slot_gens", 3)
        p.define("slot_ack_ok", (slot_oh_3 & p.get("slot_ack_eq", 3)).any(), 3)
        p.define("slot_req", one_hot_select(slot_oh_3, [slot.req.as_value() for slot in slots]), 3)
        p.define("slot_gen", one_hot_select(slot_oh_3, [gens_3[4 * k:4 * k + 4]
                                                        for k in range(self.connects)]), 3)

        # Stage C (4): the listener and the slot are known; classify, build the cookie
        # message.
        C = self.HASH_AT - 1
        rc = HANDSHAKE_IN(p.get("rec", C))
        mc = rc.meta
        hit, entry = listen.hit, listen.entry
        listener_index = listen.index
        g = {name: p.get(name, C) for name in (
            "is_tcp", "errored", "vlan", "syn_only", "closed_syn", "cookie_ack", "synack",
            "rst", "ack_flag", "peer_isn", "iss", "syn_mss_index", "peer_wscale", "rst_ack",
            "slot_hit", "slot_index", "slot_ack_ok")}
        slot_req = CONNECT_REQUEST(p.get("slot_req", C))
        slot_ack_ok = g["slot_ack_ok"]
        cls, reason = Signal(_Class), Signal(Reason)
        with m.If(~g["is_tcp"]):
            m.d.comb += [cls.eq(_Class.PASS), reason.eq(Reason.NOT_TCP)]
        with m.Elif(g["errored"]):
            m.d.comb += [cls.eq(_Class.PASS), reason.eq(Reason.PARSE_ERROR)]
        with m.Elif(g["vlan"]):
            m.d.comb += [cls.eq(_Class.PASS), reason.eq(Reason.VLAN)]
        with m.Elif(rc.flow_hit):
            m.d.comb += [cls.eq(_Class.PASS), reason.eq(Reason.FLOW)]
        with m.Elif(g["slot_hit"]):
            with m.If(g["rst"]):
                with m.If(g["ack_flag"] & slot_ack_ok):
                    m.d.comb += [cls.eq(_Class.ACTIVE_RST), reason.eq(Reason.ACTIVE_RESET)]
                with m.Else():
                    m.d.comb += [cls.eq(_Class.ACTIVE_DISCARD),
                                 reason.eq(Reason.ACTIVE_DISCARD)]
            with m.Elif(g["synack"]):
                with m.If(slot_ack_ok):
                    m.d.comb += [cls.eq(_Class.ACTIVE_EST),
                                 reason.eq(Reason.ACTIVE_ESTABLISHED)]
                with m.Else():
                    m.d.comb += [cls.eq(_Class.ACTIVE_BAD), reason.eq(Reason.ACTIVE_BAD_ACK)]
            with m.Else():
                m.d.comb += [cls.eq(_Class.ACTIVE_DISCARD), reason.eq(Reason.ACTIVE_DISCARD)]
        with m.Elif(~hit):
            with m.If(g["closed_syn"]):
                m.d.comb += [cls.eq(_Class.CLOSED_SYN), reason.eq(Reason.CLOSED_PORT)]
            with m.Else():
                m.d.comb += [cls.eq(_Class.PASS), reason.eq(Reason.NO_LISTENER)]
        with m.Elif(~entry.offload | ~key_set):
            m.d.comb += [cls.eq(_Class.PASS), reason.eq(Reason.NOT_OFFLOADED)]
        with m.Elif(g["syn_only"]):
            m.d.comb += [cls.eq(_Class.SYN), reason.eq(Reason.SYN_COOKIE)]
        with m.Elif(g["cookie_ack"]):
            m.d.comb += [cls.eq(_Class.CHECK_ACK), reason.eq(Reason.COOKIE_BAD)]
        with m.Elif(g["synack"]):
            m.d.comb += [cls.eq(_Class.SYNACK), reason.eq(Reason.LISTEN_SYNACK)]
        with m.Else():
            m.d.comb += [cls.eq(_Class.DISCARD), reason.eq(Reason.LISTEN_DISCARD)]

        # The hash input depends on the segment's flags, not on its class (when the class
        # is neither SYN nor CHECK_ACK the hash is not used), so that it is shallow logic.
        is_syn = g["syn_only"]
        is_active = g["slot_hit"]
        iss = COOKIE_ISS(g["iss"])
        # Options we remember (SYN) or read back from TSecr (ACK); for a CONNECT, the
        # options both sides agreed on, in the same encoding.
        syn_ts_ok = mc.opt.ts_valid & entry.ts_ok
        syn_wscale_ok = mc.opt.wscale_valid & entry.wscale_ok
        syn_options = (Mux(syn_wscale_ok, g["peer_wscale"], WSCALE_NONE)
                       | Mux(mc.opt.sack_perm & entry.sack_ok, TS_SACK, 0))
        active_ts_ok = mc.opt.ts_valid & slot_req.ts_ok
        active_options = (Mux(mc.opt.wscale_valid & slot_req.wscale_ok, g["peer_wscale"],
                              WSCALE_NONE)
                          | Mux(mc.opt.sack_perm & slot_req.sack_ok, TS_SACK, 0))
        ts_ok = Mux(is_active, active_ts_ok, Mux(is_syn, syn_ts_ok, mc.opt.ts_valid))
        ts_options = Mux(is_active, active_options,
                         Mux(ts_ok, Mux(is_syn, syn_options, mc.opt.tsecr[:TS_OPTION_BITS]), 0))
        count = self.cookie_count
        ack_count = Mux(iss.count_lsb == count[0], count, count_before)
        mss_index = Mux(is_syn, g["syn_mss_index"], iss.mss_index)
        key_gen = Mux(is_syn, gen, iss.key_gen)
        message = struct_value(COOKIE_MESSAGE, {
            "peer_ip": mc.ip.src, "local_ip": mc.ip.dst,
            "peer_port": mc.tcp.sport, "local_port": mc.tcp.dport,
            "peer_isn": g["peer_isn"], "count": Mux(is_syn, count, ack_count),
            "mss_index": mss_index, "ts_options": ts_options, "ts_ok": ts_ok,
            "ingress": rc.ingress})
        p.define("message", message, C)
        p.define("key", Mux(key_gen, keys[1], keys[0]), C)
        carry = struct_value(_CARRY, {
            "cls": cls, "reason": reason, "ingress": rc.ingress,
            "listener": Mux(is_active, g["slot_index"], listener_index),
            "slot_gen": p.get("slot_gen", C),
            "a_mss": Mux(mc.opt.mss_valid, mc.opt.mss, DEFAULT_MSS),
            "eth_peer": mc.eth.src, "eth_local": mc.eth.dst,
            "peer_ip": mc.ip.src, "local_ip": mc.ip.dst,
            "peer_port": mc.tcp.sport, "local_port": mc.tcp.dport,
            "seq": mc.tcp.seq, "ack": mc.tcp.ack, "iss": g["iss"], "fin": mc.tcp.flags[0],
            "window": mc.tcp.window, "payload_length": mc.payload_length,
            "tsval": mc.opt.tsval, "tsecr": mc.opt.tsecr,
            "ts_ok": ts_ok, "ts_options": ts_options, "mss_index": mss_index,
            "count_lsb": count[0], "key_gen": key_gen,
            "key_ok": (iss.key_gen == gen) | (previous_ticks != 0),
            "l_mss": entry.mss,
            "l_wscale": Mux(is_active, slot_req.wscale, entry.wscale),
            "l_window": Mux(is_active, slot_req.window, entry.window)})
        p.define("carry", carry, C)
        # The connection-table key of the segment (the peer is its source).
        p.define("ident", struct_value(FLOW_KEY, {
            "port": rc.ingress, "src": mc.ip.src, "dst": mc.ip.dst,
            "sport": mc.tcp.sport, "dport": mc.tcp.dport}), C)
        slot_oh_c = p.get("slot_oh", C)
        p.define("timer_busy", Mux((cls == _Class.ACTIVE_EST) | (cls == _Class.ACTIVE_RST),
                                   slot_oh_c, 0), C)
        p.define("rst_ack_c", g["rst_ack"], C)
        p.define("ts_now", self.ts_clock, C)

        # Stage C + 1 .. decide_at: the cookie.
        at = self.HASH_AT
        _, digest = siphash_pipeline(m, "cookie", p.valid(at), p.get("key", at),
                                              p.get("message", at))
        D = self.decide_at
        F = D + 1
        p.inject("digest", digest, D)
        middle = (C + D) // 2
        # (Read half-way first: two LUT-RAM delay lines instead of a chain of registers.)
        for name in ("carry", "rst_ack_c", "ts_now", "slot_oh", "timer_busy", "ident"):
            p.get(name, middle)
        c_d = _CARRY(p.get("carry", D))

        # Connections established in the last RECENT_CYCLES (the last `recent` of them):
        # their later segments go to the host even before the connection table knows
        # them, so that a data segment right behind a final ACK is neither taken for
        # another final ACK (a second event) nor dropped or answered with RST.
        recent = [Signal(_RECENT, name=f"recent_{k}") for k in range(self.recent)]
        alive = Cat(*[r.left != 0 for r in recent])
        for r in recent:
            with m.If(r.left != 0):
                m.d.sync += r.left.eq(r.left - 1)
        recent_pointer = Signal(self.recent, init=1)        # one-hot
        last_write_valid = Signal()              # the record now at G establishes
        # An entry is written from registers, when its record is at G (a cycle after the
        # decision): `pending` is that write, to the entry at `recent_pointer`. Until it
        # is done, the entry there counts as gone and the new one is compared directly.
        pending = Signal()
        alive_now = alive & ~Mux(pending, recent_pointer, 0)

        # Stage D: the cookie's MAC compare, the recent connections, the connect slot.
        mac = digest[:COOKIE_ISS["mac"].width]
        p.define("cookie", struct_value(COOKIE_ISS, {
            "mss_index": c_d.mss_index, "count_lsb": c_d.count_lsb, "key_gen": c_d.key_gen,
            "mac": mac}), D)
        cookie_ok_d = c_d.key_ok & (COOKIE_ISS(c_d.iss).mac == mac)
        p.define("cookie_ok", cookie_ok_d, D)
        # The tuples are compared two stages earlier, in 8-bit parts at D - 2 and the
        # parts combined at D - 1 (one wide compare per entry in one cycle spreads the
        # tuple's fan-out over the die), with the entries as they are at D - 2. The two
        # entries written since, at the ends of those two cycles (`written_prev`, then
        # `written_last`), are compared with the tuples written into them instead.
        assert self.recent >= 2, "consecutive writes must go to different entries"
        ident_pre2 = p.get("ident", D - 2)
        ident_pre = p.get("ident", D - 1)
        ident_d, ident_f, ident_g = (p.get("ident", at) for at in (D, F, F + 1))
        written_last = Signal(self.recent)
        written_prev = Signal(self.recent)
        m.d.sync += [written_last.eq(Mux(pending, recent_pointer, 0)),
                     written_prev.eq(written_last)]
        parts = -(-FLOW_KEY.size // 8)
        p.define("recent_parts", Cat(*[_eq_parts(r.tuple.as_value(), ident_pre2, 8)
                                       for r in recent]), D - 2)
        parts_d1 = p.get("recent_parts", D - 1)
        p.define("recent_eq", Cat(*[parts_d1[parts * k:parts * (k + 1)].all()
                                    for k in range(self.recent)]), D - 1)
        p.define("prev_eq", ident_pre2 == ident_g, D - 2)
        p.define("pending_eq", ident_pre == ident_g, D - 1)
        recent_eq_d, pending_eq_d = p.get("recent_eq", D), p.get("pending_eq", D)
        prev_eq_d = p.get("prev_eq", D)
        p.define("recent_seen", Cat(*[
            alive_now[k] & Mux(written_last[k], pending_eq_d,
                               Mux(written_prev[k], prev_eq_d, recent_eq_d[k]))
            for k in range(self.recent)]).any(), D)
        # A connect slot may have been freed (timeout) since stage 1: then do nothing.
        slot_oh_d = p.get("slot_oh", D)
        slot_live_d = Cat(*[slot_oh_d[k] & slot.active & (slot.gen == c_d.slot_gen)
                            for k, slot in enumerate(slots)]).any()
        p.define("slot_live", slot_live_d, D)
        # Stage F's decisions as they are without a recent-connection hit (which can only
        # turn them off), pre-decoded here: F then has a single gate between the hit
        # (`recent_seen`...) and the writes of a recent entry and of a slot's `active`.
        est_live_d = (c_d.cls == _Class.ACTIVE_EST) & slot_live_d
        rst_live_d = (c_d.cls == _Class.ACTIVE_RST) & slot_live_d
        p.define("est_live", est_live_d, D)
        p.define("rst_live", rst_live_d, D)
        p.define("check_ok", (c_d.cls == _Class.CHECK_ACK) & cookie_ok_d, D)
        p.define("may_establish", p.valid(D) & (((c_d.cls == _Class.CHECK_ACK) & cookie_ok_d)
                                                | est_live_d), D)
        p.define("may_free_slot", p.valid(D) & (est_live_d | rst_live_d), D)

        # The record ahead (at F in this cycle) may establish the same connection: its
        # entry is written only at the end of this cycle, so compare with it directly.
        p.define("same_as_next", ident_d == ident_f, D)
        # And the record two ahead (at G), whose entry is written at the end of this cycle.
        p.define("same_as_pending", pending
                 & (ident_d == ident_g), D)

        # Stage F = D + 1: decide (small signals only).
        c = _CARRY(p.get("carry", F))
        cookie_ok, slot_live = p.get("cookie_ok", F), p.get("slot_live", F)
        seen = (p.get("recent_seen", F) | (p.get("same_as_next", F) & last_write_valid)
                | p.get("same_as_pending", F))
        recent_hit = seen & (c.cls != _Class.PASS)
        cls_d = Mux(recent_hit, _Class.PASS, c.cls)
        active_cls = ((cls_d == _Class.ACTIVE_EST) | (cls_d == _Class.ACTIVE_RST)
                      | (cls_d == _Class.ACTIVE_BAD) | (cls_d == _Class.ACTIVE_DISCARD))
        # (The pre-decoded classes are not PASS, so for them a hit is `seen`.)
        active_est = p.get("est_live", F) & ~seen
        active_rst = p.get("rst_live", F) & ~seen
        slot_oh_f = p.get("slot_oh", F)
        free_slot = p.get("may_free_slot", F) & ~seen      # valid, ACTIVE_EST/RST, slot live
        for k, slot in enumerate(slots):
            with m.If(free_slot & slot_oh_f[k]):
                m.d.sync += slot.active.eq(0)
        # The timers leave alone a slot whose segment is in the decision stages (D and
        # F): the mask of the next cycle, from the stages before.
        m.d.comb += busy_next.eq(Mux(p.valid(D - 1), p.get("timer_busy", D - 1), 0)
                                 | Mux(p.valid(D), p.get("timer_busy", D), 0))
        check_ok = p.get("check_ok", F) & ~seen                 # CHECK_ACK, cookie ok
        established = check_ok | active_est
        m.d.sync += last_write_valid.eq(p.get("may_establish", F) & ~seen)
        # The entry is written a cycle later (stage G) with one cycle less to live: it
        # expires when it would have, written at the end of this cycle.
        m.d.comb += pending.eq(last_write_valid)
        tuple_g = ident_g
        with m.If(pending):
            m.d.sync += recent_pointer.eq(Cat(recent_pointer[-1], recent_pointer[:-1]))
            for k, r in enumerate(recent):
                with m.If(recent_pointer[k]):
                    m.d.sync += r.eq(struct_value(_RECENT, {
                        "tuple": tuple_g, "left": self.RECENT_CYCLES - 1}))
        final_reason = Mux(recent_hit, Reason.FLOW,
                           Mux(check_ok, Reason.COOKIE_OK,
                               Mux(active_cls & ~slot_live, Reason.ACTIVE_DISCARD, c.reason)))
        to_host = ((cls_d == _Class.PASS)
                   | (check_ok & ((c.payload_length != 0) | c.fin)))
        send_synack = cls_d == _Class.SYN
        send_rst = ((cls_d == _Class.CLOSED_SYN) | (cls_d == _Class.SYNACK)
                    | ((cls_d == _Class.ACTIVE_BAD) & slot_live)
                    | ((cls_d == _Class.CHECK_ACK) & ~cookie_ok & self.rst_bad_cookie))
        p.define("out_verdict", Cat(to_host, final_reason), F)
        p.define("out_send", send_synack | send_rst | active_est, F)
        p.define("out_event_valid", established | active_rst, F)
        p.define("f_synack", send_synack, F)
        p.define("f_active_est", active_est, F)
        p.define("f_active_rst", active_rst, F)
        p.define("f_closed", cls_d == _Class.CLOSED_SYN, F)
        # Stage G's arithmetic, from the carried fields (not from the decision).
        p.define("seq_plus_1", (c.seq + 1)[:32], F)
        p.define("seq_minus_1", (c.seq - 1)[:32], F)
        p.define("active_window", c.l_window >> Mux(c.ts_options[:4] != WSCALE_NONE,
                                                    c.l_wscale, 0), F)

        # Stage G = F + 1: format the segment and the event.
        G = F + 1
        c = _CARRY(p.get("carry", G))
        rst_ack, ts_now = p.get("rst_ack_c", G), p.get("ts_now", G)
        ts_high = Cat(Const(0, TS_OPTION_BITS), ts_now[TS_OPTION_BITS:])
        cookie = p.get("cookie", G)
        send_synack, active_est = p.get("f_synack", G), p.get("f_active_est", G)
        active_rst, closed = p.get("f_active_rst", G), p.get("f_closed", G)
        iss_d = c.iss
        wscale_ok = c.ts_ok & (c.ts_options[:4] != WSCALE_NONE)
        sack_ok = c.ts_ok & c.ts_options[4]
        # For a CONNECT the options were agreed with or without timestamps.
        a_wscale_ok = c.ts_options[:4] != WSCALE_NONE
        ev_wscale_ok = Mux(active_est, a_wscale_ok, wscale_ok)
        ev_sack_ok = Mux(active_est, c.ts_options[4], sack_ok)
        reply_opt = Mux(send_synack, struct_value(TX_HEADER["opt"].shape, {
            "mss_valid": 1, "mss": c.l_mss, "wscale_valid": wscale_ok,
            "wscale": c.l_wscale, "sack_perm": sack_ok, "ts_valid": c.ts_ok,
            "tsval": ts_high | c.ts_options, "tsecr": c.tsval}),
            Mux(active_est & c.ts_ok, struct_value(TX_HEADER["opt"].shape, {
                "ts_valid": 1, "tsval": ts_now, "tsecr": c.tsval}), 0))
        reply = struct_value(TX_HEADER, {
            "eth": {"dst": c.eth_peer, "src": c.eth_local},
            "ip": {"src": c.local_ip, "dst": c.peer_ip, "ttl": REPLY_TTL, "df": 1},
            "tcp": {"sport": c.local_port, "dport": c.peer_port,
                    "seq": Mux(send_synack, cookie, Mux(closed, 0, c.ack)),
                    "ack": Mux(send_synack | active_est, p.get("seq_plus_1", G),
                               Mux(closed, rst_ack, 0)),
                    "flags": Mux(send_synack, TcpFlags.SYN | TcpFlags.ACK,
                                 Mux(active_est, TcpFlags.ACK,
                                     Mux(closed, TcpFlags.RST | TcpFlags.ACK, TcpFlags.RST))),
                    "window": Mux(send_synack, c.l_window,
                                  Mux(active_est, p.get("active_window", G),
                                      0))},
            "opt": reply_opt,
        })
        table_mss = Mux(c.mss_index[1], Mux(c.mss_index[0], MSS_TABLE[3], MSS_TABLE[2]),
                        Mux(c.mss_index[0], MSS_TABLE[1], MSS_TABLE[0]))
        event = struct_value(EVENT, {
            "kind": Mux(active_rst, EventKind.FAILED, EventKind.ESTABLISHED),
            "status": Mux(active_rst, FailStatus.RESET, 0),
            "active": active_est | active_rst,
            "ingress": c.ingress, "listener": c.listener,
            "eth": {"peer": c.eth_peer, "local": c.eth_local},
            "peer_ip": c.peer_ip, "local_ip": c.local_ip,
            "peer_port": c.peer_port, "local_port": c.local_port,
            "iss": iss_d,
            "irs": Mux(active_rst, 0, Mux(active_est, c.seq, p.get("seq_minus_1", G))),
            "mss": Mux(active_rst, 0, Mux(active_est, c.a_mss, table_mss)),
            "wscale_ok": ev_wscale_ok & ~active_rst,
            "peer_wscale": Mux(ev_wscale_ok & ~active_rst, c.ts_options[:4], 0),
            "local_wscale": Mux(ev_wscale_ok & ~active_rst, c.l_wscale, 0),
            "sack_ok": ev_sack_ok & ~active_rst, "ts_ok": c.ts_ok & ~active_rst,
            "ts_recent": Mux(c.ts_ok & ~active_rst, c.tsval, 0),
            "ts_echo": Mux(c.ts_ok & ~active_rst, c.tsecr, 0),
            "window": Mux(active_rst, 0, c.window),
            "payload_length": Mux(active_rst, 0, c.payload_length)})
        p.define("out_reply", reply, G)
        p.define("out_event", event, G)

        # Stage G+1: write the FIFOs (the side registers when the pipeline does not) and count.
        E = G + 1
        valid_e = p.valid(E)
        pipe_tx = valid_e & p.get("out_send", E)
        pipe_ev = valid_e & p.get("out_event_valid", E)
        side_room = {name: fifo.level + in_flight + 3 < self.FIFO_DEPTH
                     for name, fifo in fifos.items()}
        m.d.comb += [
            written.eq(valid_e),
            fifos["verdict"].w_en.eq(valid_e),
            fifos["verdict"].w_data.eq(p.get("out_verdict", E)),
            side_tx_taken.eq(side_tx_valid & ~pipe_tx & side_room["tx"]),
            fifos["tx"].w_en.eq(pipe_tx | side_tx_taken),
            fifos["tx"].w_data.eq(Mux(pipe_tx, p.get("out_reply", E), side_tx)),
            side_ev_taken.eq(side_ev_valid & ~pipe_ev & side_room["event"]),
            fifos["event"].w_en.eq(pipe_ev | side_ev_taken),
            fifos["event"].w_data.eq(Mux(pipe_ev, p.get("out_event", E), side_ev)),
        ]
        verdict_e = VERDICT(p.get("out_verdict", E))
        with m.If(valid_e):
            with m.Switch(verdict_e.reason):
                for r in Reason:
                    with m.Case(r):
                        counter = self.counters[32 * r:32 * (r + 1)]
                        m.d.sync += counter.eq(counter + 1)
        assert E + 2 == self.latency
        return m
