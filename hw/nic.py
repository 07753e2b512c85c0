r"""The NIC: the offload datapath behind its PCIe host interface.

::

   wire                                                          host (PCIe)
   mac_rx --> +----------------------+ host_rx, events   +---------------+ <-- mmio
              | hw.datapath.Datapath | ----------------> | hw.host_      | --> mmio_rdata
   mac_tx <-- | parser, table, three | <---------------- | interface     | <-> pcie_rd/cpl/wr
              | engines, rewriter,   | host_tx, commands | registers,    | --> irq
              | builder, arbiter     | <---------------> | rings, DMA    |
              +----------------------+ configuration,    +---------------+
                                       statistics

``Nic(width=64, entries=4096, listeners=16, teardown_slots=1024, teardown_buffers=16,
splice_slots=512)``: everything the host does goes through BAR 0 (``hw.registers``)
and the rings in its memory (``hw.host_formats``); the wire side is the MAC's two
packet streams. The driver (``host_driver``) brings it up and uses it; the simulated
host side of the link is ``sim.pcie_host.PcieHost``.

Ports: ``mac_rx`` (In) and ``mac_tx`` (Out): packet streams of ``width`` bits;
``mmio``, ``mmio_rdata``, ``pcie_rd``, ``pcie_cpl``, ``pcie_wr``, ``irq``: see
``hw.host_interface``.
"""

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from hw.datapath import Datapath
from hw.headers import MAX_FRAME_BYTES
from hw.host_interface import DATAPATH_REGISTERS, HostInterface, host_side_ports
from hw.mmio_regs import port_name
from hw.registers import Access
from hw.stream import packet_signature

__all__ = ["Nic"]

#: Registers whose datapath port has another name.
_DATAPATH_PORT = {"HANDSHAKE_COUNTERS": "counters", "TEARDOWN_COUNTERS": "td_counters",
                  "SPLICE_COUNTERS": "sp_counters"}


class Nic(wiring.Component):
    def __init__(self, width=64, entries=4096, listeners=16, teardown_slots=1024,
                 teardown_buffers=16, splice_slots=512, max_frame_bytes=MAX_FRAME_BYTES):
        self.width = width
        sizes = {"entries": entries, "listeners": listeners, "teardown_slots": teardown_slots,
                 "teardown_buffers": teardown_buffers, "splice_slots": splice_slots}
        self._datapath = Datapath(width, max_frame_bytes=max_frame_bytes, **sizes)
        self._host = HostInterface(width, max_frame_bytes=max_frame_bytes, **sizes)
        super().__init__({
            "mac_rx": In(packet_signature(width)),
            "mac_tx": Out(packet_signature(width)),
            **host_side_ports(width),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.datapath = datapath = self._datapath
        m.submodules.host = host = self._host
        wiring.connect(m, wiring.flipped(self.mac_rx), datapath.mac_rx)
        wiring.connect(m, datapath.mac_tx, wiring.flipped(self.mac_tx))
        for name in ("mmio", "pcie_cpl"):
            wiring.connect(m, wiring.flipped(getattr(self, name)), getattr(host, name))
        for name in ("mmio_rdata", "pcie_rd", "pcie_wr", "irq"):
            wiring.connect(m, getattr(host, name), wiring.flipped(getattr(self, name)))

        wiring.connect(m, host.host_tx, datapath.host_tx)
        wiring.connect(m, datapath.host_rx, host.host_rx)
        wiring.connect(m, datapath.host_rx_meta, host.host_rx_meta)
        wiring.connect(m, datapath.event, host.event)
        for name in ("control", "close", "close_data", "splice", "table_cmd"):
            wiring.connect(m, getattr(host, name), getattr(datapath, name))
        wiring.connect(m, datapath.table_resp, host.table_resp)

        for reg in DATAPATH_REGISTERS:
            outside = getattr(host, port_name(reg))
            inside = getattr(datapath, _DATAPATH_PORT.get(reg.name, port_name(reg)))
            if reg.access is Access.RW:
                m.d.comb += inside.eq(outside)      # truncated to the datapath's width
            else:
                m.d.comb += outside.eq(inside)
        return m
