"""Testbench of ``RxDeliver``: the host's frames into its RX buffers, and every buffer back.

``sim.dma_responder`` plays the DMA engine and host memory; every stream stalls at random.

1. Buffers of random sizes (some too small for the next frame, some unreadable or
   misaligned) and frames of random sizes (14 .. the maximum) with random verdicts:
   every buffer comes back in one RX event, in order, with the right status; an OK
   buffer holds its frame byte for byte and the event its length and reason.
2. No buffers while maximum-size frames keep coming: the frame side never stalls, the
   frames that find no room are dropped whole and counted, and once buffers come the
   frames that were kept arrive, in order.

Amaranth simulator, Verilator and Icarus, W=64 and W=512.
"""

import random

import cocotb
import pytest

from hw.handshake import VERDICT
from hw.headers import MAX_FRAME_BYTES
from hw.host_formats import EVENT_ENTRY, RX_DESCRIPTOR, HostEventKind, RxStatus
from hw.ring_fetch import fetched_entry_layout
from hw.rx_deliver import RxDeliver
from hw.stream import frame_to_beats, pack_struct, unpack_struct
from sim.bus import StreamSink, StreamSource, run_cycles, run_until
from sim.dma_responder import DmaWriteResponder
from sim.pcie import HostMemory

BUFFERS = 0x300000
SLOT = 2048


async def rx_job(bus, width, seed=1, stall=0.3, count=40):
    rng = random.Random(seed)
    beat_bytes = width // 8
    memory = HostMemory()
    memory.register(BUFFERS, 4 * count * SLOT, "rx buffers")
    dma = DmaWriteResponder(bus, memory, width, stall=stall, rng=random.Random(rng.random()))
    frames = StreamSource(bus, "frame", stall=stall, rng=random.Random(rng.random()))
    # A verdict comes no later than its frame's first beat (the dispatcher's order).
    metas = StreamSource(bus, "meta", stall=0, rng=random.Random(rng.random()))
    bufs = StreamSource(bus, "buf", stall=stall, rng=random.Random(rng.random()))
    done = StreamSink(bus, "done", stall=stall, rng=random.Random(rng.random()))
    agents = [dma, frames, metas, bufs, done]
    layout = fetched_entry_layout(16)
    posted = 0

    def post(length, error=False, misaligned=False):
        nonlocal posted
        addr = BUFFERS + posted * SLOT + (rng.randrange(1, beat_bytes) if misaligned else 0)
        bufs.send([pack_struct(layout, index=posted, error=int(error),
                               data=pack_struct(RX_DESCRIPTOR, addr=addr, length=length))])
        posted += 1
        return addr

    def send(frame, reason):
        frames.send(frame_to_beats(frame, width))
        metas.send([pack_struct(VERDICT, to_host=1, reason=reason)])

    def events():
        return [unpack_struct(EVENT_ENTRY, p) for p in done.received]

    # 1. Buffers and frames; at most two frames waiting, so that none is dropped.
    expected = []                                 # (buffer index, status, frame, reason, addr)
    pending = [(rng.randbytes(rng.randrange(14, MAX_FRAME_BYTES + 1)), rng.randrange(16))
               for _ in range(count)]
    queue = list(pending)
    while queue:
        frame, reason = queue[0]
        case = rng.choices(["ok", "small", "bad", "misaligned"], [12, 2, 1, 1])[0]
        if case == "ok":
            addr = post(rng.randrange(len(frame), MAX_FRAME_BYTES + 64))
            expected.append((posted - 1, RxStatus.OK, frame, reason, addr))
            queue.pop(0)
        elif case == "small":
            post(rng.randrange(0, len(frame)))
            expected.append((posted - 1, RxStatus.TOO_LONG, None, 0, None))
            queue.pop(0)
        else:
            post(MAX_FRAME_BYTES, error=case == "bad", misaligned=case == "misaligned")
            expected.append((posted - 1, RxStatus.BAD_BUFFER, None, 0, None))
    sent = 0
    while len(done.received) < len(expected):
        statuses = [e["event"]["status"] for e in events()]
        consumed = sum(s != RxStatus.BAD_BUFFER for s in statuses)
        if sent < len(pending) and sent - consumed < 2:
            send(*pending[sent])
            sent += 1
        await run_cycles(bus, agents, 1)
        assert bus.cycle < 400000
    await run_cycles(bus, agents, 20)                # the last writes land
    for got, (index, status, frame, reason, addr) in zip(events(), expected):
        assert got["event"]["kind"] == HostEventKind.RX
        assert (got["ring_index"], got["event"]["status"]) == (index, status), index
        if status == RxStatus.OK:
            assert (got["length"], got["reason"]) == (len(frame), reason)
            assert memory.read(addr, len(frame)) == frame
    assert not dma.faults and bus.get("dropped") == 0

    # 2. No buffers: maximum-size frames back to back; the kept ones arrive later.
    burst = [rng.randbytes(MAX_FRAME_BYTES) for _ in range(6)]
    for frame in burst:
        send(frame, 3)
    await run_until(bus, agents, lambda: frames.idle and metas.idle, 20000)
    await run_cycles(bus, agents, 5)
    dropped = bus.get("dropped")
    kept = len(burst) - dropped
    assert 2 <= kept < len(burst)
    addrs = [post(MAX_FRAME_BYTES) for _ in range(kept)]
    before = len(done.received)
    await run_until(bus, agents, lambda: len(done.received) == before + kept, 20000)
    await run_cycles(bus, agents, 20)
    for got, addr, frame in zip(events()[before:], addrs, burst):
        assert got["event"]["status"] == RxStatus.OK and got["length"] == len(frame)
        assert memory.read(addr, len(frame)) == frame
    return {"buffers": posted, "dropped": dropped}


@cocotb.test()
async def rx_deliver(dut):
    from tb.cocotb_util import start
    from tb.harness import tb_params
    await rx_job(await start(dut), tb_params()["width"])


@pytest.mark.parametrize("width", [64, 512])
def test_rx_deliver_rtl(sim, width):
    from tb.harness import run_cocotb
    run_cocotb(RxDeliver, {"width": width}, "tb.test_rx_deliver", sim)


def test_rx_deliver_amaranth():
    from sim.jobs import run_job
    run_job(RxDeliver, {"width": 64}, rx_job, sim="amaranth", job_args={"width": 64, "count": 15})
