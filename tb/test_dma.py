"""Testbench of hw.dma.DmaEngine against sim.dma_model, served by sim.pcie_host.PcieHost.

Every read answer is compared beat by beat (kept bytes, keep, last, error) with
``sim.dma_model.read_beats``; the PCIe reads on the link with the model's split of the
accepted requests, in acceptance order; every write TLP (addr, bytes, order) with
``sim.dma_model.apply_writes`` and host memory byte for byte; the TLP rules (<= mrrs /
mps, no 4 KB crossing, addr/length on every beat) by the host's checks; the counters.

Jobs (``sim.bus`` adapters: run under cocotb or the Amaranth simulator):
  dma_job     random reads and writes from every client, random lengths 1..max_length
              (4 KB crossings), random stalls on every stream, completions interleaved
              between tags, UR (reads outside host memory), bad requests, unexpected
              completions, short completions, stray beats past an outstanding read's
              end, writes outside host memory (host faults); optionally a host
              that never answers some reads or answers after the completion timeout,
              and the timed link (sim.pcie.PcieLink) instead of at-once answers
  bench_dma   beats per cycle (read data, write TLP beats) with an always-ready host,
              and read latency (engine alone, and with the Gen3 x8 link model)

cocotb tests: random_traffic, no_stalls, timeouts, timed_link, throughput. pytest:
``test_dma`` runs them at W=64 and W=512 on each simulator in $SIM (one build per width),
``test_dma_small`` on a small configuration (``SMALL``), and
``test_dma_amaranth`` a short ``dma_job`` and the host's MMIO master on the Amaranth
simulator.
"""

import random

import pytest
from amaranth.hdl import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from hw.dma import DMA_READ, DMA_WRITE, DmaCounter, DmaEngine, dma_read_data_layout
from hw.stream import frame_to_beats, pack_struct, pack_beat, unpack_struct
from sim.bus import StreamSink, StreamSource, run_until
from sim.dma_model import apply_writes, is_bad, read_beats, split
from sim.pcie import HostMemory, HostMemoryError, PcieConfig, PcieLink
from sim.pcie_host import PcieHost

try:
    import cocotb
except ImportError:
    cocotb = None

READ_BASE, READ_SIZE = 0x1_0000_0000, 96 * 1024     # random contents, never written
WRITE_BASE, WRITE_SIZE = 0x2_0000_0000, 96 * 1024
SILENT_BASE = 0x3_0000_0000                        # registered, never answered
LATE_BASE = 0x4_0000_0000                          # registered, answered after the timeout
HOLE = 0x5_0000_0000                               # not registered: UR / write faults
SHORT_BASE = 0x6_0000_0000     # answered without the last beat (a short completion)
BOGUS_BASE = 0x7_0000_0000     # answered after a beat with an offset past the request
REGION = 32 * 1024
CLIENTS = 2


def _length(rng, max_length):
    pick = rng.random()
    if pick < 0.45:
        return rng.randint(1, 256)
    if pick < 0.8:
        return rng.randint(1, 4096)
    return rng.randint(1, max_length)


def _read_request(rng, width, max_length, kinds, longest):
    step = width // 8
    kind = rng.choices(list(kinds), weights=list(kinds.values()))[0]
    length = _length(rng, longest)
    if kind == "bad":
        choice = rng.randrange(3)
        if choice == 0:
            return READ_BASE + rng.randrange(1, step), length
        return READ_BASE, 0 if choice == 1 else rng.randint(max_length + 1, 0xFFFF)
    base, size = {"ok": (READ_BASE, READ_SIZE), "silent": (SILENT_BASE, REGION),
                  "late": (LATE_BASE, REGION), "ur": (HOLE, REGION),
                  "short": (SHORT_BASE, REGION), "bogus": (BOGUS_BASE, REGION)}[kind]
    if kind in ("silent", "late", "short", "bogus"):
        length = min(length, 2048)
    if kind == "ur" and rng.random() < 0.6:          # straddles an end of host memory
        if rng.random() < 0.5:
            length = max(length, 1200)               # starts below: later pieces succeed
            return READ_BASE - rng.randrange(1, 1024 // step) * step, length
        base, size = READ_BASE + READ_SIZE - 4096, 4096 + length
    addr = base + rng.randrange(0, max(1, (size - length) // step)) * step
    return addr, length


def _write_request(rng, width, max_length, longest):
    step = width // 8
    pick = rng.random()
    length = _length(rng, longest)
    if pick < 0.06:
        return WRITE_BASE + rng.randrange(1, step), length          # misaligned: bad
    if pick < 0.09:
        return WRITE_BASE, rng.choice([0, rng.randint(max_length + 1, max_length + 600)])
    if pick < 0.12:
        return HOLE + rng.randrange(0, 64) * step, min(length, 1024)  # outside memory
    return WRITE_BASE + rng.randrange(0, (WRITE_SIZE - length) // step) * step, length


def _acceptance_order(sources, requests):
    """Requests of every client in the order the engine took them (one per cycle)."""
    taken = []
    for client, (source, reqs) in enumerate(zip(sources, requests)):
        for cycle, req in zip(source.sent_cycles, reqs):
            taken.append((cycle, client, req))
    taken.sort(key=lambda t: t[0])
    assert len({t[0] for t in taken}) == len(taken), "two requests taken in one cycle"
    return [(client, req) for _, client, req in taken]


def _group(payloads, width):
    """rd_data payloads -> answers (lists of model Beats)."""
    from sim.dma_model import Beat
    layout = dma_read_data_layout(width)
    answers, current = [], []
    for p in payloads:
        b = unpack_struct(layout, p)
        nbytes = bin(b["keep"]).count("1")
        assert b["keep"] == (1 << nbytes) - 1, f"keep {b['keep']:#x} is not a run from byte 0"
        data = b["data"].to_bytes(width // 8, "little")[:nbytes]
        current.append(Beat(data, b["keep"], bool(b["last"]), bool(b["error"])))
        if b["last"]:
            answers.append(current)
            current = []
    assert not current, "an answer without its last beat"
    return answers


def _memory(rng):
    memory = HostMemory()
    memory.register(READ_BASE, READ_SIZE, "read")
    memory.register(WRITE_BASE, WRITE_SIZE, "write")
    memory.register(SILENT_BASE, REGION, "silent")
    memory.register(LATE_BASE, REGION, "late")
    memory.register(SHORT_BASE, REGION, "short")
    memory.register(BOGUS_BASE, REGION, "bogus")
    memory.write(READ_BASE, rng.randbytes(READ_SIZE))
    memory.write(SHORT_BASE, rng.randbytes(REGION))
    memory.write(BOGUS_BASE, rng.randbytes(REGION))
    memory.write(WRITE_BASE, rng.randbytes(WRITE_SIZE))
    return memory


async def dma_job(bus, width=64, seed=1, reads=30, writes=24, stall=0.3, reorder=True,
                  timeout=0, silent=0.0, late=0.0, ur=0.06, bad=0.08, inject=6, link=False,
                  short=0.0, bogus=0.0,
                  tags=16, mrrs=512, mps=256, max_length=16384, longest=16384,
                  read_clients=CLIENTS, write_clients=CLIENTS):
    """Random traffic on every client; everything checked against sim.dma_model."""
    rng = random.Random(seed)
    step = width // 8
    memory = _memory(rng)
    pcie_link = PcieLink(PcieConfig(), clock_mhz=250.0 if width == 512 else 156.25,
                         memory=memory) if link else None
    host = PcieHost(bus, memory, pcie_link, reorder=reorder, stall=stall, width=width,
                    rng=random.Random(rng.random()))
    late_cycles = 4 * timeout // 3

    def delay(addr, length):
        if SILENT_BASE <= addr < SILENT_BASE + REGION:
            return None
        if LATE_BASE <= addr < LATE_BASE + REGION:
            return late_cycles
        return rng.randrange(0, 20) if reorder else 0
    host.answer_delay = delay
    plain_answer = host._answer

    def answer(tag, addr, length):
        """Malformed answers (without a link): a short one, or a stray beat first."""
        if SHORT_BASE <= addr < SHORT_BASE + REGION and length > step:
            data = memory.read(addr, length)
            host._completion(tag, 0, data[:(length - 1) // step * step], True, False)
            return
        if BOGUS_BASE <= addr < BOGUS_BASE + REGION:
            host.inject(tag, 4095 // step * step, b"\xee" * step, last=False)
        plain_answer(tag, addr, length)
    host._answer = answer
    bus.set("cpl_timeout", timeout)

    def rnd():
        return random.Random(rng.random())
    rd_req = [StreamSource(bus, f"rd_req__{c}", stall, rnd()) for c in range(read_clients)]
    rd_data = [StreamSink(bus, f"rd_data__{c}", stall, rnd()) for c in range(read_clients)]
    wr_req = [StreamSource(bus, f"wr_req__{c}", stall, rnd()) for c in range(write_clients)]
    wr_data = [StreamSource(bus, f"wr_data__{c}", stall, rnd()) for c in range(write_clients)]

    # Completions nobody asked for: one for a tag the engine has not issued yet (before
    # any request), the others for tags past the engine's, in the middle of the traffic.
    agents = [*rd_req, *rd_data, *wr_req, *wr_data, host]
    if inject:
        host.inject(3, 0, b"\x55" * step)
        await run_until(bus, agents, lambda: host.idle, 1000)
    kinds = {"ok": 1.0 - ur - bad - silent - late - short - bogus, "ur": ur, "bad": bad,
             "silent": silent, "late": late, "short": short, "bogus": bogus}
    read_reqs = [[] for _ in range(read_clients)]
    for _ in range(reads):
        client = rng.randrange(read_clients)
        addr, length = _read_request(rng, width, max_length, kinds, longest)
        read_reqs[client].append((addr, length))
        rd_req[client].send([pack_struct(DMA_READ, addr=addr, length=length)])
    write_reqs = [[] for _ in range(write_clients)]
    for _ in range(writes):
        client = rng.randrange(write_clients)
        addr, length = _write_request(rng, width, max_length, longest)
        data = rng.randbytes(length)
        write_reqs[client].append((addr, data))
        wr_req[client].send([pack_struct(DMA_WRITE, addr=addr, length=length)])
        if length:
            wr_data[client].send(frame_to_beats(data, width))
    for _ in range(inject - 1):
        host.inject(tags + rng.randrange(256 - tags), 0, b"\xaa" * step)

    # The model's view of one PCIe read: its bytes, or None when it fails.
    def model_read(addr, n):
        if addr >= SILENT_BASE and addr < LATE_BASE + REGION:
            return None
        try:
            data = memory.read(addr, n)
        except HostMemoryError:
            return None
        if SHORT_BASE <= addr < SHORT_BASE + REGION and n > step:
            kept = (n - 1) // step * step
            return data[:kept] + bytes(n - kept), True
        return data
    expected_answers = [[read_beats(a, n, width, model_read, mrrs, max_length) for a, n in reqs]
                        for reqs in read_reqs]
    answers_due = [sum(len(beats) for beats in ex) for ex in expected_answers]
    beats_due = sum(len(b) for b in frame_to_beats_list(write_reqs, width))

    def done():
        return (all(len(s.received) == n for s, n in zip(rd_data, answers_due))
                and sum(s.sent for s in wr_data) == beats_due
                and all(s.idle for s in wr_req) and host.idle and not host._tlp)
    total_beats = sum(answers_due) + beats_due
    cycles = await run_until(bus, agents, done,
                             max_cycles=20 * total_beats + 40 * timeout + 20_000)
    for _ in range(50):                             # nothing more may come out
        for a in agents:
            a.drive()
        await bus.settle()
        for a in agents:
            a.sample()
        await bus.edge()

    # Reads: answers, in order, per client.
    for c in range(read_clients):
        got = _group(rd_data[c].received, width)
        assert len(got) == len(expected_answers[c])
        for k, (g, e) in enumerate(zip(got, expected_answers[c])):
            assert g == e, (f"client {c} read {k} {read_reqs[c][k][0]:#x}+"
                            f"{read_reqs[c][k][1]}: got {len(g)} beats (error "
                            f"{g[-1].error}), expected {len(e)} (error {e[-1].error})")
    # PCIe reads: the model's split of the good reads, in acceptance order.
    order = _acceptance_order(rd_req, read_reqs)
    expected_mrd = [piece for _, (a, n) in order if not is_bad(a, n, width, max_length)
                    for piece in split(a, n, mrrs)]
    assert [(a, n) for _, _, a, n in host.reads] == expected_mrd
    assert all(n <= mrrs for _, _, _, n in host.reads)
    # Writes: TLPs in acceptance order and host memory, byte for byte.
    shadow = {}
    order = _acceptance_order(wr_req, write_reqs)
    expected_tlps = apply_writes(shadow, [req for _, req in order], width, mps, max_length)
    got_tlps = [(a, d) for _, a, d in host.writes]
    assert got_tlps == expected_tlps
    assert all(len(d) <= mps for _, d in got_tlps)
    rule_faults = [f for f in host.faults if not f.startswith(("read:", "write:"))]
    assert not rule_faults, rule_faults
    outside = [t for t in expected_tlps if t[0] >= HOLE]
    assert len([f for f in host.faults if f.startswith("write:")]) == len(outside)
    image = memory.read(WRITE_BASE, WRITE_SIZE)
    for addr, byte in shadow.items():
        if WRITE_BASE <= addr < WRITE_BASE + WRITE_SIZE:
            assert image[addr - WRITE_BASE] == byte, f"host memory at {addr:#x}"
    # Counters.
    counters = bus.get("counters")

    def counter(c):
        return counters >> (32 * c) & 0xFFFFFFFF
    all_reads = [r for reqs in read_reqs for r in reqs]
    all_writes = [(a, len(d)) for reqs in write_reqs for a, d in reqs]
    bad_count = sum(is_bad(a, n, width, max_length) for a, n in all_reads + all_writes)
    pieces = [p for a, n in all_reads if not is_bad(a, n, width, max_length)
              for p in split(a, n, mrrs)]
    silent_pieces = [p for p in pieces if SILENT_BASE <= p[0] < LATE_BASE + REGION]
    late_beats = sum((n + step - 1) // step for a, n in pieces
                     if LATE_BASE <= a < LATE_BASE + REGION)
    assert counter(DmaCounter.READ_REQUESTS) == sum(not is_bad(a, n, width, max_length)
                                                     for a, n in all_reads)
    assert counter(DmaCounter.WRITE_REQUESTS) == sum(not is_bad(a, n, width, max_length)
                                                      for a, n in all_writes)
    assert counter(DmaCounter.BAD_REQUESTS) == bad_count
    assert counter(DmaCounter.COMPLETION_TIMEOUTS) == len(silent_pieces)
    bogus_beats = sum(BOGUS_BASE <= a < BOGUS_BASE + REGION for a, n in pieces)
    assert counter(DmaCounter.UNEXPECTED_COMPLETIONS) == inject + late_beats + bogus_beats
    return {"cycles": cycles, "reads": reads, "writes": writes, "mrd": len(host.reads),
            "mwr": len(host.writes), "bad": bad_count, "timeouts": len(silent_pieces),
            "unexpected": inject + late_beats + bogus_beats, "read_beats": sum(answers_due),
            "write_beats": beats_due}


def frame_to_beats_list(write_reqs, width):
    return [frame_to_beats(d, width) for reqs in write_reqs for _, d in reqs if d]


async def bench_dma(bus, width=64, count=24):
    """Beats per cycle with an always-ready host answering at once (requests of 4096 B
    and of 64 B, alternating between the clients), and the read latency."""
    step = width // 8
    rng = random.Random(5)
    memory = _memory(rng)
    host = PcieHost(bus, memory, None, width=width)
    bus.set("cpl_timeout", 0)
    rd_req = [StreamSource(bus, f"rd_req__{c}") for c in range(CLIENTS)]
    rd_data = [StreamSink(bus, f"rd_data__{c}") for c in range(CLIENTS)]
    wr_req = [StreamSource(bus, f"wr_req__{c}") for c in range(CLIENTS)]
    wr_data = [StreamSource(bus, f"wr_data__{c}") for c in range(CLIENTS)]
    agents = [*rd_req, *rd_data, *wr_req, *wr_data, host]

    def rate(cycles):
        return round(len(cycles) / (cycles[-1] - cycles[0] + 1), 4) if len(cycles) > 1 else 1.0

    figures = {}
    for size, name, do_reads, do_writes in ((4096, "read", True, False),
                                            (4096, "write", False, True),
                                            (4096, "both", True, True),
                                            (64, "read", True, False),
                                            (64, "write", False, True)):
        n = count if size > 64 else 8 * count
        start_rd = [len(s.received_cycles) for s in rd_data]
        start_beats = len(host.write_beat_cycles)
        for k in range(n):
            c = k % CLIENTS
            if do_reads:
                rd_req[c].send([pack_struct(DMA_READ, addr=READ_BASE + k * size, length=size)])
            if do_writes:
                wr_req[c].send([pack_struct(DMA_WRITE, addr=WRITE_BASE + k * size, length=size)])
                wr_data[c].send(frame_to_beats(bytes(size), width))
        beats = -(-size // step)
        want_rd = [start_rd[c] + (beats * (n // CLIENTS) if do_reads else 0)
                   for c in range(CLIENTS)]
        want_wr = start_beats + (n * beats if do_writes else 0)
        await run_until(bus, agents, lambda: all(len(s.received_cycles) == w for s, w in
                                                  zip(rd_data, want_rd))
                        and len(host.write_beat_cycles) == want_wr,
                        max_cycles=20 * n * beats + 2000)
        rd_cycles = sorted(c for s, k in zip(rd_data, start_rd) for c in s.received_cycles[k:])
        label = f"{name}_{size}B" if name != "both" else f"both_{size}B"
        if do_reads:
            figures[f"{label}_read_beats_per_cycle"] = rate(rd_cycles)
        if do_writes:
            figures[f"{label}_write_beats_per_cycle"] = rate(host.write_beat_cycles[start_beats:])
    # Latency of one 64-byte read: request taken -> first data beat.
    before = len(rd_data[0].received_cycles)
    rd_req[0].send([pack_struct(DMA_READ, addr=READ_BASE, length=64)])
    await run_until(bus, agents, lambda: len(rd_data[0].received_cycles) == before + 64 // step,
                    1000)
    figures["read_latency_cycles"] = rd_data[0].received_cycles[before] - rd_req[0].sent_cycles[-1]
    mrd_cycle = host.reads[-1][0]
    figures["request_to_pcie_rd_cycles"] = mrd_cycle - rd_req[0].sent_cycles[-1]
    figures["completion_to_rd_data_cycles"] = (rd_data[0].received_cycles[before]
                                               - (mrd_cycle + 1))
    assert not host.faults
    return figures


async def link_latency(bus, width=64):
    """Read latency through the Gen3 x8 link model (PcieLink), request to first beat."""
    rng = random.Random(6)
    memory = _memory(rng)
    clock = 250.0 if width == 512 else 156.25
    link = PcieLink(PcieConfig(), clock_mhz=clock, memory=memory)
    host = PcieHost(bus, memory, link, width=width)
    bus.set("cpl_timeout", 0)
    rd_req = [StreamSource(bus, f"rd_req__{c}") for c in range(CLIENTS)]
    rd_data = [StreamSink(bus, f"rd_data__{c}") for c in range(CLIENTS)]
    idle = [StreamSource(bus, f"wr_req__{c}") for c in range(CLIENTS)] + \
        [StreamSource(bus, f"wr_data__{c}") for c in range(CLIENTS)]
    figures = {}
    for size in (64, 512, 4096):
        before = len(rd_data[0].received_cycles)
        rd_req[0].send([pack_struct(DMA_READ, addr=READ_BASE, length=size)])
        await run_until(bus, [*rd_req, *rd_data, *idle, host],
                        lambda: len(rd_data[0].received_cycles) >= before + size // (width // 8),
                        5000)
        first = rd_data[0].received_cycles[before] - rd_req[0].sent_cycles[-1]
        end = rd_data[0].received_cycles[-1] - rd_req[0].sent_cycles[-1]
        figures[f"link_read_{size}B_first_beat_cycles"] = first
        figures[f"link_read_{size}B_last_beat_cycles"] = end
    figures["link_clock_mhz"] = clock
    return figures


async def bench_dma_figures(bus, width=64):
    """``acceltcp bench dma``: bench_dma, then the read latency through the link model."""
    figures = await bench_dma(bus, width=width)
    figures.update(await link_latency(bus, width=width))
    return figures


# --- cocotb tests (names must not start with test_) ----------------------------------------

if cocotb is not None:
    def _config():
        """The engine's parameters (as built) in dma_job's terms."""
        from tb.harness import tb_params
        p = {"width": 64, "tags": 16, "mrrs": 512, "mps": 256, "read_clients": 2,
             "write_clients": 2, "max_length": 16384}
        p.update(tb_params())
        p["longest"] = p["max_length"]
        return p

    @cocotb.test()
    async def random_traffic(dut):
        from tb.cocotb_util import start
        cfg = _config()
        result = await dma_job(await start(dut), seed=11, reads=150, writes=110, short=0.05,
                               bogus=0.05, **cfg)
        dut._log.info(f"random_traffic {cfg}: {result}")

    @cocotb.test()
    async def no_stalls(dut):
        from tb.cocotb_util import start
        cfg = _config()
        result = await dma_job(await start(dut), seed=14, reads=120, writes=80, stall=0.0,
                               short=0.05, bogus=0.05, **cfg)
        dut._log.info(f"no_stalls {cfg}: {result}")

    @cocotb.test()
    async def timeouts(dut):
        from tb.cocotb_util import start
        cfg = _config()
        result = await dma_job(await start(dut), seed=12, reads=70, writes=10, timeout=3000,
                               silent=0.1, late=0.1, ur=0.08, bad=0.08, **cfg)
        dut._log.info(f"timeouts {cfg}: {result}")

    @cocotb.test()
    async def timed_link(dut):
        from tb.cocotb_util import start
        cfg = _config()
        result = await dma_job(await start(dut), seed=13, reads=40, writes=30, link=True,
                               reorder=False, stall=0.2, timeout=100_000, **cfg)
        dut._log.info(f"timed_link {cfg}: {result}")

    @cocotb.test()
    async def throughput(dut):
        from tb.cocotb_util import start
        cfg = _config()
        if cfg["read_clients"] != CLIENTS or cfg["write_clients"] != CLIENTS:
            return                              # the bench drives two clients of each
        figures = await bench_dma_figures(await start(dut), width=cfg["width"])
        dut._log.info(f"bench_dma W={cfg['width']}: {figures}")
        assert figures["read_4096B_read_beats_per_cycle"] >= 0.95
        assert figures["write_4096B_write_beats_per_cycle"] >= 0.95

    ALL_TESTS = ["random_traffic", "no_stalls", "timeouts", "timed_link", "throughput"]

#: A small configuration: few tags (ring full, quarantine blocking), small mrrs/mps,
#: three read clients and one write client, W=128.
SMALL = {"width": 128, "tags": 4, "mrrs": 128, "mps": 128, "read_clients": 3,
         "write_clients": 1, "max_length": 5000}


def test_dma_small(sim):
    from tb.harness import run_cocotb
    run_cocotb(DmaEngine, SMALL, "tb.test_dma", sim, testcase=ALL_TESTS[:-1])


@pytest.mark.parametrize("width", [64, 512])
def test_dma(sim, width):
    from tb.harness import run_cocotb
    run_cocotb(DmaEngine, {"width": width}, "tb.test_dma", sim, testcase=ALL_TESTS)


def test_model_split_matches_link_rules():
    from sim.pcie import tlps_for_read, tlps_for_write
    rng = random.Random(3)
    for _ in range(2000):
        addr, n = rng.randrange(0, 1 << 20) * 8, rng.randint(1, 16384)
        assert split(addr, n, 512) == [(t.addr, t.length) for t in tlps_for_read(n, addr)]
        assert split(addr, n, 256) == [(t.addr, t.length) for t in tlps_for_write(n, addr)]


def test_dma_amaranth():
    from sim.jobs import run_job
    result = run_job(DmaEngine, {"width": 64}, dma_job, sim="amaranth",
                     job_args={"reads": 12, "writes": 6, "timeout": 3000, "silent": 0.1,
                               "late": 0.1, "short": 0.1, "bogus": 0.1, "longest": 3000})
    assert result.value["reads"] == 12


# --- the host's MMIO master and interrupt input (Amaranth simulator) ----------------------

async def mmio_job(bus, link=False):
    """PcieHost as the MMIO master of hw.mmio_regs.MmioRegisters: posted writes, reads in
    order behind them, with and without the link's MMIO latency."""
    from hw.registers import NIC_ID, REGISTERS, Access, register_offset
    pcie_link = PcieLink(PcieConfig(), clock_mhz=156.25) if link else None
    host = PcieHost(bus, HostMemory(), pcie_link, dma=False, mmio="mmio", mmio_rdata="rdata")
    rw = [r for r in REGISTERS if r.access is Access.RW]
    rng = random.Random(4)
    values = {r.offset: rng.getrandbits(32) for r in rw}
    start = bus.cycle
    assert await host.mmio_read(register_offset("ID")) == NIC_ID
    read_cycles = bus.cycle - start
    for offset, value in values.items():
        host.mmio_write(offset, value)
    for offset, value in values.items():          # a read never passes an earlier write
        assert await host.mmio_read(offset) == value
    tokens = [host.mmio_read_start(offset) for offset in values]
    await run_until(bus, [host], lambda: all(host.mmio_result(t) is not None for t in tokens),
                    100_000)
    assert [host.mmio_result(t) for t in tokens] == list(values.values())
    counters = {d: vars(c) for d, c in pcie_link.counters.items()} if link else None
    return {"mmio_read_cycles": read_cycles, "registers": len(values), "link": counters}


def test_pcie_host_mmio_amaranth():
    from hw.mmio_regs import MmioRegisters
    from sim.jobs import run_job
    from tb.test_mmio_regs import PARAMS
    fast = run_job(MmioRegisters, PARAMS, mmio_job, sim="amaranth").value
    timed = run_job(MmioRegisters, PARAMS, mmio_job, sim="amaranth", job_args={"link": True}).value
    assert fast["mmio_read_cycles"] <= 4
    # 547 ns at 156.25 MHz is 85 cycles; the device adds its own.
    assert 80 <= timed["mmio_read_cycles"] <= 100, timed
    assert timed["link"]["down"]["tlps"] == 3 * timed["registers"] + 1


class IrqSource(wiring.Component):
    """A stand-in device: raises interrupt ``vector`` on ``irq`` when ``fire`` is set."""
    fire: In(1)
    vector: In(8)
    irq: Out(stream.Signature(8))

    def elaborate(self, platform):
        m = Module()
        with m.If(self.irq.ready):
            m.d.sync += self.irq.valid.eq(0)
        with m.If(self.fire):
            m.d.sync += [self.irq.valid.eq(1), self.irq.payload.eq(self.vector)]
        return m


async def irq_job(bus):
    """The host records each interrupt vector with its cycle."""
    host = PcieHost(bus, HostMemory(), None, dma=False, irq="irq")
    async def cycles(n):
        start = bus.cycle
        await run_until(bus, [host], lambda: bus.cycle >= start + n, n + 1)
    for vector in (3, 7, 3):
        bus.set("vector", vector)
        bus.set("fire", 1)
        await cycles(1)
        bus.set("fire", 0)
        await cycles(4)
    return {"interrupts": host.interrupts}


def test_pcie_host_irq_amaranth():
    from sim.jobs import run_job
    got = run_job(IrqSource, {}, irq_job, sim="amaranth").value["interrupts"]
    assert [v for v, _ in got] == [3, 7, 3] and len({c for _, c in got}) == 3
