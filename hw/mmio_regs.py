"""The MMIO register block: the register map of ``hw.registers`` behind a simple bus.

``MmioRegisters(params)`` (``params``: the NIC's parameters, for the CONST registers)
serves one access per cycle on ``mmio`` (``{addr, write, wdata}``, byte addresses, 32-bit
aligned registers; the low two address bits are ignored). A write updates an RW register
at the next edge; a read answers on ``rdata`` one cycle later, in order (``mmio`` waits
while an answer is not taken). Unmapped offsets read ``UNMAPPED``; writes to them or to
read-only registers are ignored; both count in ``BAD_ACCESSES``.

Each RW register is an output port named after it in lower case (``cookie_period``...),
each RO register an input port of ``32 * count`` bits (``flows``, ``handshake_counters``...),
so that the NIC connects them by name.

Latency: 1 cycle (read). Throughput: one access per cycle.
"""

from amaranth.hdl import Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from hw.registers import REGISTERS, UNMAPPED, Access

__all__ = ["MmioRegisters", "MMIO_REQUEST", "MMIO_ADDRESS_BITS"]

#: Byte address bits of BAR 0.
MMIO_ADDRESS_BITS = 12

MMIO_REQUEST = data.StructLayout({"addr": MMIO_ADDRESS_BITS, "write": 1, "wdata": 32})


def port_name(reg):
    return reg.name.lower()


class MmioRegisters(wiring.Component):
    def __init__(self, params):
        self.params = dict(params)
        ports = {"mmio": In(stream.Signature(MMIO_REQUEST)), "rdata": Out(stream.Signature(32))}
        for reg in REGISTERS:
            if reg.access is Access.RW:
                ports[port_name(reg)] = Out(32 * reg.count, init=reg.init)
            elif reg.access is Access.RO and reg.name != "BAD_ACCESSES":
                ports[port_name(reg)] = In(32 * reg.count)
        super().__init__(ports)

    def elaborate(self, platform):
        m = Module()
        request = self.mmio.payload
        word = request.addr[2:]
        bad_accesses = Signal(32)
        took = self.mmio.valid & self.mmio.ready
        m.d.comb += self.mmio.ready.eq(~self.rdata.valid | self.rdata.ready)
        with m.If(self.rdata.ready):
            m.d.sync += self.rdata.valid.eq(0)
        bad = Signal()
        with m.If(took):
            m.d.sync += self.rdata.valid.eq(~request.write)
            with m.Switch(word):
                for reg in REGISTERS:
                    for k in range(reg.count):
                        with m.Case((reg.offset >> 2) + k):
                            if reg.access is Access.CONST:
                                value = reg.value(self.params)
                                m.d.sync += self.rdata.payload.eq(value)
                                m.d.comb += bad.eq(request.write)
                            elif reg.name == "BAD_ACCESSES":
                                m.d.sync += self.rdata.payload.eq(bad_accesses)
                                m.d.comb += bad.eq(request.write)
                            elif reg.access is Access.RO:
                                port = getattr(self, port_name(reg))
                                m.d.sync += self.rdata.payload.eq(port[32 * k:32 * k + 32])
                                m.d.comb += bad.eq(request.write)
                            else:
                                port = getattr(self, port_name(reg))
                                field = port[32 * k:32 * k + 32]
                                m.d.sync += self.rdata.payload.eq(field)
                                with m.If(request.write):
                                    m.d.sync += field.eq(request.wdata)
                with m.Default():
                    m.d.sync += self.rdata.payload.eq(UNMAPPED)
                    m.d.comb += bad.eq(1)
        with m.If(bad):
            m.d.sync += bad_accesses.eq(bad_accesses + 1)
        return m
