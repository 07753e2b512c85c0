"""A free list: the indices 0 .. n-1 of a pool, handed out and taken back one per cycle.

``FreeList(n)`` starts full: after a reset it writes 0, 1, ..., n-1 into its FIFO, one per
cycle (a release in the same cycle goes first), so indices become available from the
second cycle on and all n after n cycles. ``alloc`` offers the next free index (valid
while one is free); ``release`` takes one back. Releasing an index that is not allocated
is the user's mistake and is not detected.

Latency: a released index can be allocated again 2 cycles later (``SyncFIFOBuffered``).
Throughput: one alloc and one release per cycle.

Ports
  alloc    Out(stream of range(n))   the next free index
  release  In(stream of range(n))    an index given back; always ready
  free     Out(range(n + 1))         indices free (those still to be written at reset
                                     included)
"""

from amaranth.hdl import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

__all__ = ["FreeList"]


class FreeList(wiring.Component):
    def __init__(self, n):
        self.n = n
        super().__init__({
            "alloc": Out(stream.Signature(range(n))),
            "release": In(stream.Signature(range(n))),
            "free": Out(range(n + 1)),
        })

    def elaborate(self, platform):
        m = Module()
        n = self.n
        # One entry more than there are indices: SyncFIFOBuffered(depth) keeps depth - 1 in
        # its memory and one in its output register, and refuses a write while the memory
        # is full even when the register is about to take one; with n in the memory, a
        # release always has room (at most n indices exist).
        m.submodules.fifo = fifo = SyncFIFOBuffered(width=max(1, (n - 1).bit_length()),
                                                    depth=n + 1)
        filling = Signal(init=1)
        next_fill = Signal(range(n + 1))
        fill = Signal()
        m.d.comb += [
            self.release.ready.eq(1),
            fill.eq(filling & ~self.release.valid & fifo.w_rdy),
            fifo.w_en.eq(self.release.valid | fill),
            fifo.w_data.eq(next_fill),
            self.alloc.valid.eq(fifo.r_rdy),
            self.alloc.payload.eq(fifo.r_data),
            fifo.r_en.eq(self.alloc.ready),
        ]
        with m.If(self.release.valid):
            m.d.comb += fifo.w_data.eq(self.release.payload)
        with m.If(fill):
            m.d.sync += next_fill.eq(next_fill + 1)
            with m.If(next_fill == n - 1):
                m.d.sync += filling.eq(0)
        m.d.comb += self.free.eq(fifo.level + (n - next_fill))
        with m.If(~filling):
            m.d.comb += self.free.eq(fifo.level)
        return m
