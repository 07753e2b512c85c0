"""Testbench of hw.builder.TxBuilder: scapy builds the expected frames.

Random TX_HEADER values (every option combination, payload 0..1460 bytes of random
bytes) go in with random valid/ready stalls on all three streams; each output frame
must equal, byte for byte, the frame scapy builds from the same values (Ether/IP/TCP
with the same option order, checksums computed by scapy, zero padding to 60 bytes).

``bench_builder(bus, width)`` measures throughput and latency with an always-ready
sink; it runs on any ``sim.bus`` adapter (``bench_builder_amaranth(width)`` runs it on
the built-in Amaranth simulator). The pytest wrappers ``test_*`` run the cocotb tests
(functions not named ``test_``) on each simulator in $SIM.
"""

import random
import socket

import pytest

from hw.builder import TxBuilder, OPTION_COMBOS, FIXED_HEADER_BYTES, header_length
from hw.headers import MIN_FRAME_BYTES, MAX_FRAME_BYTES
from hw.metadata import TX_HEADER
from hw.stream import frame_to_beats, pack_beat, pack_struct, unpack_beat, unpack_struct, packet_layout
from sim.bus import StreamSink, StreamSource, run_until

try:
    import cocotb
except ImportError:                      # benches on the Amaranth simulator need no cocotb
    cocotb = None

MAX_PAYLOAD = 1460


# --- Reference model ------------------------------------------------------------------------

def random_header(rng, payload_length=None, combo=None):
    """A random TX_HEADER as nested dicts (the shape ``pack_struct`` takes); ``combo`` is
    a (mss, sack_perm, timestamps, wscale) tuple of ``OPTION_COMBOS``, random if None."""
    mss, sack, ts, ws = combo if combo is not None else rng.choice(OPTION_COMBOS)
    if payload_length is None:
        # Up to 1460 bytes, as long as the frame stays within MAX_FRAME_BYTES (longer
        # ones are dropped, see ``oversize_dropped``).
        longest = min(MAX_PAYLOAD, MAX_FRAME_BYTES - header_length(mss, sack, ts, ws))
        payload_length = rng.choice([0, rng.randrange(1, 64), rng.randrange(0, longest + 1), longest])
    return {
        "eth": {"dst": rng.getrandbits(48), "src": rng.getrandbits(48)},
        "ip": {"src": rng.getrandbits(32), "dst": rng.getrandbits(32), "ttl": rng.getrandbits(8),
               "identification": rng.getrandbits(16), "df": rng.getrandbits(1),
               "dscp": rng.getrandbits(6), "ecn": rng.getrandbits(2)},
        "tcp": {"sport": rng.getrandbits(16), "dport": rng.getrandbits(16),
                "seq": rng.getrandbits(32), "ack": rng.getrandbits(32),
                "flags": rng.getrandbits(8), "window": rng.getrandbits(16)},
        "opt": {"mss_valid": int(mss), "mss": rng.getrandbits(16),
                "wscale_valid": int(ws), "wscale": rng.getrandbits(8),
                "sack_perm": int(sack),
                "ts_valid": int(ts), "tsval": rng.getrandbits(32), "tsecr": rng.getrandbits(32)},
        "payload_length": payload_length,
    }


def scapy_frame(h, payload):
    """The frame TxBuilder must emit for header ``h``, built and checksummed by scapy."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    def mac(value):
        return ":".join(f"{b:02x}" for b in value.to_bytes(6, "big"))

    def ip(value):
        return socket.inet_ntoa(value.to_bytes(4, "big"))

    o = h["opt"]
    options = []
    if o["mss_valid"]:
        options.append(("MSS", o["mss"]))
    timestamp = ("Timestamp", (o["tsval"], o["tsecr"]))
    if o["sack_perm"] and o["ts_valid"]:
        options += [("SAckOK", b""), timestamp]
    elif o["ts_valid"]:
        options += [("NOP", None), ("NOP", None), timestamp]
    elif o["sack_perm"]:
        options += [("NOP", None), ("NOP", None), ("SAckOK", b"")]
    if o["wscale_valid"]:
        options += [("NOP", None), ("WScale", o["wscale"])]
    t = h["tcp"]
    pkt = (Ether(dst=mac(h["eth"]["dst"]), src=mac(h["eth"]["src"]))
           / IP(src=ip(h["ip"]["src"]), dst=ip(h["ip"]["dst"]), ttl=h["ip"]["ttl"],
                id=h["ip"]["identification"], flags=2 * h["ip"]["df"],
                tos=h["ip"]["dscp"] << 2 | h["ip"]["ecn"])
           / TCP(sport=t["sport"], dport=t["dport"], seq=t["seq"], ack=t["ack"],
                 flags=t["flags"], window=t["window"], options=options)
           / Raw(payload))
    frame = bytes(pkt)
    return frame + bytes(max(0, MIN_FRAME_BYTES - len(frame)))


def split_frames(payloads, width):
    """Output beats -> frames, checking the keep rules of hw.stream on the way."""
    frames, current = [], b""
    full = (1 << width // 8) - 1
    for p in payloads:
        beat = unpack_struct(packet_layout(width), p)
        keep = beat["keep"]
        assert keep != 0 and keep & (keep + 1) == 0, f"keep {keep:#x} is not a run from byte 0"
        assert beat["last"] or keep == full, "a beat that is not last must be full"
        current += unpack_beat(width, p)[0]
        if beat["last"]:
            frames.append(current)
            current = b""
    return frames, current


def payload_beats(payload, width, last_on=None):
    """The payload stream of one frame; ``last_on`` moves ``last`` to another beat (-1: none)."""
    if not payload:
        return []
    beats = frame_to_beats(payload, width)
    if last_on is None:
        return beats
    chunks = [unpack_beat(width, b)[0] for b in beats]
    return [pack_beat(width, c, i == last_on) for i, c in enumerate(chunks)]


# --- Shared drivers (any sim.bus adapter) -------------------------------------------------

async def clock(bus, agents, cycles):
    """Run ``agents`` for a fixed number of cycles."""
    ticks = iter(range(cycles))
    await run_until(bus, agents, lambda: next(ticks, None) is None, cycles + 1)


async def drive_and_check(bus, width, jobs, stall=0.3, seed=0):
    """Send ``jobs`` = [(header dict, payload bytes, payload beats)] and check every frame.

    Returns the list of received frames (for further checks by the caller)."""
    rng = random.Random(seed)
    headers = StreamSource(bus, "header", stall=stall, rng=random.Random(rng.random()))
    payload = StreamSource(bus, "payload", stall=stall, rng=random.Random(rng.random()))
    sink = StreamSink(bus, "o", stall=stall, rng=random.Random(rng.random()))
    expected = [scapy_frame(h, data) for h, data, _ in jobs]
    for h, _, beats in jobs:
        headers.send([pack_struct(TX_HEADER, **h)])
        payload.send(beats)
    total = sum(-(-len(f) // (width // 8)) for f in expected)
    await run_until(bus, [headers, payload, sink], lambda: len(sink.received) >= total,
                    max_cycles=20 * total + 1000)
    await clock(bus, [headers, payload, sink], 10)     # nothing more may come out
    frames, rest = split_frames(sink.received, width)
    assert rest == b"", "trailing beats without last"
    assert len(frames) == len(expected), f"{len(frames)} frames out, {len(expected)} expected"
    for n, (got, want) in enumerate(zip(frames, expected)):
        if got != want:
            raise AssertionError(f"frame {n} (header {jobs[n][0]}) differs:\n got  {got.hex()}\n want {want.hex()}")
    assert payload.idle and headers.idle
    return frames


def random_jobs(rng, width, count, **kw):
    jobs = []
    for _ in range(count):
        h = random_header(rng, **kw)
        data = rng.randbytes(h["payload_length"])
        jobs.append((h, data, payload_beats(data, width)))
    return jobs


class _Timestamps:
    """A passive agent recording the cycles of header and output transfers."""

    def __init__(self, bus):
        self.bus = bus
        self.header_cycles, self.out_cycles = [], []

    def drive(self):
        pass

    def sample(self):
        g = self.bus.get
        if g("header__valid") and g("header__ready"):
            self.header_cycles.append(self.bus.cycle)
        if g("o__valid") and g("o__ready"):
            self.out_cycles.append(self.bus.cycle)


BENCH_FRAME_SIZES = (60, 64, 128, 256, 512, 1024, 1518)


async def bench_builder(bus, width, frames_per_size=16, header_only_frames=200):
    """Throughput and latency of a running TxBuilder with an always-ready sink.

    For each frame size (no TCP options, so the payload is size - 54 bytes) a batch of
    back-to-back frames is sent; beats per cycle = output beats / cycles from the
    batch's first to its last output beat. Then ``header_only_frames`` back-to-back
    frames without payload. Works on ``AmaranthBus`` and ``CocotbBus``.

    Returns {"beats_per_cycle_min", "beats_per_cycle": {size or "header_only": value},
    "latency_cycles": cycles from the first header accepted to the first output beat}.
    """
    rng = random.Random(7)
    headers = StreamSource(bus, "header", rng=rng)
    payload = StreamSource(bus, "payload", rng=rng)
    sink = StreamSink(bus, "o")
    stamps = _Timestamps(bus)
    agents = [headers, payload, sink, stamps]
    result = {}
    latency = None
    batches = [(size, frames_per_size) for size in BENCH_FRAME_SIZES]
    batches.append(("header_only", header_only_frames))
    for size, count in batches:
        stamps.header_cycles.clear()
        stamps.out_cycles.clear()
        payload_length = 0 if size == "header_only" else size - FIXED_HEADER_BYTES
        expect = 0
        for _ in range(count):
            h = random_header(rng, payload_length=payload_length, combo=OPTION_COMBOS[0])
            headers.send([pack_struct(TX_HEADER, **h)])
            payload.send(payload_beats(rng.randbytes(payload_length), width))
            expect += -(-max(MIN_FRAME_BYTES, FIXED_HEADER_BYTES + payload_length) // (width // 8))
        await run_until(bus, agents, lambda: len(stamps.out_cycles) >= expect,
                        max_cycles=10 * expect + 1000)
        first, last = stamps.out_cycles[0], stamps.out_cycles[-1]
        result[size] = expect / (last - first + 1)
        if latency is None:
            latency = first - stamps.header_cycles[0]
    return {"beats_per_cycle_min": min(result.values()), "beats_per_cycle": result,
            "latency_cycles": latency}


def bench_builder_amaranth(width=64, **kw):
    """Run ``bench_builder`` on the built-in Amaranth simulator; returns its dict."""
    from amaranth.sim import Simulator
    from sim.bus import AmaranthBus

    dut = TxBuilder(width)
    sim = Simulator(dut)
    sim.add_clock(4e-9)
    out = {}

    async def bench(ctx):
        out.update(await bench_builder(AmaranthBus(ctx, dut), width, **kw))

    sim.add_testbench(bench)
    sim.run()
    return out


# --- cocotb tests (names must not start with test_) --------------------------------------

if cocotb is not None:
    from tb.cocotb_util import start
    from tb.harness import tb_params

    @cocotb.test()
    async def random_frames(dut):
        """Random headers, all option combinations, payload 0..1460, stalls everywhere."""
        bus = await start(dut)
        width = tb_params()["width"]
        count = 150 if width == 64 else 200
        await drive_and_check(bus, width, random_jobs(random.Random(1), width, count), seed=1)

    @cocotb.test()
    async def option_combinations(dut):
        """Every option combination with short payloads around the 60-byte padding edge."""
        bus = await start(dut)
        width = tb_params()["width"]
        rng = random.Random(2)
        jobs = []
        for combo in OPTION_COMBOS:
            for length in (0, 1, 5, 6, 7, rng.randrange(8, 200)):
                h = random_header(rng, payload_length=length, combo=combo)
                data = rng.randbytes(length)
                jobs.append((h, data, payload_beats(data, width)))
        await drive_and_check(bus, width, jobs, seed=2)

    @cocotb.test()
    async def smoke(dut):
        """A few random frames (the short test for the other widths)."""
        bus = await start(dut)
        width = tb_params()["width"]
        await drive_and_check(bus, width, random_jobs(random.Random(3), width, 12), seed=3)

    @cocotb.test()
    async def payload_mismatch(dut):
        """``last`` on the wrong payload beat: framing follows payload_length, counted."""
        bus = await start(dut)
        width = tb_params()["width"]
        rng = random.Random(4)
        jobs = []
        for last_on, length in ((0, 300), (-1, 200), (None, 100), (0, 5 * width // 8)):
            h = random_header(rng, payload_length=length)
            data = rng.randbytes(length)
            jobs.append((h, data, payload_beats(data, width, last_on)))
        await drive_and_check(bus, width, jobs, seed=4)
        assert bus.get("payload_mismatch") == 3, bus.get("payload_mismatch")

    @cocotb.test()
    async def oversize_dropped(dut):
        """A frame longer than max_frame_bytes is consumed, not sent, and counted."""
        bus = await start(dut)
        width = tb_params()["width"]
        rng = random.Random(5)
        big = random_header(rng, payload_length=1518)
        big_data = rng.randbytes(1518)
        jobs = random_jobs(rng, width, 2)
        # Send the oversize frame between two normal ones; only those two come out.
        headers = [jobs[0], (big, big_data, payload_beats(big_data, width)), jobs[1]]
        src_h = StreamSource(bus, "header", stall=0.3, rng=random.Random(1))
        src_p = StreamSource(bus, "payload", stall=0.3, rng=random.Random(2))
        sink = StreamSink(bus, "o", stall=0.3, rng=random.Random(3))
        for h, _, beats in headers:
            src_h.send([pack_struct(TX_HEADER, **h)])
            src_p.send(beats)
        want = [scapy_frame(h, data) for h, data, _ in (jobs[0], jobs[1])]
        total = sum(-(-len(f) // (width // 8)) for f in want)
        agents = [src_h, src_p, sink]
        await run_until(bus, agents, lambda: len(sink.received) >= total and src_p.idle, 20000)
        await clock(bus, agents, 20)
        frames, rest = split_frames(sink.received, width)
        assert frames == [scapy_frame(jobs[0][0], jobs[0][1]), scapy_frame(jobs[1][0], jobs[1][1])]
        assert bus.get("oversize_drops") == 1

    @cocotb.test()
    async def throughput(dut):
        """Back-to-back frames with an always-ready sink: 1.0 beat per cycle, no bubbles."""
        bus = await start(dut)
        width = tb_params()["width"]
        result = await bench_builder(bus, width, frames_per_size=8, header_only_frames=100)
        dut._log.info("TxBuilder W=%d: %s", width, result)
        assert result["beats_per_cycle_min"] >= 0.99, result


# --- pytest wrappers -------------------------------------------------------------------------

@pytest.mark.parametrize("width", [64, 512])
def test_builder(sim, width):
    from tb.harness import run_cocotb
    run_cocotb(TxBuilder, {"width": width}, "tb.test_builder", sim,
               testcase=["random_frames", "option_combinations", "payload_mismatch",
                         "oversize_dropped", "throughput"])


@pytest.mark.parametrize("width", [128, 256])
def test_builder_smoke(sim, width):
    from tb.harness import run_cocotb
    run_cocotb(TxBuilder, {"width": width}, "tb.test_builder", sim, testcase=["smoke"])
