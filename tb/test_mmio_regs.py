"""The MMIO register block (hw.mmio_regs) against the register map (hw.registers): every
register read back, writes to RW registers only, unmapped offsets, bad accesses counted,
back-pressure on the read answers; on the Amaranth simulator, Verilator and Icarus."""

import random

import cocotb
import pytest

from hw.mmio_regs import MMIO_REQUEST, MmioRegisters
from hw.registers import NIC_ID, NIC_VERSION, REGISTERS, UNMAPPED, Access, register_offset
from hw.stream import pack_struct
from sim.bus import StreamSink, StreamSource, run_until

PARAMS = {"params": {"width": 64, "entries": 4096, "listeners": 16, "teardown_slots": 1024,
                     "teardown_buffers": 16, "splice_slots": 512}}


def test_map_is_consistent():
    offsets = set()
    for reg in REGISTERS:
        for k in range(reg.count):
            offset = reg.offset + 4 * k
            assert offset not in offsets and offset % 4 == 0 and offset < 1 << 12
            offsets.add(offset)
    assert register_offset("HANDSHAKE_COUNTERS", 3) == 0x10C
    with pytest.raises(IndexError):
        register_offset("FLOWS", 1)


async def mmio_all(bus, params, seed=1, stall=0.3):
    rng = random.Random(seed)
    req = StreamSource(bus, "mmio", stall=stall, rng=random.Random(rng.random()))
    rdata = StreamSink(bus, "rdata", stall=stall, rng=random.Random(rng.random()))
    agents = [req, rdata]
    status = {}
    for reg in REGISTERS:
        if reg.access is Access.RO and reg.name != "BAD_ACCESSES":
            value = rng.getrandbits(32 * reg.count)
            status[reg.name] = value
            bus.set(reg.name.lower(), value)

    def access(offset, write=False, wdata=0):
        req.send([pack_struct(MMIO_REQUEST, addr=offset, write=int(write), wdata=wdata)])

    async def reads(offsets):
        before = len(rdata.received)
        for offset in offsets:
            access(offset)
        await run_until(bus, agents, lambda: len(rdata.received) == before + len(offsets),
                        max_cycles=20 * len(offsets) + 100)
        return rdata.received[before:]

    expected = {}
    rw = [r for r in REGISTERS if r.access is Access.RW]
    for reg in REGISTERS:
        for k in range(reg.count):
            offset = reg.offset + 4 * k
            if reg.access is Access.CONST:
                expected[offset] = reg.value(params)
            elif reg.access is Access.RO and reg.name != "BAD_ACCESSES":
                expected[offset] = status[reg.name] >> (32 * k) & 0xFFFFFFFF
            elif reg.access is Access.RW:
                expected[offset] = reg.init
    # 1. Everything after reset.
    got = await reads(sorted(expected))
    assert dict(zip(sorted(expected), got)) == expected
    assert expected[register_offset("ID")] == NIC_ID
    assert expected[register_offset("VERSION")] == NIC_VERSION
    # 2. Writes to every RW register (and to CONST/RO ones and unmapped offsets, ignored).
    bad = 0
    for reg in rw:
        value = rng.getrandbits(32)
        access(reg.offset, write=True, wdata=value)
        expected[reg.offset] = value
    for reg in REGISTERS:
        if reg.access is not Access.RW:
            access(reg.offset, write=True, wdata=rng.getrandbits(32))
            bad += 1
    unmapped = [o for o in range(0, 1 << 12, 4) if o not in expected
                and o != register_offset("BAD_ACCESSES")]
    for offset in rng.sample(unmapped, 20):
        access(offset, write=True, wdata=rng.getrandbits(32))
        bad += 1
    got = await reads(sorted(expected))
    assert dict(zip(sorted(expected), got)) == expected
    for reg in rw:
        assert bus.get(reg.name.lower()) == expected[reg.offset]
    # 3. Unmapped reads: all ones, counted; misaligned addresses read the word.
    sample = rng.sample(unmapped, 20)
    assert await reads(sample) == [UNMAPPED] * 20
    bad += 20
    assert await reads([register_offset("ID") + 2]) == [NIC_ID]
    assert await reads([register_offset("BAD_ACCESSES")]) == [bad]
    return {"registers": len(expected), "bad_accesses": bad}


@cocotb.test()
async def mmio_regs(dut):
    from tb.cocotb_util import start
    await mmio_all(await start(dut), PARAMS["params"])


def test_mmio_regs_rtl(sim):
    from tb.harness import run_cocotb
    run_cocotb(MmioRegisters, PARAMS, "tb.test_mmio_regs", sim)


def test_mmio_regs_amaranth():
    from sim.jobs import run_job
    run_job(MmioRegisters, PARAMS, mmio_all, sim="amaranth", job_args={"params": PARAMS["params"]})
