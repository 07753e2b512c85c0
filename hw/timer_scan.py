"""Per-slot timers served by a round-robin sweep: one slot compared per cycle.

``TimerScan(slots)`` keeps an armed bit and a 32-bit deadline per slot in a block RAM.
A sweep reads one slot per cycle, in order, round after round, and queues every armed
slot whose deadline has passed (``now - deadline`` is not negative, modulo 2**32) for
``expired`` (an 8-entry queue). Its cost per cycle is one memory read and one compare
whatever the number of slots; a timer is queued at most ``slots`` + 3 cycles after its
deadline while ``expired`` is read (the sweep pauses while the queue is nearly full, so
none is skipped). This is a
timer wheel with one slot per bucket and a ``slots``-cycle revolution.

After a reset every timer is disarmed (the memory is cleared in ``slots`` cycles, then
``ready`` rises). Writes (``set_en``: slot, armed, deadline) go straight to the memory. A sweep read at
the edge of a write may report the slot's old deadline, and an expiry is reported again
each round until the slot is re-armed or disarmed, so the user checks an expiry against
its own copy of the deadline before acting on it.

Latency: deadline -> ``expired`` at most slots + 4 cycles while ``expired`` is read. Throughput: one expiry per
cycle at most.

Ports
  now                     In(32)             the timer clock
  set_en, set_slot, set_armed, set_deadline  In     write one slot's timer
  expired                 Out(stream of range(slots))
  ready                   Out(1)             the memory is cleared (``slots`` cycles after a
                                             reset); writes before that are lost
"""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
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
            "ready": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        n = self.slots
        m.submodules.mem = mem = Memory(shape=TIMER_ENTRY, depth=n, init=[])
        wr = mem.write_port()
        rd = mem.read_port()
        # After a reset the memory is cleared (every timer disarmed), one slot per cycle,
        # before the sweep starts: block RAMs have no reset.
        clearing = Signal(init=1)
        clear_slot = Signal(range(n))
        m.d.comb += self.ready.eq(~clearing)
        with m.If(clearing):
            m.d.comb += [wr.en.eq(1), wr.addr.eq(clear_slot), wr.data.eq(0)]
            m.d.sync += clear_slot.eq(clear_slot + 1)
            with m.If(clear_slot == n - 1):
                m.d.sync += clearing.eq(0)
        with m.Else():
            m.d.comb += [wr.en.eq(self.set_en), wr.addr.eq(self.set_slot),
                         wr.data.eq(struct_value(TIMER_ENTRY, {"armed": self.set_armed,
                                                               "deadline": self.set_deadline}))]

        # Three stages: read slot `addr`; register its timer (`entry`, `entry_slot`);
        # compare and queue an expired slot. The sweep pauses while the queue could not
        # take the slots already in the stages, so no expiry is lost and nothing in the
        # compare feeds back into the read address.
        m.submodules.queue = queue = SyncFIFOBuffered(width=max(1, (n - 1).bit_length()),
                                                      depth=8)
        addr = Signal(range(n))
        read_valid, read_slot = Signal(), Signal(range(n))
        entry_valid, entry_slot = Signal(), Signal(range(n))
        entry = Signal(TIMER_ENTRY)
        go = Signal()
        m.d.comb += [go.eq(~clearing & (queue.level < queue.depth - 3)), rd.addr.eq(addr)]
        m.d.sync += [read_valid.eq(go), read_slot.eq(addr),
                     entry_valid.eq(read_valid), entry_slot.eq(read_slot), entry.eq(rd.data)]
        with m.If(go):
            m.d.sync += addr.eq(Mux(addr == n - 1, 0, addr + 1))
        m.d.comb += [
            queue.w_en.eq(entry_valid & entry.armed
                          & deadline_passed(self.now, entry.deadline)),
            queue.w_data.eq(entry_slot),
            self.expired.valid.eq(queue.r_rdy), self.expired.payload.eq(queue.r_data),
            queue.r_en.eq(self.expired.ready),
        ]
        return m
