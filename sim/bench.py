"""Benchmarks: throughput (beats per cycle), latency (cycles), simulation speed.

``run(block, width, sim)`` runs the bench job of ``block`` on the chosen simulator
(the built-in Amaranth simulator, Verilator or Icarus, through ``sim.jobs.run_job``)
and returns a dict of figures; ``acceltcp bench`` prints it. Figures are measured
with always-ready sinks (the block is the only possible bottleneck) and are exact
cycle counts, so they do not depend on the machine; only ``sim_cycles_per_second``
does.
"""

import random

from hw.stream import frame_to_beats
from sim.bus import StreamSink, StreamSource, run_until
from sim.traffic import tcp_frame

__all__ = ["FRAME_SIZES", "tcp_frame_of_size", "parser_bench", "run", "BENCHES"]

#: Frame sizes (bytes, without FCS) measured by every packet bench.
FRAME_SIZES = (60, 64, 65, 128, 256, 512, 1024, 1500, 1518)


def tcp_frame_of_size(rng, size):
    """A valid TCP frame of exactly ``size`` bytes (60..1518)."""
    header = len(tcp_frame(rng, "PA"))      # 60 (padded) for a bare header
    payload = max(0, size - 54)
    frame = tcp_frame(rng, "PA", rng.randbytes(payload)) if payload else tcp_frame(rng, "PA")
    assert len(frame) == max(size, header), (len(frame), size)
    return frame


async def _stream_frames(bus, width, frames, extra_sinks=("meta",)):
    """Send ``frames`` back to back into ``i`` with always-ready sinks; return
    (source, sinks, cycles)."""
    src = StreamSource(bus, "i")
    out = StreamSink(bus, "o")
    sinks = {name: StreamSink(bus, name) for name in extra_sinks}
    for frame in frames:
        src.send(frame_to_beats(frame, width))
    total = sum(len(frame_to_beats(f, width)) for f in frames)
    first = dict(sinks)

    def done():
        return src.sent == total and all(len(s.received) >= len(frames) for s in first.values())

    cycles = await run_until(bus, [src, out, *sinks.values()], done, max_cycles=50 * total + 1000)
    return src, out, sinks, cycles


def _rate(cycle_stamps):
    """Beats per cycle between the first and the last stamped beat."""
    if len(cycle_stamps) < 2:
        return 1.0
    return len(cycle_stamps) / (cycle_stamps[-1] - cycle_stamps[0] + 1)


async def parser_bench(bus, width):
    """Parser: input beats per cycle for every frame size and for back-to-back minimum
    frames, and latency from a frame's first (and last) beat to its metadata record."""
    rng = random.Random(1)
    start_cycle = bus.cycle
    per_size = {}
    for size in FRAME_SIZES:
        beats_per_frame = len(frame_to_beats(bytes(size), width))
        count = max(8, 256 // beats_per_frame)
        frames = [tcp_frame_of_size(rng, size) for _ in range(count)]
        src, _, _, _ = await _stream_frames(bus, width, frames)
        per_size[size] = round(_rate(src.sent_cycles), 4)
    frames = [tcp_frame_of_size(rng, 60) for _ in range(200)]
    src, _, sinks, _ = await _stream_frames(bus, width, frames)
    back_to_back = round(_rate(src.sent_cycles), 4)
    records_per_cycle = round(_rate(sinks["meta"].received_cycles), 4)
    # Latency of one isolated minimum frame.
    for _ in range(4):
        await bus.edge()
    src, _, sinks, _ = await _stream_frames(bus, width, [tcp_frame_of_size(rng, 60)])
    first_in, last_in = src.sent_cycles[0], src.sent_cycles[-1]
    meta_out = sinks["meta"].received_cycles[0]
    cycles = bus.cycle - start_cycle
    return {
        "block": "parser",
        "width": width,
        "beats_per_cycle_min": min(min(per_size.values()), back_to_back),
        "beats_per_cycle": per_size,
        "back_to_back_min_frames_beats_per_cycle": back_to_back,
        "records_per_cycle_back_to_back": records_per_cycle,
        "latency_cycles": meta_out - first_in,
        "latency_after_last_beat_cycles": meta_out - last_in,
        "simulated_cycles": cycles,
    }


def _bench_job(block):
    """The async bench job of ``block`` (the TX benches live with their testbenches)."""
    if block == "parser":
        return parser_bench
    if block == "builder":
        from tb.test_builder import bench_builder
        return bench_builder
    if block == "checksum_insert":
        from tb.test_checksum_insert import bench_inserter
        return bench_inserter
    if block == "conn_table":
        from tb.test_conn_table import bench_conn_table
        return bench_conn_table
    if block == "handshake":
        from tb.test_nic import bench_handshake
        return bench_handshake
    if block == "teardown":
        from tb.test_teardown import bench_teardown
        return bench_teardown
    if block == "splice":
        from tb.test_splice import bench_splice
        return bench_splice
    if block == "dma":
        from tb.test_dma import bench_dma_figures
        return bench_dma_figures
    if block == "host":
        from tb.bench_host import bench_host_interface
        return bench_host_interface
    raise KeyError(block)


BENCHES = ("parser", "builder", "checksum_insert", "conn_table", "handshake", "teardown",
           "splice", "dma", "host")

#: Benches that measure a block inside the NIC: the component they run on.
IN_NIC = {"handshake": ("hw.datapath:Datapath", {"width": 64, "entries": 4096}),
          "teardown": ("hw.datapath:Datapath", {"width": 64, "entries": 4096}),
          "splice": ("hw.datapath:Datapath", {"width": 64, "entries": 4096}),
          "host": ("hw.host_interface:HostInterface", {"width": 64})}


def run(block, width=64, sim="amaranth", waves=None, entries=None):
    """Run the bench of ``block`` and return its figures."""
    from sim.blocks import get_block
    from sim.jobs import run_job
    if block not in BENCHES:
        raise KeyError(f"no bench for {block!r}; benches exist for: {', '.join(sorted(BENCHES))}")
    if block in IN_NIC:
        from sim.blocks import Block
        entry = Block(*IN_NIC[block])
    else:
        entry = get_block(block)
    params = dict(entry.params)
    if "width" in params:                               # table blocks have no width
        params["width"] = width
    job_args = {"width": width}
    if entries is not None:                             # `--entries N` for table blocks
        params["entries"] = job_args["entries"] = entries
    result = run_job(entry.component_class(), params, _bench_job(block), sim=sim,
                     job_args=job_args, waves=waves)
    figures = {"block": block, "width": width}
    figures.update(result.value)
    figures["sim"] = sim
    figures["sim_cycles_per_second"] = round(result.cycles_per_second, 1)
    figures["wall_seconds"] = round(result.total_seconds, 2)
    if block == "host":
        # Host work per short transaction, with and without the offloads: the driver's
        # servers on the whole NIC (W=64; the host side does not change with the width).
        from tb.test_driver import host_work_figures
        figures["per_transaction"] = host_work_figures(sim=sim)
    return figures
