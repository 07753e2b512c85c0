r"""The NIC's host side: BAR 0 registers, four rings in host memory, a DMA engine, an interrupt.

::

   host (PCIe)                                        NIC datapath (hw.datapath)
   mmio/mmio_rdata -> MmioRegisters --config--------> cookie_period, fin_rto, ...
                                    <-statistics----- flows, counters, ...
   pcie_rd  <-+                                       
   pcie_cpl ->| DmaEngine <- RingFetcher(TX) -> TxFetch ------------> host_tx
   pcie_wr  <-+           <- RingFetcher(RX) -> RxDeliver <---------- host_rx, host_rx_meta
                          <- RingFetcher(COMMAND) -> CommandDecoder -> control, close(+data),
                          |                                 ^            splice, table_cmd
                          |                                 +----------- table_resp
                          <- EventRing <- merge of: the engines' events <- event
   irq <--------------------------------------- RX events, TX_DONE, COMMAND_DONE

``HostInterface(width, entries, listeners, teardown_slots, teardown_buffers,
splice_slots, max_frame_bytes)``: everything the host sees of the NIC. The register map
is ``hw.registers``, the ring formats ``hw.host_formats``; docs/host_interface.md
explains how a driver uses them. DMA clients: reads: TX ring, TX frames, RX ring,
command ring, CLOSE data; writes: RX frames, events.

Ports, host side: ``mmio`` (In, ``MMIO_REQUEST``), ``mmio_rdata`` (Out, 32),
``pcie_rd``/``pcie_cpl``/``pcie_wr`` (``hw.dma``'s link interface), ``irq`` (Out, the
vector). Datapath side: ``host_tx`` (Out) and ``host_rx``/``host_rx_meta`` (In), the
command ports ``control``, ``close``, ``close_data``, ``splice``, ``table_cmd`` (Out)
and ``table_resp`` (In), ``event`` (In, ``hw.metadata.EVENT``), and one port per
configuration register (Out) and statistics register (In) that the datapath has,
named after the register in lower case (``hw.mmio_regs``).
"""

from amaranth.hdl import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from hw.command_decoder import CommandDecoder
from hw.conn_table import command_layout, response_layout
from hw.dma import PCIE_READ, DmaEngine, pcie_completion_layout, pcie_write_layout
from hw.event_ring import EventRing
from hw.handshake import VERDICT, control_layout
from hw.headers import MAX_FRAME_BYTES
from hw.host_formats import EVENT_ENTRY, RING_ENTRY_BYTES, HostCounter, Ring
from hw.metadata import EVENT, FLOW_VALUE
from hw.mmio_regs import MMIO_REQUEST, MmioRegisters, port_name
from hw.registers import REGISTERS, Access
from hw.ring_fetch import RingFetcher
from hw.rx_deliver import RxDeliver
from hw.splice import SPLICE_COMMAND
from hw.stream import packet_signature, struct_value
from hw.stream_merge import StreamMerge
from hw.teardown import CLOSE_COMMAND
from hw.tx_fetch import TxFetch

__all__ = ["HostInterface", "DATAPATH_REGISTERS", "host_side_ports"]

#: Registers the host interface keeps for itself (rings, interrupt, DMA, its counters);
#: every other RW/RO register is a port to the datapath.
_OWN = {f"{ring.name}_{name}" for ring in Ring
        for name in ("BASE_LO", "BASE_HI", "SIZE_LOG2", "HOST_INDEX", "NIC_INDEX", "STATUS")} | {
    "IRQ_ENABLE", "IRQ_COUNT", "IRQ_TIME", "DMA_TIMEOUT", "HOST_COUNTERS", "DMA_COUNTERS",
    "BAD_ACCESSES", "SCRATCH"}

#: The registers that are ports of the host interface to the datapath.
DATAPATH_REGISTERS = tuple(reg for reg in REGISTERS
                           if reg.access is not Access.CONST and reg.name not in _OWN)

# Read clients of the DMA engine, and write clients.
_TX_RING, _TX_DATA, _RX_RING, _CMD_RING, _CLOSE_DATA = range(5)
_RX_DATA, _EVENTS = range(2)


def host_side_ports(width):
    """The NIC's ports toward the host (BAR 0, the PCIe link, the interrupt): the same on
    ``HostInterface`` and on ``hw.nic.Nic``."""
    return {
        "mmio": In(stream.Signature(MMIO_REQUEST)),
        "mmio_rdata": Out(stream.Signature(32)),
        "pcie_rd": Out(stream.Signature(PCIE_READ)),
        "pcie_cpl": In(stream.Signature(pcie_completion_layout(width))),
        "pcie_wr": Out(stream.Signature(pcie_write_layout(width))),
        "irq": Out(stream.Signature(8)),
    }


class HostInterface(wiring.Component):
    def __init__(self, width=64, entries=4096, listeners=16, teardown_slots=1024,
                 teardown_buffers=16, splice_slots=512, max_frame_bytes=MAX_FRAME_BYTES):
        self.width = width
        self.params = {"width": width, "entries": entries, "listeners": listeners,
                       "teardown_slots": teardown_slots, "teardown_buffers": teardown_buffers,
                       "splice_slots": splice_slots}
        self.max_frame_bytes = max_frame_bytes
        self._commands = CommandDecoder(width, listeners, entries)
        geo = self._commands.geo
        ports = {
            **host_side_ports(width),
            "host_tx": Out(packet_signature(width)),
            "host_rx": In(packet_signature(width)),
            "host_rx_meta": In(stream.Signature(VERDICT)),
            "event": In(stream.Signature(EVENT)),
            "control": Out(stream.Signature(control_layout(listeners))),
            "close": Out(stream.Signature(CLOSE_COMMAND)),
            "close_data": Out(packet_signature(width)),
            "splice": Out(stream.Signature(SPLICE_COMMAND)),
            "table_cmd": Out(stream.Signature(command_layout(geo, FLOW_VALUE.size))),
            "table_resp": In(stream.Signature(response_layout(geo, FLOW_VALUE.size))),
        }
        for reg in DATAPATH_REGISTERS:
            ports[port_name(reg)] = (Out if reg.access is Access.RW else In)(32 * reg.count,
                                                                             init=reg.init)
        super().__init__(ports)

    def elaborate(self, platform):
        m = Module()
        w = self.width
        m.submodules.regs = regs = MmioRegisters(self.params)
        m.submodules.dma = dma = DmaEngine(w, read_clients=5, write_clients=2)
        m.submodules.commands = commands = self._commands
        m.submodules.tx = tx = TxFetch(w, self.max_frame_bytes)
        m.submodules.rx = rx = RxDeliver(w, self.max_frame_bytes)
        m.submodules.events = events = EventRing(w)
        m.submodules.event_merge = merge = StreamMerge(EVENT_ENTRY, inputs=4)
        fetchers = {ring: RingFetcher(w, RING_ENTRY_BYTES[ring]) for ring in
                    (Ring.TX, Ring.RX, Ring.COMMAND)}
        for ring, fetcher in fetchers.items():
            m.submodules[f"{ring.name.lower()}_ring"] = fetcher

        # ---- registers: the host's side, the datapath's, and the rings'.
        wiring.connect(m, wiring.flipped(self.mmio), regs.mmio)
        wiring.connect(m, regs.rdata, wiring.flipped(self.mmio_rdata))
        for reg in DATAPATH_REGISTERS:
            name = port_name(reg)
            if reg.access is Access.RW:
                m.d.comb += getattr(self, name).eq(getattr(regs, name))
            else:
                m.d.comb += getattr(regs, name).eq(getattr(self, name))

        def ring_regs(ring, block):
            prefix = ring.name.lower()
            m.d.comb += [
                block.base.eq(getattr(regs, f"{prefix}_base_lo")
                              | (getattr(regs, f"{prefix}_base_hi") << 32)),
                block.size_log2.eq(getattr(regs, f"{prefix}_size_log2")),
                block.host_index.eq(getattr(regs, f"{prefix}_host_index")),
                getattr(regs, f"{prefix}_nic_index").eq(block.nic_index),
                getattr(regs, f"{prefix}_status").eq(block.status),
            ]
        for ring, fetcher in fetchers.items():
            ring_regs(ring, fetcher)
        ring_regs(Ring.EVENT, events)

        # ---- the DMA engine's clients, and its link.
        reads = {_TX_RING: fetchers[Ring.TX], _TX_DATA: tx, _RX_RING: fetchers[Ring.RX],
                 _CMD_RING: fetchers[Ring.COMMAND], _CLOSE_DATA: commands}
        for client, block in reads.items():
            wiring.connect(m, block.dma_req, dma.rd_req[client])
            wiring.connect(m, dma.rd_data[client], block.dma_data)
        for client, block in {_RX_DATA: rx, _EVENTS: events}.items():
            wiring.connect(m, block.dma_req, dma.wr_req[client])
            wiring.connect(m, block.dma_data, dma.wr_data[client])
        wiring.connect(m, dma.pcie_rd, wiring.flipped(self.pcie_rd))
        wiring.connect(m, wiring.flipped(self.pcie_cpl), dma.pcie_cpl)
        wiring.connect(m, dma.pcie_wr, wiring.flipped(self.pcie_wr))
        m.d.comb += [dma.cpl_timeout.eq(regs.dma_timeout), regs.dma_counters.eq(dma.counters)]

        # ---- rings to and from the datapath.
        wiring.connect(m, fetchers[Ring.TX].entry, tx.desc)
        wiring.connect(m, tx.o, wiring.flipped(self.host_tx))
        wiring.connect(m, fetchers[Ring.RX].entry, rx.buf)
        wiring.connect(m, wiring.flipped(self.host_rx), rx.frame)
        wiring.connect(m, wiring.flipped(self.host_rx_meta), rx.meta)
        wiring.connect(m, fetchers[Ring.COMMAND].entry, commands.entry)
        for name in ("control", "close", "close_data", "splice", "table_cmd"):
            wiring.connect(m, getattr(commands, name), wiring.flipped(getattr(self, name)))
        wiring.connect(m, wiring.flipped(self.table_resp), commands.table_resp)

        # ---- events: the engines', RX, TX_DONE, COMMAND_DONE; one ring, one interrupt.
        m.d.comb += [
            merge.i[0].valid.eq(self.event.valid),
            merge.i[0].payload.eq(struct_value(EVENT_ENTRY, {"event": self.event.payload})),
            self.event.ready.eq(merge.i[0].ready),
        ]
        wiring.connect(m, rx.done, merge.i[1])
        wiring.connect(m, tx.done, merge.i[2])
        wiring.connect(m, commands.done, merge.i[3])
        wiring.connect(m, merge.o, events.event)
        wiring.connect(m, events.irq, wiring.flipped(self.irq))
        m.d.comb += [events.irq_enable.eq(regs.irq_enable[0]),
                     events.irq_count.eq(regs.irq_count), events.irq_time.eq(regs.irq_time)]

        # ---- statistics.
        counters = {HostCounter.TX_FRAMES: tx.frames, HostCounter.TX_BAD: tx.bad,
                    HostCounter.RX_DELIVERED: rx.delivered, HostCounter.RX_DROPPED: rx.dropped,
                    HostCounter.RX_TOO_LONG: rx.too_long, HostCounter.EVENTS: events.written,
                    HostCounter.COMMANDS: commands.executed}
        for counter, value in counters.items():
            m.d.comb += regs.host_counters[32 * counter:32 * counter + 32].eq(value)
        return m
