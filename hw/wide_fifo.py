"""A wide synchronous FIFO built from narrow lanes with their own control.

A record FIFO several hundred bits wide, in LUT RAM, spreads over much of an FPGA; one
set of read/write pointers then drives every RAM cell and the routing of that fan-out
limits the clock. ``WideFIFO`` splits the data into lanes of at most ``lane_bits``, each a
``SyncFIFOBuffered`` with its own pointers. All lanes are written and read together, so
they hold the same entries; lane 0's flags and level stand for the whole FIFO.

Ports: ``w_data``, ``w_en``, ``w_rdy``, ``r_data``, ``r_en``, ``r_rdy``, ``level``, as in
``amaranth.lib.fifo``. Latency and throughput are those of ``SyncFIFOBuffered``.
"""

from amaranth.hdl import Cat, Module
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

__all__ = ["WideFIFO"]


class WideFIFO(wiring.Component):
    def __init__(self, width, depth, lane_bits=64):
        self.width = width
        self.depth = depth
        self.lane_bits = lane_bits
        super().__init__({
            "w_data": In(width), "w_en": In(1), "w_rdy": Out(1),
            "r_data": Out(width), "r_en": In(1), "r_rdy": Out(1),
            "level": Out(range(depth + 1)),
        })

    def elaborate(self, platform):
        m = Module()
        lanes = []
        for k, lo in enumerate(range(0, self.width, self.lane_bits)):
            hi = min(lo + self.lane_bits, self.width)
            lane = SyncFIFOBuffered(width=hi - lo, depth=self.depth)
            m.submodules[f"lane{k}"] = lane
            m.d.comb += [lane.w_data.eq(self.w_data[lo:hi]), lane.w_en.eq(self.w_en),
                         lane.r_en.eq(self.r_en)]
            lanes.append(lane)
        m.d.comb += [
            self.r_data.eq(Cat(*[lane.r_data for lane in lanes])),
            self.r_rdy.eq(lanes[0].r_rdy),
            self.w_rdy.eq(lanes[0].w_rdy),
            self.level.eq(lanes[0].level),
        ]
        return m
