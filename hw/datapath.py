r"""The NIC's datapath: connection setup, teardown and splicing offload, plain host streams.

::

  mac_rx -> Parser --frames-----------------------------------> RxDispatch --> host_rx
                   \--meta--> ConnTable lookup --+                 ^   |       host_rx_meta
                   \--meta--> meta FIFO ---------+-> Handshake ----+   | relayed frames
                                                 |   engine            v
                                                 +-> Teardown ------+  SpliceRewriter --+
                                                 |   engine --tx--> TxBuilder ---+      |
                                                 +-> Splice engine --descriptors-|--^   |
  host_tx -> ChecksumInserter -----------------------------------------> TxArbiter <-+---+
                                                                           |
        close, close_data (CLOSE), splice (SPLICE) commands              mac_tx
        event <-- the three engines' events
        table_cmd/table_resp: the host's, the NIC's inserts (established flows), and the
        teardown and splice engines' commands share the table's command port

Every received frame is parsed, its 4-tuple is looked up in the connection table (one
lookup per frame, in order), and the record goes to the three engines at once:

* the handshake engine (``hw.handshake``) decides, from the metadata and the lookup,
  whether the frame goes to the host or is dropped and whether the NIC answers it (SYN
  cookies, active opens). When it reports an *established* connection, the NIC inserts
  its 4-tuple into the connection table as a host-owned flow (``FlowKind.HOST``), so that
  the connection's later segments go to the host instead of being checked as cookies;
* the teardown engine (``hw.teardown``) claims the segments of the flows it is closing
  (``FlowKind.CLOSING``) and answers them; its verdict replaces the handshake engine's
  for those frames (``Reason.FLOW`` on ``host_rx_meta`` for the few it delivers);
* the splice engine (``hw.splice``) claims the frames of spliced flows
  (``FlowKind.SPLICED``): ``RxDispatch`` sends them to the ``SpliceRewriter`` with the
  engine's descriptor, and out on ``mac_tx`` rewritten, with no host involvement (those
  it cannot relay go to the host with ``Reason.FLOW``).

The host's own frames (``host_tx``) get their checksums completed and share ``mac_tx``
with the NIC's segments, a frame at a time.

``hw.nic.Nic`` puts the host interface (``hw.host_interface``: registers, rings, DMA)
in front of this datapath; on its own, as the engines' tests use it, its host side is
plain streams: ``control``
(listeners, cookie key, CONNECT), ``close`` + ``close_data`` (CLOSE commands and their
held data), ``splice`` (SPLICE commands), ``event`` (the engines' events), ``host_rx`` +
``host_rx_meta``, ``host_tx``, and ``table_cmd``/``table_resp`` (the connection table's
command port, shared with the NIC's own inserts and the engines' commands, which go
first). The splice engine's timers use the teardown engine's tick (``timer_now``).

Known limits: a segment that reaches the table lookup after the final ACK of its own
connection but before the insert lands (about 60 cycles) is recognised by the handshake
engine's recent-connection memory and goes to the host; only when more than 16
connections are established within 4096 cycles can such a segment miss it, be checked
as a cookie ACK, fail and be dropped (the peer retransmits it). Segments looked up
before a CLOSE's table entry lands go to the host, which has let the connection go and
answers them as a closed socket would.

Ports: see ``__init__``; ``width`` is the datapath width (64 or 512 tested).
"""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from hw.builder import TxBuilder
from hw.checksum_insert import ChecksumInserter
from hw.conn_table import FLOW_KEY, ConnTable, Op, command_layout, response_layout
from hw.handshake import HANDSHAKE_IN, VERDICT, HandshakeEngine, Reason, control_layout
from hw.headers import MAX_FRAME_BYTES
from hw.metadata import (EVENT, FLOW_RECORD, FLOW_VALUE, PARSER_META, TX_HEADER, EventKind,
                         FlowKind, FrameClass)
from hw.parser import Parser
from hw.rx_dispatch import DISPATCH, RxDispatch
from hw.splice import SPLICE_COMMAND, SpCounter, SpliceEngine
from hw.splice_rewrite import SpliceRewriter
from hw.stream import packet_signature, struct_value
from hw.stream_merge import StreamMerge
from hw.teardown import CLOSE_COMMAND, TdCounter, TeardownEngine
from hw.tx_arbiter import TxArbiter

__all__ = ["Datapath"]


class Datapath(wiring.Component):
    def __init__(self, width=64, entries=4096, listeners=16, max_frame_bytes=MAX_FRAME_BYTES,
                 teardown_slots=1024, teardown_buffers=16, splice_slots=512):
        self.width = width
        self.entries = entries
        self.listeners = listeners
        self.max_frame_bytes = max_frame_bytes
        self._table = ConnTable(entries=entries, value_width=FLOW_VALUE.size, stash=4,
                                max_moves=256, state_width=0)
        geo = self._table.geo
        self._teardown = TeardownEngine(width, slots=teardown_slots, buffers=teardown_buffers,
                                        table=geo)
        self._splice = SpliceEngine(slots=splice_slots, table=geo)
        self._rewriter = SpliceRewriter(width)
        super().__init__({
            "mac_rx": In(packet_signature(width)),
            "mac_tx": Out(packet_signature(width)),
            "host_rx": Out(packet_signature(width)),
            "host_rx_meta": Out(stream.Signature(VERDICT)),
            "host_tx": In(packet_signature(width)),
            "event": Out(stream.Signature(EVENT)),
            "control": In(stream.Signature(control_layout(listeners))),
            "table_cmd": In(stream.Signature(command_layout(geo, FLOW_VALUE.size))),
            "table_resp": Out(stream.Signature(response_layout(geo, FLOW_VALUE.size))),
            "cookie_period": In(32),
            "ts_period": In(32),
            "rst_bad_cookie": In(1),
            "syn_rto": In(32),
            "syn_retries": In(4),
            "counters": Out(32 * len(Reason)),     # the handshake engine's, per Reason
            "flows": Out(range(geo.slots + 1)),
            "insert_failures": Out(32),
            "cut_frames": Out(32),
            # teardown offload
            "close": In(stream.Signature(CLOSE_COMMAND)),
            "close_data": In(packet_signature(width)),
            "tick_period": In(32), "fin_rto": In(32), "fin2_timeout": In(32),
            "time_wait": In(32), "fin_retries": In(4),
            "td_counters": Out(32 * len(TdCounter)),
            "closing": Out(range(teardown_slots + 1)),
            "timer_now": Out(32),
            "ts_clock": Out(32),
            # splicing
            "splice": In(stream.Signature(SPLICE_COMMAND)),
            "idle_timeout": In(32), "linger": In(32),
            "sp_counters": Out(32 * len(SpCounter)),
            "spliced": Out(range(splice_slots + 1)),
        })

    def elaborate(self, platform):
        m = Module()
        w = self.width
        m.submodules.parser = parser = Parser(w, self.max_frame_bytes)
        m.submodules.table = table = self._table
        m.submodules.engine = engine = HandshakeEngine(self.listeners)
        m.submodules.teardown = teardown = self._teardown
        m.submodules.splicer = splicer = self._splice
        m.submodules.rewriter = rewriter = self._rewriter
        m.submodules.dispatch = dispatch = RxDispatch(w, self.max_frame_bytes)
        m.submodules.builder = builder = TxBuilder(w, self.max_frame_bytes)
        m.submodules.inserter = inserter = ChecksumInserter(w)
        m.submodules.arbiter = arbiter = TxArbiter(w, inputs=3)

        # ------------------------------------------------------------ RX
        wiring.connect(m, wiring.flipped(self.mac_rx), parser.i)
        wiring.connect(m, parser.o, dispatch.i)
        wiring.connect(m, dispatch.host, wiring.flipped(self.host_rx))
        wiring.connect(m, dispatch.host_meta, wiring.flipped(self.host_rx_meta))
        m.d.comb += self.cut_frames.eq(dispatch.cut_frames)

        # Each record goes both to the table lookup and to a FIFO that waits for its result.
        m.submodules.meta_fifo = meta_fifo = SyncFIFOBuffered(
            width=PARSER_META.size, depth=1 << (table.lookup_latency + 8).bit_length())
        meta = parser.meta.payload
        m.d.comb += [
            table.i.payload.eq(struct_value(FLOW_KEY, {
                "port": 0, "src": meta.ip.src, "dst": meta.ip.dst,
                "sport": meta.tcp.sport, "dport": meta.tcp.dport})),
            table.i.valid.eq(parser.meta.valid & meta_fifo.w_rdy),
            meta_fifo.w_en.eq(parser.meta.valid & table.i.ready),
            meta_fifo.w_data.eq(meta),
            parser.meta.ready.eq(table.i.ready & meta_fifo.w_rdy),
        ]
        # Each record with its lookup result goes to the three engines at once.
        waiting = PARSER_META(meta_fifo.r_data)
        both = table.o.valid & meta_fifo.r_rdy
        record = struct_value(FLOW_RECORD, {
            "meta": meta_fifo.r_data, "ingress": 0, "hit": table.o.payload.hit,
            "value": table.o.payload.value})
        engines_ready = engine.rx.ready & teardown.rx.ready & splicer.rx.ready
        m.d.comb += [
            engine.rx.valid.eq(both & teardown.rx.ready & splicer.rx.ready),
            engine.rx.payload.eq(struct_value(HANDSHAKE_IN, {
                "meta": meta_fifo.r_data, "ingress": 0,
                "flow_hit": table.o.payload.hit & (waiting.frame_class == FrameClass.TCP)})),
            teardown.rx.valid.eq(both & engine.rx.ready & splicer.rx.ready),
            teardown.rx.payload.eq(record),
            splicer.rx.valid.eq(both & engine.rx.ready & teardown.rx.ready),
            splicer.rx.payload.eq(record),
            table.o.ready.eq(engines_ready & meta_fifo.r_rdy),
            meta_fifo.r_en.eq(engines_ready & table.o.valid),
        ]
        # One verdict per frame from each engine; the teardown or splice engine's wins
        # when it claims the frame (a segment of a flow it is closing or relaying).
        hs_verdict, td_verdict, sp_verdict = engine.verdict, teardown.verdict, splicer.verdict
        all_valid = hs_verdict.valid & td_verdict.valid & sp_verdict.valid
        td, sp = td_verdict.payload, sp_verdict.payload
        m.d.comb += [
            dispatch.verdict.valid.eq(all_valid),
            dispatch.verdict.payload.eq(Mux(
                sp.claimed,
                struct_value(DISPATCH, {"verdict": {"to_host": sp.to_host, "reason": Reason.FLOW},
                                        "to_splice": sp.to_splice}),
                Mux(td.claimed,
                    struct_value(DISPATCH, {"verdict": {"to_host": td.to_host,
                                                        "reason": Reason.FLOW}}),
                    struct_value(DISPATCH, {"verdict": hs_verdict.payload.as_value()})))),
            hs_verdict.ready.eq(td_verdict.valid & sp_verdict.valid & dispatch.verdict.ready),
            td_verdict.ready.eq(hs_verdict.valid & sp_verdict.valid & dispatch.verdict.ready),
            sp_verdict.ready.eq(hs_verdict.valid & td_verdict.valid & dispatch.verdict.ready),
        ]
        # Relayed frames: the splice engine's descriptors drive the rewriter.
        wiring.connect(m, dispatch.splice, rewriter.i)
        wiring.connect(m, splicer.desc, rewriter.desc)
        wiring.connect(m, wiring.flipped(self.splice), splicer.command)
        m.d.comb += [splicer.now.eq(teardown.now), splicer.idle_timeout.eq(self.idle_timeout),
                     splicer.linger.eq(self.linger), self.sp_counters.eq(splicer.counters),
                     self.spliced.eq(splicer.spliced)]
        wiring.connect(m, wiring.flipped(self.control), engine.control)
        m.d.comb += [engine.cookie_period.eq(self.cookie_period),
                     engine.ts_period.eq(self.ts_period),
                     engine.rst_bad_cookie.eq(self.rst_bad_cookie),
                     engine.syn_rto.eq(self.syn_rto), engine.syn_retries.eq(self.syn_retries),
                     self.counters.eq(engine.counters), self.flows.eq(table.count),
                     self.ts_clock.eq(engine.ts_clock)]
        wiring.connect(m, wiring.flipped(self.close), teardown.close)
        wiring.connect(m, wiring.flipped(self.close_data), teardown.close_data)
        m.d.comb += [teardown.ts_clock.eq(engine.ts_clock),
                     teardown.tick_period.eq(self.tick_period), teardown.fin_rto.eq(self.fin_rto),
                     teardown.fin2_timeout.eq(self.fin2_timeout),
                     teardown.time_wait.eq(self.time_wait),
                     teardown.fin_retries.eq(self.fin_retries),
                     self.td_counters.eq(teardown.counters), self.closing.eq(teardown.closing),
                     self.timer_now.eq(teardown.now)]

        # ------------------------------------------------------------ events and inserts
        # Both engines' events go to the host; an established connection's 4-tuple also
        # goes into the insert queue (the event waits until the queue has room).
        m.submodules.insert_fifo = insert_fifo = SyncFIFOBuffered(width=FLOW_KEY.size, depth=16)
        m.submodules.event_merge = event_merge = StreamMerge(EVENT, inputs=3)
        ev = engine.event.payload
        m.d.comb += [
            event_merge.i[0].valid.eq(engine.event.valid & insert_fifo.w_rdy),
            event_merge.i[0].payload.eq(ev),
            engine.event.ready.eq(event_merge.i[0].ready & insert_fifo.w_rdy),
            insert_fifo.w_en.eq(engine.event.valid & engine.event.ready
                                & (ev.kind == EventKind.ESTABLISHED)),
            insert_fifo.w_data.eq(struct_value(FLOW_KEY, {
                "port": ev.ingress, "src": ev.peer_ip, "dst": ev.local_ip,
                "sport": ev.peer_port, "dport": ev.local_port})),
        ]
        wiring.connect(m, teardown.event, event_merge.i[1])
        wiring.connect(m, splicer.event, event_merge.i[2])
        wiring.connect(m, event_merge.o, wiring.flipped(self.event))

        # The table's command port: NIC inserts first, then the teardown engine's
        # commands, the splice engine's, and the host's; a FIFO remembers who asked, so
        # that each response goes back to its issuer.
        NIC, TEARDOWN, SPLICE, HOST = 0, 1, 2, 3
        m.submodules.issuer = issuer = SyncFIFOBuffered(width=2, depth=4)
        insert_cmd = struct_value(command_layout(table.geo, FLOW_VALUE.size), {
            "op": Op.INSERT, "key": insert_fifo.r_data,
            "value": struct_value(FLOW_VALUE, {"kind": FlowKind.HOST})})
        who = Signal(2)
        m.d.comb += who.eq(Mux(insert_fifo.r_rdy, NIC,
                               Mux(teardown.table_cmd.valid, TEARDOWN,
                                   Mux(splicer.table_cmd.valid, SPLICE, HOST))))
        accepted = table.cmd.valid & table.cmd.ready
        m.d.comb += [
            table.cmd.valid.eq(issuer.w_rdy & (insert_fifo.r_rdy | teardown.table_cmd.valid
                                               | splicer.table_cmd.valid
                                               | self.table_cmd.valid)),
            table.cmd.payload.eq(Mux(who == NIC, insert_cmd,
                                     Mux(who == TEARDOWN, teardown.table_cmd.payload.as_value(),
                                         Mux(who == SPLICE, splicer.table_cmd.payload.as_value(),
                                             self.table_cmd.payload.as_value())))),
            insert_fifo.r_en.eq(accepted & (who == NIC)),
            teardown.table_cmd.ready.eq(issuer.w_rdy & table.cmd.ready & (who == TEARDOWN)),
            splicer.table_cmd.ready.eq(issuer.w_rdy & table.cmd.ready & (who == SPLICE)),
            self.table_cmd.ready.eq(issuer.w_rdy & table.cmd.ready & (who == HOST)),
            issuer.w_en.eq(accepted),
            issuer.w_data.eq(who),
        ]
        asker = issuer.r_data
        responders = {TEARDOWN: teardown.table_resp, SPLICE: splicer.table_resp,
                      HOST: self.table_resp}
        for code, port in responders.items():
            m.d.comb += [port.payload.eq(table.resp.payload),
                         port.valid.eq(table.resp.valid & issuer.r_rdy & (asker == code))]
        m.d.comb += [
            table.resp.ready.eq(issuer.r_rdy & Mux(asker == NIC, 1,
                                                   Mux(asker == TEARDOWN,
                                                       teardown.table_resp.ready,
                                                       Mux(asker == SPLICE,
                                                           splicer.table_resp.ready,
                                                           self.table_resp.ready)))),
            issuer.r_en.eq(table.resp.valid & table.resp.ready),
        ]
        with m.If(table.resp.valid & table.resp.ready & (asker == NIC)
                  & (table.resp.payload.status != 0)):
            m.d.sync += self.insert_failures.eq(self.insert_failures + 1)

        # ------------------------------------------------------------ TX
        # Segments from both engines share the builder; only the teardown engine's carry
        # data (its held data, on its own payload stream, in the order of its headers).
        m.submodules.header_merge = header_merge = StreamMerge(TX_HEADER, inputs=2)
        wiring.connect(m, engine.tx, header_merge.i[0])
        wiring.connect(m, teardown.tx, header_merge.i[1])
        wiring.connect(m, header_merge.o, builder.header)
        wiring.connect(m, teardown.tx_payload, builder.payload)
        wiring.connect(m, wiring.flipped(self.host_tx), inserter.i)
        wiring.connect(m, builder.o, arbiter.i[0])
        wiring.connect(m, inserter.o, arbiter.i[1])
        wiring.connect(m, rewriter.o, arbiter.i[2])
        wiring.connect(m, arbiter.o, wiring.flipped(self.mac_tx))
        return m
