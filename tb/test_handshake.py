"""Tests of hw.handshake (HandshakeEngine) against sim.handshake_model and real packets.

Clients are played with scapy: their frames go through the bit-exact parser model
(``sim.reference.parse_frame``) into the engine's ``rx`` records; every verdict, every
SYN-ACK/RST header and every event the RTL produces is compared, field for field and in
order, with the golden model. Beside the model comparison, each scenario asserts what
must happen from the outside (genuine final ACKs establish, forged ones never do), so a
model that drifts with the RTL cannot hide a bug. Random stalls on all five streams.
"""

import ipaddress
import random

import cocotb
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from hw.handshake import (DEFAULT_CONNECTS, DEFAULT_RECENT, HANDSHAKE_IN, VERDICT, ControlOp, HandshakeEngine,
                          Reason, control_layout)
from hw.listen_table import LISTEN_ENTRY
from hw.metadata import EVENT, TX_HEADER
from hw.stream import pack_struct, unpack_struct
from sim.bus import StreamSink, StreamSource, run_until
from sim.handshake_model import HandshakeModel, listener
from sim.reference import parse_frame
from sim.traffic import NIC_MAC, SYN_OPTION_LAYOUTS, pad

LISTEN_IP = "198.51.100.10"
OTHER_IP = "198.51.100.20"
OUTPUTS = {"verdict": VERDICT, "tx": TX_HEADER, "event": EVENT}


def ip_int(text):
    return int(ipaddress.IPv4Address(text))


#: index -> listener entry
LISTENERS = {
    0: listener(80, ip=ip_int(LISTEN_IP), mss=1460, wscale=7, window=65535),
    1: listener(443, ip=0, mss=1400, wscale=9, sack_ok=False, window=29200),
    2: listener(8080, ip=ip_int(LISTEN_IP), offload=False),
    3: listener(6379, ip=0, ts_ok=False, mss=1360, wscale=5, window=16384),
    4: listener(80, ip=0, mss=1200, wscale=2, window=1000),     # behind entry 0 for LISTEN_IP
}
OFFLOADED_PORTS = [80, 443, 6379]
CLOSED_PORTS = [22, 25]


class Client:
    """One scapy TCP client: addresses, ISN, timestamp clock, its SYN options."""

    def __init__(self, rng, dport, layout=None, dst=LISTEN_IP, randomize=True):
        self.rng = rng
        self.src = "192.0.2.%d" % rng.randrange(1, 255)
        self.dst = dst
        self.sport = rng.randrange(1024, 65536)
        self.dport = dport
        self.mac = "02:00:00:00:01:%02x" % rng.randrange(256)
        self.isn = rng.getrandbits(32)
        self.ts = rng.getrandbits(32)
        self.layout = layout if layout is not None else rng.choice(sorted(SYN_OPTION_LAYOUTS))
        options = []
        for kind, value in SYN_OPTION_LAYOUTS[self.layout]:
            if kind == "Timestamp":
                value = (self.ts, 0)
            elif not randomize:
                pass
            elif kind == "WScale":
                value = rng.choice([0, 2, 7, 10, 14, 15])
            elif kind == "MSS":
                value = rng.choice([100, 536, 1299, 1300, 1439, 1440, 1460, 8960])
            options.append((kind, value))
        self.options = options
        self.uses_ts = any(kind == "Timestamp" for kind, _ in options)

    def frame(self, flags, seq, ack=0, options=(), payload=b"", vlan=None):
        eth = Ether(src=self.mac, dst=NIC_MAC)
        l2 = eth / Dot1Q(vlan=vlan) if vlan is not None else eth
        segment = (IP(src=self.src, dst=self.dst, flags="DF", ttl=64)
                   / TCP(sport=self.sport, dport=self.dport, flags=flags, seq=seq & 0xFFFFFFFF,
                         ack=ack & 0xFFFFFFFF, window=self.rng.randrange(1, 65536),
                         options=list(options)))
        return pad(l2 / segment / Raw(payload) if payload else l2 / segment)

    def syn(self, **kw):
        return self.frame("S", self.isn, options=self.options, **kw)

    def final_ack(self, synack, payload=b"", fin=False, ack_delta=0, seq_delta=0,
                  tsecr_xor=0, drop_ts=False):
        """The handshake's third segment for the SYN-ACK header ``synack`` (a dict)."""
        options = []
        if synack["opt"]["ts_valid"] and not drop_ts:
            options = [("NOP", None), ("NOP", None),
                       ("Timestamp", (self.ts + 1, synack["opt"]["tsval"] ^ tsecr_xor))]
        return self.frame("FA" if fin else "A", self.isn + 1 + seq_delta,
                          ack=synack["tcp"]["seq"] + 1 + ack_delta, options=options,
                          payload=payload)


class EngineBench:
    """The engine under test, its stream agents and the golden model, in lock step."""

    def __init__(self, bus, listeners=16, stall=0.3, seed=0):
        self.bus = bus
        rng = random.Random(seed)
        self.rng = rng
        self.listeners = listeners
        self.rx = StreamSource(bus, "rx", stall=stall, rng=random.Random(rng.random()))
        self.control = StreamSource(bus, "control", stall=stall, rng=random.Random(rng.random()))
        self.sinks = {name: StreamSink(bus, name, stall=stall, rng=random.Random(rng.random()))
                      for name in OUTPUTS}
        self.agents = [self.rx, self.control, *self.sinks.values()]
        self.model = HandshakeModel(listeners)
        self.expected = {name: [] for name in OUTPUTS}
        self.checked = {name: 0 for name in OUTPUTS}
        self.results = []                 # (verdict, reply, event) per record, from the model
        for port in ("cookie_period", "ts_period", "rst_bad_cookie", "syn_rto", "syn_retries"):
            bus.set(port, 0)

    async def _control(self, payload):
        self.control.send([pack_struct(control_layout(self.listeners), **payload)])
        await run_until(self.bus, self.agents, lambda: self.control.idle, max_cycles=1000)

    async def write_listener(self, index, entry):
        await self._control({"op": ControlOp.WRITE_LISTENER, "index": index, "entry": entry})
        self.model.write_listener(index, entry)

    async def set_key(self, key):
        await self._control({"op": ControlOp.SET_KEY, "key": key})
        self.model.keys.rotate(key)

    async def setup(self, key=None):
        for index, entry in LISTENERS.items():
            await self.write_listener(index, entry)
        await self.set_key(key if key is not None else self.rng.getrandbits(128))

    def send(self, frames, flow_hit=None, ingress=0):
        """Queue frames; the model decides each one now (its state must not change
        before the engine has passed stage 3 for all of them: ``drain`` first)."""
        out = []
        for k, frame in enumerate(frames):
            meta = parse_frame(frame)
            hit = int(flow_hit[k]) if flow_hit else 0
            self.rx.send([pack_struct(HANDSHAKE_IN, meta=meta, ingress=ingress, flow_hit=hit)])
            result = self.model.process(meta, ingress=ingress, flow_hit=hit)
            verdict, reply, event = result
            self.expected["verdict"].append(pack_struct(VERDICT, **verdict))
            if reply is not None:
                self.expected["tx"].append(pack_struct(TX_HEADER, **reply))
            if event is not None:
                self.expected["event"].append(pack_struct(EVENT, **event))
            self.results.append(result)
            out.append(result)
        return out

    async def drain(self, max_cycles=None):
        """Run until every expected output has arrived (and 40 more cycles for strays);
        compare them in order."""
        pending = sum(len(v) for v in self.expected.values())
        await run_until(self.bus, self.agents,
                        lambda: all(len(self.sinks[n].received) >= len(self.expected[n])
                                    for n in OUTPUTS),
                        max_cycles=max_cycles or 200 + 20 * pending)
        await self._idle(40)
        for name, layout in OUTPUTS.items():
            got, want = self.sinks[name].received, self.expected[name]
            assert len(got) == len(want), f"{name}: {len(got)} outputs, expected {len(want)}"
            for k in range(self.checked[name], len(want)):
                if got[k] != want[k]:
                    raise AssertionError(f"{name} #{k}:\n  rtl   {unpack_struct(layout, got[k])}"
                                         f"\n  model {unpack_struct(layout, want[k])}")
            self.checked[name] = len(want)

    async def _idle(self, cycles):
        count = [0]

        def done():
            count[0] += 1
            return count[0] > cycles
        await run_until(self.bus, self.agents, done, max_cycles=cycles + 1)

    async def advance_cookie_count(self, ticks):
        """Move the coarse counter on by exactly ``ticks`` (the engine must be idle): the
        period input is 1 (a tick at every clock edge) for ``ticks`` cycles."""
        bus = self.bus
        target = (bus.get("cookie_count") + ticks) & 0xFFFFFFFF

        class Ticker:
            count = None
            left = ticks

            def drive(self):
                bus.set("cookie_period", int(self.left > 0))
                self.left -= 1

            def sample(self):
                self.count = bus.get("cookie_count")

        ticker = Ticker()
        await run_until(bus, [ticker, *self.agents], lambda: ticker.count == target,
                        max_cycles=ticks + 10)
        bus.set("cookie_period", 0)
        await self._idle(4)
        assert bus.get("cookie_count") == target
        for _ in range(ticks):
            self.model.keys.tick()


def _noise(rng, client):
    """Segments and frames that are not handshakes, to every kind of port."""
    frames = [
        client.frame("R", client.isn),
        client.frame("SF", client.isn),
        client.frame("SA", client.isn, ack=rng.getrandbits(32)),
        client.frame("", client.isn),
        client.frame("F", client.isn),
        client.frame("PA", client.isn, ack=rng.getrandbits(32), payload=b"x" * 10),
        client.syn(vlan=5),
        pad(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=LISTEN_IP)),
    ]
    bad = bytearray(client.syn())
    bad[-1 if len(bad) > 60 else 50] ^= 0x5A           # a corrupted byte: bad checksum
    frames.append(bytes(bad))
    # Options that overflow the header: a 24-byte TCP header whose MSS option (after two
    # NOPs) crosses its end.
    frames.append(pad(Ether(src=client.mac, dst=NIC_MAC)
                      / IP(src=client.src, dst=client.dst)
                      / TCP(sport=client.sport, dport=client.dport, flags="S", seq=client.isn,
                            dataofs=6, options=[("NOP", None), ("NOP", None), ("MSS", 1460)])))
    return frames


async def handshake_mix(bus, clients=40, stall=0.3, seed=1):
    """SYNs of every option layout to every kind of port, noise, then final ACKs of every
    kind (genuine with and without data or FIN, wrong ACK, wrong sequence, tampered
    TSecr, missing timestamps); flow-table hits; RST on bad cookies for a while."""
    bench = EngineBench(bus, stall=stall, seed=seed)
    rng = bench.rng
    await bench.setup()
    population = []
    frames, hits = [], []
    for _ in range(clients):
        port = rng.choice(OFFLOADED_PORTS * 3 + CLOSED_PORTS + [8080])
        client = Client(rng, port, dst=rng.choice([LISTEN_IP, LISTEN_IP, OTHER_IP]))
        population.append(client)
        frames.append(client.syn())
        hits.append(rng.random() < 0.05)
        if rng.random() < 0.2:                  # a retransmitted SYN: the same SYN-ACK again
            frames.append(client.syn())
            hits.append(False)
        if rng.random() < 0.2:
            for noise in _noise(rng, client):
                frames.append(noise)
                hits.append(rng.random() < 0.1)
    results = bench.send(frames, flow_hit=hits)
    await bench.drain()

    # The SYN-ACKs answer the options offered.
    synacks = {}
    for client in population:
        for verdict, reply, _ in results:
            if (reply and verdict["reason"] == Reason.SYN_COOKIE
                    and reply["tcp"]["dport"] == client.sport
                    and reply["tcp"]["ack"] == (client.isn + 1) & 0xFFFFFFFF):
                synacks[client] = reply
    assert len(synacks) >= clients // 3, len(synacks)
    # A retransmitted SYN gets the same cookie (same period, same key).
    by_client = {}
    for verdict, reply, _ in results:
        if reply and verdict["reason"] == Reason.SYN_COOKIE:
            by_client.setdefault((reply["tcp"]["dport"], reply["tcp"]["ack"]), set()).add(
                reply["tcp"]["seq"])
    assert all(len(cookies) == 1 for cookies in by_client.values())
    for client, reply in synacks.items():
        entry = next(e for e in LISTENERS.values()
                     if e["port"] == client.dport and e["ip"] in (0, ip_int(client.dst)))
        opt = reply["opt"]
        assert opt["mss_valid"] and opt["mss"] == entry["mss"]
        assert opt["ts_valid"] == int(client.uses_ts and bool(entry["ts_ok"]))
        if not opt["ts_valid"]:
            assert not opt["wscale_valid"] and not opt["sack_perm"], (client.layout, opt)

    # Final ACKs.
    frames, genuine, followers = [], 0, 0
    for client, reply in synacks.items():
        kind = rng.choice(["good", "good", "data", "fin", "ack+1", "seq+1", "tsecr", "no_ts"])
        if kind == "good":
            frames.append(client.final_ack(reply))
        elif kind == "data":
            frames.append(client.final_ack(reply, payload=rng.randbytes(rng.randrange(1, 200))))
        elif kind == "fin":
            frames.append(client.final_ack(reply, fin=True))
        elif kind == "ack+1":
            frames.append(client.final_ack(reply, ack_delta=1))
        elif kind == "seq+1":
            frames.append(client.final_ack(reply, seq_delta=1))
        elif kind == "tsecr":
            frames.append(client.final_ack(reply, tsecr_xor=0x10 if reply["opt"]["ts_valid"]
                                           else 0, ack_delta=0 if reply["opt"]["ts_valid"] else 7))
        else:
            frames.append(client.final_ack(reply, drop_ts=True,
                                           ack_delta=0 if reply["opt"]["ts_valid"] else 3))
        genuine += kind in ("good", "data", "fin")
        if kind == "good" and rng.random() < 0.5:
            # Data right behind a pure final ACK has the same SEQ and ACK: it must not
            # count as a second final ACK (it is the connection's, for the host).
            frames.append(client.frame("PA", client.isn + 1, ack=reply["tcp"]["seq"] + 1,
                                       payload=b"GET / HTTP/1.1\r\n\r\n"))
            followers += 1
    bus.set("rst_bad_cookie", 1)
    bench.model.rst_bad_cookie = True
    results = bench.send(frames)
    await bench.drain()
    accepted = [event for _, _, event in results if event]
    assert len(accepted) == genuine, (len(accepted), genuine)
    assert sum(1 for v, _, _ in results if v["reason"] == Reason.FLOW) >= followers
    bus.set("rst_bad_cookie", 0)
    bench.model.rst_bad_cookie = False
    return {"records": len(bench.results), "established": len(accepted),
            "counters": check_counters(bus, bench)}


def check_counters_raw(bus):
    counters = bus.get("counters")
    return {reason.name: counters >> (32 * reason) & 0xFFFFFFFF for reason in Reason
            if counters >> (32 * reason) & 0xFFFFFFFF}


def check_counters(bus, bench):
    counters = bus.get("counters")
    out = {}
    for reason in Reason:
        got = counters >> (32 * reason) & 0xFFFFFFFF
        assert got == bench.model.counters[reason], (reason, got, bench.model.counters[reason])
        out[reason.name] = got
    return out


async def key_rotation_and_expiry(bus, stall=0.2, seed=2):
    """Cookies made under a key that is then rotated out, and cookies that age: accepted
    for exactly as long as documented, rejected after."""
    bench = EngineBench(bus, stall=stall, seed=seed)
    rng = bench.rng
    # Before any SET_KEY the NIC does not offload: SYNs to offloaded listeners go to the host.
    for index, entry in LISTENERS.items():
        await bench.write_listener(index, entry)
    early = Client(rng, 80)
    results = bench.send([early.syn()])
    await bench.drain()
    assert results[0][0] == {"to_host": 1, "reason": Reason.NOT_OFFLOADED}
    await bench.set_key(rng.getrandbits(128))
    # The reset key (all zero) is public: a cookie made with it is refused after the
    # first SET_KEY, under either generation.
    from hw.syn_cookie import cookie_iss, mss_index
    forger = Client(rng, 80, layout="none")
    connection = {"ingress": 0, "peer_ip": ip_int(forger.src), "local_ip": ip_int(forger.dst),
                  "peer_port": forger.sport, "local_port": forger.dport,
                  "peer_isn": forger.isn, "ts_ok": False, "ts_options": 0}
    forged = [cookie_iss(0, gen, count=bench.model.keys.count, mss_index=0, **connection)
              for gen in (0, 1)]
    results = bench.send([forger.frame("A", forger.isn + 1, ack=iss + 1) for iss in forged])
    await bench.drain()
    assert [r[0]["reason"] for r in results] == [Reason.COOKIE_BAD] * 2

    def handshake_group(n):
        return [Client(rng, rng.choice(OFFLOADED_PORTS)) for _ in range(n)]

    async def syns(group):
        results = bench.send([c.syn() for c in group])
        await bench.drain()
        return [reply for _, reply, _ in results]

    async def acks(group, synacks):
        results = bench.send([c.final_ack(r) for c, r in zip(group, synacks)])
        await bench.drain()
        return sum(1 for _, _, event in results if event)

    old = handshake_group(6)
    old_synacks = await syns(old)                      # key A, count c
    await bench.set_key(rng.getrandbits(128))          # rotate to key B
    assert await acks(old[:2], old_synacks[:2]) == 2   # previous key still accepted
    new = handshake_group(6)
    new_synacks = await syns(new)                      # key B, count c
    await bench.advance_cookie_count(1)                # c + 1
    assert await acks(old[2:4], old_synacks[2:4]) == 2
    assert await acks(new[:2], new_synacks[:2]) == 2
    later = handshake_group(4)
    later_synacks = await syns(later)                  # key B, count c + 1
    await bench.advance_cookie_count(1)                # c + 2: A retired, count c expired
    assert await acks(old[4:], old_synacks[4:]) == 0
    assert await acks(new[2:], new_synacks[2:]) == 0
    assert await acks(later[:2], later_synacks[:2]) == 2
    await bench.advance_cookie_count(1)                # c + 3: count c + 1 expired too
    assert await acks(later[2:], later_synacks[2:]) == 0
    # Replays of accepted ACKs after the window are rejected too, once the engine has
    # forgotten the connections (DEFAULT_RECENT newer ones; until then their segments go
    # to the host as the connection's own).
    assert await acks(later[:2], later_synacks[:2]) == 0
    assert bench.results[-1][0]["reason"] == Reason.FLOW
    fresh = handshake_group(DEFAULT_RECENT)
    assert await acks(fresh, await syns(fresh)) == len(fresh)
    assert await acks(later[:2], later_synacks[:2]) == 0
    assert [r[0]["reason"] for r in bench.results[-2:]] == [Reason.COOKIE_BAD] * 2
    return {"counters": check_counters(bus, bench)}


async def forged_acks(bus, count=10000, stall=0.0, seed=3):
    """Random ACKs (and ACKs with TSecr) to offloaded listeners: none may establish."""
    bench = EngineBench(bus, stall=stall, seed=seed)
    rng = bench.rng
    await bench.setup()
    frames = []
    for _ in range(count):
        client = Client(rng, rng.choice(OFFLOADED_PORTS), layout="none")
        options = ([("Timestamp", (rng.getrandbits(32), rng.getrandbits(32)))]
                   if rng.random() < 0.5 else [])
        frames.append(client.frame("A", rng.getrandbits(32), ack=rng.getrandbits(32),
                                   options=options))
    for start in range(0, count, 2000):
        bench.send(frames[start:start + 2000])
        await bench.drain()
    established = bus.get("counters") >> (32 * Reason.COOKIE_OK) & 0xFFFFFFFF
    assert established == 0 and not bench.sinks["event"].received
    return {"forged": count, "forged_accepted": established,
            "counters": check_counters(bus, bench)}


async def syn_flood(bus, count=400, seed=4):
    """Back-to-back SYNs, no stalls: one record accepted and one SYN-ACK out per cycle."""
    bench = EngineBench(bus, stall=0.0, seed=seed)
    rng = bench.rng
    await bench.setup()
    bench.send([Client(rng, 80, layout="linux").syn() for _ in range(count)])
    await bench.drain()
    sent, synacks = bench.rx.sent_cycles, bench.sinks["tx"].received_cycles
    assert len(synacks) == count
    return {"records_per_cycle": round(count / (sent[-1] - sent[0] + 1), 3),
            "synacks_per_cycle": round(count / (synacks[-1] - synacks[0] + 1), 3),
            "latency_cycles": synacks[0] - sent[0]}


class Server:
    """A scapy TCP server at the far end of an active open (CONNECT)."""

    def __init__(self, rng, req):
        self.rng, self.req = rng, req
        self.isn = rng.getrandbits(32)

    def frame(self, flags, seq=None, ack=None, options=()):
        req = self.req
        ip = lambda value: str(ipaddress.IPv4Address(value))
        mac = lambda value: value.to_bytes(6, "big").hex(":")
        segment = (Ether(src=mac(req["peer_mac"]), dst=mac(req["local_mac"]))
                   / IP(src=ip(req["peer_ip"]), dst=ip(req["local_ip"]), flags="DF")
                   / TCP(sport=req["peer_port"], dport=req["local_port"], flags=flags,
                         seq=self.isn if seq is None else seq & 0xFFFFFFFF,
                         ack=(req["iss"] + 1 if ack is None else ack) & 0xFFFFFFFF,
                         window=29200, options=list(options)))
        return pad(segment)


def connect_request(rng, **overrides):
    req = {"ingress": 0, "peer_mac": 0x020000000199, "local_mac": 0x020000000001,
           "local_ip": ip_int(LISTEN_IP), "peer_ip": ip_int("192.0.2.%d" % rng.randrange(1, 255)),
           "local_port": rng.randrange(32768, 61000), "peer_port": rng.choice([80, 443]),
           "iss": rng.getrandbits(32), "mss": 1460, "wscale_ok": 1, "wscale": 7,
           "sack_ok": 1, "ts_ok": 1, "window": 64240}
    req.update(overrides)
    return req


async def active_opens(bus, stall=0.2, seed=6):
    """CONNECT: SYN out, then a server that answers, resets, answers wrongly first, or
    stays silent (retransmissions with backoff, then a timeout); BUSY when every slot is
    taken; segments to a connecting 4-tuple that are not a SYN-ACK."""
    from hw.handshake import CONNECT_REQUEST
    from hw.metadata import EventKind, FailStatus
    bench = EngineBench(bus, stall=stall, seed=seed)
    rng = bench.rng
    rto, retries = 200, 2
    bus.set("syn_rto", rto)
    bus.set("syn_retries", retries)
    await bench.setup()
    layout = control_layout(bench.listeners)
    sinks = bench.sinks
    seen = {name: 0 for name in OUTPUTS}

    def new(name):
        out = [unpack_struct(OUTPUTS[name], v) for v in sinks[name].received[seen[name]:]]
        seen[name] = len(sinks[name].received)
        return out

    async def wait(name, count, max_cycles=3000):
        try:
            await run_until(bus, bench.agents,
                            lambda: len(sinks[name].received) >= seen[name] + count,
                            max_cycles=max_cycles)
        except TimeoutError:
            raise AssertionError(
                f"waiting for {count} on {name}: " + "; ".join(
                    f"{n}: {[unpack_struct(OUTPUTS[n], v) for v in sinks[n].received[seen[n]:]]}"
                    for n in OUTPUTS) + f"; counters {check_counters_raw(bus)}") from None

    async def connect(req):
        bench.control.send([pack_struct(layout, op=ControlOp.CONNECT, connect=req)])
        await run_until(bus, bench.agents, lambda: bench.control.idle, max_cycles=1000)

    def feed(frames):
        for frame in frames:
            bench.rx.send([pack_struct(HANDSHAKE_IN, meta=parse_frame(frame))])

    def check_syn(syn, req):
        assert syn["tcp"]["flags"] == 0x02 and syn["tcp"]["seq"] == req["iss"]
        assert (syn["ip"]["src"], syn["ip"]["dst"]) == (req["local_ip"], req["peer_ip"])
        assert (syn["tcp"]["sport"], syn["tcp"]["dport"]) == (req["local_port"], req["peer_port"])
        assert syn["eth"] == {"dst": req["peer_mac"], "src": req["local_mac"]}
        opt = syn["opt"]
        assert opt["mss_valid"] and opt["mss"] == req["mss"]
        assert opt["wscale_valid"] == req["wscale_ok"] and opt["sack_perm"] == req["sack_ok"]
        assert opt["ts_valid"] == req["ts_ok"] and syn["tcp"]["window"] == req["window"]

    # 1. A server that answers: ACK out, established event with the agreed options.
    req = connect_request(rng)
    await connect(req)
    await wait("tx", 1)
    check_syn(new("tx")[0], req)
    server = Server(rng, req)
    feed([server.frame("SA", options=[("MSS", 1400), ("SAckOK", b""),
                                      ("Timestamp", (777, 0)), ("NOP", None), ("WScale", 8)])])
    await wait("event", 1)
    await wait("tx", 1)
    ack, = new("tx")
    assert ack["tcp"]["flags"] == 0x10 and ack["tcp"]["seq"] == (req["iss"] + 1) & 0xFFFFFFFF
    assert ack["tcp"]["ack"] == (server.isn + 1) & 0xFFFFFFFF
    assert ack["tcp"]["window"] == req["window"] >> req["wscale"]
    assert ack["opt"]["ts_valid"] and ack["opt"]["tsecr"] == 777 and not ack["opt"]["mss_valid"]
    event, = new("event")
    assert event["kind"] == EventKind.ESTABLISHED and event["active"] == 1
    assert (event["iss"], event["irs"]) == (req["iss"], server.isn)
    assert event["mss"] == 1400 and event["wscale_ok"] and event["peer_wscale"] == 8
    assert event["local_wscale"] == 7 and event["sack_ok"] and event["ts_ok"]
    assert event["ts_recent"] == 777
    # The slot is free again: a second SYN-ACK is not for a connecting 4-tuple any more.
    feed([server.frame("SA")])
    await wait("verdict", 2)
    verdicts = new("verdict")
    assert [v["reason"] for v in verdicts] == [Reason.ACTIVE_ESTABLISHED, Reason.NO_LISTENER]

    # 2. A server without options (no timestamps, no scaling): MSS 536, window unscaled.
    req = connect_request(rng, ts_ok=0)
    await connect(req)
    await wait("tx", 1)
    check_syn(new("tx")[0], req)
    server = Server(rng, req)
    feed([server.frame("A"),                                  # not a SYN-ACK: discarded
          server.frame("R", ack=req["iss"] + 9),              # RST, unacceptable: discarded
          server.frame("SA", ack=req["iss"] + 5),             # wrong ACK: RST
          server.frame("SA")])
    await wait("event", 1)
    await wait("tx", 2)
    rst, ack = new("tx")
    assert rst["tcp"]["flags"] == 0x04 and rst["tcp"]["seq"] == (req["iss"] + 5) & 0xFFFFFFFF
    assert ack["tcp"]["flags"] == 0x10 and ack["tcp"]["window"] == req["window"]
    assert not ack["opt"]["ts_valid"]
    event, = new("event")
    assert event["mss"] == 536 and not event["wscale_ok"] and not event["ts_ok"]
    await wait("verdict", 4)
    assert [v["reason"] for v in new("verdict")] == [
        Reason.ACTIVE_DISCARD, Reason.ACTIVE_DISCARD, Reason.ACTIVE_BAD_ACK,
        Reason.ACTIVE_ESTABLISHED]

    # 3. A server that resets.
    req = connect_request(rng)
    await connect(req)
    await wait("tx", 1)
    new("tx")
    feed([Server(rng, req).frame("RA", seq=0)])
    await wait("event", 1)
    event, = new("event")
    assert event["kind"] == EventKind.FAILED and event["status"] == FailStatus.RESET
    assert event["active"] and event["local_port"] == req["local_port"]

    # 4. A silent server: SYN at t, t + rto, t + 3 rto, then a timeout at t + 7 rto.
    req = connect_request(rng)
    await connect(req)
    await wait("tx", retries + 1, max_cycles=10 * rto)
    stamps = sinks["tx"].received_cycles[-(retries + 1):]
    for syn in new("tx"):
        check_syn(syn, req)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    for k, gap in enumerate(gaps):
        assert rto << k <= gap <= (rto << k) + 40, gaps
    await wait("event", 1, max_cycles=10 * rto)
    event, = new("event")
    assert event["kind"] == EventKind.FAILED and event["status"] == FailStatus.TIMEOUT
    timeout_after = sinks["event"].received_cycles[-1] - stamps[0]
    assert (7 * rto) <= timeout_after <= 7 * rto + 60, timeout_after

    # 5. Every slot taken: the next CONNECT fails at once with BUSY.
    bus.set("syn_rto", 1 << 30)
    held = [connect_request(rng) for _ in range(DEFAULT_CONNECTS)]
    for r in held:
        await connect(r)
    await wait("tx", len(held))
    new("tx")
    extra = connect_request(rng)
    await connect(extra)
    await wait("event", 1)
    event, = new("event")
    assert event["status"] == FailStatus.BUSY and event["local_port"] == extra["local_port"]
    return {"gaps": gaps, "timeout_after": timeout_after}


# ----------------------------------------------------------------------------- cocotb tests

@cocotb.test()
async def hs_mix(dut):
    from tb.cocotb_util import start
    await handshake_mix(await start(dut))


@cocotb.test()
async def hs_keys(dut):
    from tb.cocotb_util import start
    await key_rotation_and_expiry(await start(dut))


@cocotb.test()
async def hs_forged(dut):
    from tb.cocotb_util import start
    result = await forged_acks(await start(dut))
    dut._log.info(f"forged ACKs: {result['forged']}, accepted: {result['forged_accepted']}")


@cocotb.test()
async def hs_active(dut):
    from tb.cocotb_util import start
    result = await active_opens(await start(dut))
    dut._log.info(f"active opens: {result}")


@cocotb.test()
async def hs_flood(dut):
    from tb.cocotb_util import start
    figures = await syn_flood(await start(dut))
    dut._log.info(f"SYN flood: {figures}")
    assert figures["records_per_cycle"] == 1.0 and figures["synacks_per_cycle"] == 1.0, figures
    assert figures["latency_cycles"] == HandshakeEngine().latency, figures


# ----------------------------------------------------------------------------- pytest entries

def test_handshake_rtl(sim):
    from tb.harness import run_cocotb
    run_cocotb(HandshakeEngine, {"listeners": 16}, "tb.test_handshake", sim)


def test_handshake_amaranth():
    """The same mix on the built-in simulator (fewer clients: it is slower)."""
    from sim.jobs import run_job
    result = run_job(HandshakeEngine, {"listeners": 16}, handshake_mix, sim="amaranth",
                     job_args={"clients": 8, "stall": 0.2})
    assert result.value["records"] > 8
