"""Stream merge: several single-beat record streams into one, round robin.

``StreamMerge(shape, inputs=2)``: each cycle the first input with a record, in round-robin
order after the input served last, is passed to ``o`` (combinationally: no added latency,
no bubble). For records that are one beat each (headers, events); packet streams, whose
frames must not interleave, use ``hw.tx_arbiter.TxArbiter``.

Latency: 0 cycles. Throughput: one record per cycle.

Ports: ``i`` (In, a list of ``inputs`` streams of ``shape``), ``o`` (Out, stream of ``shape``).
"""

from amaranth.hdl import Array, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from hw.stream import round_robin_grant

__all__ = ["StreamMerge"]


class StreamMerge(wiring.Component):
    def __init__(self, shape, inputs=2):
        self.inputs = inputs
        super().__init__({
            "i": In(stream.Signature(shape)).array(inputs),
            "o": Out(stream.Signature(shape)),
        })

    def elaborate(self, platform):
        m = Module()
        n = self.inputs
        last_served = Signal(range(n), init=n - 1)
        valids = Array(port.valid for port in self.i)
        grant = round_robin_grant(m, [port.valid for port in self.i], last_served)
        m.d.comb += [self.o.valid.eq(valids[grant]),
                     self.o.payload.eq(Array(port.payload.as_value() for port in self.i)[grant])]
        for k, port in enumerate(self.i):
            m.d.comb += port.ready.eq(self.o.ready & (grant == k))
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += last_served.eq(grant)
        return m
