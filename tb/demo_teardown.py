"""The connection-teardown phase of ``acceltcp demo``: the host hands closes to the NIC.

Eight scapy clients open connections through the NIC's setup offload; the host then
hands each connection's close to the NIC with a CLOSE command (its response data held on
the NIC) and forgets it. The clients answer as TCP peers do, each in its own way: a
normal close, a lost FIN, a simultaneous close, a reset, a silent peer, data after the
close, a passive close, and a CLOSE sent twice. Every segment the NIC sends is checked by
scapy; the job returns what the report shows.
"""

from scapy.layers.inet import TCP

from hw.metadata import CloseReason, CloseStatus, EventKind
from hw.stream import frame_to_beats, pack_struct
from hw.teardown import CLOSE_COMMAND, TdCounter
from sim.traffic import NIC_MAC
from tb.test_handshake import Client, ip_int
from tb.test_nic import NicBench, tx_segments

__all__ = ["demo_teardown", "SCENARIOS", "TIMERS"]

#: (name, what the client does after the NIC's FIN, bytes of response data held)
SCENARIOS = [
    ("normal", "ACKs the FIN, sends its own FIN; TIME_WAIT expires", 300),
    ("lost FIN", "never sees the first FIN; answers the retransmission", 1400),
    ("simultaneous", "sends its FIN before ACKing ours (CLOSING)", 0),
    ("reset", "answers with an RST", 120),
    ("silent", "never answers: retransmissions, then RST", 64),
    ("data after close", "sends more data: Linux's RST", 0),
    ("passive close", "its FIN came first (LAST_ACK); ACKs ours", 200),
    ("CLOSE twice", "the host repeats its CLOSE; then a normal close", 10),
]

#: Timer settings of the demo, in cycles (tick_period = 1): short, so that the whole close
#: fits a short simulation; a real NIC uses milliseconds to seconds.
TIMERS = {"tick_period": 1, "fin_rto": 600, "fin_retries": 2, "time_wait": 1500,
          "fin2_timeout": 8000}


def _mac_int(text):
    return int(text.replace(":", ""), 16)


class _Connection:
    def __init__(self, client, synack, request, name):
        self.client, self.name = client, name
        self.iss = synack["tcp"]["seq"]
        self.ts = synack["opt"]["ts_valid"]
        self.peer_ts = client.ts + 1
        self.request = request
        self.rcv_nxt = (client.isn + 1 + len(request)) & 0xFFFFFFFF     # the NIC's RCV.NXT
        self.snd_una = (self.iss + 1) & 0xFFFFFFFF                    # nothing sent yet

    def segment(self, flags, seq=None, ack=None, payload=b""):
        options = []
        if self.ts:
            self.peer_ts += 1
            options = [("NOP", None), ("NOP", None), ("Timestamp", (self.peer_ts, 0))]
        return self.client.frame(flags, self.rcv_nxt if seq is None else seq,
                                 ack=self.snd_una if ack is None else ack,
                                 options=options, payload=payload)


async def demo_teardown(bus, width, entries=4096, seed=11):
    bench = NicBench(bus, width, 0.0, seed)
    bench.entries = entries
    rng = bench.rng
    await bench.setup()
    for port, value in TIMERS.items():
        bus.set(port, value)

    # Connections through the setup offload (as in the setup phase), with a request each.
    clients = [Client(rng, 80, layout="linux", randomize=False) for _ in SCENARIOS]
    bench.send([c.syn() for c in clients])
    await bench.until(lambda: len(bench.mac_tx.frames) == len(clients))
    synacks = {}
    for seg in tx_segments(bench.mac_tx.frames):
        options = dict(seg[TCP].options)
        synacks[seg[TCP].dport] = {"tcp": {"seq": seg[TCP].seq},
                                   "opt": {"ts_valid": int("Timestamp" in options),
                                           "tsval": options.get("Timestamp", (0, 0))[0]}}
    request = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"
    bench.send([c.final_ack(synacks[c.sport], payload=request) for c in clients])
    await bench.until(lambda: len(bench.event.received) == len(clients))
    await bench.until(lambda: bus.get("flows") == len(clients), max_cycles=5000)
    conns = [_Connection(c, synacks[c.sport], request, name)
             for c, (name, _, _) in zip(clients, SCENARIOS)]
    bench.mac_tx.frames.clear()
    bench.event.received.clear()

    # The host hands every close over; the passive one after the client's FIN, which
    # reaches the host (the host still owns that connection).
    by_port = {c.client.sport: c for c in conns}
    passive = conns[6]
    host_before = len(bench.host_rx.frames)
    bench.send([passive.segment("FA")])
    await bench.until(lambda: len(bench.host_rx.frames) == host_before + 1)
    passive.rcv_nxt = (passive.rcv_nxt + 1) & 0xFFFFFFFF
    held = {}
    start = bus.cycle
    for k, (conn, (name, _, size)) in enumerate(zip(conns, SCENARIOS)):
        data = bytes(rng.randrange(32, 127) for _ in range(size))
        held[conn.client.sport] = data
        command = pack_struct(
            CLOSE_COMMAND, ingress=0, peer_mac=_mac_int(conn.client.mac),
            local_mac=_mac_int(NIC_MAC), local_ip=ip_int(conn.client.dst),
            peer_ip=ip_int(conn.client.src), local_port=conn.client.dport,
            peer_port=conn.client.sport, snd_una=conn.snd_una, snd_nxt=conn.snd_una,
            rcv_nxt=conn.rcv_nxt, window=502, rcv_wscale=7, peer_fin=int(conn is passive),
            ts_ok=conn.ts, ts_recent=conn.client.ts + 1, ts_offset=rng.getrandbits(32),
            data_length=len(data))
        repeats = 2 if name == "CLOSE twice" else 1
        for _ in range(repeats):
            bench.close.send([command])
            bench.close_data.send(frame_to_beats(data, width) if data else [])
        conn.fin_seq = (conn.snd_una + len(data)) & 0xFFFFFFFF
        conn.closed_at = None
    await bench.until(lambda: len(bench.event.received) >= len(conns) + 1
                      and len(bench.mac_tx.frames) >= len(conns))

    sent = []                     # (cycle, client port, scapy segment) of everything sent

    def collect():
        for seg in tx_segments(bench.mac_tx.frames):
            sent.append((bus.cycle, seg[TCP].dport, seg))
        bench.mac_tx.frames.clear()
    collect()
    first_fin = {port: seg for _, port, seg in sent if seg[TCP].flags.F}
    assert set(first_fin) == set(by_port), "every CLOSE sends a FIN"
    for port, seg in first_fin.items():
        assert bytes(seg[TCP].payload)[:len(held[port])] == held[port]

    # The clients' answers.
    def ack_of_fin(conn):
        return (conn.fin_seq + 1) & 0xFFFFFFFF
    replies = []
    for conn in conns:
        name = conn.name
        if name in ("normal", "CLOSE twice"):
            replies += [conn.segment("A", ack=ack_of_fin(conn)), conn.segment("FA", ack=ack_of_fin(conn))]
        elif name == "simultaneous":
            replies.append(conn.segment("FA"))
        elif name == "reset":
            replies.append(conn.segment("R", ack=0))
        elif name == "data after close":
            replies.append(conn.segment("PA", ack=ack_of_fin(conn), payload=b"more data"))
        elif name == "passive close":
            replies.append(conn.segment("A", ack=ack_of_fin(conn)))
    bench.send(replies)
    simultaneous, lost = conns[2], conns[1]

    def closed(port):
        return any(e["kind"] == EventKind.CLOSED and e["peer_port"] == port
                   for e in bench.events())
    # The simultaneous close: our ACK of its FIN, then it ACKs our FIN.
    await bench.until(lambda: (collect() or True) and any(
        p == simultaneous.client.sport and not s[TCP].flags.F for _, p, s in sent))
    simultaneous.rcv_nxt = (simultaneous.rcv_nxt + 1) & 0xFFFFFFFF
    bench.send([simultaneous.segment("A", ack=ack_of_fin(simultaneous))])
    # The lost FIN comes again after fin_rto: now the client answers it.
    await bench.until(lambda: (collect() or True) and sum(
        1 for _, p, s in sent if p == lost.client.sport and s[TCP].flags.F) >= 2,
        max_cycles=20 * TIMERS["fin_rto"])
    bench.send([lost.segment("A", ack=ack_of_fin(lost)), lost.segment("FA", ack=ack_of_fin(lost))])
    # Everything ends: TIME_WAIT expiries, the silent client's timeout.
    limit = 4 * (TIMERS["fin_rto"] << TIMERS["fin_retries"]) + 4 * TIMERS["time_wait"]
    await bench.until(lambda: (collect() or True) and all(closed(c.client.sport) for c in conns),
                      max_cycles=limit)
    # The last segments leave and the last table entries go (DELETEs are queued).
    await bench.until(lambda: (collect() or True) and bus.get("flows") == 0, max_cycles=2000)
    settle = bus.cycle + 200
    await bench.until(lambda: (collect() or True) and bus.cycle >= settle, max_cycles=400)
    collect()

    statuses = {}
    rows = []
    for event in bench.events():
        conn = by_port[event["peer_port"]]
        if event["kind"] == EventKind.CLOSE_STATUS:
            statuses.setdefault(conn.name, []).append(CloseStatus(event["status"]).name)
    closed_events = {by_port[e["peer_port"]].name: e for e in bench.events()
                     if e["kind"] == EventKind.CLOSED}
    for conn, (name, behaviour, size) in zip(conns, SCENARIOS):
        e = closed_events[name]
        segs = [s for _, p, s in sent if p == conn.client.sport]
        kinds = []
        for s in segs:
            f = s[TCP].flags
            kinds.append("RST" if f.R else ("FIN" if f.F else "ACK"))
        rows.append({"scenario": name, "behaviour": behaviour, "held_bytes": size,
                     "status": statuses.get(name, []), "reason": CloseReason(e["status"]).name,
                     "retransmits": e["retransmits"], "segments_in": e["segments_in"],
                     "segments_out": e["segments_out"], "sent": kinds})
    counters = bus.get("td_counters")
    return {"rows": rows, "cycles": bus.cycle - start,
            "closing_after": bus.get("closing"), "flows_after": bus.get("flows"),
            "counters": {c.name: counters >> (32 * c) & 0xFFFFFFFF for c in TdCounter
                         if counters >> (32 * c) & 0xFFFFFFFF}}
