"""End-to-end tests of the NIC datapath (hw.datapath.Datapath): scapy clients on the wire, the host on plain streams.

The clients' frames go in on ``mac_rx`` beat by beat; everything the NIC sends on
``mac_tx`` is parsed back with scapy and checked (checksums recomputed by scapy, flags,
sequence numbers, options); events and host frames are checked against what the clients
did. Random stalls on every stream.
"""

import random

import cocotb
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Ether

from hw.conn_table import Op, Status, command_layout, response_layout
from hw.handshake import VERDICT, ControlOp, Reason, control_layout
from hw.metadata import EVENT, FLOW_VALUE, EventKind
from hw.datapath import Datapath
from hw.stream import beats_to_frame, frame_to_beats, pack_struct, unpack_struct
from sim.bus import StreamSink, StreamSource, run_until
from sim.demo import _checksums_ok
from sim.traffic import pad
from tb.test_handshake import LISTEN_IP, LISTENERS, Client, Server, connect_request, ip_int

CLOSED_PORT = 22


class FrameSink:
    """A packet sink that cuts beats into frames."""

    def __init__(self, bus, name, width, stall, rng):
        self.sink = StreamSink(bus, name, stall=stall, rng=rng)
        self.width = width
        self._beats = []
        self.frames = []

    def drive(self):
        self.sink.drive()

    def sample(self):
        before = len(self.sink.received)
        self.sink.sample()
        for beat in self.sink.received[before:]:
            self._beats.append(beat)
            if beat >> (self.width + self.width // 8) & 1:
                self.frames.append(beats_to_frame(self._beats, self.width))
                self._beats = []
        self.sink.received.clear()


class NicBench:
    def __init__(self, bus, width, stall, seed):
        self.bus, self.width = bus, width
        rng = self.rng = random.Random(seed)

        def r():
            return random.Random(rng.random())
        self.mac_rx = StreamSource(bus, "mac_rx", stall=stall, rng=r())
        self.host_tx = StreamSource(bus, "host_tx", stall=stall, rng=r())
        self.control = StreamSource(bus, "control", stall=stall, rng=r())
        self.table_cmd = StreamSource(bus, "table_cmd", stall=stall, rng=r())
        self.mac_tx = FrameSink(bus, "mac_tx", width, stall, r())
        self.host_rx = FrameSink(bus, "host_rx", width, stall, r())
        self.host_rx_meta = StreamSink(bus, "host_rx_meta", stall=stall, rng=r())
        self.event = StreamSink(bus, "event", stall=stall, rng=r())
        self.table_resp = StreamSink(bus, "table_resp", stall=stall, rng=r())
        self.close = StreamSource(bus, "close", stall=stall, rng=r())
        self.close_data = StreamSource(bus, "close_data", stall=stall, rng=r())
        self.splice = StreamSource(bus, "splice", stall=stall, rng=r())
        self.agents = [self.mac_rx, self.host_tx, self.control, self.table_cmd, self.mac_tx,
                       self.host_rx, self.host_rx_meta, self.event, self.table_resp,
                       self.close, self.close_data, self.splice]
        for port in ("cookie_period", "ts_period", "rst_bad_cookie", "syn_rto", "syn_retries",
                     "tick_period", "fin_rto", "fin2_timeout", "time_wait", "fin_retries",
                     "idle_timeout", "linger"):
            bus.set(port, 0)

    async def until(self, done, max_cycles=20000):
        return await run_until(self.bus, self.agents, done, max_cycles=max_cycles)

    async def setup(self, listeners=16):
        self.table_cmd.send([self._table_command(Op.SET_KEY, hash_key=self.rng.getrandbits(128))])
        await self.until(lambda: len(self.table_resp.received) == 1)
        assert unpack_struct(self._resp_layout, self.table_resp.received[0])["status"] == Status.OK
        layout = control_layout(listeners)
        for index, entry in LISTENERS.items():
            self.control.send([pack_struct(layout, op=ControlOp.WRITE_LISTENER, index=index,
                                           entry=entry)])
        self.control.send([pack_struct(layout, op=ControlOp.SET_KEY,
                                       key=self.rng.getrandbits(128))])
        await self.until(lambda: self.control.idle)

    def _table_command(self, op, **fields):
        from hw.conn_table import Geometry
        geo = Geometry(self.entries, stash=4, max_moves=256)
        self._resp_layout = response_layout(geo, FLOW_VALUE.size)
        return pack_struct(command_layout(geo, FLOW_VALUE.size), op=op, **fields)

    def send(self, frames):
        for frame in frames:
            self.mac_rx.send(frame_to_beats(frame, self.width))

    def events(self):
        return [unpack_struct(EVENT, e) for e in self.event.received]

    def host_reasons(self):
        return [unpack_struct(VERDICT, v)["reason"] for v in self.host_rx_meta.received]


def tx_segments(frames):
    """scapy views of the TCP frames sent on mac_tx (checksums checked)."""
    out = []
    for frame in frames:
        assert _checksums_ok(frame), Ether(frame).show(dump=True)
        out.append(Ether(frame))
    return out


async def nic_session(bus, width, entries=256, clients=12, stall=0.2, seed=1):
    """Handshakes through the whole NIC, then data on the established connections, host
    frames out, SYNs to a closed port, forged ACKs."""
    bench = NicBench(bus, width, stall, seed)
    bench.entries = entries
    rng = bench.rng
    await bench.setup()

    # 1. SYNs (every option layout) to offloaded listeners, one to a closed port, an ARP.
    group = [Client(rng, rng.choice([80, 443, 6379])) for _ in range(clients)]
    closed = Client(rng, CLOSED_PORT)
    arp = pad(Ether(dst="ff:ff:ff:ff:ff:ff", src=group[0].mac) / ARP(pdst=LISTEN_IP))
    bench.send([c.syn() for c in group] + [closed.syn(), arp])
    await bench.until(lambda: len(bench.mac_tx.frames) == clients + 1
                      and len(bench.host_rx.frames) == 1)
    segments = tx_segments(bench.mac_tx.frames)
    synacks = {}
    for seg in segments:
        tcp = seg[TCP]
        if int(tcp.flags) == 0x14:                       # RST/ACK for the closed port
            assert tcp.dport == closed.sport and tcp.ack == (closed.isn + 1) & 0xFFFFFFFF
            continue
        assert int(tcp.flags) == 0x12, tcp.flags
        client = next(c for c in group if c.sport == tcp.dport)
        assert tcp.ack == (client.isn + 1) & 0xFFFFFFFF and seg[IP].src == client.dst
        options = dict(tcp.options)
        entry = next(e for e in LISTENERS.values()
                     if e["port"] == client.dport and e["ip"] in (0, ip_int(client.dst)))
        assert options["MSS"] == entry["mss"]
        assert ("Timestamp" in options) == (client.uses_ts and bool(entry["ts_ok"]))
        synacks[client] = {"tcp": {"seq": tcp.seq},
                           "opt": {"ts_valid": int("Timestamp" in options),
                                   "tsval": options.get("Timestamp", (0, 0))[0]}}
    assert len(synacks) == clients
    assert Ether(bench.host_rx.frames[0]).haslayer(ARP)
    bench.mac_tx.frames.clear()

    # 2. Final ACKs, half of them with data: one event each; data goes to the host.
    payloads = {c: (rng.randbytes(rng.randrange(1, 300)) if k % 2 else b"")
                for k, c in enumerate(group)}
    bench.send([c.final_ack(synacks[c], payload=payloads[c]) for c in group])
    with_data = sum(1 for p in payloads.values() if p)
    await bench.until(lambda: len(bench.event.received) == clients
                      and len(bench.host_rx.frames) == 1 + with_data)
    for event in bench.events():
        client = next(c for c in group if c.sport == event["peer_port"])
        assert event["kind"] == EventKind.ESTABLISHED
        assert event["iss"] == synacks[client]["tcp"]["seq"]
        assert event["irs"] == client.isn and event["ts_ok"] == synacks[client]["opt"]["ts_valid"]
        assert event["payload_length"] == len(payloads[client])
    for frame in bench.host_rx.frames[1:]:
        seg = Ether(frame)
        client = next(c for c in group if c.sport == seg[TCP].sport)
        assert bytes(seg[TCP].payload)[:len(payloads[client])] == payloads[client]
    assert bench.host_reasons()[1:] == [Reason.COOKIE_OK] * with_data

    # 3. The flows are in the table; their next segments go to the host.
    await bench.until(lambda: bus.get("flows") == clients, max_cycles=5000)
    assert bus.get("insert_failures") == 0
    before = len(bench.host_rx.frames)
    bench.send([c.frame("PA", c.isn + 1 + len(payloads[c]), ack=synacks[c]["tcp"]["seq"] + 1,
                        payload=b"GET / HTTP/1.1\r\n\r\n") for c in group])
    await bench.until(lambda: len(bench.host_rx.frames) == before + clients)
    assert bench.host_reasons()[-clients:] == [Reason.FLOW] * clients

    # 4. Forged ACKs: dropped, no event.
    forged = [Client(rng, 80).frame("A", rng.getrandbits(32), ack=rng.getrandbits(32))
              for _ in range(50)]
    bench.send(forged)
    await bench.until(lambda: bench.mac_rx.idle)
    await bench.until(lambda: bus.get("counters") >> (32 * Reason.COOKIE_BAD) & 0xFFFFFFFF == 50,
                      max_cycles=3000)
    assert len(bench.event.received) == clients

    # 5. Host frames leave with their checksums completed.
    host_frames = []
    for client in group[:4]:
        seg = (Ether(src="02:00:00:00:00:01", dst=client.mac)
               / IP(src=client.dst, dst=client.src, chksum=0)
               / TCP(sport=client.dport, dport=client.sport, flags="PA", chksum=0,
                     seq=synacks[client]["tcp"]["seq"] + 1) / (b"HTTP/1.1 200 OK\r\n" * 3))
        host_frames.append(pad(bytes(seg)))
    for frame in host_frames:
        bench.host_tx.send(frame_to_beats(frame, width))
    await bench.until(lambda: len(bench.mac_tx.frames) == len(host_frames))
    tx_segments(bench.mac_tx.frames)
    bench.mac_tx.frames.clear()

    # 6. Active open: CONNECT, SYN on the wire, the server's SYN-ACK, our ACK, the event,
    #    and the server's data then goes to the host.
    bus.set("syn_rto", 100000)
    bus.set("syn_retries", 3)
    req = connect_request(rng)
    bench.control.send([pack_struct(control_layout(16), op=ControlOp.CONNECT, connect=req)])
    await bench.until(lambda: len(bench.mac_tx.frames) == 1)
    syn, = tx_segments(bench.mac_tx.frames)
    assert int(syn[TCP].flags) == 0x02 and syn[TCP].seq == req["iss"]
    assert dict(syn[TCP].options)["MSS"] == req["mss"]
    server = Server(rng, req)
    events_before = len(bench.event.received)
    bench.send([server.frame("SA", options=[("MSS", 1300), ("NOP", None), ("WScale", 4)])])
    await bench.until(lambda: len(bench.mac_tx.frames) == 2
                      and len(bench.event.received) == events_before + 1)
    ack = tx_segments(bench.mac_tx.frames[1:])[0]
    assert int(ack[TCP].flags) == 0x10 and ack[TCP].ack == (server.isn + 1) & 0xFFFFFFFF
    event = bench.events()[-1]
    assert event["active"] and event["irs"] == server.isn and event["mss"] == 1300
    await bench.until(lambda: bus.get("flows") == clients + 1, max_cycles=5000)
    before = len(bench.host_rx.frames)
    bench.send([server.frame("PA", seq=server.isn + 1, options=[])])
    await bench.until(lambda: len(bench.host_rx.frames) == before + 1)
    assert bench.host_reasons()[-1] == Reason.FLOW
    return {"clients": clients, "events": len(bench.event.received),
            "host_frames": len(bench.host_rx.frames), "cycles": bus.cycle}


@cocotb.test()
async def nic_handshakes(dut):
    from tb.cocotb_util import start
    from tb.harness import tb_params
    params = tb_params()
    result = await nic_session(await start(dut), params["width"], entries=params["entries"])
    dut._log.info(f"NIC session: {result}")


@pytest.mark.parametrize("width", [64, 512])
def test_nic_rtl(sim, width):
    from tb.harness import run_cocotb
    run_cocotb(Datapath, {"width": width, "entries": 256}, "tb.test_nic", sim)


# ----------------------------------------------------------------------------- bench

#: Clock of each datapath width (MHz) and the minimum-frame line rate it serves (Mpps).
CLOCK_MHZ = {64: 156.25, 512: 250.0}
LINE_RATE_MPPS = {64: 14.88, 512: 148.8}


async def bench_handshake(bus, width, entries=4096, syns=200, forged=2000, seed=5):
    """Back-to-back SYNs (60-byte frames, MSS option only, and 74-byte Linux SYNs) at
    line rate with always-ready sinks, then forged ACKs; returns the figures of
    ``acceltcp bench handshake``."""
    bench = NicBench(bus, width, 0.0, seed)
    bench.entries = entries
    rng = bench.rng
    await bench.setup()
    figures = {"width": width, "clock_mhz": CLOCK_MHZ.get(width),
               "line_rate_mpps": LINE_RATE_MPPS.get(width)}
    first_beats = []                      # mac_tx cycle of each frame's first beat
    sink = bench.mac_tx.sink
    original_sample = bench.mac_tx.sample

    def sample():
        starting = not bench.mac_tx._beats
        before = len(sink.received_cycles)
        original_sample()
        if starting and len(sink.received_cycles) > before:
            first_beats.append(sink.received_cycles[before])
    bench.mac_tx.sample = sample
    for layout in ("mss_only", "linux"):
        clients = [Client(rng, 80, layout=layout) for _ in range(syns)]
        frames = [c.syn() for c in clients]
        sent_before = len(bench.mac_rx.sent_cycles)
        out_before = len(bench.mac_tx.frames)
        first_before = len(first_beats)
        bench.send(frames)
        await bench.until(lambda: len(bench.mac_tx.frames) == out_before + syns,
                          max_cycles=100 * syns + 2000)
        await bench.until(lambda: bench.mac_tx.sink.received_cycles[-1] + 200 < bus.cycle,
                          max_cycles=400)
        in_cycles = bench.mac_rx.sent_cycles[sent_before:]
        outs = first_beats[first_before:]
        beats_per_frame = len(in_cycles) // syns
        in_rate = syns / (in_cycles[-1] - in_cycles[0] + beats_per_frame)
        out_rate = syns / (outs[-1] - outs[0] + (outs[1] - outs[0] if syns > 1 else 1))
        synacks = len(bench.mac_tx.frames) - out_before
        key = "min" if layout == "mss_only" else "linux"
        figures[f"synack_per_syn_{key}"] = round(synacks / syns, 3)
        figures[f"syn_frame_bytes_{key}"] = len(frames[0])
        figures[f"syns_per_cycle_{key}"] = round(in_rate, 4)
        figures[f"synacks_per_cycle_{key}"] = round(out_rate, 4)
        if width in CLOCK_MHZ:
            figures[f"syn_rate_mpps_{key}"] = round(min(in_rate, out_rate) * CLOCK_MHZ[width], 2)
        figures[f"latency_cycles_{key}"] = outs[0] - in_cycles[0]
    tx_segments(bench.mac_tx.frames[:20])
    figures["synack_per_syn"] = figures["synack_per_syn_min"]
    figures["syn_rate_mpps"] = figures.get("syn_rate_mpps_min")
    figures["latency_cycles"] = figures["latency_cycles_min"]

    events_before = len(bench.event.received)
    bench.send([Client(rng, 80, layout="none").frame("A", rng.getrandbits(32),
                                                      ack=rng.getrandbits(32))
                for _ in range(forged)])
    await bench.until(lambda: bench.mac_rx.idle, max_cycles=100 * forged + 2000)
    await bench.until(lambda: bus.get("counters") >> (32 * Reason.COOKIE_BAD) & 0xFFFFFFFF
                      == forged, max_cycles=2000)
    figures["forged_acks"] = forged
    figures["forged_accepted"] = len(bench.event.received) - events_before
    figures["state_left_by_syns"] = bus.get("flows")
    return figures


# ----------------------------------------------------------------------------- demo

async def demo_setup(bus, width, entries=4096, clients=8, flood=200, forged=200, seed=7):
    """The connection-setup phase of ``acceltcp demo``: scapy clients complete handshakes
    through the NIC (SYN-ACKs checked by scapy, established events, data to the host),
    then a SYN flood at line rate and forged final ACKs; returns what the report shows."""
    bench = NicBench(bus, width, 0.0, seed)
    bench.entries = entries
    rng = bench.rng
    await bench.setup()
    group = [Client(rng, port, layout=layout, randomize=False)
             for port, layout in zip([80, 443, 6379, 80, 443, 6379, 80, 443] * (clients // 8 + 1),
                                     ["linux", "windows", "macos", "none", "mss_only",
                                      "unknown_kinds", "linux", "windows"] * (clients // 8 + 1))
             ][:clients]
    start = bus.cycle
    bench.send([c.syn() for c in group])
    await bench.until(lambda: len(bench.mac_tx.frames) == clients)
    synacks = {}
    for seg in tx_segments(bench.mac_tx.frames):
        client = next(c for c in group if c.sport == seg[TCP].dport)
        options = dict(seg[TCP].options)
        synacks[client] = {"tcp": {"seq": seg[TCP].seq},
                           "opt": {"ts_valid": int("Timestamp" in options),
                                   "tsval": options.get("Timestamp", (0, 0))[0]},
                           "options": sorted(str(k) for k in options)}
    bench.send([c.final_ack(synacks[c], payload=b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"
                            if k % 2 else b"") for k, c in enumerate(group)])
    await bench.until(lambda: len(bench.event.received) == clients)
    handshake_cycles = bus.cycle - start
    connections = []
    for event in bench.events():
        client = next(c for c in group if c.sport == event["peer_port"])
        connections.append({
            "client": f"{client.src}:{client.sport}", "layout": client.layout,
            "server_port": client.dport, "synack_options": synacks[client]["options"],
            "mss": event["mss"], "wscale": (event["peer_wscale"], event["local_wscale"])
            if event["wscale_ok"] else None, "sack": event["sack_ok"], "ts": event["ts_ok"],
            "data_bytes": event["payload_length"]})
    await bench.until(lambda: bus.get("flows") == clients, max_cycles=5000)

    # SYN flood at line rate, then forged final ACKs.
    bench.mac_tx.frames.clear()
    flood_clients = [Client(rng, 80, layout="mss_only") for _ in range(flood)]
    flood_start = bus.cycle
    bench.send([c.syn() for c in flood_clients])
    await bench.until(lambda: len(bench.mac_tx.frames) == flood, max_cycles=100 * flood + 2000)
    flood_cycles = bus.cycle - flood_start
    bench.send([Client(rng, 80, layout="none").frame("A", rng.getrandbits(32),
                                                      ack=rng.getrandbits(32))
                for _ in range(forged)])
    events_before = len(bench.event.received)
    await bench.until(lambda: bus.get("counters") >> (32 * Reason.COOKIE_BAD) & 0xFFFFFFFF
                      == forged, max_cycles=100 * forged + 2000)
    counters = bus.get("counters")
    return {
        "connections": connections, "handshake_cycles": handshake_cycles,
        "host_frames": len(bench.host_rx.frames), "flows": bus.get("flows"),
        "flood_syns": flood, "flood_synacks": len(bench.mac_tx.frames),
        "flood_cycles": flood_cycles, "flows_after_flood": bus.get("flows"),
        "forged": forged, "forged_accepted": len(bench.event.received) - events_before,
        "counters": {r.name: counters >> (32 * r) & 0xFFFFFFFF for r in Reason
                     if counters >> (32 * r) & 0xFFFFFFFF},
    }
