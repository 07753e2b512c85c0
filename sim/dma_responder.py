"""The DMA engine's client side, in Python: serves a block's DMA ports from host memory.

A block of the host interface (``hw.ring_fetch``, ``hw.event_ring``...) talks to the DMA
engine (``hw.dma``) through client ports: read requests (``DMA_READ``) answered by read
data beats, and write requests (``DMA_WRITE``) followed by a packet of data. These
agents stand in for the engine and the link in a block's own testbench, so that the
block is tested alone, with random stalls and read latency, against a
``sim.pcie.HostMemory``:

* ``DmaReadResponder``: each request is answered ``latency`` cycles later, in order,
  with exactly the beats the engine would send: a read outside the registered memory
  (or one the test marks with ``fail(addr)``) gets all its beats, zero, with ``error``
  on the last; a bad request (misaligned, length 0) one beat with ``error``.
* ``DmaWriteResponder``: each request's data packet lands in host memory ``latency``
  cycles after its last beat (a posted write on its way), in order; writes outside the registered memory, and packets whose length
  differs from their request's, are recorded in ``faults`` (never written).

Both follow the ``drive()``/``sample()`` cycle of ``sim.bus`` agents.
"""

import random


from hw.dma import DMA_READ, DMA_WRITE, dma_read_data_layout
from hw.stream import pack_struct, unpack_beat, unpack_struct
from sim.bus import StreamSink, StreamSource
from sim.pcie import HostMemoryError

__all__ = ["DmaReadResponder", "DmaWriteResponder"]


class DmaReadResponder:
    def __init__(self, bus, memory, width, req="dma_req", data="dma_data", latency=8,
                 stall=0.0, rng=None):
        rng = rng or random.Random(0)
        self.bus, self.memory, self.width, self.latency = bus, memory, width, latency
        self.requests = StreamSink(bus, req, stall=stall, rng=random.Random(rng.random()))
        self.data = StreamSource(bus, data, stall=stall, rng=random.Random(rng.random()))
        self.layout = dma_read_data_layout(width)
        self.failing = set()            # addresses whose reads fail
        self.log = []                   # (addr, length) of every request, in order
        self._due = []                  # (cycle, beats) in request order

    def fail(self, addr):
        self.failing.add(addr)

    def _beats(self, addr, length):
        step = self.width // 8
        if addr % step or length == 0:
            # A bad request: the engine answers one error beat and reads nothing.
            return [pack_struct(self.layout, keep=1, last=1, error=1)]
        error = 0
        try:
            if addr in self.failing:
                raise HostMemoryError(addr, length, "read")
            raw = self.memory.read(addr, length)
        except HostMemoryError:
            # A failed read: all of its beats, zero, the last one marked.
            raw, error = bytes(length), 1
        chunks = [raw[i:i + step] for i in range(0, length, step)]
        return [pack_struct(self.layout, data=int.from_bytes(c, "little"),
                            keep=(1 << len(c)) - 1, last=int(k == len(chunks) - 1),
                            error=error & int(k == len(chunks) - 1))
                for k, c in enumerate(chunks)]

    def drive(self):
        while self._due and self._due[0][0] <= self.bus.cycle:
            self.data.send(self._due.pop(0)[1])
        self.requests.drive()
        self.data.drive()

    def sample(self):
        before = len(self.requests.received)
        self.requests.sample()
        for raw in self.requests.received[before:]:
            req = unpack_struct(DMA_READ, raw)
            self.log.append((req["addr"], req["length"]))
            # The memory is read when the request arrives (the host's data at that time).
            self._due.append((self.bus.cycle + self.latency,
                              self._beats(req["addr"], req["length"])))
        self.data.sample()

    @property
    def idle(self):
        return not self._due and self.data.idle


class DmaWriteResponder:
    def __init__(self, bus, memory, width, req="dma_req", data="dma_data", latency=4, stall=0.0,
                 rng=None):
        rng = rng or random.Random(0)
        self.bus, self.memory, self.width, self.latency = bus, memory, width, latency
        self._landing = []              # (cycle, addr, payload): posted writes on their way
        self.requests = StreamSink(bus, req, stall=stall, rng=random.Random(rng.random()))
        self.data = StreamSink(bus, data, stall=stall, rng=random.Random(rng.random()))
        self.log = []                   # (addr, bytes) of every write, in order
        self.faults = []                # (addr, length, why)
        self._beats = []

    def drive(self):
        while self._landing and self._landing[0][0] <= self.bus.cycle:
            _, addr, payload = self._landing.pop(0)
            self.memory.write(addr, payload)
        self.requests.drive()
        self.data.drive()
        # As the engine does: a request's data is taken only after the request.
        if len(self.requests.received) <= len(self.log) + len(self.faults):
            self.data._ready = 0
            self.bus.set(f"{self.data.name}__ready", 0)

    def sample(self):
        self.requests.sample()
        before = len(self.data.received)
        self.data.sample()
        for raw in self.data.received[before:]:
            chunk, last = unpack_beat(self.width, raw)
            self._beats.append(chunk)
            if last:
                payload = b"".join(self._beats)
                self._beats = []
                if len(self.log) + len(self.faults) >= len(self.requests.received):
                    self.faults.append((None, len(payload), "data without a request"))
                    continue
                req = unpack_struct(DMA_WRITE, self.requests.received[len(self.log) + len(self.faults)])
                if req["length"] != len(payload):
                    self.faults.append((req["addr"], req["length"], "length mismatch"))
                    continue
                if self.memory.region_of(req["addr"], len(payload)) is None:
                    self.faults.append((req["addr"], req["length"], "outside host memory"))
                    continue
                self.log.append((req["addr"], payload))
                self._landing.append((self.bus.cycle + self.latency, req["addr"], payload))

    @property
    def idle(self):
        return not self._beats and not self._landing
