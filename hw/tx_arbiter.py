"""TX arbiter: several packet streams into one, a whole frame at a time, round robin.

``TxArbiter(width, inputs=2)``: when no frame is in progress, the next input after the
last one served that has a beat waiting is granted (in the same cycle, so there is no
bubble between frames); the grant holds until that frame's last beat is accepted.

Latency: 0 cycles (combinational path from the granted input to ``o``). Throughput: one
beat per cycle; a frame is never interleaved with another.

Ports: ``i`` (In, a list of ``inputs`` packet streams), ``o`` (Out, packet stream).
"""

from amaranth.hdl import Array, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from hw.stream import packet_signature, round_robin_grant

__all__ = ["TxArbiter"]


class TxArbiter(wiring.Component):
    def __init__(self, width=64, inputs=2):
        self.width = width
        self.inputs = inputs
        super().__init__({
            "i": In(packet_signature(width)).array(inputs),
            "o": Out(packet_signature(width)),
        })

    def elaborate(self, platform):
        m = Module()
        n = self.inputs
        locked = Signal()                 # a frame is in progress on `owner`
        owner = Signal(range(n))
        last_served = Signal(range(n), init=n - 1)

        # The first waiting input after `last_served`, in round-robin order.
        pick = round_robin_grant(m, [port.valid for port in self.i], last_served)
        grant = Signal(range(n))
        m.d.comb += grant.eq(Mux(locked, owner, pick))

        m.d.comb += [self.o.valid.eq(Array(port.valid for port in self.i)[grant]),
                     self.o.payload.eq(Array(port.payload.as_value() for port in self.i)[grant])]
        for k, port in enumerate(self.i):
            m.d.comb += port.ready.eq(self.o.ready & (grant == k))
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += [locked.eq(~self.o.payload.last), owner.eq(grant)]
            with m.If(self.o.payload.last):
                m.d.sync += last_served.eq(grant)
        return m
