"""Common start-up for cocotb tests: clock, reset, bus adapter."""
import cocotb
from cocotb.clock import Clock
from cocotb.triggers import RisingEdge

from sim.bus import CocotbBus

CLOCK_NS = 4


async def start(dut, reset_cycles=4):
    """Start the clock, hold reset for ``reset_cycles`` and return a ``CocotbBus``."""
    cocotb.start_soon(Clock(dut.clk, CLOCK_NS, unit="ns").start())
    dut.rst.value = 1
    for _ in range(reset_cycles):
        await RisingEdge(dut.clk)
    dut.rst.value = 0
    return CocotbBus(dut)
