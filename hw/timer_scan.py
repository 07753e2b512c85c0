"""Per-slot timers served by a round-robin sweep: one slot compared per cycle.

``TimerScan(slots)`` keeps an armed bit and a 32-bit deadline per slot in a block RAM.
A sweep reads one slot per cycle, in order, round after round, and offers every armed
slot whose deadline has passed (``now - deadline`` is not negative, modulo 2**32) on
``expired``. Its cost per cycle is one memory read and one compare whatever the number
of slots; a timer fires at most ``slots`` + 2 cycles after its deadline while ``expired``
is read (the sweep waits on a slot it cannot hand over, so none is skipped). This is a
timer wheel with one slot per bucket and a ``slots``-cycle revolution.

Writes (``set_en``: slot, armed, deadline) go straight to the memory. A sweep read at
the edge of a write may report the slot's old deadline, and an expiry is reported again
each round until the slot is re-armed or disarmed, so the user checks an expiry against
its own copy of the deadline before acting on it.

Latency: deadline -> ``expired`` at most slots + 2 cycles. Throughput: one expiry per
cycle at most.

Ports
  now                     In(32)             the timer clock
  set_en, set_slot, set_armed, set_deadline  In     write one slot's timer
  expired                 Out(stream of range(slots))
"""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from hw.stream import struct_value

__all__ = ["TimerScan", "TIMER_ENTRY", "deadline_passed"]

TIMER_ENTRY = data.StructLayout({"armed": 1, "deadline": 32})


def deadline_passed(now, deadline):
    """``now`` is at or after ``deadline`` (modulo 2**32: less than 2**31 apart)."""
    return ~(now - deadline)[31]


class TimerScan(wiring.Component):
    def __init__(self, slots):
        self.slots = slots
        super().__init__({
            "now": In(32),
            "set_en": In(1), "set_slot": In(range(slots)), "set_armed": In(1),
            "set_deadline": In(32),
            "expired": Out(stream.Signature(range(slots))),
        })

    def elaborate(self, platform):
        m = Module()
        n = self.slots
        m.submodules.mem = mem = Memory(shape=TIMER_ENTRY, depth=n, init=[])
        wr = mem.write_port()
        rd = mem.read_port()
        m.d.comb += [wr.en.eq(self.set_en), wr.addr.eq(self.set_slot),
                     wr.data.eq(struct_value(TIMER_ENTRY, {"armed": self.set_armed,
                                                           "deadline": self.set_deadline}))]

        # rd.data holds the timer of slot `current` (read at the previous edge). An expired
        # slot goes to the output register; when that is still occupied the sweep reads
        # the same slot again instead of moving on.
        current = Signal(range(n))
        due = Signal()
        out_free = Signal()
        stall = Signal()
        following = Signal(range(n))
        m.d.comb += [
            due.eq(rd.data.armed & deadline_passed(self.now, rd.data.deadline)),
            out_free.eq(~self.expired.valid | self.expired.ready),
            stall.eq(due & ~out_free),
            following.eq(Mux(current == n - 1, 0, current + 1)),
            rd.addr.eq(Mux(stall, current, following)),
        ]
        m.d.sync += current.eq(rd.addr)
        with m.If(out_free):
            m.d.sync += [self.expired.valid.eq(due), self.expired.payload.eq(current)]
        return m
