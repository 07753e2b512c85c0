"""Executes the host's commands: one command-ring entry at a time, to the engine it names.

``CommandDecoder(width, listeners=16, table_entries=4096)`` takes the entries that a
``RingFetcher`` reads from the command ring (``hw.host_formats.COMMAND_ENTRY``), in
order, and for each, by ``op`` (``CommandOp``):

=========  ==========================================  ===================================
op         does                                        answer (on ``done`` unless noted)
=========  ==========================================  ===================================
NOP        nothing                                     COMMAND_DONE OK
LISTEN     ``control``: WRITE_LISTENER index, entry    COMMAND_DONE OK
SET_KEY    ``control``: SET_KEY key                    COMMAND_DONE OK
CONNECT    ``control``: CONNECT                        the engine's ESTABLISHED / FAILED
CLOSE      reads the held data at ``addr`` by DMA,     the engine's CLOSE_STATUS
           then ``close`` and the data on
           ``close_data``
SPLICE     ``splice``                                  the engine's SPLICE_STATUS
TABLE      ``table_cmd``, waits for ``table_resp``     COMMAND_DONE OK, the response in
                                                       the event's ``table``
other      nothing                                     COMMAND_DONE UNKNOWN_OP
=========  ==========================================  ===================================

Errors answer COMMAND_DONE and change nothing: an entry the fetcher could not read, or
a CLOSE whose held data could not be read -> DMA_ERROR; a CLOSE whose held data is
longer than ``hw.teardown.MAX_HELD_DATA`` or not aligned to the datapath width ->
BAD_LENGTH. A CLOSE's data is read whole into a buffer before the command goes to the
teardown engine, so that a failed read never reaches the wire. COMMAND_DONE carries
the command's ring index and ``tag``.

Throughput: one command per few cycles (a CLOSE with data: its DMA read, then a beat per
cycle). Latency: 2 cycles to the engine's port, plus the DMA read for a CLOSE's data.

Ports:
  entry: In(stream of hw.ring_fetch.fetched_entry_layout(128))
  control, close, close_data, splice, table_cmd: Out (the NIC's engine ports); table_resp: In
  dma_req: Out(stream of hw.dma.DMA_READ), dma_data: In(DMA read data): the CLOSE data
  done: Out(stream of hw.host_formats.EVENT_ENTRY)
  executed: Out(32): command entries taken
"""

from amaranth.hdl import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from hw.conn_table import Geometry, command_layout, response_layout
from hw.dma import DMA_READ, dma_read_data_layout
from hw.handshake import ControlOp, control_layout
from hw.host_formats import (COMMAND_ENTRY, EVENT_ENTRY, RING_ENTRY_BYTES, CommandOp,
                             CommandStatus, HostEventKind, Ring)
from hw.metadata import FLOW_VALUE
from hw.ring_fetch import fetched_entry_layout
from hw.splice import SPLICE_COMMAND
from hw.stream import packet_signature, struct_value
from hw.teardown import CLOSE_COMMAND, MAX_HELD_DATA

__all__ = ["CommandDecoder"]


class CommandDecoder(wiring.Component):
    def __init__(self, width=64, listeners=16, table_entries=4096):
        self.width = width
        self.listeners = listeners
        self.geo = Geometry(table_entries, stash=4, max_moves=256)
        super().__init__({
            "entry": In(stream.Signature(fetched_entry_layout(RING_ENTRY_BYTES[Ring.COMMAND]))),
            "control": Out(stream.Signature(control_layout(listeners))),
            "close": Out(stream.Signature(CLOSE_COMMAND)),
            "close_data": Out(packet_signature(width)),
            "splice": Out(stream.Signature(SPLICE_COMMAND)),
            "table_cmd": Out(stream.Signature(command_layout(self.geo, FLOW_VALUE.size))),
            "table_resp": In(stream.Signature(response_layout(self.geo, FLOW_VALUE.size))),
            "dma_req": Out(stream.Signature(DMA_READ)),
            "dma_data": In(stream.Signature(dma_read_data_layout(width))),
            "done": Out(stream.Signature(EVENT_ENTRY)),
            "executed": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        beat_bytes = self.width // 8
        held_beats = -(-MAX_HELD_DATA // beat_bytes)

        index = Signal(16)
        command = Signal(COMMAND_ENTRY)
        status = Signal(4)
        table = Signal.like(self.table_resp.payload)
        body = command.body
        data_length = body.close.data_length

        # The engines' ports carry the latched command's body; valid says which one.
        control_op = Signal(2)
        m.d.comb += [
            self.control.payload.op.eq(control_op),
            self.control.payload.index.eq(body.listen.index),
            self.control.payload.entry.eq(body.listen.entry),
            self.control.payload.key.eq(body.key),
            self.control.payload.connect.eq(body.connect),
            self.close.payload.eq(body.close),
            self.splice.payload.eq(body.splice),
            self.table_cmd.payload.op.eq(body.table.op),
            self.table_cmd.payload.key.eq(body.table.key),
            self.table_cmd.payload.value.eq(body.table.value),
            self.table_cmd.payload.slot.eq(body.table.slot),
            self.table_cmd.payload.hash_key.eq(body.table.hash_key),
        ]

        # The CLOSE's held data, read whole before the command goes on.
        m.submodules.held = held = SyncFIFOBuffered(width=self.width, depth=held_beats + 1)
        read_failed = Signal()
        beats_left = Signal(range(held_beats + 1))
        m.d.comb += [
            self.dma_req.payload.addr.eq(command.addr),
            self.dma_req.payload.length.eq(data_length),
            held.w_data.eq(self.dma_data.payload.data),
            self.close_data.payload.data.eq(held.r_data),
            self.close_data.payload.keep.eq((1 << beat_bytes) - 1),
            self.close_data.payload.last.eq(beats_left == 1),
        ]

        m.d.comb += self.done.payload.eq(struct_value(EVENT_ENTRY, {
            "event": {"kind": HostEventKind.COMMAND_DONE, "status": status},
            "ring_index": index, "command_tag": command.tag,
            "table": {"status": table.status, "index": table.index, "slot": table.slot,
                      "key": table.key.as_value(), "value": table.value}}))

        def answer(code):
            m.d.sync += status.eq(code)
            m.next = "DONE"

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.entry.ready.eq(1)
                with m.If(self.entry.valid):
                    m.d.sync += [index.eq(self.entry.payload.index),
                                 self.executed.eq(self.executed + 1),
                                 command.eq(self.entry.payload.data), table.eq(0)]
                    with m.If(self.entry.payload.error):
                        m.d.sync += status.eq(CommandStatus.DMA_ERROR)
                        m.next = "DONE"
                    with m.Else():
                        m.next = "DECODE"
            with m.State("DECODE"):
                with m.Switch(command.op):
                    with m.Case(CommandOp.NOP):
                        answer(CommandStatus.OK)
                    with m.Case(CommandOp.LISTEN):
                        m.d.sync += control_op.eq(ControlOp.WRITE_LISTENER)
                        m.next = "CONTROL"
                    with m.Case(CommandOp.SET_KEY):
                        m.d.sync += control_op.eq(ControlOp.SET_KEY)
                        m.next = "CONTROL"
                    with m.Case(CommandOp.CONNECT):
                        m.d.sync += control_op.eq(ControlOp.CONNECT)
                        m.next = "CONTROL"
                    with m.Case(CommandOp.CLOSE):
                        with m.If((data_length > MAX_HELD_DATA)
                                  | ((data_length != 0)
                                     & (command.addr[:beat_bytes.bit_length() - 1] != 0))):
                            answer(CommandStatus.BAD_LENGTH)
                        with m.Elif(data_length == 0):
                            m.next = "CLOSE"
                        with m.Else():
                            m.d.sync += [read_failed.eq(0),
                                         beats_left.eq((data_length + beat_bytes - 1)
                                                       // beat_bytes)]
                            m.next = "READ"
                    with m.Case(CommandOp.SPLICE):
                        m.next = "SPLICE"
                    with m.Case(CommandOp.TABLE):
                        m.next = "TABLE"
                    with m.Default():
                        answer(CommandStatus.UNKNOWN_OP)
            with m.State("CONTROL"):
                m.d.comb += self.control.valid.eq(1)
                with m.If(self.control.ready):
                    with m.If(control_op == ControlOp.CONNECT):
                        m.next = "IDLE"
                    with m.Else():
                        answer(CommandStatus.OK)
            with m.State("READ"):
                m.d.comb += self.dma_req.valid.eq(1)
                with m.If(self.dma_req.ready):
                    m.next = "FILL"
            with m.State("FILL"):
                # Exactly the beats of the request come back (one, with error, if refused).
                m.d.comb += [self.dma_data.ready.eq(1),
                             held.w_en.eq(self.dma_data.valid)]
                with m.If(self.dma_data.valid):
                    with m.If(self.dma_data.payload.error):
                        m.d.sync += read_failed.eq(1)
                    with m.If(self.dma_data.payload.last):
                        m.next = "CHECK"
            with m.State("CHECK"):
                with m.If(read_failed):
                    m.next = "DRAIN"
                with m.Else():
                    m.next = "CLOSE"
            with m.State("DRAIN"):
                m.d.comb += held.r_en.eq(1)
                with m.If(~held.r_rdy):
                    answer(CommandStatus.DMA_ERROR)
            with m.State("CLOSE"):
                m.d.comb += self.close.valid.eq(1)
                with m.If(self.close.ready):
                    with m.If(data_length == 0):
                        m.next = "IDLE"
                    with m.Else():
                        m.next = "CLOSE_DATA"
            with m.State("CLOSE_DATA"):
                m.d.comb += [self.close_data.valid.eq(held.r_rdy),
                             held.r_en.eq(self.close_data.ready)]
                with m.If(self.close_data.valid & self.close_data.ready):
                    m.d.sync += beats_left.eq(beats_left - 1)
                    with m.If(beats_left == 1):
                        m.next = "IDLE"
            with m.State("SPLICE"):
                m.d.comb += self.splice.valid.eq(1)
                with m.If(self.splice.ready):
                    m.next = "IDLE"
            with m.State("TABLE"):
                m.d.comb += self.table_cmd.valid.eq(1)
                with m.If(self.table_cmd.ready):
                    m.next = "TABLE_WAIT"
            with m.State("TABLE_WAIT"):
                m.d.comb += self.table_resp.ready.eq(1)
                with m.If(self.table_resp.valid):
                    m.d.sync += table.eq(self.table_resp.payload)
                    answer(CommandStatus.OK)
            with m.State("DONE"):
                m.d.comb += self.done.valid.eq(1)
                with m.If(self.done.ready):
                    m.next = "IDLE"
        return m
