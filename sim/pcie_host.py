"""The host side of the DMA engine's PCIe link, as a bus agent (``sim.bus`` protocol).

``PcieHost(bus, memory, link)`` serves a device's link ports (``hw.dma``'s interface;
port names ``<prefix>pcie_rd``, ``<prefix>pcie_cpl``, ``<prefix>pcie_wr``) on any
``sim.bus`` adapter, so the same host runs on the Amaranth simulator and under cocotb:

* ``pcie_rd`` read requests are answered with ``pcie_cpl`` beats from ``memory``
  (``sim.pcie.HostMemory``), timed by ``link`` (``sim.pcie.PcieLink``: latency,
  bandwidth, completions cut at RCB/MPS) or, with ``link=None``, from the next cycle.
  An address outside the registered regions answers one error beat (UR). With
  ``reorder=True`` the beats of different tags are interleaved at random (each tag's
  beats stay in order). Hooks for tests: ``answer_delay(addr, length)`` gives extra
  cycles before answering (None: never answer), ``inject(...)`` sends a raw beat.
* ``pcie_wr`` TLPs are written to memory (through the link's posted-write latency when
  there is one); a TLP that breaks a rule (beats disagreeing on addr/length, a length
  that does not match its bytes, a 4 KB crossing) or a write outside memory is recorded
  in ``faults``, never raised. Every TLP is kept in ``writes`` and every read request
  in ``reads`` (with its cycle) for the tests' checks.
* MMIO master (when ``mmio`` / ``mmio_rdata`` name the device's ports, whose payloads
  are ``hw.mmio_regs.MMIO_REQUEST`` and 32 bits): ``mmio_write(addr, value)`` (posted)
  and ``await mmio_read(addr)``, with the link's MMIO latencies when there is a link.
* ``irq`` (optional): a stream of vector numbers, recorded as (vector, cycle) in
  ``interrupts``.

Counters: with a link, ``link.counters["up"/"down"]`` (TLPs, payload and wire bytes per
direction, MMIO included) and the link's own; always ``tlps``: TLPs and payload bytes
this agent saw per kind.

Per cycle, as every ``sim.bus`` agent: ``drive()``, then ``sample()`` after the design
settled; ``sample()`` also advances the host's time by one cycle.
"""

import heapq
import random
from collections import deque

from hw.dma import PCIE_READ, pcie_completion_layout, pcie_write_layout
from hw.mmio_regs import MMIO_REQUEST
from hw.stream import pack_struct, unpack_struct
from sim.bus import run_until
from sim.pcie import HostMemoryError, Tlp

__all__ = ["PcieHost"]

PAGE = 4096


class PcieHost:
    def __init__(self, bus, memory, link=None, prefix="", reorder=False, rng=None, stall=0.0,
                 width=64, mmio=None, mmio_rdata=None, irq=None, dma=True):
        self.bus, self.memory, self.link = bus, memory, link
        self.width, self.step = width, width // 8
        self.reorder, self.stall = reorder, stall
        self.rng = rng or random.Random(0)
        self.dma = dma                 # False: MMIO (and irq) only, no link ports
        self.rd, self.cpl, self.wr = (f"{prefix}{n}" for n in ("pcie_rd", "pcie_cpl", "pcie_wr"))
        self.mmio, self.mmio_rdata, self.irq = mmio, mmio_rdata, irq
        self._cpl_layout, self._wr_layout = pcie_completion_layout(width), pcie_write_layout(width)
        self._ticks = 0                # cycles sampled: the host's own time
        self.answer_delay = lambda addr, length: 0
        self.reads = []                # (cycle, tag, addr, length) of every read request
        self.writes = []               # (cycle, addr, data) of every write TLP
        self.write_beat_cycles = []    # cycle of every pcie_wr beat taken
        self.faults = []               # rule breaks and accesses outside memory (strings)
        self.interrupts = []           # (vector, cycle)
        self.tlps = {"MRd": 0, "CplD": 0, "Cpl": 0, "MWr": 0, "MWr_bytes": 0, "CplD_bytes": 0}
        self._events = []              # heap of (cycle, seq, action)
        self._seq = 0
        self._beats = {}               # tag -> deque of completion payloads
        self._arrival = deque()        # tags in beat arrival order (reorder=False)
        self._offer = None             # the completion beat offered now
        self._tlp = []                 # beats of the write TLP being received
        self._ready = {}
        self._link_errors_seen = 0
        # MMIO
        self._mmio_queue = deque()     # request payloads waiting for the mmio port
        self._mmio_waiting = deque()   # tokens of reads sent, answers to come in order
        self._mmio_results = {}
        self._mmio_next = 0
        self._mmio_offer = False
        self._mmio_up_cycles = 0
        self._mmio_issued = self._mmio_delivered = 0
        self._mmio_kinds = {"write": deque(), "read": deque()}
        self._mmio_arrived = {}
        if link is not None:
            link.memory = memory
            if mmio is not None:
                link.mmio_target = self
                self._mmio_up_cycles = self._cycles(self._mmio_up_ns(link))
        self._sinks = ((self.rd, self.wr) if dma else ()) + tuple(p for p in (mmio_rdata, irq) if p)
        for port in self._sinks:
            bus.set(f"{port}__ready", 0)
        for port in ((self.cpl,) if dma else ()) + ((mmio,) if mmio else ()):
            bus.set(f"{port}__valid", 0)

    # ------------------------------------------------------------------ time

    def _cycles(self, ns):
        return max(0, round(ns / self.link.period_ns)) if self.link else 0

    @staticmethod
    def _mmio_up_ns(link):
        """Device answer -> host: half the MMIO read round trip outside the wires, plus
        the completion's serialization (the split ``sim.pcie.PcieLink`` uses)."""
        cfg = link.cfg
        total = cfg.mmio_read_latency_ns or cfg.dma_read_latency_ns
        mrd, cpl = Tlp("MRd", 0, 4, "mmio"), Tlp("CplD", 0, 4, "mmio")
        flight = (total - link.serialization_ns(mrd) - link.serialization_ns(cpl)) / 2
        return flight + link.serialization_ns(cpl)

    def _at(self, cycle, action):
        heapq.heappush(self._events, (cycle, self._seq, action))
        self._seq += 1

    @property
    def idle(self):
        """No answer pending, no beat waiting, nothing in flight on the link."""
        return (not self._events and not any(self._beats.values()) and self._offer is None
                and (self.link is None or self.link.idle()) and not self._mmio_queue
                and not self._mmio_waiting)

    # ------------------------------------------------------------------ agent protocol

    def drive(self):
        bus = self.bus
        for port in self._sinks:
            self._ready[port] = int(not (self.stall and self.rng.random() < self.stall))
            bus.set(f"{port}__ready", self._ready[port])
        if self.dma:
            if self._offer is None:
                self._offer = self._next_beat()
            if self._offer is not None:
                bus.set(f"{self.cpl}__payload", self._offer)
            bus.set(f"{self.cpl}__valid", int(self._offer is not None))
        if self.mmio:
            if not self._mmio_offer and self._mmio_queue:
                self._mmio_offer = not (self.stall and self.rng.random() < self.stall)
            if self._mmio_offer:
                bus.set(f"{self.mmio}__payload", self._mmio_queue[0])
            bus.set(f"{self.mmio}__valid", int(self._mmio_offer))

    def sample(self):
        bus = self.bus
        if self.dma:
            if self._offer is not None and bus.get(f"{self.cpl}__ready"):
                self._offer = None
            if self._ready[self.rd] and bus.get(f"{self.rd}__valid"):
                self._on_read(unpack_struct(PCIE_READ, bus.get(f"{self.rd}__payload")))
            if self._ready[self.wr] and bus.get(f"{self.wr}__valid"):
                self.write_beat_cycles.append(self.cycle)
                self._on_write_beat(unpack_struct(self._wr_layout,
                                                  bus.get(f"{self.wr}__payload")))
        if self.mmio:
            if self._mmio_offer and bus.get(f"{self.mmio}__ready"):
                self._mmio_queue.popleft()
                self._mmio_offer = False
            if self._ready[self.mmio_rdata] and bus.get(f"{self.mmio_rdata}__valid"):
                value = bus.get(f"{self.mmio_rdata}__payload")
                token = self._mmio_waiting.popleft()
                self._at(self._ticks + self._mmio_up_cycles,
                         lambda t=token, v=value: self._mmio_results.__setitem__(t, v))
        if self.irq and self._ready[self.irq] and bus.get(f"{self.irq}__valid"):
            self.interrupts.append((bus.get(f"{self.irq}__payload"), self.cycle))
        self._tick()

    @property
    def cycle(self):
        """The bus cycle (for the records: comparable with the other agents')."""
        return self.bus.cycle

    def _tick(self):
        self._ticks += 1
        while self._events and self._events[0][0] <= self._ticks:
            heapq.heappop(self._events)[2]()
        if self.link is not None:
            for completion in self.link.tick():
                tag = completion.tag[0]
                self._completion(tag, completion.offset, completion.data, completion.last,
                                 completion.status != "SC")
            for error in self.link.errors[self._link_errors_seen:]:
                self.faults.append(f"{error.op}: {error}")
            self._link_errors_seen = len(self.link.errors)

    # ------------------------------------------------------------------ reads

    def _on_read(self, request):
        tag, addr, length = request["tag"], request["addr"], request["length"]
        self.reads.append((self.cycle, tag, addr, length))
        self.tlps["MRd"] += 1
        if not 0 < length <= PAGE or addr // PAGE != (addr + length - 1) // PAGE:
            self.faults.append(f"read request tag {tag} {addr:#x}+{length} breaks the TLP rules")
        delay = self.answer_delay(addr, length)
        if delay is None:
            return                                  # never answered (timeout tests)
        if self.link is not None:
            seq = self._seq
            self._at(self._ticks + delay,
                     lambda: self.link.request_read(addr, length, (tag, seq)))
        else:
            self._at(self._ticks + delay, lambda: self._answer(tag, addr, length))

    def _answer(self, tag, addr, length):
        """Answer from memory at once (no link): one completion for the whole request."""
        try:
            data = self.memory.read(addr, length)
        except HostMemoryError as error:
            self.faults.append(f"read: {error}")
            self._completion(tag, 0, b"", True, True)
            return
        self._completion(tag, 0, data, True, False)

    def _completion(self, tag, offset, data, last, error):
        """Queue the beats of one completion (an error one: a single beat, no data)."""
        if error:
            self.tlps["Cpl"] += 1
            self.inject(tag, offset, b"", last=True, error=True)
            return
        self.tlps["CplD"] += 1
        self.tlps["CplD_bytes"] += len(data)
        assert offset % self.step == 0, "completions start on a beat boundary"
        chunks = [data[k:k + self.step] for k in range(0, len(data), self.step)]
        for k, chunk in enumerate(chunks):
            self.inject(tag, offset + k * self.step, chunk, last and k == len(chunks) - 1)

    def inject(self, tag, offset, data=b"", last=True, error=False):
        """Queue one raw completion beat (tests: unexpected or malformed completions)."""
        payload = pack_struct(self._cpl_layout, tag=tag, offset=offset,
                              data=int.from_bytes(bytes(data), "little"), last=int(last),
                              error=int(error))
        self._beats.setdefault(tag, deque()).append(payload)
        self._arrival.append(tag)

    def _next_beat(self):
        if not self._arrival or (self.stall and self.rng.random() < self.stall):
            return None
        if self.reorder:
            tags = [t for t, q in self._beats.items() if q]
            tag = self.rng.choice(tags)
            self._arrival.remove(tag)
        else:
            tag = self._arrival.popleft()
        return self._beats[tag].popleft()

    # ------------------------------------------------------------------ writes

    def _on_write_beat(self, beat):
        self._tlp.append(beat)
        if not beat["last"]:
            return
        beats, self._tlp = self._tlp, []
        addr, length = beats[0]["addr"], beats[0]["length"]
        data = b"".join(b["data"].to_bytes(self.step, "little")[:bin(b["keep"]).count("1")]
                        for b in beats)
        self.writes.append((self.cycle, addr, data))
        self.tlps["MWr"] += 1
        self.tlps["MWr_bytes"] += len(data)
        if any(b["addr"] != addr or b["length"] != length for b in beats):
            self.faults.append(f"write TLP at {addr:#x}: beats disagree on addr/length")
        if len(data) != length or not 0 < length <= PAGE or \
                addr // PAGE != (addr + length - 1) // PAGE:
            self.faults.append(f"write TLP {addr:#x}+{length} ({len(data)} B) breaks the rules")
        if not data:
            return
        if self.link is not None:
            self.link.post_write(addr, data)    # an error shows in link.errors, then faults
        else:
            try:
                self.memory.write(addr, data)
            except HostMemoryError as error:
                self.faults.append(f"write: {error}")

    # ------------------------------------------------------------------ MMIO

    def _push_mmio(self, addr, write, value=0, token=None):
        self._mmio_queue.append(pack_struct(MMIO_REQUEST, addr=addr, write=int(write),
                                            wdata=value))
        if not write:
            self._mmio_waiting.append(token)

    def _issue_mmio(self, kind, addr, value=0, token=None):
        """Number the access; with a link, send it as a TLP and keep the order of issue
        at the device (PCIe: a read never passes a posted write; the link model's write
        and read flight times differ slightly)."""
        if self.link is None:
            self._push_mmio(addr, kind == "write", value, token)
            return
        seq = self._mmio_issued
        self._mmio_issued += 1
        self._mmio_kinds[kind].append((seq, addr, value, token))
        if kind == "write":
            self.link.mmio_write(addr, int(value).to_bytes(4, "little"))
        else:
            self.link.mmio_read(addr, 4)          # reaches ``read`` below at the device

    def _arrived(self, kind):
        seq, addr, value, token = self._mmio_kinds[kind].popleft()
        self._mmio_arrived[seq] = (addr, kind == "write", value, token)
        while self._mmio_delivered in self._mmio_arrived:
            self._push_mmio(*self._mmio_arrived.pop(self._mmio_delivered))
            self._mmio_delivered += 1

    # The link's MMIO target: called when a host access reaches the device.
    def write(self, addr, data):
        self._arrived("write")

    def read(self, addr, size):
        self._arrived("read")
        return bytes(size)     # the link's completion only counts; the value is the device's

    def mmio_write(self, addr, value):
        """A posted 32-bit store to BAR 0."""
        self._issue_mmio("write", addr, value)

    def mmio_read_start(self, addr):
        """Start a 32-bit load; returns a token for ``mmio_result``."""
        token = self._mmio_next
        self._mmio_next += 1
        self._mmio_results[token] = None
        self._issue_mmio("read", addr, token=token)
        return token

    def mmio_result(self, token):
        """The value read, or None while the load is in flight."""
        return self._mmio_results[token]

    async def mmio_read(self, addr, agents=(), max_cycles=100_000):
        """A 32-bit load: clocks this host and ``agents`` until the value is back."""
        token = self.mmio_read_start(addr)
        await run_until(self.bus, [self, *agents],
                        lambda: self._mmio_results[token] is not None, max_cycles)
        return self._mmio_results.pop(token)
