"""Testbench of hw.checksum_insert.ChecksumInserter: scapy frames with wrong checksums in.

Well-formed frames are built by scapy (TCP with options and payloads, VLAN-tagged, IP
options, UDP, ICMP, fragments, ARP, IPv6); their checksum fields are zeroed or filled
with garbage on the way in. Out must come scapy's correctly checksummed frame for
IPv4/TCP, the IP checksum only for other IPv4 (a TCP checksum of a fragment stays as
it was), and the unchanged frame for everything else.

Malformed frames (truncated, bad IHL, bad data offset, extra bytes, runts, oversize,
jumbo frames longer than the buffer) have a defined outcome, given by
``inserter_reference``: the inserter's rule applied to ``sim.reference.parse_frame``.

All streams see random valid/ready stalls. ``bench_inserter(bus, width)`` measures
throughput with an always-ready sink, on any ``sim.bus`` adapter.
"""

import random

import pytest

from hw.checksum_insert import ChecksumInserter
from hw.headers import (IPV4, TCP, ETH_LEN, IPV4_MIN_LEN, TCP_MIN_LEN, MAX_FRAME_BYTES,
                        MIN_FRAME_BYTES, IpProto)
from hw.metadata import FrameClass
from hw.stream import frame_to_beats
from sim.bus import StreamSink, StreamSource, run_until
from sim.reference import fold, ones_sum, parse_frame
from tb.test_builder import clock, split_frames

try:
    import cocotb
except ImportError:
    cocotb = None

IPV4_CLASSES = (FrameClass.TCP, FrameClass.UDP, FrameClass.IPV4_OTHER, FrameClass.FRAGMENT)


# --- Reference ------------------------------------------------------------------------------

def inserter_reference(frame, max_frame_bytes=MAX_FRAME_BYTES):
    """What the inserter must output for ``frame`` (the rule of its docstring)."""
    meta = parse_frame(frame, max_frame_bytes)
    err, l3, l4 = meta["errors"], meta["l3_offset"], meta["l4_offset"]
    out = bytearray(frame)
    ip_ok = (meta["frame_class"] in IPV4_CLASSES and len(frame) >= l4
             and not (err["bad_ip_version"] or err["bad_ihl"] or err["oversize"]))
    if ip_ok:
        IPV4.checksum.put(out, 0, l3)
        IPV4.checksum.put(out, ~ones_sum(out[l3:l4]) & 0xFFFF, l3)
    if ip_ok and meta["frame_class"] == FrameClass.TCP and not (
            err["truncated"] or err["bad_data_offset"] or err["length_mismatch"]):
        end = l3 + IPV4.total_length.get(out, l3)
        TCP.checksum.put(out, 0, l4)
        pseudo = ones_sum(out[l3 + IPV4.src.byte_offset:l3 + IPV4.dst.byte_offset + 4]) \
            + IPV4.protocol.get(out, l3) + (end - l4)
        TCP.checksum.put(out, ~fold(ones_sum(out[l4:end]) + pseudo) & 0xFFFF, l4)
    return bytes(out)


def pad(frame):
    return bytes(frame) + bytes(max(0, MIN_FRAME_BYTES - len(frame)))


def random_tcp_options(rng):
    choices = [("MSS", rng.randrange(536, 9000)), ("SAckOK", b""), ("WScale", rng.randrange(15)),
               ("Timestamp", (rng.getrandbits(32), rng.getrandbits(32))), ("NOP", None),
               ("SAck", (rng.getrandbits(32), rng.getrandbits(32)))]
    opts = rng.sample(choices, rng.randrange(len(choices) + 1))
    return opts


def scapy_frames(rng, count):
    """(label, correct frame) pairs: a mix of every kind of frame the host may send."""
    from scapy.layers.inet import ICMP, IP, TCP as ScapyTCP, UDP, IPOption_Router_Alert, IPOption_RR
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import ARP, Dot1Q, Ether
    from scapy.packet import Raw

    def addr():
        return "192.0.2.%d" % rng.randrange(1, 255), "198.51.100.%d" % rng.randrange(1, 255)

    def tcp(max_payload):
        payload = rng.randbytes(rng.choice([0, rng.randrange(1, 100), rng.randrange(0, max_payload)]))
        return ScapyTCP(sport=rng.randrange(65536), dport=rng.randrange(65536), seq=rng.getrandbits(32),
                        ack=rng.getrandbits(32), flags=rng.getrandbits(8), window=rng.randrange(65536),
                        options=random_tcp_options(rng)) / Raw(payload)

    def ip(**kw):
        src, dst = addr()
        return IP(src=src, dst=dst, ttl=rng.randrange(1, 256), id=rng.randrange(65536), **kw)

    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    kinds = {
        "tcp": lambda: eth / ip(flags="DF") / tcp(1400),
        "vlan_tcp": lambda: eth / Dot1Q(vlan=rng.randrange(4096), prio=rng.randrange(8)) / ip() / tcp(1400),
        "ip_options_tcp": lambda: eth / ip(options=[IPOption_Router_Alert(),
                                                    IPOption_RR(routers=["192.0.2.1"] * rng.randrange(1, 9))]) / tcp(1400),
        "udp": lambda: eth / ip() / UDP(sport=rng.randrange(65536), dport=53) / Raw(rng.randbytes(rng.randrange(0, 300))),
        "icmp": lambda: eth / ip() / ICMP() / Raw(rng.randbytes(rng.randrange(0, 100))),
        "fragment_first": lambda: eth / ip(flags="MF") / tcp(400),
        "fragment_later": lambda: eth / ip(frag=rng.randrange(1, 100), proto=int(IpProto.TCP)) / Raw(rng.randbytes(rng.randrange(8, 400))),
        "arp": lambda: eth / ARP(psrc="192.0.2.1", pdst="192.0.2.2"),
        "ipv6_tcp": lambda: eth / IPv6(src="2001:db8::1", dst="2001:db8::2") / tcp(1000),
    }
    names = list(kinds)
    return [(name, pad(bytes(kinds[name]()))) for name in (names + [rng.choice(names) for _ in range(count - len(names))])]


def spoil_checksums(rng, frame):
    """Zero or randomise the IPv4 and TCP checksum fields (found with the reference parser)."""
    meta = parse_frame(frame)
    out = bytearray(frame)
    value = 0 if rng.random() < 0.5 else rng.getrandbits(16)
    if meta["frame_class"] in IPV4_CLASSES:
        IPV4.checksum.put(out, value, meta["l3_offset"])
        if IPV4.protocol.get(out, meta["l3_offset"]) == IpProto.TCP and IPV4.frag_offset.get(out, meta["l3_offset"]) == 0:
            TCP.checksum.put(out, value ^ 0x5A5A, meta["l4_offset"])
    return bytes(out)


def expected_output(label, good, spoiled):
    """What scapy says must come out: the good frame, except checksums the inserter leaves."""
    if label in ("arp", "ipv6_tcp"):
        return spoiled                      # not IPv4: unchanged
    if label == "fragment_first":           # IP checksum fixed, TCP checksum left as it was
        meta = parse_frame(good)
        out = bytearray(good)
        TCP.checksum.put(out, TCP.checksum.get(spoiled, meta["l4_offset"]), meta["l4_offset"])
        return bytes(out)
    return good


def malformed_frames(rng, width):
    """Frames with a defined outcome but no scapy truth: truncated, bad IHL/data offset, ..."""
    good = [f for label, f in scapy_frames(rng, 40) if label == "tcp"]
    out = []
    for frame in good[:8]:
        b = bytearray(frame)
        l3 = ETH_LEN
        l4 = l3 + 4 * IPV4.ihl.get(b, l3)
        out.append(bytes(b[:rng.randrange(1, len(b))]))                          # truncated
        out.append(bytes(b[:rng.randrange(l4 + 1, l4 + 20)]))                    # cut in the TCP header
        c = bytearray(b); IPV4.ihl.put(c, rng.choice([0, 3, 4]), l3); out.append(bytes(c))
        c = bytearray(b); IPV4.ihl.put(c, 15, l3); out.append(bytes(c))          # longer than the frame
        c = bytearray(b); TCP.data_offset.put(c, rng.choice([0, 2, 4, 15]), l4); out.append(bytes(c))
        c = bytearray(b); IPV4.version.put(c, 6, l3); out.append(bytes(c))
        out.append(bytes(b) + rng.randbytes(rng.randrange(1, 40)))                 # length mismatch
        out.append(rng.randbytes(rng.randrange(1, 14)))                            # runt
        out.append(rng.randbytes(rng.randrange(14, 200)))                          # garbage
    # Oversize, but it fits the buffer: flagged by the parser, passes unchanged.
    out.append(long_tcp_frame(rng, 1600))
    return out


def long_tcp_frame(rng, size):
    from scapy.layers.inet import IP, TCP as ScapyTCP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    pkt = (Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="192.0.2.1", dst="192.0.2.2")
           / ScapyTCP() / Raw(rng.randbytes(size - ETH_LEN - IPV4_MIN_LEN - TCP_MIN_LEN)))
    frame = bytearray(bytes(pkt))
    IPV4.checksum.put(frame, 0, ETH_LEN)
    return bytes(frame)


# --- Shared driver ------------------------------------------------------------------------------

async def drive_and_check(bus, width, frames, expected, stall=0.3, seed=0):
    """Send ``frames`` through the inserter and compare with ``expected``, frame by frame."""
    rng = random.Random(seed)
    src = StreamSource(bus, "i", stall=stall, rng=random.Random(rng.random()))
    sink = StreamSink(bus, "o", stall=stall, rng=random.Random(rng.random()))
    for f in frames:
        src.send(frame_to_beats(f, width))
    total = sum(-(-len(f) // (width // 8)) for f in frames)
    await run_until(bus, [src, sink], lambda: len(sink.received) >= total, max_cycles=20 * total + 2000)
    await clock(bus, [src, sink], 20)
    got, rest = split_frames(sink.received, width)
    assert rest == b"" and len(got) == len(frames), f"{len(got)} frames out, {len(frames)} in"
    for n, (g, want, sent) in enumerate(zip(got, expected, frames)):
        if g != want:
            raise AssertionError(f"frame {n} differs:\n in   {sent.hex()}\n got  {g.hex()}\n want {want.hex()}")


async def bench_inserter(bus, width, frames_per_size=16, sizes=(60, 64, 128, 256, 512, 1024, 1518)):
    """Beats per cycle through the inserter for back-to-back TCP frames, always-ready sink.

    Returns {"beats_per_cycle_min", "beats_per_cycle": {size: value},
    "latency_cycles": first beat in -> first beat out}."""
    rng = random.Random(9)
    src = StreamSource(bus, "i")
    sink = StreamSink(bus, "o")
    times = {"in": [], "out": []}

    class Stamps:
        def drive(self):
            pass

        def sample(self):
            if bus.get("i__valid") and bus.get("i__ready"):
                times["in"].append(bus.cycle)
            if bus.get("o__valid") and bus.get("o__ready"):
                times["out"].append(bus.cycle)

    agents = [src, sink, Stamps()]
    result, latency = {}, None
    for size in sizes:
        times["in"].clear()
        times["out"].clear()
        beats = 0
        for _ in range(frames_per_size):
            frame = long_tcp_frame(rng, size)
            src.send(frame_to_beats(frame, width))
            beats += -(-size // (width // 8))
        await run_until(bus, agents, lambda: len(times["out"]) >= beats, max_cycles=10 * beats + 1000)
        result[size] = beats / (times["out"][-1] - times["out"][0] + 1)
        if latency is None:
            latency = times["out"][0] - times["in"][0]
    return {"beats_per_cycle_min": min(result.values()), "beats_per_cycle": result,
            "latency_cycles": latency}


# --- cocotb tests ---------------------------------------------------------------------------------

if cocotb is not None:
    from tb.cocotb_util import start
    from tb.harness import tb_params

    async def _wellformed(dut, count, seed):
        bus = await start(dut)
        width = tb_params()["width"]
        rng = random.Random(seed)
        labelled = scapy_frames(rng, count)
        frames, expected = [], []
        for label, good in labelled:
            spoiled = spoil_checksums(rng, good)
            want = expected_output(label, good, spoiled)
            assert inserter_reference(spoiled) == want, f"reference model disagrees with scapy on {label}"
            frames.append(spoiled)
            expected.append(want)
        await drive_and_check(bus, width, frames, expected, seed=seed)

    @cocotb.test()
    async def wellformed_frames(dut):
        """scapy frames of every kind with zeroed or garbage checksums."""
        await _wellformed(dut, 80, seed=1)

    @cocotb.test()
    async def smoke(dut):
        """A few scapy frames (the short test for the other widths)."""
        await _wellformed(dut, 14, seed=3)

    @cocotb.test()
    async def malformed(dut):
        """Truncated, bad IHL/data offset/version, extra bytes, runts, garbage, oversize."""
        bus = await start(dut)
        width = tb_params()["width"]
        rng = random.Random(2)
        frames = malformed_frames(rng, width)
        await drive_and_check(bus, width, frames, [inserter_reference(f) for f in frames], seed=2)
        assert bus.get("unpatched") == 0

    @cocotb.test()
    async def jumbo(dut):
        """Frames longer than the buffer leave unpatched (counted); the next ones are fine."""
        bus = await start(dut)
        width = tb_params()["width"]
        rng = random.Random(4)
        jumbo_frame = long_tcp_frame(rng, 9000)
        normal = [spoil_checksums(rng, f) for _, f in scapy_frames(rng, 9)]
        frames = normal[:3] + [jumbo_frame] + normal[3:6] + [jumbo_frame] + normal[6:]
        await drive_and_check(bus, width, frames, [inserter_reference(f) for f in frames], seed=4)
        assert bus.get("unpatched") == 2, bus.get("unpatched")

    @cocotb.test()
    async def throughput(dut):
        """Back-to-back TCP frames with an always-ready sink: 1.0 beat per cycle."""
        bus = await start(dut)
        width = tb_params()["width"]
        result = await bench_inserter(bus, width, frames_per_size=8)
        dut._log.info("ChecksumInserter W=%d: %s", width, result)
        assert result["beats_per_cycle_min"] >= 0.99, result


# --- pytest wrappers -----------------------------------------------------------------------------

def test_reference_matches_scapy():
    """The Python rule agrees with scapy on well-formed frames (no simulator needed)."""
    rng = random.Random(11)
    for label, good in scapy_frames(rng, 200):
        spoiled = spoil_checksums(rng, good)
        assert inserter_reference(spoiled) == expected_output(label, good, spoiled), label


@pytest.mark.parametrize("width", [64, 512])
def test_checksum_insert(sim, width):
    from tb.harness import run_cocotb
    run_cocotb(ChecksumInserter, {"width": width}, "tb.test_checksum_insert", sim,
               testcase=["wellformed_frames", "malformed", "jumbo", "throughput"])


@pytest.mark.parametrize("width", [128, 256])
def test_checksum_insert_smoke(sim, width):
    from tb.harness import run_cocotb
    run_cocotb(ChecksumInserter, {"width": width}, "tb.test_checksum_insert", sim, testcase=["smoke"])
