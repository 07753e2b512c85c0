"""Testbench of the ring blocks of the host interface: ``RingFetcher`` and ``EventRing``.

Each block runs alone against ``sim.dma_responder`` (the DMA engine's client side with a
``sim.pcie.HostMemory``), with random stalls on every stream and a random read latency,
on the Amaranth simulator, Verilator and Icarus:

* fetcher: the host posts entries in random batches over several passes of the ring;
  every entry comes out once, in order, with the bytes the host wrote, and the NIC's
  index never passes the host's; entries come in blocks (fewer reads than entries),
  every read inside its block and the ring, also for a ring smaller than a beat; a read that fails gives an entry marked ``error``;
  bad configuration and an overflowing host index stop the ring (status bits) until
  fixed; turning the ring off returns its index to 0;
* event ring: random events over several passes; the host polls memory by phase bit,
  consumes late at times (the ring fills and the NIC waits, never overwriting an entry
  not consumed); short events (zero after their head) are one 16-byte write, the others
  the whole entry then the head, and every entry reads back as it was sent (a short
  one's stale tail read as zero); interrupts follow the count and time thresholds.
"""

import random

import cocotb
import pytest

from hw.event_ring import EventRing
from hw.host_formats import (EVENT_ENTRY, EVENT_HEAD_BYTES, RING_ENTRY_BYTES, HostEventKind,
                             Ring, event_from_bytes, phase_of_pass)
from hw.registers import RingStatus
from hw.ring_fetch import RingFetcher, fetched_entry_layout
from hw.stream import pack_struct, unpack_struct
from sim.bus import StreamSink, StreamSource, run_cycles, run_until
from sim.dma_responder import DmaReadResponder, DmaWriteResponder
from sim.pcie import HostMemory

BASE = 0x40000


# ------------------------------------------------------------------------------ fetcher

def check_reads(log, width, entry_bytes, base, size):
    """Every read: whole beats (or the whole ring, if smaller than a beat) inside the
    ring, inside one block (``RingFetcher``: 64 bytes, an entry or a beat if larger)."""
    beat = width // 8
    block = max(64, entry_bytes, beat)
    ring_end = base + size * entry_bytes
    for addr, length in log:
        assert addr % beat == 0 and base <= addr and addr + length <= ring_end, (addr, length)
        assert length % beat == 0 or length == size * entry_bytes, (addr, length)
        assert addr // block == (addr + length - 1) // block, (addr, length)


async def fetch_job(bus, width, entry_bytes, seed=1, stall=0.3, passes=3):
    rng = random.Random(seed)
    log2 = 3
    size = 1 << log2
    memory = HostMemory()
    memory.register(BASE, size * entry_bytes, "ring")
    dma = DmaReadResponder(bus, memory, width, latency=rng.randrange(2, 30), stall=stall,
                           rng=random.Random(rng.random()))
    out = StreamSink(bus, "entry", stall=stall, rng=random.Random(rng.random()))
    agents = [dma, out]
    layout = fetched_entry_layout(entry_bytes)
    bus.set("base", BASE)
    bus.set("size_log2", log2)
    host_index = 0
    bus.set("host_index", 0)
    posted = []                                   # bytes of each posted entry, by index

    def post_at(base, size, count):
        nonlocal host_index
        for _ in range(count):
            raw = rng.randbytes(entry_bytes)
            memory.write(base + (host_index % size) * entry_bytes, raw)
            posted.append(raw)
            host_index = (host_index + 1) & 0xFFFF
        bus.set("host_index", host_index)

    def post(count):
        post_at(BASE, size, count)

    def entries():
        return [unpack_struct(layout, p) for p in out.received]

    # 1. Several passes, posting whatever room the NIC's index leaves.
    while len(posted) < passes * size:
        room = size - ((host_index - bus.get("nic_index")) & 0xFFFF)
        post(rng.randrange(0, room + 1))
        await run_cycles(bus, agents, rng.randrange(1, 40))
        assert (host_index - bus.get("nic_index")) & 0xFFFF <= size
    await run_until(bus, agents, lambda: len(out.received) == len(posted), 4000)
    # Under cocotb a read right after an edge sees the value before it: wait a little.
    await run_cycles(bus, agents, 2)
    for k, entry in enumerate(entries()):
        assert entry["index"] == k & 0xFFFF and entry["error"] == 0
        assert entry["data"].to_bytes(entry_bytes, "little") == posted[k], k
    assert bus.get("nic_index") == host_index and bus.get("status") == 0
    check_reads(dma.log, width, entry_bytes, BASE, size)
    if entry_bytes < 64:
        assert len(dma.log) < len(posted)         # blocks of entries, not one read each

    # 2. A failed read: that entry is marked, the next is not.
    slot = host_index % size
    dma.fail((BASE + slot * entry_bytes) & ~(width // 8 - 1))
    post(1)
    await run_until(bus, agents, lambda: len(out.received) == len(posted), 2000)
    assert entries()[-1]["error"] == 1
    dma.failing.clear()
    post(1)
    await run_until(bus, agents, lambda: len(out.received) == len(posted), 2000)
    assert entries()[-1]["error"] == 0

    # 3. The host posts more than the ring holds: stopped, flagged; fixed: resumes.
    await run_cycles(bus, agents, 2)
    nic = bus.get("nic_index")
    bus.set("host_index", (nic + size + 1) & 0xFFFF)
    await run_until(bus, agents, lambda: bus.get("status") & RingStatus.OVERFLOW, 20)
    fetched = len(dma.log)
    await run_cycles(bus, agents, 40)
    assert len(dma.log) == fetched and bus.get("nic_index") == nic
    bus.set("host_index", host_index)
    await run_until(bus, agents, lambda: bus.get("status") == 0, 20)
    post(1)
    await run_until(bus, agents, lambda: len(out.received) == len(posted), 2000)
    assert entries()[-1]["data"].to_bytes(entry_bytes, "little") == posted[-1]

    # 4. Bad configuration: a base that is not 4 KB-aligned stops the ring.
    bus.set("base", BASE + 0x800)
    post(1)
    await run_until(bus, agents, lambda: bus.get("status") & RingStatus.BAD_CONFIG, 20)
    before = len(dma.log)
    await run_cycles(bus, agents, 40)
    assert len(dma.log) == before
    bus.set("base", BASE)
    await run_until(bus, agents, lambda: len(out.received) == len(posted), 2000)

    # 5. Off: the index returns to 0 and the ring starts again from slot 0.
    bus.set("size_log2", 0)
    await run_until(bus, agents, lambda: bus.get("nic_index") == 0, 20)
    host_index = 0
    posted.clear()
    out.received.clear()
    bus.set("host_index", 0)
    bus.set("size_log2", log2)
    post(3)
    await run_until(bus, agents, lambda: len(out.received) == 3, 2000)
    assert [e["data"].to_bytes(entry_bytes, "little") for e in entries()] == posted

    # 6. A ring of two entries (smaller than a beat at W=512): reads stay inside it.
    small = BASE + 0x10000
    memory.register(small, 2 * entry_bytes, "small ring")
    bus.set("size_log2", 0)
    await run_until(bus, agents, lambda: bus.get("nic_index") == 0, 20)
    dma.log.clear()
    host_index, size = 0, 2
    posted.clear()
    out.received.clear()
    bus.set("host_index", 0)
    bus.set("base", small)
    bus.set("size_log2", 1)
    for _ in range(5):
        room = size - ((host_index - bus.get("nic_index")) & 0xFFFF)
        post_at(small, size, rng.randrange(1, room + 1) if room else 0)
        await run_until(bus, agents, lambda: len(out.received) == len(posted), 2000)
        await run_cycles(bus, agents, 2)
    assert all(e["error"] == 0 for e in entries())
    assert [e["data"].to_bytes(entry_bytes, "little") for e in entries()] == posted
    check_reads(dma.log, width, entry_bytes, small, size)
    return {"entries": len(posted), "reads": len(dma.log)}


# ------------------------------------------------------------------------------ event ring

async def event_job(bus, width, seed=1, stall=0.3, passes=3):
    rng = random.Random(seed)
    log2 = 3
    size = 1 << log2
    entry_size = RING_ENTRY_BYTES[Ring.EVENT]
    memory = HostMemory()
    memory.register(BASE, size * entry_size, "events")
    dma = DmaWriteResponder(bus, memory, width, stall=stall, rng=random.Random(rng.random()))
    events = StreamSource(bus, "event", stall=stall, rng=random.Random(rng.random()))
    irq = StreamSink(bus, "irq", stall=stall, rng=random.Random(rng.random()))
    agents = [dma, events, irq]
    bus.set("base", BASE)
    bus.set("size_log2", log2)
    bus.set("host_index", 0)
    bus.set("irq_enable", 0)
    sent = []
    for _ in range(passes * size + 5):
        if rng.random() < 0.5:
            # A short event: only head fields (the host interface's own kinds).
            fields = {"event": {"kind": rng.choice(list(HostEventKind)),
                                "status": rng.getrandbits(4)},
                      "ring_index": rng.getrandbits(16), "length": rng.getrandbits(16),
                      "reason": rng.getrandbits(8), "command_tag": rng.getrandbits(16)}
        else:
            fields = {"event": {"kind": rng.randrange(1, 11), "peer_ip": rng.getrandbits(32),
                                "bytes_b": rng.getrandbits(48)},
                      "ring_index": rng.getrandbits(16), "length": rng.getrandbits(16),
                      "table": {"key": rng.getrandbits(104)}}
        # What the sender puts in `short` and `phase` does not matter: the ring sets them.
        fields.update(short=rng.getrandbits(1), phase=rng.getrandbits(1))
        sent.append(fields)
    events.send([pack_struct(EVENT_ENTRY, **f) for f in sent])
    got = []
    host_index = 0

    def poll():
        """The driver: consume every new entry (phase bit), sometimes only later."""
        nonlocal host_index
        while rng.random() < 0.7:
            raw = memory.read(BASE + (host_index % size) * entry_size, entry_size)
            entry = event_from_bytes(raw)
            if entry["phase"] != phase_of_pass(host_index, log2):
                return
            got.append(entry)
            host_index = (host_index + 1) & 0xFFFF
            bus.set("host_index", host_index)
        return

    full_seen = 0

    def step():
        nonlocal full_seen
        if (bus.cycle // 400) % 2:              # the host looks away for a while
            poll()
        used = (bus.get("nic_index") - host_index) & 0xFFFF
        assert used <= size, used
        full_seen += used == size
        return len(got) == len(sent)
    await run_until(bus, agents, step, 20000)
    head_bits = (1 << 8 * EVENT_HEAD_BYTES) - 1
    for k, (want, entry) in enumerate(zip(sent, got)):
        want = unpack_struct(EVENT_ENTRY, pack_struct(EVENT_ENTRY, **{**want, "short": 0,
                                                                      "phase": 0}))
        short = entry["short"]
        assert short == (pack_struct(EVENT_ENTRY, **want) & ~head_bits == 0), k
        assert {**entry, "short": 0, "phase": 0} == want, k
    # A short entry is one 16-byte write; a full one, the whole entry then its head.
    kinds = [pack_struct(EVENT_ENTRY, **f) & ~head_bits == 0 for f in sent]
    assert [len(payload) for _, payload in dma.log] == [
        n for short in kinds for n in ((EVENT_HEAD_BYTES,) if short
                                       else (entry_size, EVENT_HEAD_BYTES))]
    assert not dma.faults and bus.get("written") == len(sent) and bus.get("status") == 0
    assert not irq.received                       # interrupts off
    assert full_seen                              # the ring filled up, and the NIC waited

    # Interrupts: every 4 events, or after 200 cycles for the rest.
    bus.set("irq_enable", 1)
    bus.set("irq_count", 4)
    bus.set("irq_time", 200)
    more = [pack_struct(EVENT_ENTRY, event={"kind": 1}) for _ in range(6)]
    events.send(more)
    sent += [None] * 6
    await run_until(bus, agents, step, 4000)
    await run_until(bus, agents, lambda: len(irq.received) == 2, 400)
    assert irq.received == [0, 0]

    # A host index ahead of the NIC's (impossible): the ring stops, flagged.
    bus.set("host_index", (bus.get("nic_index") + 3) & 0xFFFF)
    events.send([pack_struct(EVENT_ENTRY, event={"kind": 2})])
    await run_until(bus, agents, lambda: bus.get("status") & RingStatus.OVERFLOW, 20)
    written = bus.get("written")
    await run_cycles(bus, agents, 40)
    assert bus.get("written") == written
    return {"events": len(got)}


# ------------------------------------------------------------------------------ runners

# W=256: two descriptors per beat, two beats per 64-byte block.
FETCH_CONFIGS = [(64, 16), (512, 16), (64, 128), (256, 16)]


@cocotb.test()
async def fetcher(dut):
    from tb.cocotb_util import start
    from tb.harness import tb_params
    p = tb_params()
    await fetch_job(await start(dut), p["width"], p["entry_bytes"])


@cocotb.test()
async def event_ring(dut):
    from tb.cocotb_util import start
    from tb.harness import tb_params
    await event_job(await start(dut), tb_params()["width"])


@pytest.mark.parametrize("width,entry_bytes", FETCH_CONFIGS)
def test_fetcher_rtl(sim, width, entry_bytes):
    from tb.harness import run_cocotb
    run_cocotb(RingFetcher, {"width": width, "entry_bytes": entry_bytes}, "tb.test_host_rings",
               sim, testcase="fetcher")


@pytest.mark.parametrize("width", [64, 256, 512])
def test_event_ring_rtl(sim, width):
    from tb.harness import run_cocotb
    run_cocotb(EventRing, {"width": width}, "tb.test_host_rings", sim, testcase="event_ring")


@pytest.mark.parametrize("width,entry_bytes", FETCH_CONFIGS[:2])
def test_fetcher_amaranth(width, entry_bytes):
    from sim.jobs import run_job
    run_job(RingFetcher, {"width": width, "entry_bytes": entry_bytes}, fetch_job,
            sim="amaranth", job_args={"width": width, "entry_bytes": entry_bytes})


def test_event_ring_amaranth():
    from sim.jobs import run_job
    run_job(EventRing, {"width": 64}, event_job, sim="amaranth", job_args={"width": 64})
