"""sim/pcie.py: TLP splitting, wire accounting, the bandwidth model, the timed link, host memory.

Plain pytest, no simulator. Reference values are derived by hand in docs/pcie_model.md
from the equations of Neugebauer et al. (SIGCOMM 2018, sec. 3) with the constants of
their released model (pcie-bench model/pcie.py); the comments below show the arithmetic.
"""

import math
import random

import pytest

from sim.pcie import (Completion, HostMemory, HostMemoryError, PcieConfig, PcieLink, Tlp,
                      completions_for_read, effective_bandwidth, raw_bandwidth_gbps,
                      tlp_wire_bytes, tlps_for_read, tlps_for_write, usable_bandwidth_gbps,
                      wire_bytes)

CFG = PcieConfig()
HI = 1 << 32                     # host buffers above 4 GB (64-bit addressing)


def pieces(tlps):
    return [(t.addr, t.length) for t in tlps]


def memory(size=1 << 20, base=HI):
    mem = HostMemory()
    mem.register(base, size, "test")
    return mem


# ---------------------------------------------------------------------- configuration

@pytest.mark.parametrize("kwargs", [
    {"mps": 300}, {"mps": 64}, {"mrrs": 8192}, {"rcb": 32}, {"generation": 7},
    {"lanes": 3}, {"max_tags": 0}, {"max_tags": 257}, {"dma_addr_bits": 48},
    {"generation": 4},                      # no DLLP table for Gen4: must pass one
    {"dma_read_latency_ns": 0},
])
def test_config_rejects_illegal_values(kwargs):
    with pytest.raises(ValueError):
        PcieConfig(**kwargs)


def test_gen4_with_explicit_dllp_interval_is_accepted():
    cfg = PcieConfig(generation=4, dllp_interval=203)
    assert raw_bandwidth_gbps(cfg) == pytest.approx(2 * raw_bandwidth_gbps(CFG))


def test_default_link_rates():
    # 8 GT/s x 128/130 x 8 lanes = 63.015 Gb/s
    assert raw_bandwidth_gbps(CFG) == pytest.approx(63.0154, abs=1e-4)
    # minus 2 x 8 B DLLPs per 203 B and 4 B SKP per 1538 B (pcie-bench TLP_bw) = 57.88
    assert usable_bandwidth_gbps(CFG) == pytest.approx(57.8848, abs=1e-4)


# ---------------------------------------------------------------------- splitting

def test_write_split_by_mps():
    assert pieces(tlps_for_write(1500, HI)) == [(HI + 256 * i, 256) for i in range(5)] + [
        (HI + 1280, 220)]
    assert [t.length for t in tlps_for_write(512, HI, PcieConfig(mps=128))] == [128] * 4
    assert pieces(tlps_for_write(64, HI)) == [(HI, 64)]
    assert all(t.kind == "MWr" for t in tlps_for_write(1500, HI))


def test_write_unaligned_start_keeps_mps_pieces():
    # The spec asks only for <= MPS and no 4 KB crossing: an unaligned start keeps full pieces.
    assert pieces(tlps_for_write(512, HI + 0x10)) == [(HI + 0x10, 256), (HI + 0x110, 256)]
    assert pieces(tlps_for_write(3, HI + 1)) == [(HI + 1, 3)]


def test_write_never_crosses_4k():
    assert pieces(tlps_for_write(128, HI + 0xFC0)) == [(HI + 0xFC0, 64), (HI + 0x1000, 64)]
    tlps = tlps_for_write(8192, HI + 0x810)
    for t in tlps:
        assert t.addr // 4096 == (t.addr + t.length - 1) // 4096
        assert t.length <= 256
    assert sum(t.length for t in tlps) == 8192
    assert [t.addr for t in tlps] == sorted(t.addr for t in tlps)


def test_read_split_by_mrrs_and_4k():
    assert pieces(tlps_for_read(1500, HI)) == [(HI, 512), (HI + 512, 512), (HI + 1024, 476)]
    assert pieces(tlps_for_read(1024, HI + 0xF00)) == [
        (HI + 0xF00, 256), (HI + 0x1000, 512), (HI + 0x1200, 256)]
    assert [t.length for t in tlps_for_read(1024, HI, PcieConfig(mrrs=128))] == [128] * 8
    assert all(t.kind == "MRd" and t.payload_bytes() == 0 for t in tlps_for_read(1500, HI))


def test_completions_split_at_mps_and_rcb():
    req = Tlp("MRd", HI, 512)
    assert pieces(completions_for_read(req)) == [(HI, 256), (HI + 256, 256)]
    # Unaligned start: the first completion ends on the last RCB boundary within MPS.
    req = Tlp("MRd", HI + 0x10, 512)
    assert pieces(completions_for_read(req)) == [(HI + 0x10, 240), (HI + 0x100, 256),
                                                 (HI + 0x200, 16)]
    # Older chipsets: one completion per RCB.
    cfg = PcieConfig(rcb_chunks=True)
    assert [c.length for c in completions_for_read(Tlp("MRd", HI, 256), cfg)] == [64] * 4
    cfg = PcieConfig(rcb=128, rcb_chunks=True)
    assert pieces(completions_for_read(Tlp("MRd", HI + 8, 256), cfg)) == [
        (HI + 8, 120), (HI + 128, 128), (HI + 256, 8)]
    # A short request is one completion, whatever its alignment.
    assert pieces(completions_for_read(Tlp("MRd", HI + 0x3C, 8))) == [(HI + 0x3C, 8)]


@pytest.mark.parametrize("cfg", [CFG, PcieConfig(mps=128, mrrs=1024, rcb=128),
                                 PcieConfig(rcb_chunks=True)])
def test_completion_rules_hold_for_random_reads(cfg):
    rng = random.Random(1)
    for _ in range(300):
        addr, n = HI + rng.randrange(0, 8192), rng.randrange(1, 3000)
        pos = addr
        for req in tlps_for_read(n, addr, cfg):
            assert req.addr == pos and req.length <= cfg.mrrs
            assert req.addr // 4096 == (req.addr + req.length - 1) // 4096
            cpls = completions_for_read(req, cfg)
            for c in cpls:
                assert c.addr == pos and 0 < c.length <= cfg.mps
                pos += c.length
            for c in cpls[:-1]:                     # all but the last end on an RCB boundary
                assert (c.addr + c.length) % cfg.rcb == 0
        assert pos == addr + n


# ---------------------------------------------------------------------- wire bytes

def test_wire_bytes_per_tlp():
    # 64-bit MWr: 2 framing + 6 DLL + 4 TLP + 12 MWr header = 24 B (the paper's MWr_Hdr)
    assert tlp_wire_bytes(Tlp("MWr", HI, 64)) == 24 + 64
    assert tlp_wire_bytes(Tlp("MRd", HI, 512)) == 24
    # CplD: 8 + 4 + 8 = 20 B (the paper's CplD_Hdr)
    assert tlp_wire_bytes(Tlp("CplD", HI, 256)) == 20 + 256
    cfg32 = PcieConfig(dma_addr_bits=32)
    assert tlp_wire_bytes(Tlp("MWr", 0x1000, 64), cfg32) == 20 + 64
    assert tlp_wire_bytes(Tlp("MWr", HI, 64), PcieConfig(ecrc=True)) == 28 + 64
    # MMIO to a 32-bit BAR: 3DW header
    assert tlp_wire_bytes(Tlp("MWr", 0x40, 4, "mmio")) == 20 + 4
    # Payloads are whole double words: 1 byte at offset 3 costs a DW, 6 bytes at 2 two.
    assert tlp_wire_bytes(Tlp("MWr", HI + 3, 1)) == 24 + 4
    assert tlp_wire_bytes(Tlp("MWr", HI + 2, 6)) == 24 + 8


def test_wire_bytes_of_transfers():
    assert wire_bytes(tlps_for_write(1500, HI)) == 1500 + 6 * 24
    reqs = tlps_for_read(1500, HI)
    assert wire_bytes(reqs) == 3 * 24
    assert wire_bytes([c for r in reqs for c in completions_for_read(r)]) == 1500 + 6 * 20


# ---------------------------------------------------------------------- bandwidth model

# (size, write Gb/s, read Gb/s) from the paper's equations with U = 57.8848 Gb/s:
#   write = U*sz/(ceil(sz/256)*24 + sz);  read = U*sz/max(ceil(sz/512)*24, ceil(sz/256)*20 + sz)
#   64:   U*64/88 = 42.098     U*64/84 = 44.103
#   256:  U*256/280 = 52.923   U*256/276 = 53.690
#   1500: U*1500/1644 = 52.815 U*1500/1620 = 53.597
PAPER_MODEL = [(64, 42.098, 44.103), (128, 48.745, 50.063), (256, 52.923, 53.690),
               (512, 52.923, 53.690), (1024, 52.923, 53.690), (1500, 52.815, 53.597)]


@pytest.mark.parametrize("size,write,read", PAPER_MODEL)
def test_effective_bandwidth_matches_the_papers_model(size, write, read):
    # The references are the equations evaluated to 3 decimals: only rounding may differ.
    assert effective_bandwidth(size, "write") == pytest.approx(write, abs=1e-3)
    assert effective_bandwidth(size, "read") == pytest.approx(read, abs=1e-3)


def test_effective_bandwidth_shape():
    # Sawtooth: one more TLP header just past each MPS multiple; tiny reads are limited
    # by the request direction (24 B per request > 20 B + sz of completion).
    assert effective_bandwidth(257, "write") < effective_bandwidth(256, "write")
    assert effective_bandwidth(4, "read") == pytest.approx(usable_bandwidth_gbps(CFG) * 4 / 24)
    sizes = range(1, 2049)
    assert max(effective_bandwidth(s, "write") for s in sizes) < usable_bandwidth_gbps(CFG)
    assert effective_bandwidth(1500, "write", PcieConfig(mps=128)) == pytest.approx(
        usable_bandwidth_gbps(PcieConfig(mps=128)) * 1500 / (12 * 24 + 1500))


@pytest.mark.parametrize("direction", ["write", "read"])
def test_event_model_reaches_the_analytic_bandwidth(direction):
    n, size = 100, 1500
    link = PcieLink(CFG, 250, memory())
    for i in range(n):
        if direction == "write":
            link.post_write(HI + 2048 * i, bytes(size))
        else:
            link.request_read(HI + 2048 * i, size, i)
    done = link.drain()
    if direction == "write":
        elapsed = link.wires["up"].last_sent_ns
    else:   # the first completion can only start one read latency in
        elapsed = max(c.time_ns for c in done) - (CFG.dma_read_latency_ns
                                                  - link.serialization_ns(Tlp("CplD", 0, 64)))
    achieved = n * size * 8 / elapsed
    assert achieved == pytest.approx(effective_bandwidth(size, direction), rel=0.01)
    assert achieved / effective_bandwidth(size, direction) >= 0.99


# ---------------------------------------------------------------------- latency

def test_single_small_read_takes_the_configured_latency():
    mem = memory()
    mem.write(HI + 0x40, bytes(range(64)))
    link = PcieLink(CFG, 250, mem)
    link.request_read(HI + 0x40, 64, "t")
    (c,) = link.drain()
    assert c == Completion("t", HI + 0x40, 0, bytes(range(64)), True, c.time_ns)
    assert c.time_ns == pytest.approx(547.0)
    link2 = PcieLink(PcieConfig(dma_read_latency_ns=1213.0), 250, mem)   # the Xeon E3 figure
    link2.request_read(HI, 64, 0)
    assert link2.drain()[0].time_ns == pytest.approx(1213.0)


def test_larger_read_adds_only_serialization():
    link = PcieLink(CFG, 250, memory())
    link.request_read(HI, 256, 0)
    (c,) = link.drain()
    extra = (192 * 8) / usable_bandwidth_gbps(CFG)        # 192 more payload bytes
    assert c.time_ns == pytest.approx(547.0 + extra)


def test_tick_uses_the_clock():
    link = PcieLink(CFG, 250, memory())                  # 4 ns per cycle
    link.request_read(HI, 64, 0)
    cycles = 0
    while True:
        cycles += 1
        got = link.tick()
        if got:
            break
    assert cycles == math.ceil(547 / 4)
    assert link.now == pytest.approx(cycles * 4)


def test_mmio_latencies():
    link = PcieLink(CFG, 250, memory())
    link.mmio_target.write(0x20, b"\x01\x02\x03\x04")
    tok = link.mmio_read(0x20)
    assert link.mmio_result(tok) is None
    link.drain()
    t, data = link.mmio_result(tok)
    assert data == b"\x01\x02\x03\x04" and t == pytest.approx(547.0)

    link = PcieLink(PcieConfig(mmio_read_latency_ns=900.0, mmio_write_latency_ns=300.0),
                    250, memory())
    link.mmio_write(0x40, b"\xaa" * 4)               # the figures are for 4-byte accesses
    link.run_until(299.0)
    assert 0x40 not in link.mmio_target.regs
    link.run_until(300.0)
    assert link.mmio_target.regs[0x40] == b"\xaa" * 4
    tok = link.mmio_read(0x40)
    link.drain()
    t, data = link.mmio_result(tok)
    assert data == b"\xaa" * 4 and t == pytest.approx(300.0 + 900.0)
    # an 8-byte read adds the serialization of 4 more completion bytes
    tok = link.mmio_read(0x48, 8)
    start = link.now
    link.drain()
    extra = 4 * 8 / usable_bandwidth_gbps(CFG)
    assert link.mmio_result(tok) == (pytest.approx(start + 900.0 + extra), bytes(8))
    assert (link.mmio_writes, link.mmio_reads) == (1, 2)


def test_posted_write_lands_after_the_write_latency():
    mem = memory()
    link = PcieLink(CFG, 250, mem)
    link.post_write(HI + 8, b"hello")
    wire = link.serialization_ns(Tlp("MWr", HI + 8, 5))
    link.run_until(wire + link.dma_write_latency_ns - 0.01)
    assert mem.read(HI + 8, 5) == bytes(5)
    link.run_until(wire + link.dma_write_latency_ns)
    assert mem.read(HI + 8, 5) == b"hello"
    # derived default: half of the time a read spends outside the wires
    assert link.dma_write_latency_ns == pytest.approx(link.host_turnaround_ns / 2)


# ---------------------------------------------------------------------- full duplex

def test_directions_are_independent():
    def run(with_writes):
        link = PcieLink(CFG, 250, memory())
        for i in range(10):          # 30 read requests, all tagged at once, sent first
            link.request_read(HI + 0x10000 + 2048 * i, 1500, i)
        if with_writes:
            for i in range(50):
                link.post_write(HI + 2048 * i, bytes(1500))
        done = link.drain()
        return max(c.time_ns for c in done), link

    reads_alone, _ = run(False)
    reads_with_writes, link = run(True)
    assert reads_with_writes == pytest.approx(reads_alone)     # down side unaffected by up
    assert link.counters["up"].mwr == 50 * 6

    def writes(mmio):
        link = PcieLink(CFG, 250, memory())
        for i in range(50):
            link.post_write(HI + 2048 * i, bytes(1500))
        for i in range(mmio):
            link.mmio_write(8 * i, bytes(8))
        link.drain()
        return link.wires["up"].last_sent_ns, link

    alone, _ = writes(0)
    loaded, link = writes(2000)
    assert loaded == pytest.approx(alone)                      # up side unaffected by down
    assert link.wires["down"].busy_ns > 0.5 * alone            # and the down side was busy


def test_shared_direction_serializes():
    # Writes and read requests share the up direction: the writes delay the reads.
    link = PcieLink(CFG, 250, memory())
    for i in range(50):
        link.post_write(HI + 2048 * i, bytes(1500))
    link.request_read(HI, 64, "late")
    (c,) = [c for c in link.drain() if c.tag == "late"]
    assert c.time_ns == pytest.approx(547.0 + link.wires["up"].busy_ns - link.serialization_ns(
        Tlp("MRd", HI, 64)))


# ---------------------------------------------------------------------- tags

def test_tag_exhaustion_stalls_requests():
    cfg = PcieConfig(max_tags=2)
    link = PcieLink(cfg, 250, memory())
    for tag in range(4):
        link.request_read(HI + 64 * tag, 64, tag)
    assert link.free_tags == 0 and link.tag_stalls == 2 and link.outstanding_reads == 4
    done = link.drain()
    times = {c.tag: c.time_ns for c in done}
    mrd, cpl = (link.serialization_ns(Tlp("MRd", 0, 64)),
                link.serialization_ns(Tlp("CplD", 0, 64)))
    assert times[0] == pytest.approx(547.0)
    # request 1 is answered while request 0's completion still holds the down wire
    assert times[1] == pytest.approx(547.0 + cpl)
    # Tag 0 frees at 547 ns: request 2 starts then and takes a full read latency.
    assert times[2] == pytest.approx(2 * 547.0)
    assert times[3] == pytest.approx(times[1] + 547.0)
    assert link.free_tags == 2 and link.outstanding_reads == 0
    assert mrd < cpl


def test_one_large_read_is_paced_by_the_tags():
    link = PcieLink(PcieConfig(max_tags=1), 250, memory())
    link.request_read(HI, 2048, "big")                  # 4 MRRS requests, one tag
    done = link.drain()
    assert [c.offset for c in done] == [0, 256, 512, 768, 1024, 1280, 1536, 1792]
    assert done[-1].last and not any(c.last for c in done[:-1])
    # each request waits for the previous one's last completion
    per_request = 547.0 + link.serialization_ns(Tlp("CplD", 0, 256)) * 2 - \
        link.serialization_ns(Tlp("CplD", 0, 64))
    assert done[-1].time_ns == pytest.approx(4 * per_request)


def test_outstanding_tag_cannot_be_reused():
    link = PcieLink(CFG, 250, memory())
    link.request_read(HI, 64, 7)
    with pytest.raises(ValueError):
        link.request_read(HI + 64, 64, 7)
    link.drain()
    link.request_read(HI + 64, 64, 7)                   # free again once completed
    assert len(link.drain()) == 1


# ---------------------------------------------------------------------- ordering

def test_completions_out_of_order_across_tags_in_order_within_a_tag():
    slow = range(HI, HI + 0x1000)                      # e.g. a cache miss: +1 us
    mem = memory()
    mem.write(HI, bytes(range(256)) * 16)
    link = PcieLink(CFG, 250, mem, host_latency=lambda a, n: 1000.0 if a in slow else 0.0)
    link.request_read(HI, 1024, "slow")                # 2 requests, 4 completions
    link.request_read(HI + 0x2000, 64, "fast")
    done = link.drain()
    assert [c.tag for c in done] == ["fast"] + ["slow"] * 4
    slow_cpls = [c for c in done if c.tag == "slow"]
    assert [c.offset for c in slow_cpls] == [0, 256, 512, 768]
    assert b"".join(c.data for c in slow_cpls) == mem.read(HI, 1024)
    assert [c.last for c in slow_cpls] == [False, False, False, True]


def test_within_a_tag_order_holds_even_when_a_later_part_is_faster():
    mem = memory()
    # first MRRS request of the read is slow, the second fast
    link = PcieLink(CFG, 250, mem, host_latency=lambda a, n: 2000.0 if a == HI else 0.0)
    link.request_read(HI, 1024, "r")
    done = link.drain()
    assert [c.offset for c in done] == [0, 256, 512, 768]
    assert all(a.time_ns <= b.time_ns for a, b in zip(done, done[1:]))


def test_interleaved_completions_from_two_tags():
    link = PcieLink(CFG, 250, memory())
    link.request_read(HI, 512, "a")
    link.request_read(HI + 4096, 512, "b")
    tags = [c.tag for c in link.drain()]
    assert sorted(tags) == ["a", "a", "b", "b"]


# ---------------------------------------------------------------------- counters

def test_counters():
    link = PcieLink(CFG, 250, memory())
    link.post_write(HI, bytes(1500))
    link.request_read(HI, 1500, 0)
    link.mmio_write(0, bytes(4))
    link.drain()
    up, down = link.counters["up"], link.counters["down"]
    assert (up.tlps, up.mwr, up.mrd) == (9, 6, 3)
    assert up.payload_bytes == 1500
    assert up.wire_bytes == 1500 + 6 * 24 + 3 * 24
    assert (down.tlps, down.cpld, down.mwr) == (7, 6, 1)
    assert down.payload_bytes == 1504
    assert down.wire_bytes == 1500 + 6 * 20 + 4 + 20
    assert (link.dma_writes, link.dma_reads, link.mmio_writes) == (1, 1, 1)


# ---------------------------------------------------------------------- host memory

def test_host_memory_regions():
    mem = HostMemory()
    ring = mem.register(0x10000, 0x1000, "tx ring")
    mem.register(0x20000, 0x100, "buf")
    with pytest.raises(ValueError):
        mem.register(0x10800, 0x1000)                   # overlaps the ring
    with pytest.raises(ValueError):
        mem.register(0x30000, 0)
    assert mem.read(0x10000, 16) == bytes(16)          # unwritten reads as zero
    mem.write(0x10FFC, b"abcd")
    assert mem.read(0x10FFE, 2) == b"cd"
    assert mem.region_of(0x10010) is ring
    for addr, n in [(0xFFFF, 1), (0x10FFE, 4), (0x20100, 1), (0x0, 8)]:
        with pytest.raises(HostMemoryError) as err:
            mem.read(addr, n)
        assert err.value.addr == addr and err.value.op == "read"
        with pytest.raises(HostMemoryError):
            mem.write(addr, bytes(n))
    with pytest.raises(ValueError):
        mem.read(0x10000, 0)
    mem.unregister(0x10000)
    with pytest.raises(HostMemoryError):
        mem.read(0x10000, 1)
    with pytest.raises(ValueError):
        mem.unregister(0x10000)


def test_host_memory_spans_pages():
    mem = memory(1 << 16)
    data = bytes(random.Random(2).randbytes(10000))
    mem.write(HI + 100, data)
    assert mem.read(HI + 100, 10000) == data


def test_dma_to_unregistered_memory_is_reported_not_raised():
    mem = memory(0x1000)
    link = PcieLink(CFG, 250, mem)
    link.post_write(HI + 0x2000, b"x" * 8)
    link.request_read(HI + 0x3000, 1024, "bad")
    link.request_read(HI, 64, "good")
    done = link.drain()
    # one UR per read request TLP (1024 B = 2 MRRS requests); the read ends at the first
    assert link.write_errors == 1 and link.read_errors == 2
    assert all(isinstance(e, HostMemoryError) for e in link.errors)
    bad = [c for c in done if c.tag == "bad"]
    assert len(bad) == 1 and bad[0].status == "UR" and bad[0].last and bad[0].data == b""
    assert [c.status for c in done if c.tag == "good"] == ["SC"]
    assert link.free_tags == CFG.max_tags and link.outstanding_reads == 0


# ---------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("call", [
    lambda l: l.request_read(HI, 0, 1),
    lambda l: l.request_read(HI, -64, 1),
    lambda l: l.request_read(-4, 64, 1),
    lambda l: l.post_write(HI, b""),
    lambda l: l.mmio_write(0x2, bytes(4)),              # unaligned
    lambda l: l.mmio_write(0x8, bytes(2)),              # not a 4/8-byte access
    lambda l: l.mmio_read(0x4, 8),                      # 8-byte read at a 4-aligned address
    lambda l: l.mmio_read(0x0, 16),
    lambda l: l.advance(-1),
])
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call(PcieLink(CFG, 250, memory()))


def test_bad_arguments_in_pure_functions():
    with pytest.raises(TypeError):
        tlps_for_write(1.5, HI)
    with pytest.raises(ValueError):
        tlps_for_read(0, HI)
    with pytest.raises(ValueError):                     # 32-bit requests above 4 GB
        tlps_for_write(64, HI, PcieConfig(dma_addr_bits=32))
    with pytest.raises(ValueError):
        effective_bandwidth(64, "sideways")
    with pytest.raises(ValueError):
        effective_bandwidth(0, "write")
    with pytest.raises(ValueError):
        PcieLink(CFG, 0)
    with pytest.raises(ValueError):                     # latency below its own wire time
        PcieLink(PcieConfig(dma_read_latency_ns=5.0))
    link = PcieLink(CFG, 250)
    link.advance(10)
    with pytest.raises(ValueError):
        link.run_until(5)
