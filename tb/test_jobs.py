"""Tests of sim.jobs: one job, run on the Amaranth simulator and on cocotb simulators.

The design is a stand-in, ``StreamRegister``: a one-stage register on a packet stream.
It is the smallest block with the NIC's stream ports (``i`` in, ``o`` out) and is also
used by tb/test_synth.py to check the synthesis flow.
"""

import random

import pytest
from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from hw.stream import beats_to_frame, frame_to_beats, packet_signature, unpack_beat
from sim.bus import StreamSink, StreamSource, run_until
from sim.jobs import JobError, job_path, run_job


class StreamRegister(wiring.Component):
    """A packet stream through one register stage: full throughput, one cycle of latency."""

    def __init__(self, width=64):
        self.width = width
        super().__init__({"i": In(packet_signature(width)), "o": Out(packet_signature(width))})

    def elaborate(self, platform):
        m = Module()
        # Take a new beat when the register is empty or its beat leaves this cycle.
        m.d.comb += self.i.ready.eq(~self.o.valid | self.o.ready)
        with m.If(self.i.ready):
            m.d.sync += [self.o.valid.eq(self.i.valid), self.o.payload.eq(self.i.payload)]
        return m


def random_frames(count, seed):
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(60, 300)) for _ in range(count)]


def split_frames(payloads, width):
    """Group received beat payloads into frames at each ``last``."""
    frames, current = [], []
    for payload in payloads:
        current.append(payload)
        if unpack_beat(width, payload)[1]:
            frames.append(beats_to_frame(current, width))
            current = []
    return frames


async def push_frames(bus, width=64, frames=8, seed=0, stall=0.0):
    """A job: send random frames into ``i``, collect them from ``o`` and compare."""
    sent = random_frames(frames, seed)
    source = StreamSource(bus, "i", stall=stall, rng=random.Random(seed + 1))
    sink = StreamSink(bus, "o", stall=stall, rng=random.Random(seed + 2))
    beats = 0
    for frame in sent:
        payloads = frame_to_beats(frame, width)
        source.send(payloads)
        beats += len(payloads)
    cycles = await run_until(bus, [source, sink], lambda: len(sink.received) == beats,
                             max_cycles=20 * beats + 100)
    received = split_frames(sink.received, width)
    return {"frames": len(received), "bytes": sum(map(len, received)), "beats": beats,
            "cycles": cycles, "match": received == sent}


async def failing_job(bus):
    """A job that fails after a few cycles."""
    for _ in range(3):
        await bus.edge()
    raise AssertionError("deliberate failure after 3 cycles")


def check_push_result(result, frames):
    value = result.value
    assert value["match"], "frames came out different from what went in"
    assert value["frames"] == frames
    assert value["bytes"] == sum(map(len, random_frames(frames, 0)))
    # Without stalls the register passes one beat per cycle, one cycle late.
    assert value["cycles"] == value["beats"] + 1
    assert result.cycles == value["cycles"]
    assert result.seconds > 0 and result.cycles_per_second > 0


@pytest.mark.parametrize("width", [64, 512])
def test_push_frames_amaranth(width):
    result = run_job(StreamRegister, {"width": width}, push_frames, sim="amaranth",
                     job_args={"width": width, "frames": 8})
    check_push_result(result, 8)


def test_push_frames_cocotb(sim):
    result = run_job(StreamRegister, {"width": 64}, push_frames, sim=sim,
                     job_args={"width": 64, "frames": 8})
    check_push_result(result, 8)


def test_stalls_amaranth():
    result = run_job(StreamRegister, {"width": 64}, push_frames, sim="amaranth",
                     job_args={"frames": 8, "stall": 0.3})
    assert result.value["match"]
    assert result.value["cycles"] > result.value["beats"] + 1


def test_waves_amaranth(tmp_path):
    vcd = tmp_path / "push.vcd"
    result = run_job(StreamRegister, {"width": 64}, push_frames, sim="amaranth",
                     job_args={"frames": 2}, waves=vcd)
    assert result.waves == str(vcd)
    assert vcd.stat().st_size > 0 and "$enddefinitions" in vcd.read_text()


def test_failing_job_amaranth():
    with pytest.raises(JobError, match="deliberate failure"):
        run_job(StreamRegister, {"width": 64}, failing_job, sim="amaranth")


def test_failing_job_cocotb(sim):
    with pytest.raises(JobError, match="deliberate failure"):
        run_job(StreamRegister, {"width": 64}, failing_job, sim=sim)


def test_job_must_be_importable():
    async def local_job(bus):
        return {}
    with pytest.raises(JobError, match="top level"):
        job_path(local_job)
    assert job_path(push_frames) == "tb.test_jobs:push_frames"


def test_unknown_simulator():
    with pytest.raises(JobError, match="unknown simulator"):
        run_job(StreamRegister, {}, push_frames, sim="modelsim")
