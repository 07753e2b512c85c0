"""Bench of the host interface alone: TX and RX throughput over the PCIe link model, latency.

``bench_host_interface(bus, width)`` runs on ``hw.host_interface.HostInterface`` with the
driver's lowest layer (``host_driver.device.NicDevice``) and the default PCIe link
(``sim.pcie.PcieLink``: Gen3 x8) at the datapath's clock (156.25 MHz at W=64, 250 MHz
at W=512); the datapath side is always ready (TX) or sends frames back to back (RX),
so the host interface and the link are the only possible bottlenecks.

* TX: the host posts a ring's worth of frames of one size (a completion asked on the
  last only, as a batching driver does) and rings the doorbell once; ``tx_gbps`` is the
  steady-state rate: the bytes of frames 2..N over the time from the end of frame 1 to
  the end of frame N on ``host_tx`` (the first frame's wait is ``latency_ns``).
* RX: frames back to back into ``host_rx``, with every RX buffer posted; ``rx_gbps`` is
  the steady-state rate of delivery: the bytes of RX events 2..N over the time from the
  first RX event in host memory to the last; frames the host side has no room for are
  dropped (``rx_delivered_fraction``: at W=512 the datapath offers more than PCIe Gen3
  x8 carries).
* ``pcie_efficiency_1500``: the lower of the two at 1500 bytes over the model's ideal
  for 1500-byte transfers in that direction (``sim.pcie.effective_bandwidth``: payload
  and TLP headers only, no descriptors, events or doorbells).
* ``bottleneck_efficiency_1500``: the same over the narrower of the link's ideal and the
  datapath's raw rate (``datapath_gbps``, W x clock: 10 Gb/s at W=64, where the datapath
  and not the link is the limit).
* ``latency_ns``: an isolated frame, doorbell to first beat on ``host_tx`` (TX), and
  first beat into ``host_rx`` to its RX event in host memory (RX).

Figures are cycle counts of the model; only ``sim_cycles_per_second`` depends on the
machine.
"""

import random

from host_driver.device import NicDevice
from hw.handshake import VERDICT
from hw.host_formats import HostEventKind, Ring
from hw.stream import frame_to_beats, pack_struct
from sim.bus import StreamSink, StreamSource
from sim.pcie import effective_bandwidth

SIZES = (64, 128, 256, 512, 1024, 1500)
_DATAPATH_SOURCES = ("host_rx", "host_rx_meta", "event", "table_resp")
_DATAPATH_SINKS = ("host_tx", "control", "close", "close_data", "splice", "table_cmd")


def clock_mhz(width):
    return 250.0 if width >= 512 else 156.25


async def bench_host_interface(bus, width, sizes=SIZES, count=64):
    rng = random.Random(1)
    sources = {name: StreamSource(bus, name) for name in _DATAPATH_SOURCES}
    sinks = {name: StreamSink(bus, name) for name in _DATAPATH_SINKS}
    mhz = clock_mhz(width)
    nic = NicDevice(bus, [*sources.values(), *sinks.values()], width=width, clock_mhz=mhz)
    await nic.bring_up()
    count = min(count, nic.rings[Ring.TX].size)
    ns_per_cycle = 1000.0 / mhz
    tx_out = sinks["host_tx"]
    figures = {"tx_gbps": {}, "rx_gbps": {}, "rx_delivered_fraction": {}}

    def gbps(nbytes, cycles):
        return round(nbytes * 8 / (cycles * ns_per_cycle), 3)

    events = []

    def poll():
        events.extend(nic.poll_events())

    for size in sizes:
        # ---- TX: a ring's worth of frames, one doorbell.
        beats_before = len(tx_out.received)
        indices = [nic.post_tx(rng.randbytes(size), completion=False, doorbell=False)
                   for _ in range(count - 1)]
        indices.append(nic.post_tx(rng.randbytes(size), completion=True, doorbell=False))
        nic.doorbell(Ring.TX)
        frame_beats = len(frame_to_beats(bytes(size), width))
        await nic.run_until(lambda: len(tx_out.received) - beats_before >= count * frame_beats)
        ends = tx_out.received_cycles[beats_before + frame_beats - 1::frame_beats]
        figures["tx_gbps"][size] = gbps((count - 1) * size, ends[-1] - ends[0])
        await nic.run_until(lambda: poll() or any(
            e["event"]["kind"] == HostEventKind.TX_DONE and e["ring_index"] == indices[-1]
            for e in events))
        for index in indices:
            nic.tx_done(index)
        events.clear()

        # ---- RX: frames back to back, buffers for all of them.
        frames = [rng.randbytes(size) for _ in range(count)]
        for frame in frames:
            sources["host_rx"].send(frame_to_beats(frame, width))
            sources["host_rx_meta"].send([pack_struct(VERDICT, to_host=1, reason=3)])
        rx_events = []                  # (cycle seen, event)

        def received():
            new = [e for e in nic.poll_events() if e["event"]["kind"] == HostEventKind.RX]
            for e in new:
                nic.repost_rx(e["ring_index"], doorbell=False)
            if new:
                nic.doorbell(Ring.RX)
                rx_events.extend((bus.cycle, e) for e in new)
            # Frames the host side had no room for are dropped (counted): wait for quiet.
            return len(rx_events) >= count or (sources["host_rx"].idle and rx_events
                                                and bus.cycle - rx_events[-1][0] > 3000)
        await nic.run_until(received)
        figures["rx_gbps"][size] = gbps(sum(e["length"] for _, e in rx_events[1:]),
                                        rx_events[-1][0] - rx_events[0][0])
        figures["rx_delivered_fraction"][size] = round(len(rx_events) / count, 3)

    # ---- latency of one isolated frame each way.
    await nic.run(200)
    index = nic.post_tx(rng.randbytes(64))
    start = bus.cycle
    before = len(tx_out.received)
    await nic.run_until(lambda: len(tx_out.received) > before)
    tx_latency = (tx_out.received_cycles[before] - start) * ns_per_cycle
    await nic.run_until(lambda: poll() or any(e["ring_index"] == index for e in events))
    nic.tx_done(index)
    sources["host_rx"].send(frame_to_beats(rng.randbytes(64), width))
    sources["host_rx_meta"].send([pack_struct(VERDICT, to_host=1, reason=3)])
    start = bus.cycle
    found = []
    await nic.run_until(lambda: found.extend(nic.poll_events()) or found)
    rx_latency = (bus.cycle - start) * ns_per_cycle

    ideal = {"tx": effective_bandwidth(1500, "read"), "rx": effective_bandwidth(1500, "write")}
    datapath_gbps = width * mhz / 1000
    if 1500 in sizes:
        figures["pcie_efficiency_1500"] = round(min(
            figures["tx_gbps"][1500] / ideal["tx"], figures["rx_gbps"][1500] / ideal["rx"]), 3)
        # Over the narrower of the link and the datapath (at W=64 the 10G datapath).
        figures["bottleneck_efficiency_1500"] = round(min(
            figures[f"{d}_gbps"][1500] / min(ideal[d], datapath_gbps) for d in ("tx", "rx")), 3)
    figures["ideal_gbps_1500"] = {k: round(v, 3) for k, v in ideal.items()}
    figures["datapath_gbps"] = round(datapath_gbps, 3)
    figures["latency_ns"] = {"tx_doorbell_to_wire": round(tx_latency, 1),
                             "rx_wire_to_event": round(rx_latency, 1)}
    figures["clock_mhz"] = mhz
    figures["dma_counters"] = {k: v for k, v in (await nic.diagnostics()).items()
                               if k.startswith("DMA_") or k.startswith("RX_")}
    figures["simulated_cycles"] = bus.cycle
    return figures
