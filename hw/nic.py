"""The NIC top level (first version: connection setup offload, plain host streams).

::

  mac_rx -> Parser --frames--------------------------------> RxDispatch --> host_rx
                   \\--meta--> ConnTable lookup --+                ^         host_rx_meta
                   \\--meta--> meta FIFO ---------+-> Handshake ---+ verdict
                                                     engine --tx--> TxBuilder --+
                                                        |                       +-> TxArbiter -> mac_tx
  host_tx -> ChecksumInserter --------------------------|-----------------------+
                                                        +--event--> event (host)
                                                        +--established--> ConnTable INSERT

Every received frame is parsed, its 4-tuple is looked up in the connection table (one
lookup per frame, in order) and the handshake engine decides, from the metadata and the
lookup, whether the frame goes to the host or is dropped and whether the NIC answers it
(``hw.handshake``). When the engine reports an *established* connection, the NIC inserts
its 4-tuple into the connection table as a host-owned flow (``FlowKind.HOST``), so that
the connection's later segments go to the host instead of being checked as cookies. The
host's own frames (``host_tx``) get their checksums completed and share ``mac_tx`` with
the NIC's replies, a frame at a time.

Until the host-interface issue lands, the host side is plain streams: ``control``
(listeners, cookie key, CONNECT), ``event``, ``host_rx`` + ``host_rx_meta``, ``host_tx``, and
``table_cmd``/``table_resp`` (the connection table's command port, shared with the
NIC's own inserts; the NIC's inserts go first).

Known limit: a segment that reaches the table lookup within about 60 cycles after the
final ACK of its own connection (before the insert lands) is checked as a cookie ACK,
fails, and is dropped; the peer retransmits it.

Ports: see ``__init__``; ``width`` is the datapath width (64 or 512 tested).
"""

from amaranth.hdl import Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from hw.builder import TxBuilder
from hw.checksum_insert import ChecksumInserter
from hw.conn_table import FLOW_KEY, ConnTable, Op, command_layout, response_layout
from hw.handshake import HANDSHAKE_IN, VERDICT, HandshakeEngine, Reason, control_layout
from hw.headers import MAX_FRAME_BYTES
from hw.metadata import EVENT, FLOW_VALUE, PARSER_META, FlowKind, FrameClass
from hw.parser import Parser
from hw.rx_dispatch import RxDispatch
from hw.stream import packet_signature, struct_value
from hw.tx_arbiter import TxArbiter

__all__ = ["Nic"]


class Nic(wiring.Component):
    def __init__(self, width=64, entries=4096, listeners=16, max_frame_bytes=MAX_FRAME_BYTES):
        self.width = width
        self.entries = entries
        self.listeners = listeners
        self.max_frame_bytes = max_frame_bytes
        self._table = ConnTable(entries=entries, value_width=FLOW_VALUE.size, stash=4,
                                max_moves=256, state_width=8)
        geo = self._table.geo
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
        })

    def elaborate(self, platform):
        m = Module()
        w = self.width
        m.submodules.parser = parser = Parser(w, self.max_frame_bytes)
        m.submodules.table = table = self._table
        m.submodules.engine = engine = HandshakeEngine(self.listeners)
        m.submodules.dispatch = dispatch = RxDispatch(w, self.max_frame_bytes)
        m.submodules.builder = builder = TxBuilder(w, self.max_frame_bytes)
        m.submodules.inserter = inserter = ChecksumInserter(w)
        m.submodules.arbiter = arbiter = TxArbiter(w, inputs=2)

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
        waiting = PARSER_META(meta_fifo.r_data)
        both = table.o.valid & meta_fifo.r_rdy
        m.d.comb += [
            engine.rx.valid.eq(both),
            engine.rx.payload.eq(struct_value(HANDSHAKE_IN, {
                "meta": meta_fifo.r_data, "ingress": 0,
                "flow_hit": table.o.payload.hit & (waiting.frame_class == FrameClass.TCP)})),
            table.o.ready.eq(engine.rx.ready & meta_fifo.r_rdy),
            meta_fifo.r_en.eq(engine.rx.ready & table.o.valid),
        ]
        wiring.connect(m, engine.verdict, dispatch.verdict)
        wiring.connect(m, wiring.flipped(self.control), engine.control)
        m.d.comb += [engine.cookie_period.eq(self.cookie_period),
                     engine.ts_period.eq(self.ts_period),
                     engine.rst_bad_cookie.eq(self.rst_bad_cookie),
                     engine.syn_rto.eq(self.syn_rto), engine.syn_retries.eq(self.syn_retries),
                     self.counters.eq(engine.counters), self.flows.eq(table.count)]

        # ------------------------------------------------------------ events and inserts
        # An established event goes to the host and its 4-tuple into the insert queue.
        m.submodules.insert_fifo = insert_fifo = SyncFIFOBuffered(width=FLOW_KEY.size, depth=16)
        ev = engine.event.payload
        m.d.comb += [
            self.event.payload.eq(ev),
            self.event.valid.eq(engine.event.valid & insert_fifo.w_rdy),
            insert_fifo.w_en.eq(engine.event.valid & self.event.ready),
            insert_fifo.w_data.eq(struct_value(FLOW_KEY, {
                "port": ev.ingress, "src": ev.peer_ip, "dst": ev.local_ip,
                "sport": ev.peer_port, "dport": ev.local_port})),
            engine.event.ready.eq(self.event.ready & insert_fifo.w_rdy),
        ]
        # The table's command port: NIC inserts first, then host commands; a one-bit
        # FIFO remembers who asked, so that each response goes back to its issuer.
        m.submodules.issuer = issuer = SyncFIFOBuffered(width=1, depth=4)
        nic_turn = insert_fifo.r_rdy
        insert_cmd = struct_value(command_layout(table.geo, FLOW_VALUE.size), {
            "op": Op.INSERT, "key": insert_fifo.r_data,
            "value": struct_value(FLOW_VALUE, {"kind": FlowKind.HOST})})
        can_issue = issuer.w_rdy
        m.d.comb += [
            table.cmd.valid.eq(can_issue & (insert_fifo.r_rdy | self.table_cmd.valid)),
            table.cmd.payload.eq(insert_cmd),
            insert_fifo.r_en.eq(can_issue & table.cmd.ready),
            self.table_cmd.ready.eq(can_issue & table.cmd.ready & ~nic_turn),
            issuer.w_en.eq(table.cmd.valid & table.cmd.ready),
            issuer.w_data.eq(nic_turn),
        ]
        with m.If(~nic_turn):
            m.d.comb += table.cmd.payload.eq(self.table_cmd.payload)
        from_nic = issuer.r_data[0]
        m.d.comb += [
            self.table_resp.payload.eq(table.resp.payload),
            self.table_resp.valid.eq(table.resp.valid & issuer.r_rdy & ~from_nic),
            table.resp.ready.eq(issuer.r_rdy & (from_nic | self.table_resp.ready)),
            issuer.r_en.eq(table.resp.valid & table.resp.ready),
        ]
        with m.If(table.resp.valid & table.resp.ready & from_nic
                  & (table.resp.payload.status != 0)):
            m.d.sync += self.insert_failures.eq(self.insert_failures + 1)

        # ------------------------------------------------------------ TX
        wiring.connect(m, engine.tx, builder.header)
        m.d.comb += builder.payload.valid.eq(0)
        wiring.connect(m, wiring.flipped(self.host_tx), inserter.i)
        wiring.connect(m, builder.o, arbiter.i[0])
        wiring.connect(m, inserter.o, arbiter.i[1])
        wiring.connect(m, arbiter.o, wiring.flipped(self.mac_tx))
        return m
