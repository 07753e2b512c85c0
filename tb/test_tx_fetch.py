"""Testbench of ``TxFetch``: frames read from host memory, whole, in order, or refused.

Descriptors come in as a ``RingFetcher`` hands them on; ``sim.dma_responder`` serves the
reads from a ``sim.pcie.HostMemory`` with latency; every stream stalls at random. A
random mix of good frames (14 bytes .. the maximum, with and without a completion
request) and bad ones (too short, too long, misaligned, outside host memory, an entry
the fetcher could not read) must give exactly the good frames on ``o``, in order, byte
for byte, and the TX_DONE events the host asked for or must hear of, in order.
Amaranth simulator, Verilator and Icarus, W=64 and W=512.
"""

import random

import cocotb
import pytest

from hw.headers import MAX_FRAME_BYTES
from hw.host_formats import EVENT_ENTRY, TX_DESCRIPTOR, HostEventKind, TxFlag, TxStatus
from hw.ring_fetch import fetched_entry_layout
from hw.stream import beats_to_frame, pack_struct, packet_layout, unpack_struct
from hw.tx_fetch import MIN_TX_FRAME, TxFetch
from sim.bus import StreamSink, StreamSource, run_until
from sim.dma_responder import DmaReadResponder
from sim.pcie import HostMemory

BUFFERS = 0x200000


def split_frames(width, payloads):
    """Frames (bytes) from a list of beat payloads."""
    frames, beats = [], []
    for p in payloads:
        beats.append(p)
        if unpack_struct(packet_layout(width), p)["last"]:
            frames.append(beats_to_frame(beats, width))
            beats = []
    return frames


async def tx_job(bus, width, seed=1, stall=0.3, count=80):
    rng = random.Random(seed)
    memory = HostMemory()
    memory.register(BUFFERS, count * 2048, "frames")
    dma = DmaReadResponder(bus, memory, width, latency=rng.randrange(5, 60), stall=stall,
                           rng=random.Random(rng.random()))
    descs = StreamSource(bus, "desc", stall=stall, rng=random.Random(rng.random()))
    out = StreamSink(bus, "o", stall=stall, rng=random.Random(rng.random()))
    done = StreamSink(bus, "done", stall=stall, rng=random.Random(rng.random()))
    agents = [dma, descs, out, done]
    beat_bytes = width // 8
    frames, events = [], []
    layout = fetched_entry_layout(16)
    for index in range(count):
        addr = BUFFERS + index * 2048
        length = rng.randrange(MIN_TX_FRAME, MAX_FRAME_BYTES + 1)
        flags = TxFlag.COMPLETION if rng.random() < 0.5 else 0
        case = rng.choices(["good", "short", "long", "misaligned", "unreadable", "error"],
                           [10, 1, 1, 1, 1, 1])[0]
        status = TxStatus.OK
        if case == "short":
            length, status = rng.randrange(0, MIN_TX_FRAME), TxStatus.BAD_DESCRIPTOR
        elif case == "long":
            length, status = rng.randrange(MAX_FRAME_BYTES + 1, 1 << 16), TxStatus.BAD_DESCRIPTOR
        elif case == "misaligned":
            addr, status = addr + rng.randrange(1, beat_bytes), TxStatus.BAD_DESCRIPTOR
        elif case == "unreadable":
            addr, status = 0x7000000 + index * 2048, TxStatus.DMA_ERROR
        elif case == "error":
            status = TxStatus.BAD_DESCRIPTOR
        frame = rng.randbytes(length)
        if case == "good":
            memory.write(addr, frame)
            frames.append(frame)
        if flags or status != TxStatus.OK:
            events.append((index, status))
        descs.send([pack_struct(layout, index=index, error=int(case == "error"),
                                data=pack_struct(TX_DESCRIPTOR, addr=addr, length=length,
                                                 flags=flags))])

    def finished():
        return len(done.received) == len(events) and out.received and \
            len(split_frames(width, out.received)) == len(frames)
    await run_until(bus, agents, finished, 400000)
    assert split_frames(width, out.received) == frames
    got = [unpack_struct(EVENT_ENTRY, p) for p in done.received]
    assert all(e["event"]["kind"] == HostEventKind.TX_DONE for e in got)
    assert [(e["ring_index"], e["event"]["status"]) for e in got] == events
    return {"frames": len(frames), "events": len(events)}


@cocotb.test()
async def tx_fetch(dut):
    from tb.cocotb_util import start
    from tb.harness import tb_params
    await tx_job(await start(dut), tb_params()["width"])


@pytest.mark.parametrize("width", [64, 512])
def test_tx_fetch_rtl(sim, width):
    from tb.harness import run_cocotb
    run_cocotb(TxFetch, {"width": width}, "tb.test_tx_fetch", sim)


def test_tx_fetch_amaranth():
    from sim.jobs import run_job
    run_job(TxFetch, {"width": 64}, tx_job, sim="amaranth", job_args={"width": 64, "count": 30})
