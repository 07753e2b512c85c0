"""The handshake engine: passive open with SYN cookies, decided per frame, at line rate.

``HandshakeEngine(listeners=16)`` takes one record per received frame (the parser's
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

Latency: ``latency`` (29) cycles from an accepted record to its verdict, SYN-ACK header
and event on the output streams (the SipHash pipeline is 22 of them).
Throughput: one record per cycle while the outputs are read; ``rx.ready`` is a credit
check (records in flight + FIFO levels), so the pipeline itself never stalls.

Ports
  rx         In(stream of HANDSHAKE_IN)   one record per received frame, in frame order
  verdict    Out(stream of VERDICT)       one per record, in order: to the host or dropped
  tx         Out(stream of TX_HEADER)     SYN-ACKs and RSTs, for ``hw.builder.TxBuilder``
  event      Out(stream of EVENT)         *established* events
  control    In(stream of CONTROL)        WRITE_LISTENER, SET_KEY; always ready
  cookie_period, ts_period   In(32)       cycles per counter tick (0: stopped)
  rst_bad_cookie             In(1)        answer a bad cookie ACK with RST instead of dropping it
  cookie_count, ts_clock     Out(32)      the counters (for tests and diagnostics)
  counters   Out(array of 32-bit)         frames per ``Reason``
"""

import enum

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from hw.headers import TcpFlags
from hw.listen_table import LISTEN_ENTRY, ListenTable
from hw.metadata import EVENT, PARSER_META, TX_HEADER, EventKind, FrameClass
from hw.pipeline import Pipeline
from hw.siphash import siphash_latency, siphash_pipeline
from hw.stream import struct_value
from hw.syn_cookie import (COOKIE_ISS, COOKIE_MESSAGE, DEFAULT_MSS, MAX_WSCALE, MSS_TABLE,
                           TS_OPTION_BITS, TS_SACK, WSCALE_NONE)

__all__ = ["HandshakeEngine", "HANDSHAKE_IN", "VERDICT", "Reason", "ControlOp",
           "control_layout", "REPLY_TTL"]


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


class ControlOp(enum.IntEnum):
    WRITE_LISTENER = 1      # listen-table entry ``index`` := ``entry``
    SET_KEY = 2             # rotate: ``key`` becomes the current cookie key


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

#: TTL of the segments the NIC sends.
REPLY_TTL = 64


def control_layout(listeners):
    return data.StructLayout({
        "op": 2,                      # ControlOp
        "index": range(listeners),
        "entry": LISTEN_ENTRY,
        "key": 128,
    })


# What a frame is, as far as the engine can tell before the cookie is known.
class _Class(enum.IntEnum):
    PASS = 0            # to the host, reason as computed
    CLOSED_SYN = 1
    SYN = 2
    CHECK_ACK = 3
    DISCARD = 4
    SYNACK = 5


#: Everything stage 3 hands to the output stage, carried past the hash in LUT RAM.
_CARRY = data.StructLayout({
    "cls": 3, "reason": 4, "ingress": 8, "listener": 4,
    "eth_peer": 48, "eth_local": 48,
    "peer_ip": 32, "local_ip": 32, "peer_port": 16, "local_port": 16,
    "seq": 32, "ack": 32, "fin": 1, "window": 16, "payload_length": 16,
    "tsval": 32, "tsecr": 32, "ts_ok": 1, "ts_options": TS_OPTION_BITS,
    "mss_index": 2, "count_lsb": 1, "key_gen": 1, "key_ok": 1,
    "l_mss": 16, "l_wscale": 4, "l_window": 16,
})


def _mss_index(mss):
    return Mux(mss >= MSS_TABLE[3], 3, Mux(mss >= MSS_TABLE[2], 2, Mux(mss >= MSS_TABLE[1], 1, 0)))


class HandshakeEngine(wiring.Component):
    #: Depth of each output FIFO (more than the records in flight).
    FIFO_DEPTH = 64

    def __init__(self, listeners=16):
        self.listeners = listeners
        super().__init__({
            "rx": In(stream.Signature(HANDSHAKE_IN)),
            "verdict": Out(stream.Signature(VERDICT)),
            "tx": Out(stream.Signature(TX_HEADER)),
            "event": Out(stream.Signature(EVENT)),
            "control": In(stream.Signature(control_layout(listeners))),
            "cookie_period": In(32),
            "ts_period": In(32),
            "rst_bad_cookie": In(1),
            "cookie_count": Out(32),
            "ts_clock": Out(32),
            "counters": Out(data.ArrayLayout(32, len(Reason))),
        })

    #: Stage of the hash input (after the input register and the listen table).
    HASH_AT = 1 + ListenTable.LATENCY + 1

    @property
    def decide_at(self):
        return self.HASH_AT + siphash_latency(COOKIE_MESSAGE.size)

    @property
    def latency(self):
        """Cycles from an accepted record to its outputs, valid on the output streams
        (decide, register, write the FIFOs, their output register)."""
        return self.decide_at + 3

    def elaborate(self, platform):
        m = Module()
        m.submodules.listen = listen = ListenTable(self.listeners)

        # ------------------------------------------------------------ control and clocks
        keys = [Signal(128, name=f"key_{g}") for g in range(2)]
        gen = Signal()
        previous_ticks = Signal(2)
        cookie_divider, ts_divider = Signal(32), Signal(32)
        cookie_tick = Signal()
        m.d.comb += cookie_tick.eq((self.cookie_period != 0)
                                   & (cookie_divider >= self.cookie_period - 1))
        m.d.sync += cookie_divider.eq(Mux(cookie_tick | (self.cookie_period == 0), 0,
                                          cookie_divider + 1))
        with m.If(cookie_tick):
            m.d.sync += self.cookie_count.eq(self.cookie_count + 1)
            with m.If(previous_ticks != 0):
                m.d.sync += previous_ticks.eq(previous_ticks - 1)
        ts_tick = Signal()
        m.d.comb += ts_tick.eq((self.ts_period != 0) & (ts_divider >= self.ts_period - 1))
        m.d.sync += ts_divider.eq(Mux(ts_tick | (self.ts_period == 0), 0, ts_divider + 1))
        with m.If(ts_tick):
            m.d.sync += self.ts_clock.eq(self.ts_clock + 1)

        ctl = self.control.payload
        m.d.comb += [self.control.ready.eq(1),
                     listen.write.valid.eq(self.control.valid
                                           & (ctl.op == ControlOp.WRITE_LISTENER)),
                     listen.write.payload.index.eq(ctl.index),
                     listen.write.payload.entry.eq(ctl.entry)]
        with m.If(self.control.valid & (ctl.op == ControlOp.SET_KEY)):
            m.d.sync += [gen.eq(~gen), previous_ticks.eq(2)]
            with m.If(gen):
                m.d.sync += keys[0].eq(ctl.key)
            with m.Else():
                m.d.sync += keys[1].eq(ctl.key)

        # ------------------------------------------------------------ input and credits
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
        # Registered: leave space for the record accepted in this cycle too.
        m.d.sync += room.eq(Cat(*[fifo.level + in_flight + 2 < self.FIFO_DEPTH
                                  for fifo in fifos.values()]).all())

        # ------------------------------------------------------------ stage 0 -> 1
        p = Pipeline(m, "hs", accept)
        rec = self.rx.payload
        meta = rec.meta
        p.define("rec", rec, 0)

        # Stage 1: listen-table lookup (2 cycles) and the segment's class.
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
        p.define("peer_isn", Mux(syn, m1.tcp.seq, m1.tcp.seq - 1)[:32], 1)
        p.define("iss", (m1.tcp.ack - 1)[:32], 1)
        p.define("syn_mss_index", _mss_index(Mux(m1.opt.mss_valid, m1.opt.mss, DEFAULT_MSS)), 1)
        p.define("peer_wscale", Mux(m1.opt.wscale > MAX_WSCALE, MAX_WSCALE, m1.opt.wscale), 1)
        p.define("rst_ack", (m1.tcp.seq + 1 + m1.payload_length + fin)[:32], 1)

        # Stage 3: the listener is known; classify and build the cookie message.
        r3 = HANDSHAKE_IN(p.get("rec", 3))
        m3 = r3.meta
        hit, entry = listen.hit, listen.entry
        listener_index = listen.index
        g = {name: p.get(name, 3) for name in (
            "is_tcp", "errored", "vlan", "syn_only", "closed_syn", "cookie_ack", "synack",
            "rst", "peer_isn", "iss", "syn_mss_index", "peer_wscale", "rst_ack")}
        cls, reason = Signal(_Class), Signal(Reason)
        with m.If(~g["is_tcp"]):
            m.d.comb += [cls.eq(_Class.PASS), reason.eq(Reason.NOT_TCP)]
        with m.Elif(g["errored"]):
            m.d.comb += [cls.eq(_Class.PASS), reason.eq(Reason.PARSE_ERROR)]
        with m.Elif(g["vlan"]):
            m.d.comb += [cls.eq(_Class.PASS), reason.eq(Reason.VLAN)]
        with m.Elif(r3.flow_hit):
            m.d.comb += [cls.eq(_Class.PASS), reason.eq(Reason.FLOW)]
        with m.Elif(~hit):
            with m.If(g["closed_syn"]):
                m.d.comb += [cls.eq(_Class.CLOSED_SYN), reason.eq(Reason.CLOSED_PORT)]
            with m.Else():
                m.d.comb += [cls.eq(_Class.PASS), reason.eq(Reason.NO_LISTENER)]
        with m.Elif(~entry.offload):
            m.d.comb += [cls.eq(_Class.PASS), reason.eq(Reason.NOT_OFFLOADED)]
        with m.Elif(g["syn_only"]):
            m.d.comb += [cls.eq(_Class.SYN), reason.eq(Reason.SYN_COOKIE)]
        with m.Elif(g["cookie_ack"]):
            m.d.comb += [cls.eq(_Class.CHECK_ACK), reason.eq(Reason.COOKIE_BAD)]
        with m.Elif(g["synack"]):
            m.d.comb += [cls.eq(_Class.SYNACK), reason.eq(Reason.LISTEN_SYNACK)]
        with m.Else():
            m.d.comb += [cls.eq(_Class.DISCARD), reason.eq(Reason.LISTEN_DISCARD)]

        is_syn = cls == _Class.SYN
        iss = COOKIE_ISS(g["iss"])
        # Options we remember (SYN) or read back from TSecr (ACK).
        syn_ts_ok = m3.opt.ts_valid & entry.ts_ok
        syn_wscale_ok = m3.opt.wscale_valid & entry.wscale_ok
        syn_options = (Mux(syn_wscale_ok, g["peer_wscale"], WSCALE_NONE)
                       | Mux(m3.opt.sack_perm & entry.sack_ok, TS_SACK, 0))
        ts_ok = Mux(is_syn, syn_ts_ok, m3.opt.ts_valid)
        ts_options = Mux(ts_ok, Mux(is_syn, syn_options, m3.opt.tsecr[:TS_OPTION_BITS]), 0)
        count = self.cookie_count
        ack_count = Mux(iss.count_lsb == count[0], count, count - 1)
        mss_index = Mux(is_syn, g["syn_mss_index"], iss.mss_index)
        key_gen = Mux(is_syn, gen, iss.key_gen)
        message = struct_value(COOKIE_MESSAGE, {
            "peer_ip": m3.ip.src, "local_ip": m3.ip.dst,
            "peer_port": m3.tcp.sport, "local_port": m3.tcp.dport,
            "peer_isn": g["peer_isn"], "count": Mux(is_syn, count, ack_count),
            "mss_index": mss_index, "ts_options": ts_options, "ts_ok": ts_ok,
            "ingress": r3.ingress})
        p.define("message", message, 3)
        p.define("key", Mux(key_gen, keys[1], keys[0]), 3)
        carry = struct_value(_CARRY, {
            "cls": cls, "reason": reason, "ingress": r3.ingress, "listener": listener_index,
            "eth_peer": m3.eth.src, "eth_local": m3.eth.dst,
            "peer_ip": m3.ip.src, "local_ip": m3.ip.dst,
            "peer_port": m3.tcp.sport, "local_port": m3.tcp.dport,
            "seq": m3.tcp.seq, "ack": m3.tcp.ack, "fin": m3.tcp.flags[0],
            "window": m3.tcp.window, "payload_length": m3.payload_length,
            "tsval": m3.opt.tsval, "tsecr": m3.opt.tsecr,
            "ts_ok": ts_ok, "ts_options": ts_options, "mss_index": mss_index,
            "count_lsb": count[0], "key_gen": key_gen,
            "key_ok": (iss.key_gen == gen) | (previous_ticks != 0),
            "l_mss": entry.mss, "l_wscale": entry.wscale, "l_window": entry.window})
        p.define("carry", carry, 3)
        p.define("rst_ack_3", g["rst_ack"], 3)
        p.define("ts_high", Cat(Const(0, TS_OPTION_BITS), self.ts_clock[TS_OPTION_BITS:]), 3)

        # Stage 4 .. decide_at: the cookie.
        at = self.HASH_AT
        hash_valid, digest = siphash_pipeline(m, "cookie", p.valid(at), p.get("key", at),
                                              p.get("message", at))
        D = self.decide_at
        p.inject("digest", digest, D)
        middle = (3 + D) // 2
        # (Read half-way first: two LUT-RAM delay lines instead of a chain of registers.)
        for name in ("carry", "rst_ack_3", "ts_high"):
            p.get(name, middle)
        c = _CARRY(p.get("carry", D))
        rst_ack, ts_high = p.get("rst_ack_3", D), p.get("ts_high", D)

        # Stage D: decide and format the outputs.
        mac = digest[:COOKIE_ISS["mac"].width]
        cookie = struct_value(COOKIE_ISS, {"mss_index": c.mss_index, "count_lsb": c.count_lsb,
                                           "key_gen": c.key_gen, "mac": mac})
        iss_d = (c.ack - 1)[:32]
        cookie_ok = c.key_ok & (COOKIE_ISS(iss_d).mac == mac)
        cls_d = c.cls
        final_reason = Mux((cls_d == _Class.CHECK_ACK) & cookie_ok, Reason.COOKIE_OK, c.reason)
        established = (cls_d == _Class.CHECK_ACK) & cookie_ok
        to_host = (cls_d == _Class.PASS) | (established & ((c.payload_length != 0) | c.fin))
        send_synack = cls_d == _Class.SYN
        send_rst = ((cls_d == _Class.CLOSED_SYN) | (cls_d == _Class.SYNACK)
                    | ((cls_d == _Class.CHECK_ACK) & ~cookie_ok & self.rst_bad_cookie))
        wscale_ok = c.ts_ok & (c.ts_options[:4] != WSCALE_NONE)
        sack_ok = c.ts_ok & c.ts_options[4]
        reply = struct_value(TX_HEADER, {
            "eth": {"dst": c.eth_peer, "src": c.eth_local},
            "ip": {"src": c.local_ip, "dst": c.peer_ip, "ttl": REPLY_TTL, "df": 1},
            "tcp": {"sport": c.local_port, "dport": c.peer_port,
                    "seq": Mux(send_synack, cookie,
                               Mux(cls_d == _Class.CLOSED_SYN, 0, c.ack)),
                    "ack": Mux(send_synack, c.seq + 1,
                               Mux(cls_d == _Class.CLOSED_SYN, rst_ack, 0)),
                    "flags": Mux(send_synack, TcpFlags.SYN | TcpFlags.ACK,
                                 Mux(cls_d == _Class.CLOSED_SYN, TcpFlags.RST | TcpFlags.ACK,
                                     TcpFlags.RST)),
                    "window": Mux(send_synack, c.l_window, 0)},
            "opt": Mux(send_synack, struct_value(TX_HEADER["opt"].shape, {
                "mss_valid": 1, "mss": c.l_mss, "wscale_valid": wscale_ok,
                "wscale": c.l_wscale, "sack_perm": sack_ok, "ts_valid": c.ts_ok,
                "tsval": ts_high | c.ts_options, "tsecr": c.tsval}), 0),
        })
        event = struct_value(EVENT, {
            "kind": EventKind.ESTABLISHED, "ingress": c.ingress, "listener": c.listener,
            "eth": {"peer": c.eth_peer, "local": c.eth_local},
            "peer_ip": c.peer_ip, "local_ip": c.local_ip,
            "peer_port": c.peer_port, "local_port": c.local_port,
            "iss": iss_d, "irs": c.seq - 1,
            "mss": Mux(c.mss_index[1], Mux(c.mss_index[0], MSS_TABLE[3], MSS_TABLE[2]),
                       Mux(c.mss_index[0], MSS_TABLE[1], MSS_TABLE[0])),
            "wscale_ok": wscale_ok, "peer_wscale": Mux(wscale_ok, c.ts_options[:4], 0),
            "local_wscale": Mux(wscale_ok, c.l_wscale, 0),
            "sack_ok": sack_ok, "ts_ok": c.ts_ok,
            "ts_recent": Mux(c.ts_ok, c.tsval, 0), "ts_echo": Mux(c.ts_ok, c.tsecr, 0),
            "window": c.window, "payload_length": c.payload_length})
        p.define("out_verdict", Cat(to_host, final_reason), D)
        p.define("out_reply", reply, D)
        p.define("out_event", event, D)
        p.define("out_send", send_synack | send_rst, D)
        p.define("out_established", established, D)

        # Stage D+1: write the FIFOs and count.
        E = D + 1
        valid_e = p.valid(E)
        m.d.comb += [
            written.eq(valid_e),
            fifos["verdict"].w_en.eq(valid_e),
            fifos["verdict"].w_data.eq(p.get("out_verdict", E)),
            fifos["tx"].w_en.eq(valid_e & p.get("out_send", E)),
            fifos["tx"].w_data.eq(p.get("out_reply", E)),
            fifos["event"].w_en.eq(valid_e & p.get("out_established", E)),
            fifos["event"].w_data.eq(p.get("out_event", E)),
        ]
        verdict_e = VERDICT(p.get("out_verdict", E))
        with m.If(valid_e):
            with m.Switch(verdict_e.reason):
                for r in Reason:
                    with m.Case(r):
                        m.d.sync += self.counters[r].eq(self.counters[r] + 1)
        assert E + 2 == self.latency
        return m
