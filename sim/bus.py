"""Stream agents written once and run on any simulator through a thin adapter.

The agents (``StreamSource``, ``StreamSink``) speak to a design through an adapter with
three operations: ``set(port, value)``, ``get(port)`` and two awaitables, ``settle()``
(all combinational logic has settled for this cycle) and ``edge()`` (the next rising
clock edge). Ports are named as in the generated Verilog: ``i__valid``,
``i__payload``, ``o__ready``...

Two adapters exist: ``AmaranthBus`` (the built-in Amaranth simulator, used by the
demo and the benches by default) and ``CocotbBus`` (Verilator and Icarus under cocotb,
used by the testbenches in ``tb/``). One clock cycle, for every agent, is::

    drive()   set this cycle's outputs (valid/payload or ready)
    settle()  let the design's combinational logic settle
    sample()  read the handshake: a transfer seen here happens at the coming edge
    edge()    the clock edge

``run_until`` runs that loop for a list of agents until a condition holds,
``run_cycles`` for a number of cycles.
"""

import random

__all__ = ["AmaranthBus", "CocotbBus", "StreamSource", "StreamSink", "run_until", "run_cycles"]


class AmaranthBus:
    """Adapter for an Amaranth 0.5 async testbench (``ctx``) and a component."""

    def __init__(self, ctx, component):
        self.ctx = ctx
        self.component = component
        self._cache = {}
        self.cycle = 0

    def _signal(self, port):
        sig = self._cache.get(port)
        if sig is None:
            obj = self.component
            for part in port.split("__"):    # "rd_req__0__valid": arrays of ports too
                obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
            if hasattr(obj, "as_value"):     # a lib.data view: talk to its raw bits
                obj = obj.as_value()
            sig = self._cache[port] = obj
        return sig

    def set(self, port, value):
        self.ctx.set(self._signal(port), value)

    def get(self, port):
        return int(self.ctx.get(self._signal(port)))

    async def settle(self):
        pass  # testbench reads in Amaranth always see settled values

    async def edge(self):
        await self.ctx.tick()
        self.cycle += 1


class CocotbBus:
    """Adapter for a cocotb ``dut`` with a ``clk`` input."""

    def __init__(self, dut, clock="clk"):
        from cocotb.triggers import ReadOnly, RisingEdge
        self.dut = dut
        self._clk = getattr(dut, clock)
        self._read_only = ReadOnly
        self._rising = RisingEdge
        self._handles = {}
        self._written = {}
        self.cycle = 0

    def _handle(self, port):
        h = self._handles.get(port)
        if h is None:
            h = self._handles[port] = getattr(self.dut, port)
        return h

    def set(self, port, value):
        # Writing through the GPI is the costly part of a cycle: skip unchanged values.
        if self._written.get(port) != value:
            self._written[port] = value
            self._handle(port).value = value

    def get(self, port):
        return int(self._handle(port).value)

    async def settle(self):
        await self._read_only()

    async def edge(self):
        await self._rising(self._clk)
        self.cycle += 1


class StreamSource:
    """Drives ``<name>__valid/__payload`` from a queue of payload integers.

    ``stall`` is the probability of holding ``valid`` low in a cycle where data is
    waiting (random valid stalls); a beat, once offered, is held until accepted, as
    AXI-Stream requires.
    """

    def __init__(self, bus, name, stall=0.0, rng=None):
        self.bus, self.name, self.stall = bus, name, stall
        self.rng = rng or random.Random(0)
        self.queue = []
        self._pos = 0
        self._offering = False
        self.sent = 0
        self.sent_cycles = []          # bus cycle of each accepted beat
        bus.set(f"{name}__valid", 0)

    def send(self, payloads):
        self.queue.extend(payloads)

    @property
    def idle(self):
        return self._pos >= len(self.queue)

    def drive(self):
        if not self._offering and not self.idle:
            self._offering = not (self.stall and self.rng.random() < self.stall)
        if self._offering:
            self.bus.set(f"{self.name}__payload", self.queue[self._pos])
        self.bus.set(f"{self.name}__valid", int(self._offering))

    def sample(self):
        if self._offering and self.bus.get(f"{self.name}__ready"):
            self._pos += 1
            self.sent += 1
            self.sent_cycles.append(self.bus.cycle)
            self._offering = False
            if self._pos > 4096:   # keep the queue short on long runs
                del self.queue[:self._pos]
                self._pos = 0


class StreamSink:
    """Drives ``<name>__ready`` (low with probability ``stall``) and collects payloads."""

    def __init__(self, bus, name, stall=0.0, rng=None):
        self.bus, self.name, self.stall = bus, name, stall
        self.rng = rng or random.Random(1)
        self.received = []
        self.received_cycles = []      # bus cycle of each accepted beat
        self._ready = 0
        bus.set(f"{name}__ready", 0)

    def drive(self):
        self._ready = int(not (self.stall and self.rng.random() < self.stall))
        self.bus.set(f"{self.name}__ready", self._ready)

    def sample(self):
        if self._ready and self.bus.get(f"{self.name}__valid"):
            self.received.append(self.bus.get(f"{self.name}__payload"))
            self.received_cycles.append(self.bus.cycle)


async def run_until(bus, agents, done, max_cycles, progress=None):
    """Clock ``agents`` until ``done()`` is true; return the number of cycles run.

    Raises ``TimeoutError`` after ``max_cycles`` so that a hung design fails loudly.
    ``progress(cycle)`` is called every 1024 cycles when given.
    """
    cycles = 0
    while not done():
        if cycles >= max_cycles:
            raise TimeoutError(f"no completion after {max_cycles} cycles")
        for agent in agents:
            agent.drive()
        await bus.settle()
        for agent in agents:
            agent.sample()
        await bus.edge()
        cycles += 1
        if progress is not None and cycles % 1024 == 0:
            progress(cycles)
    return cycles


async def run_cycles(bus, agents, cycles):
    """Clock ``agents`` for ``cycles`` cycles (under cocotb, a value read right after an
    edge is the one before it: a cycle or two of this lets registers be read)."""
    left = cycles

    def done():
        nonlocal left
        left -= 1
        return left < 0
    await run_until(bus, agents, done, cycles + 1)
