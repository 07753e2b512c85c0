"""The whole NIC (``hw.nic.Nic``) through its host interface, with the driver's lowest layer.

``host_driver.device.NicDevice`` plays the host over the simulated PCIe link
(``sim.pcie_host.PcieHost`` with ``sim.pcie.PcieLink`` timing); scapy frames play the
wire. One session: bring-up (ID, capabilities, rings); commands (NOP, the table's hash
key, listeners, the cookie key, an unknown op) each answered by COMMAND_DONE; a frame
sent through the TX ring reaching the wire intact; an ARP from the wire landing in an
RX buffer with its RX event; a SYN answered on the wire by a cookie SYN-ACK and the final
ACK (with a request) giving an ESTABLISHED event and the request in an RX buffer;
registers read back (counters); faults: a TX descriptor outside the registered memory
(DMA_ERROR, nothing on the wire), a host index more than a ring ahead (the ring stops,
flagged, and recovers); the interrupt with count moderation. Amaranth simulator,
Verilator and Icarus.
"""

import random

import cocotb
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from hw.conn_table import Op as TableOp
from hw.conn_table import Status as TableStatus
from hw.handshake import Reason
from hw.host_formats import (TX_DESCRIPTOR, CommandOp, CommandStatus, HostCounter, HostEventKind,
                             Ring, RxStatus, TxFlag, TxStatus, entry_bytes)
from hw.registers import RingStatus
from hw.metadata import EventKind
from hw.nic import Nic
from hw.stream import frame_to_beats
from host_driver.device import NicDevice
from sim.bus import StreamSource
from sim.traffic import pad
from tb.test_handshake import LISTEN_IP, LISTENERS, Client
from tb.test_nic import FrameSink

PARAMS = {"width": 64, "entries": 256}


async def host_session(bus, width, seed=3, stall=0.1, verbose=False):
    rng = random.Random(seed)
    mac_rx = StreamSource(bus, "mac_rx", stall=stall, rng=random.Random(rng.random()))
    mac_tx = FrameSink(bus, "mac_tx", width, stall, random.Random(rng.random()))
    nic = NicDevice(bus, [mac_rx, mac_tx], width=width)
    events = []

    async def until_event(predicate, max_cycles=20_000):
        def found():
            events.extend(nic.poll_events())
            return any(predicate(e) for e in events)
        try:
            await nic.run_until(found, max_cycles)
        except TimeoutError:
            raise TimeoutError(f"no such event; the NIC: {await nic.diagnostics()}; events: "
                               f"{[(e['event']['kind'], e['ring_index']) for e in events]}")
        return next(e for e in events if predicate(e))

    def command_done(tag):
        return lambda e: (e["event"]["kind"] == HostEventKind.COMMAND_DONE
                          and e["command_tag"] == tag)

    # 1. Bring-up.
    log = print if verbose else (lambda *a: None)
    caps = await nic.bring_up()
    log("up", bus.cycle, caps)
    assert caps["width"] == width and caps["table_entries"] == PARAMS["entries"]

    # 2. Commands: each answered.
    nic.post_command(CommandOp.NOP, tag=1)
    assert (await until_event(command_done(1)))["event"]["status"] == CommandStatus.OK
    nic.post_command(CommandOp.TABLE, tag=2, body={"table": {
        "op": TableOp.SET_KEY, "hash_key": rng.getrandbits(128)}})
    done = await until_event(command_done(2))
    assert done["event"]["status"] == CommandStatus.OK
    assert done["table"]["status"] == TableStatus.OK
    for index, entry in LISTENERS.items():
        nic.post_command(CommandOp.LISTEN, tag=10 + index,
                         body={"listen": {"index": index, "entry": entry}})
    nic.post_command(CommandOp.SET_KEY, tag=30, body={"key": rng.getrandbits(128)})
    nic.post_command(77, tag=31)
    assert (await until_event(command_done(31)))["event"]["status"] == CommandStatus.UNKNOWN_OP
    for tag in [10 + index for index in LISTENERS] + [30]:
        assert next(e for e in events if command_done(tag)(e))["event"]["status"] == \
            CommandStatus.OK

    log("commands", bus.cycle)
    # 3. TX: a frame through the TX ring, out on the wire as it was.
    frame = bytes(pad(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                      / IP(src=LISTEN_IP, dst="198.51.100.99") / UDP(sport=5, dport=6)
                      / b"through the TX ring"))
    index = nic.post_tx(frame)
    tx_done = await until_event(lambda e: e["event"]["kind"] == HostEventKind.TX_DONE
                                and e["ring_index"] == index)
    assert tx_done["event"]["status"] == TxStatus.OK
    nic.tx_done(index)
    await nic.run_until(lambda: mac_tx.frames, 20000)
    assert mac_tx.frames.pop(0) == frame

    log("tx", bus.cycle)
    # 4. RX: an ARP from the wire into an RX buffer.
    client = Client(rng, 80)
    arp = bytes(pad(Ether(dst="ff:ff:ff:ff:ff:ff", src=client.mac) / ARP(pdst=LISTEN_IP)))
    mac_rx.send(frame_to_beats(arp, width))
    rx = await until_event(lambda e: e["event"]["kind"] == HostEventKind.RX)
    assert rx["event"]["status"] == RxStatus.OK and rx["reason"] == Reason.NOT_TCP
    assert nic.rx_frame(rx["ring_index"], rx["length"]) == arp
    nic.repost_rx(rx["ring_index"])

    log("rx", bus.cycle)
    # 5. A handshake on the NIC: SYN-ACK on the wire; the final ACK's request to the host.
    mac_rx.send(frame_to_beats(client.syn(), width))
    await nic.run_until(lambda: mac_tx.frames, 50000)
    synack = Ether(mac_tx.frames.pop(0))
    assert int(synack[TCP].flags) == 0x12 and synack[TCP].ack == (client.isn + 1) & 0xFFFFFFFF
    options = dict(synack[TCP].options)
    request = b"GET / HTTP/1.1\r\n\r\n"
    ack = client.final_ack({"tcp": {"seq": synack[TCP].seq},
                            "opt": {"ts_valid": int("Timestamp" in options),
                                    "tsval": options.get("Timestamp", (0, 0))[0]}},
                           payload=request)
    mac_rx.send(frame_to_beats(ack, width))
    established = await until_event(lambda e: e["event"]["kind"] == EventKind.ESTABLISHED)
    assert established["event"]["irs"] == client.isn
    assert established["event"]["iss"] == synack[TCP].seq
    data = await until_event(lambda e: e["event"]["kind"] == HostEventKind.RX
                             and e["reason"] == Reason.COOKIE_OK)
    delivered = Ether(nic.rx_frame(data["ring_index"], data["length"]))
    assert bytes(delivered[TCP].payload)[:len(request)] == request

    log("handshake", bus.cycle)
    # 6. Statistics through BAR 0.
    await nic.run(50)
    assert await nic.read("HOST_COUNTERS", HostCounter.TX_FRAMES) == 1
    assert await nic.read("HOST_COUNTERS", HostCounter.RX_DELIVERED) == 2
    assert await nic.read("HANDSHAKE_COUNTERS", Reason.SYN_COOKIE) == 1
    assert await nic.read("FLOWS") == 1
    assert not nic.host.faults

    # 7. Faults. A TX descriptor pointing outside the host memory the driver registered:
    # the host answers UR, TX_DONE says DMA_ERROR, nothing reaches the wire.
    bad_index = nic._put(Ring.TX, entry_bytes(TX_DESCRIPTOR, addr=0x1000, length=200,
                                                flags=TxFlag.COMPLETION))
    nic.doorbell(Ring.TX)
    bad = await until_event(lambda e: e["event"]["kind"] == HostEventKind.TX_DONE
                            and e["ring_index"] == bad_index)
    assert bad["event"]["status"] == TxStatus.DMA_ERROR
    assert len(nic.host.faults) == 1 and nic.host.faults[0].startswith("read")
    nic.host.faults.clear()
    await nic.run(100)
    assert not mac_tx.frames
    assert await nic.read("HOST_COUNTERS", HostCounter.TX_BAD) == 1
    # The host posts more TX entries than the ring holds: the ring stops, flagged, and
    # fetches nothing until the host index is right again; then it goes on.
    ring = nic.rings[Ring.TX]
    nic._write_ring(Ring.TX, "HOST_INDEX", ring.host_index + ring.size + 1)
    await nic.run(30)
    assert await nic.read("TX_STATUS") == RingStatus.OVERFLOW
    assert await nic.read("TX_NIC_INDEX") == ring.host_index
    nic.doorbell(Ring.TX)
    await nic.run(30)
    assert await nic.read("TX_STATUS") == 0
    index = nic.post_tx(frame)
    await until_event(lambda e: e["event"]["kind"] == HostEventKind.TX_DONE
                      and e["ring_index"] == index)
    nic.tx_done(index)
    await nic.run_until(lambda: mac_tx.frames, 20000)
    assert mac_tx.frames.pop(0) == frame

    # 8. The interrupt: with moderation by count (2 events), one interrupt per two events;
    # the events written while it was off are announced as soon as it is on.
    assert not nic.host.interrupts
    nic.write("IRQ_COUNT", 2)
    nic.write("IRQ_TIME", 100_000)
    nic.write("IRQ_ENABLE", 1)
    await nic.run(50)
    assert [vector for vector, _ in nic.host.interrupts] == [0]
    before = len(nic.host.interrupts)
    for tag in (40, 41, 42, 43):
        nic.post_command(CommandOp.NOP, tag=tag)
    await until_event(command_done(43))
    await nic.run(50)
    assert [vector for vector, _ in nic.host.interrupts[before:]] == [0, 0]
    nic.write("IRQ_ENABLE", 0)
    assert not nic.host.faults
    return {"cycles": bus.cycle, "events": len(events), **nic.counts}


@cocotb.test()
async def host_interface(dut):
    from tb.cocotb_util import start
    await host_session(await start(dut), PARAMS["width"])


def test_host_interface_rtl(sim):
    from tb.harness import run_cocotb
    run_cocotb(Nic, PARAMS, "tb.test_host_interface", sim)


def test_host_interface_amaranth():
    from sim.jobs import run_job
    run_job(Nic, PARAMS, host_session, sim="amaranth", job_args={"width": 64})
