"""The host's TCP stack for established connections (``host_driver.tcp``).

* every frame it emits parses in scapy with right checksums and the expected fields;
* two connections back to back through a lossy, reordering, duplicating channel;
* bad input: truncated frames, bad checksums, other 4-tuples, out-of-window segments,
  RSTs and SYNs (RFC 5961), PAWS;
* the hand-overs to the NIC (CLOSE_COMMAND, SPLICE_SIDE);
* against the real Linux stack in a network namespace (``sim.linux_peer``): a Linux
  client connects to our side, which answers with the NIC's cookie SYN-ACK
  (``sim.handshake_model``) and runs an echo server on a ``TcpConnection``.

Time is simulated (seconds) except against Linux; no assertion depends on wall time.
"""

import heapq
import random
import socket
import threading
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from hw.headers import TcpFlags
from hw.metadata import CloseReason, CloseStatus, EventKind
from hw.splice import SPLICE_SIDE
from hw.stream import pack_struct
from hw.teardown import CLOSE_COMMAND, MAX_HELD_DATA
from host_driver.segment import (MASK32, build_segment, frame_from_header, parse_segment,
                                 seq_ge)
from host_driver.tcp import State, TcpConnection, TcpSettings
from sim import linux_peer
from sim.handshake_model import HandshakeModel, listener
from sim.reference import parse_frame
from sim.splice_model import desc_for, rewrite_frame
from sim.teardown_model import TeardownModel, zero_event
from tb.test_splice_rewrite import scapy_checksums

A_MAC, B_MAC = 0x02_00_00_00_00_0A, 0x02_00_00_00_00_0B
A_IP, B_IP = 0xC0_00_02_02, 0xC0_00_02_01          # 192.0.2.2, 192.0.2.1
A_PORT, B_PORT = 80, 40000


class Clock:
    """Simulated time: ``now`` in seconds, and the NIC's TSval clock in milliseconds."""

    def __init__(self, start=0.0, ts_base=0):
        self.now = start
        self.ts_base = ts_base

    def ts(self):
        return (self.ts_base + int(self.now * 1000)) & MASK32


def make_event(local, peer, iss, irs, *, mss=1460, wscale=(7, 9), ts=True, ts_recent=0,
               ts_echo=0, window=None):
    """An ESTABLISHED event dict for ``local`` talking to ``peer`` ((mac, ip, port) each).
    ``wscale``: (our shift, the peer's), or None when not negotiated."""
    e = zero_event()
    local_shift, peer_shift = wscale or (0, 0)
    e.update(kind=int(EventKind.ESTABLISHED), peer_ip=peer[1], local_ip=local[1],
             peer_port=peer[2], local_port=local[2], iss=iss, irs=irs, mss=mss,
             wscale_ok=int(wscale is not None), peer_wscale=peer_shift,
             local_wscale=local_shift, sack_ok=1, ts_ok=int(ts), ts_recent=ts_recent,
             ts_echo=ts_echo, window=(65535 >> peer_shift) if window is None else window)
    e["eth"] = {"peer": peer[0], "local": local[0]}
    return e


def make_pair(rng, clock, *, mss=1460, wscale=(7, 9), ts=True, buffers=(1 << 16, 1 << 16),
              ends=((A_MAC, A_IP, A_PORT), (B_MAC, B_IP, B_PORT)), **settings):
    """Two connections established with each other as the NIC would report it on both
    ends: by default A (192.0.2.2:80) and B (192.0.2.1:40000); ``ends``: (mac, ip, port)."""
    a_iss, b_iss = rng.getrandbits(32), rng.getrandbits(32)
    a_end, b_end = ends
    b_shifts = (wscale[1], wscale[0]) if wscale else None
    ts_a, ts_b = rng.getrandbits(32), rng.getrandbits(32)
    a = TcpConnection(make_event(a_end, b_end, a_iss, b_iss, mss=mss, wscale=wscale, ts=ts,
                                 ts_recent=ts_b, ts_echo=clock.ts()),
                      TcpSettings(receive_buffer=buffers[0], ts_clock=clock.ts, **settings))
    b = TcpConnection(make_event(b_end, a_end, b_iss, a_iss, mss=mss, wscale=b_shifts, ts=ts,
                                 ts_recent=ts_a, ts_echo=clock.ts()),
                      TcpSettings(receive_buffer=buffers[1], ts_clock=clock.ts, **settings))
    # Each side's first TSval is what the other side's ts_recent says (any value would
    # do for PAWS as long as it is not in the future of the sender's clock).
    a.ts_recent, b.ts_recent = b._tsval(), a._tsval()
    return a, b


class Channel:
    """A lossy network between two endpoints: each frame is lost with probability
    ``loss``, duplicated with ``dup``, and delivered after ``delay`` plus up to
    ``jitter`` seconds (so frames overtake each other)."""

    def __init__(self, rng, loss=0.0, dup=0.0, delay=0.01, jitter=0.0):
        self.rng, self.loss, self.dup = rng, loss, dup
        self.delay, self.jitter = delay, jitter
        self.queue = []                 # (arrival, order, destination, frame)
        self.order = 0
        self.sent = self.lost = self.duplicated = 0

    def send(self, now, destination, frame):
        self.sent += 1
        if self.rng.random() < self.loss:
            self.lost += 1
            return
        copies = 2 if self.rng.random() < self.dup else 1
        self.duplicated += copies - 1
        for _ in range(copies):
            self.order += 1
            arrival = now + self.delay + self.rng.random() * self.jitter
            heapq.heappush(self.queue, (arrival, self.order, destination, frame))

    def next_arrival(self):
        return self.queue[0][0] if self.queue else None

    def pop(self):
        arrival, _, destination, frame = heapq.heappop(self.queue)
        return arrival, destination, frame


def run_pair(a, b, clock, channel, *, until, app=None, max_events=500_000, tap=None):
    """Run both connections over ``channel`` (event-driven simulated time) until
    ``until()`` holds or nothing is left to happen. ``app(now)`` runs after each event
    (the applications); ``tap(sender, frame)`` sees every frame sent."""
    peers = {id(a): b, id(b): a}
    idle = 0
    for _ in range(max_events):
        for conn in (a, b):
            for frame in conn.poll(clock.now):
                if tap:
                    tap(conn, frame)
                channel.send(clock.now, peers[id(conn)], frame)
        if until():
            return True
        times = [t for t in (channel.next_arrival(), a.next_deadline(), b.next_deadline())
                 if t is not None]
        if not times:                   # nothing scheduled: the applications act or it is over
            idle += 1
            if app is None or idle > 1000:
                return until()
            clock.now += 0.01
            app(clock.now)
            continue
        idle = 0
        # The applications act at least every 50 ms, also while timers back off.
        clock.now = max(clock.now, min(times) if app is None else min(min(times), clock.now + 0.05))
        if channel.next_arrival() is not None and channel.next_arrival() <= clock.now:
            _, destination, frame = channel.pop()
            destination.receive(frame, clock.now)
        if app:
            app(clock.now)
    raise AssertionError("the simulation did not settle")


# ---------------------------------------------------------------------------- scapy checks

def check_with_scapy(frame, conn, *, seq=None, ack=None, flags=None, payload=None):
    """``frame`` (sent by ``conn``) parses in scapy, has right checksums and the
    connection's addresses, window and timestamp option."""
    p = Ether(frame)
    assert IP in p and TCP in p
    ip, tcp = p[IP], p[TCP]
    assert scapy_checksums(frame) == (ip.chksum, tcp.chksum)
    assert (int(p.src.replace(":", ""), 16), int(p.dst.replace(":", ""), 16)) == (
        conn.local_mac, conn.peer_mac)
    assert (ip.src, ip.dst) == (socket.inet_ntoa(conn.local_ip.to_bytes(4, "big")),
                                socket.inet_ntoa(conn.peer_ip.to_bytes(4, "big")))
    assert (tcp.sport, tcp.dport) == (conn.local_port, conn.peer_port)
    assert ip.flags.DF and ip.ttl == 64 and ip.ihl == 5
    options = dict((k, v) for k, v in tcp.options if k != "NOP")
    if tcp.flags.R:
        assert tcp.window == 0 and not options
    else:
        assert tcp.flags.A and tcp.ack == conn.rcv_nxt
        assert (tcp.window << conn.local_wscale) >= conn.receive_buffer.free - (
            1 << conn.local_wscale) or tcp.window == 0xFFFF
        if conn.ts_ok:
            assert set(options) == {"Timestamp"}
            assert options["Timestamp"] == (conn._tsval(), conn.ts_recent)
        else:
            assert not options
    data = bytes(tcp.payload)[:ip.len - ip.ihl * 4 - tcp.dataofs * 4]
    if seq is not None:
        assert tcp.seq == seq & MASK32
    if ack is not None:
        assert tcp.ack == ack & MASK32
    if flags is not None:
        assert str(tcp.flags) == flags
    if payload is not None:
        assert data == payload
    return tcp, data


@pytest.mark.parametrize("ts,wscale", [(True, (7, 9)), (False, None), (True, None),
                                        (False, (2, 14))])
def test_frames_parse_in_scapy(ts, wscale):
    rng = random.Random(1)
    clock = Clock(ts_base=rng.getrandbits(32))
    a, b = make_pair(rng, clock, ts=ts, wscale=wscale, buffers=(100_000, 70_000))
    mss = 1460 - (12 if ts else 0)
    assert a.mss == mss
    data = rng.randbytes(2 * mss + 100)     # three segments: the initial window (RFC 5681)
    a.send(data)
    frames = a.poll(0.0)
    assert len(frames) == 3
    start = a.snd_una
    for k, frame in enumerate(frames):
        chunk = data[k * mss:(k + 1) * mss]
        check_with_scapy(frame, a, seq=start + k * mss, ack=b.snd_una, payload=chunk,
                         flags="PA" if k == 2 else "A")
    for frame in frames:
        assert b.receive(frame, 0.01)
    assert b.read() == data
    acks = b.poll(0.01)
    assert len(acks) == 1          # one ACK for the burst (every second segment, merged)
    check_with_scapy(acks[0], b, seq=b.snd_nxt, ack=a.snd_max, flags="A", payload=b"")
    assert a.receive(acks[0], 0.02) and a.all_acked
    a.close()
    fin = a.poll(0.02)
    check_with_scapy(fin[0], a, seq=a.snd_una, flags="FA", payload=b"")
    # The parser model of the NIC agrees (no error flags) on everything we send.
    for frame in frames + acks + fin:
        meta = parse_frame(frame)
        assert not any(meta["errors"].values())
        assert meta["opt"]["ts_valid"] == int(ts)


@pytest.mark.parametrize("layout", ["linux", "macos", "windows", "none"])
def test_established_from_the_handshake_model(layout):
    """The real flow without Linux: a scapy client's SYN and final ACK (with a request)
    through the handshake engine's golden model; its event makes the TcpConnection, the
    final ACK's frame goes to it too; our ACK continues the SYN-ACK's TSval clock."""
    from tb.test_handshake import LISTEN_IP, Client
    rng = random.Random(40)
    model = HandshakeModel()
    model.keys.rotate(rng.getrandbits(128))
    model.write_listener(0, listener(80, mss=1460, wscale=7, window=65535))
    clock = Clock(ts_base=rng.getrandbits(32))
    model.ts_clock = clock.ts()
    client = Client(rng, 80, layout=layout, dst=LISTEN_IP, randomize=False)
    _, synack, _ = model.process(parse_frame(client.syn()))
    synack_frame = frame_from_header(synack)
    assert scapy_checksums(synack_frame) == (Ether(synack_frame)[IP].chksum,
                                             Ether(synack_frame)[TCP].chksum)
    request = b"GET / HTTP/1.1\r\n\r\n"
    final = client.final_ack(synack, payload=request)
    clock.now = 0.001
    verdict, _, event = model.process(parse_frame(final))
    assert verdict["to_host"] and event["payload_length"] == len(request)
    conn = TcpConnection(event, TcpSettings(ts_clock=clock.ts))
    assert conn.receive(final, clock.now) and conn.read() == request
    ack, = conn.poll(clock.now + 1)                 # the delayed ACK
    tcp, _ = check_with_scapy(ack, conn, seq=synack["tcp"]["seq"] + 1,
                              ack=client.isn + 1 + len(request), flags="A")
    if client.uses_ts:
        tsval, tsecr = dict(tcp.options)["Timestamp"]
        assert tsecr == (client.ts + 1) & MASK32
        assert seq_ge(tsval, synack["opt"]["tsval"])    # not older than the SYN-ACK's
    assert conn.mss == event["mss"] - (12 if client.uses_ts else 0)


# ---------------------------------------------------------------------------- back to back

@pytest.mark.parametrize("seed,loss,dup,jitter", [(1, 0.0, 0.0, 0.0), (2, 0.05, 0.02, 0.004),
                                                   (3, 0.15, 0.05, 0.02), (4, 0.02, 0.1, 0.05)])
def test_back_to_back(seed, loss, dup, jitter):
    rng = random.Random(seed)
    clock = Clock(ts_base=rng.getrandbits(32))
    a, b = make_pair(rng, clock, buffers=(rng.choice([8_000, 65_536, 300_000]),
                                          rng.choice([5_000, 65_536, 200_000])),
                     time_wait=2.0)
    channel = Channel(rng, loss=loss, dup=dup, delay=0.005, jitter=jitter)
    to_b, to_a = rng.randbytes(rng.randrange(100_000, 400_000)), rng.randbytes(150_000)
    pending = {id(a): [to_b, 0], id(b): [to_a, 0]}
    got = {id(a): bytearray(), id(b): bytearray()}

    def app(now):
        for conn in (a, b):
            data, offset = pending[id(conn)]
            if offset < len(data) and rng.random() < 0.3:
                size = rng.choice([1, 100, 1000, 5000, 30000])
                conn.send(data[offset:offset + size])
                pending[id(conn)][1] = offset + size
            elif offset >= len(data) and not conn.fin_queued:
                conn.close()
            if rng.random() < 0.5:                  # the application reads when it likes
                got[id(conn)] += conn.read(rng.choice([None, 2000]))

    def every_frame_in_scapy(sender, frame):
        check_with_scapy(frame, sender)
        sent[0] += 1

    sent = [0]
    assert run_pair(a, b, clock, channel, app=app, until=lambda: a.closed and b.closed,
                    tap=every_frame_in_scapy)
    assert sent[0] > 100
    got[id(a)] += a.read()
    got[id(b)] += b.read()
    assert bytes(got[id(b)]) == to_b and bytes(got[id(a)]) == to_a
    assert a.error is None and b.error is None
    # Who closed first ends in TIME_WAIT and then CLOSED; both end CLOSED.
    assert a.state == b.state == State.CLOSED
    if loss:
        assert a.counters.get("retransmits", 0) + b.counters.get("retransmits", 0) > 0
    if dup or jitter:
        assert a.counters.get("rx_duplicate", 0) + b.counters.get("rx_duplicate", 0) \
            + a.counters.get("rx_out_of_order", 0) + b.counters.get("rx_out_of_order", 0) > 0


def random_config_run(seed):
    """One back-to-back run with a random configuration: loss 0..25 %, duplicates,
    jitter, timestamps on/off, window scales 0..14, MSS 536..1460, delayed ACK on/off,
    small and large buffers, random data both ways, closes at random moments. Returns
    None when both ends got everything and closed cleanly, else what went wrong."""
    config = random.Random(seed * 7919)
    loss = config.choice([0, 0.02, 0.1, 0.25])
    dup, jitter = config.choice([0, 0.05, 0.2]), config.choice([0, 0.003, 0.03])
    ts, wscale = config.random() < 0.7, config.choice([(7, 9), None, (14, 0), (3, 2)])
    shifts = wscale or (0, 0)
    rng = random.Random(seed)
    clock = Clock(ts_base=rng.getrandbits(32))
    a, b = make_pair(rng, clock, ts=ts, wscale=wscale, mss=config.choice([536, 1300, 1460]),
                     buffers=(max(4 << shifts[0], rng.choice([3000, 8000, 65536, 300_000])),
                              max(4 << shifts[1], rng.choice([2000, 5000, 65536, 200_000]))),
                     time_wait=30.0, delayed_ack=config.choice([0, 0.04, 0.2]))
    channel = Channel(rng, loss=loss, dup=dup, delay=0.005, jitter=jitter)
    to_send = {id(a): rng.randbytes(rng.randrange(200_000)),
               id(b): rng.randbytes(rng.randrange(100_000))}
    offsets = {id(a): 0, id(b): 0}
    got = {id(a): bytearray(), id(b): bytearray()}

    def app(now):
        for conn in (a, b):
            data, offset = to_send[id(conn)], offsets[id(conn)]
            if offset < len(data) and rng.random() < 0.3:
                size = rng.choice([1, 100, 1000, 5000, 30000])
                conn.send(data[offset:offset + size])
                offsets[id(conn)] = offset + size
            elif offset >= len(data) and not conn.fin_queued and rng.random() < 0.1:
                conn.close()
            if rng.random() < 0.5:
                got[id(conn)] += conn.read(rng.choice([None, 2000]))

    if not run_pair(a, b, clock, channel, app=app, until=lambda: a.closed and b.closed):
        return f"seed {seed}: not closed ({a.state}, {b.state})"
    got[id(a)] += a.read()
    got[id(b)] += b.read()
    if bytes(got[id(b)]) != to_send[id(a)] or bytes(got[id(a)]) != to_send[id(b)]:
        return f"seed {seed}: data differ"
    if a.error or b.error:
        return f"seed {seed}: errors {a.error}, {b.error} (loss {loss})"
    return None


def test_back_to_back_random_configs():
    """30 random configurations (``random_config_run``); a longer sweep:
    ``[random_config_run(s) for s in range(1000)]``."""
    assert [r for r in map(random_config_run, range(30)) if r] == []


def bench_back_to_back(total=20_000_000, seed=1):
    """Throughput of the Python stack itself: ``total`` bytes one way between two
    connections in one process, no loss. Returns (CPU seconds, frames)."""
    rng = random.Random(seed)
    clock = Clock()
    a, b = make_pair(rng, clock, buffers=(1 << 20, 1 << 20))
    data = rng.randbytes(total)
    a.send(data)
    got = bytearray()
    started = time.process_time()
    assert run_pair(a, b, clock, Channel(rng, delay=0.0005), app=lambda now: got.extend(b.read()),
                    until=lambda: a.all_acked, max_events=10 ** 7)
    cpu = time.process_time() - started
    got += b.read()
    assert bytes(got) == data
    frames = a.counters["tx_segments"] + b.counters["tx_segments"]
    print(f"{total / 1e6:.0f} MB one way: {cpu:.2f} s CPU, {total / 1e6 / cpu:.1f} MB/s, "
          f"{frames} frames")
    return cpu, frames


def test_close_states():
    """Simultaneous close: FIN_WAIT_1 -> CLOSING -> TIME_WAIT on both sides; a FIN that
    comes again in TIME_WAIT is ACKed and restarts it; then CLOSED. A passive close:
    CLOSE_WAIT -> LAST_ACK -> CLOSED."""
    rng = random.Random(21)
    clock = Clock()
    a, b = make_pair(rng, clock, time_wait=5.0)
    a.close(), b.close()
    fin_a, fin_b = a.poll(0.0), b.poll(0.0)
    assert a.state == b.state == State.FIN_WAIT_1
    assert a.receive(fin_b[0], 0.01) and b.receive(fin_a[0], 0.01)
    assert a.state == b.state == State.CLOSING
    acks_a, acks_b = a.poll(0.01), b.poll(0.01)
    assert a.receive(acks_b[0], 0.02) and b.receive(acks_a[0], 0.02)
    assert a.state == b.state == State.TIME_WAIT
    assert a.receive(fin_b[0], 3.0)                 # b's FIN again: ACKed, TIME_WAIT again
    check_with_scapy(a.poll(3.0)[0], a, ack=b.snd_max, flags="A")
    assert a.next_deadline() == pytest.approx(8.0) and b.next_deadline() == pytest.approx(5.02)
    assert a.poll(7.9) == [] and a.state == State.TIME_WAIT
    a.poll(8.0), b.poll(5.02)
    assert a.state == b.state == State.CLOSED and a.error is None and b.error is None
    # Passive close.
    a, b = make_pair(rng, clock)
    b.close()
    assert a.receive(b.poll(0.0)[0], 0.0) and a.state == State.CLOSE_WAIT and a.at_eof
    a.close()
    fin, = a.poll(0.0)
    check_with_scapy(fin, a, flags="FA")
    assert a.state == State.LAST_ACK
    assert b.receive(fin, 0.0) and b.state == State.TIME_WAIT
    assert a.receive(b.poll(0.0)[0], 0.0) and a.state == State.CLOSED and a.error is None


def test_retransmission_backoff_and_abort():
    """A silent peer: RTO doubles each time, then the connection aborts with an RST."""
    rng = random.Random(7)
    clock = Clock()
    a, _ = make_pair(rng, clock, max_retries=4, initial_rto=1.0, min_rto=0.2)
    a.send(b"x" * 100)
    sent = []
    while not a.closed:
        frames = a.poll(clock.now)
        sent += [(clock.now, f) for f in frames]
        clock.now = a.next_deadline() if a.next_deadline() is not None else clock.now
    times = [t for t, _ in sent]
    gaps = [round(y - x, 6) for x, y in zip(times, times[1:])]
    assert gaps == [1.0, 2.0, 4.0, 8.0, 16.0]              # 4 retransmissions, then the RST
    last = Ether(sent[-1][1])[TCP]
    assert last.flags == "RA" and a.error == "timeout"
    assert all(bytes(Ether(f)[TCP].payload)[:100] == b"x" * 100 for _, f in sent[:-1])


def test_zero_window_probes():
    """A peer whose application never reads: its window closes; probes back off; when it
    reads, the window update restarts the transfer."""
    rng = random.Random(8)
    clock = Clock()
    a, b = make_pair(rng, clock, buffers=(1 << 16, 4096), wscale=None)
    channel = Channel(rng, delay=0.01)
    data = rng.randbytes(20_000)
    a.send(data)
    assert run_pair(a, b, clock, channel, until=lambda: a.counters.get("window_probes", 0) >= 4)
    assert b.readable == 4096 and a.snd_wnd == 0
    assert run_pair(a, b, clock, channel, app=lambda now: b.read(500) if now > 60 else None,
                    until=lambda: a.all_acked)
    assert b.counters["window_updates"] > 0


def test_rtt_estimate():
    rng = random.Random(9)
    clock = Clock()
    a, b = make_pair(rng, clock, delayed_ack=0)
    channel = Channel(rng, delay=0.05)
    a.send(rng.randbytes(50_000))
    assert run_pair(a, b, clock, channel, until=lambda: a.all_acked)
    assert a.rtt.srtt == pytest.approx(0.1, abs=0.01)
    assert a.rtt.rto == pytest.approx(0.2, abs=0.05)       # min_rto bounds it


# ---------------------------------------------------------------------------- bad input

def _from_b(b, flags="A", seq=None, ack=None, payload=b"", tsval=None, window=100):
    """A frame from B's side, built by scapy (the reference), with B's numbers."""
    options = []
    if b.ts_ok:
        options = [("NOP", None), ("NOP", None),
                   ("Timestamp", (b._tsval() if tsval is None else tsval, b.ts_recent))]
    frame = (Ether(src="02:00:00:00:00:0b", dst="02:00:00:00:00:0a")
             / IP(src="192.0.2.1", dst="192.0.2.2", flags="DF")
             / TCP(sport=B_PORT, dport=A_PORT, flags=flags,
                   seq=(b.snd_nxt if seq is None else seq) & MASK32,
                   ack=(b.rcv_nxt if ack is None else ack) & MASK32, window=window,
                   options=options) / payload)
    frame = bytes(frame)
    return frame + bytes(max(0, 60 - len(frame)))


def test_bad_frames_dropped_and_counted():
    rng = random.Random(10)
    clock = Clock()
    a, b = make_pair(rng, clock)
    assert len(a.poll(0.0)) == 1        # the first poll announces our (scaled) window
    good = _from_b(b, payload=b"hello")
    bad_tcp = bytearray(good)
    bad_tcp[54 + 12] ^= 0xFF                  # the first payload byte: TCP checksum wrong
    bad_ip = bytearray(good)
    bad_ip[14 + 8] ^= 1                       # the TTL: IPv4 checksum wrong
    other = bytes(Ether(src="02:00:00:00:00:0b", dst="02:00:00:00:00:0a")
                  / IP(src="192.0.2.1", dst="192.0.2.2") / TCP(sport=B_PORT + 1, dport=A_PORT))
    for frame in (good[:30], good[:54 + 5], bytes(bad_tcp), bytes(bad_ip), other, b"\0" * 10):
        assert not a.receive(frame, 0.0)
    c = a.counters
    assert (c["rx_truncated"], c["rx_bad_tcp_checksum"], c["rx_bad_ip_checksum"],
            c["rx_other_flow"], c["rx_not_tcp"]) == (2, 1, 1, 1, 1)
    assert a.readable == 0 and a.poll(0.0) == []
    assert a.receive(good, 0.0) and a.read() == b"hello"


def test_out_of_window_and_old_segments():
    rng = random.Random(11)
    clock = Clock()
    a, b = make_pair(rng, clock, buffers=(10_000, 10_000))
    nxt = a.rcv_nxt
    assert a.receive(_from_b(b, seq=nxt + 20_000, payload=b"far"), 0.0)
    assert a.counters["rx_out_of_window"] == 1
    acks = a.poll(0.0)
    assert len(acks) == 1
    check_with_scapy(acks[0], a, seq=a.snd_nxt, ack=nxt, flags="A", payload=b"")
    assert a.receive(_from_b(b, seq=nxt - 5000, payload=b"old"), 0.0)     # before RCV.NXT
    assert a.counters["rx_out_of_window"] == 2 and len(a.poll(0.0)) == 1
    # Out of order inside the window: held, a duplicate ACK at once, delivered later.
    assert a.receive(_from_b(b, seq=nxt + 5, payload=b"world"), 0.0)
    check_with_scapy(a.poll(0.0)[0], a, ack=nxt, flags="A")
    assert a.readable == 0
    assert a.receive(_from_b(b, seq=nxt, payload=b"hello"), 0.0)
    assert a.read() == b"helloworld"
    # An ACK of data we never sent: answered with an ACK, segment dropped.
    assert a.receive(_from_b(b, seq=a.rcv_nxt, ack=a.snd_nxt + 1000, payload=b"zzz"), 0.0)
    assert a.counters["rx_ack_too_new"] == 1 and a.readable == 0
    # An ACK older than SND.UNA - MAX.SND.WND (RFC 5961 5.2): dropped with an ACK.
    assert a.receive(_from_b(b, seq=a.rcv_nxt, ack=a.snd_una - a.max_snd_wnd - 10,
                             payload=b"old-ack"), 0.0)
    assert a.counters["rx_ack_too_old"] == 1 and a.readable == 0


def test_rst_rfc5961():
    rng = random.Random(12)
    clock = Clock()
    a, b = make_pair(rng, clock)
    nxt = a.rcv_nxt
    assert a.receive(_from_b(b, flags="R", seq=nxt + 100), 0.0)        # in window, not exact
    frames = a.poll(0.0)
    assert len(frames) == 1 and a.state == State.ESTABLISHED
    check_with_scapy(frames[0], a, seq=a.snd_nxt, ack=nxt, flags="A")   # challenge ACK
    assert a.receive(_from_b(b, flags="R", seq=nxt + 10_000_000), 0.0)  # outside: ignored
    assert a.poll(0.0) == [] and a.state == State.ESTABLISHED
    assert a.receive(_from_b(b, flags="S", seq=nxt + 3), 0.0)           # SYN: challenge ACK
    assert len(a.poll(0.0)) == 1 and a.state == State.ESTABLISHED
    assert (a.counters["rst_challenged"], a.counters["rst_ignored"],
            a.counters["syn_challenged"]) == (1, 1, 1)
    assert a.receive(_from_b(b, flags="R", seq=nxt), 0.0)               # exact: closed
    assert a.state == State.CLOSED and a.error == "reset" and a.poll(0.0) == []


def test_paws_and_ts_recent():
    rng = random.Random(13)
    clock = Clock()
    a, b = make_pair(rng, clock)
    recent = a.ts_recent
    assert a.receive(_from_b(b, payload=b"old", tsval=(recent - 5) & MASK32), 0.0)
    assert a.counters["rx_paws"] == 1 and a.readable == 0
    assert len(a.poll(0.0)) == 1                                        # ACKed, dropped
    assert a.receive(_from_b(b, payload=b"new", tsval=recent + 7), 0.0)
    assert a.read() == b"new" and a.ts_recent == (recent + 7) & MASK32
    # An out-of-order segment does not move TS.Recent (its SEQ is after the last ACK sent).
    assert a.receive(_from_b(b, seq=a.rcv_nxt + 10, payload=b"x", tsval=recent + 50), 0.0)
    assert a.ts_recent == (recent + 7) & MASK32


def test_ts_offset_continues_the_synack_clock():
    """The SYN-ACK's TSval (ts_echo) may be ahead of the NIC clock (cookie bits in its low
    6 bits): our first TSval is not below it, and the offset is what CLOSE carries."""
    clock = Clock(ts_base=1024)
    e = make_event((A_MAC, A_IP, A_PORT), (B_MAC, B_IP, B_PORT), 1, 2, ts_echo=1024 | 63)
    conn = TcpConnection(e, TcpSettings(ts_clock=clock.ts))
    assert conn.ts_offset == 63 and conn._tsval() == 1087
    clock.now = 1.0
    assert conn._tsval() == 2087
    e = make_event((A_MAC, A_IP, A_PORT), (B_MAC, B_IP, B_PORT), 1, 2, ts_echo=900)
    assert TcpConnection(e, TcpSettings(ts_clock=clock.ts)).ts_offset == 0


# ---------------------------------------------------------------------------- hand-overs

def test_close_command():
    rng = random.Random(15)
    clock = Clock(ts_base=77)
    a, b = make_pair(rng, clock)
    channel = Channel(rng, delay=0.01)
    a.send(b"request-answer" * 10)
    assert run_pair(a, b, clock, channel, until=lambda: a.all_acked)
    a.send(b"held1")
    a.poll(clock.now)                       # sent, not acknowledged
    a.send(b"held2")                        # queued, not sent
    fields, held = a.close_command()
    assert held == b"held1held2" and fields["data_length"] == 10
    assert fields["snd_una"] == a.snd_una and fields["snd_nxt"] == (a.snd_una + 5) & MASK32
    assert fields["rcv_nxt"] == a.rcv_nxt and fields["peer_fin"] == 0
    assert fields["ts_offset"] == a.ts_offset and fields["ts_recent"] == a.ts_recent
    assert fields["rcv_wscale"] == 7 and fields["window"] << 7 >= a.receive_buffer.free - 127
    pack_struct(CLOSE_COMMAND, **fields)            # every field fits the layout
    assert a.state == State.HANDED_OVER and a.poll(clock.now) == []
    # Passive close: the peer's FIN first.
    a2, b2 = make_pair(rng, clock)
    b2.close()
    assert run_pair(a2, b2, clock, Channel(rng), until=lambda: a2.state == State.CLOSE_WAIT)
    fields, held = a2.close_command()
    assert fields["peer_fin"] == 1 and held == b""
    # Too much unacknowledged data: refused.
    a3, _ = make_pair(rng, clock)
    assert a3.max_held_data == min(MAX_HELD_DATA, 1448)
    a3.send(bytes(a3.max_held_data + 1))
    assert not a3.can_hand_over_close
    with pytest.raises(ValueError):
        a3.close_command()


class NicTeardown:
    """The NIC's teardown engine (its golden model, ``sim.teardown_model``) as an endpoint
    for ``run_pair``: it takes a CLOSE and then talks to the peer. Its timer clock and
    its timestamp clock are the simulated clock in milliseconds, like the host's."""

    def __init__(self, clock, command, held, **timers):
        self.clock = clock
        self.model = TeardownModel(**timers)
        self.frames, self.events = [], []
        self._take(self._at(clock.now).close(command, held, now=self._ticks(clock.now)))

    @staticmethod
    def _ticks(now):
        return int(round(now * 1000)) & MASK32

    def _at(self, now):
        self.model.ts_clock = self.clock.ts()
        return self.model

    def _take(self, out):
        self.frames += [frame_from_header(s, s["payload"]) for s in out.segments]
        self.events += out.events

    def receive(self, frame, now):
        self._take(self._at(now).frame(frame, now=self._ticks(now)))

    def poll(self, now):
        self._take(self._at(now).advance(self._ticks(now)))
        frames, self.frames = self.frames, []
        return frames

    def next_deadline(self):
        deadline = self.model.next_deadline()
        if deadline is None:
            return None
        return self.clock.now + ((deadline - self._ticks(self.clock.now)) & MASK32) / 1000

    @property
    def closed(self):
        return self.model.closing == 0


@pytest.mark.parametrize("passive,loss", [(False, 0.0), (False, 0.2), (True, 0.1)])
def test_close_handed_to_the_nic_model(passive, loss):
    """The host hands its close to the NIC (sim.teardown_model, the RTL's golden model)
    with unacknowledged data; the peer, a TcpConnection, gets every byte and the FIN
    from the NIC, sees one monotonic TSval clock (no PAWS drop), and closes too."""
    rng = random.Random(20 + passive)
    clock = Clock(ts_base=rng.getrandbits(32))
    a, b = make_pair(rng, clock, time_wait=1.0)
    request, answer = rng.randbytes(5000), rng.randbytes(30_000)
    b.send(request)
    if passive:
        b.close()
    assert run_pair(a, b, clock, Channel(rng, loss=loss, delay=0.01),
                    until=lambda: a.readable == len(request) and a.peer_fin == passive)
    assert a.read() == request
    # The answer: most of it acknowledged; then 700 bytes sent (the frame reaches the
    # peer: it will get them twice) and 300 queued when the host hands the close over.
    a.send(answer[:-1000])
    assert run_pair(a, b, clock, Channel(rng, loss=loss, delay=0.01), until=lambda: a.all_acked)
    a.send(answer[-1000:-300])
    in_flight = a.poll(clock.now)
    a.send(answer[-300:])
    command, held = a.close_command()
    assert command["peer_fin"] == int(passive) and held == answer[-1000:]
    assert command["snd_nxt"] == (command["snd_una"] + 700) & MASK32
    for frame in in_flight:
        b.receive(frame, clock.now)
    got = bytearray(b.read())
    nic = NicTeardown(clock, command, held, fin_rto=200, fin_retries=6, time_wait=500,
                      fin2_timeout=5000)
    assert [e["status"] for e in nic.events] == [CloseStatus.OK]

    def peer_app(now):
        got.extend(b.read())
        if b.at_eof and not b.fin_queued:
            b.close()

    assert run_pair(nic, b, clock, Channel(rng, loss=loss, delay=0.01), app=peer_app,
                    until=lambda: nic.closed and b.closed)
    got.extend(b.read())
    assert bytes(got) == answer and b.error is None and b.state == State.CLOSED
    assert b.counters.get("rx_paws", 0) == 0
    assert nic.events[-1]["kind"] == EventKind.CLOSED
    assert nic.events[-1]["status"] == CloseReason.NORMAL


def test_splice_side():
    rng = random.Random(16)
    clock = Clock()
    a, b = make_pair(rng, clock)
    a.send(b"GET / HTTP/1.1\r\n\r\n")
    a.poll(0.0)
    assert not a.all_acked
    with pytest.raises(ValueError):
        a.splice_side()
    assert run_pair(a, b, clock, Channel(rng), until=lambda: a.all_acked)
    side = a.splice_side(ttl=64)
    assert side["snd_nxt"] == a.snd_una and side["rcv_nxt"] == a.rcv_nxt
    assert (side["ts_ok"], side["wscale_ok"], side["peer_wscale"], side["local_wscale"]) == (
        1, 1, 9, 7)
    assert side["ts_now"] == a._tsval()
    pack_struct(SPLICE_SIDE, **side)
    assert a.state == State.HANDED_OVER


def splice_rewrite(src, dst):
    """The REWRITE fields for frames from ``src``'s peer, relayed to ``dst``'s peer, from
    the two SPLICE_SIDE dicts (docs/splice.md's table, as ``hw.splice.splice_params``)."""
    ts = src["ts_ok"] and dst["ts_ok"]
    shift_in = src["peer_wscale"] if src["wscale_ok"] else 0
    shift_out = dst["local_wscale"] if dst["wscale_ok"] else 0
    return {"eth": {"dst": dst["peer_mac"], "src": dst["local_mac"]},
            "ip": {"src": dst["local_ip"], "dst": dst["peer_ip"], "ttl": dst["ttl"]},
            "tcp": {"sport": dst["local_port"], "dport": dst["peer_port"]},
            "seq_delta": (dst["snd_nxt"] - src["rcv_nxt"]) & MASK32,
            "ack_delta": (dst["rcv_nxt"] - src["snd_nxt"]) & MASK32,
            "tsval_delta": (dst["ts_now"] - src["ts_recent"]) & MASK32 if ts else 0,
            "tsecr_delta": (dst["ts_recent"] - src["ts_now"]) & MASK32 if ts else 0,
            "window_left": max(0, shift_in - shift_out),
            "window_right": max(0, shift_out - shift_in)}


class SplicedChannel(Channel):
    """A channel through a splicing NIC: every frame is rewritten (``sim.splice_model``,
    the rewriter's model) for the direction of its destination."""

    def __init__(self, rng, rewrites, **kw):
        super().__init__(rng, **kw)
        self.rewrites = rewrites            # id(destination) -> REWRITE fields

    def send(self, now, destination, frame):
        desc = desc_for(parse_frame(frame), **self.rewrites[id(destination)])
        super().send(now, destination, rewrite_frame(frame, desc))


@pytest.mark.parametrize("loss", [0.0, 0.1])
def test_splice_hand_over(loss):
    """A proxy holds connection pa with client A and pb with server B (other window
    scales); it forwards A's request, waits until all it sent is acknowledged, and
    splices: A and B then talk through the NIC's rewrite (model) and close, with every
    byte intact, no PAWS drop and no error."""
    rng = random.Random(30 + int(loss * 10))
    clock = Clock(ts_base=rng.getrandbits(32))
    proxy_a, proxy_b = (0x02_00_00_00_00_0A, A_IP, 80), (0x02_00_00_00_00_0A, A_IP, 51000)
    client, server = (B_MAC, B_IP, 40000), (0x02_00_00_00_00_0C, 0xC6_33_64_07, 8080)
    pa, a = make_pair(rng, clock, wscale=(7, 10), ends=(proxy_a, client))
    pb, b = make_pair(rng, clock, wscale=(9, 2), ends=(proxy_b, server))
    request = rng.randbytes(3000)
    a.send(request)
    assert run_pair(pa, a, clock, Channel(rng, loss=loss),
                    until=lambda: pa.readable == len(request) and a.all_acked)
    pb.send(pa.read())
    assert run_pair(pb, b, clock, Channel(rng, loss=loss), until=lambda: pb.all_acked)
    assert b.read() == request
    side_a, side_b = pa.splice_side(ttl=64), pb.splice_side(ttl=64)
    channel = SplicedChannel(rng, {id(b): splice_rewrite(side_a, side_b),
                                   id(a): splice_rewrite(side_b, side_a)}, loss=loss)
    response, more = rng.randbytes(200_000), rng.randbytes(20_000)
    b.send(response)
    a.send(more)
    a.close()
    got_a, got_b = bytearray(), bytearray()

    def apps(now):
        got_a.extend(a.read())
        got_b.extend(b.read())
        if b.at_eof and not b.fin_queued:
            b.close()

    assert run_pair(a, b, clock, channel, app=apps, until=lambda: a.closed and b.closed)
    assert bytes(got_a) == response and bytes(got_b) == more
    assert a.error is None and b.error is None
    assert a.counters.get("rx_paws", 0) == b.counters.get("rx_paws", 0) == 0


# ---------------------------------------------------------------------------- against Linux

LINUX_REASON = linux_peer.unavailable()
needs_linux = pytest.mark.skipif(LINUX_REASON is not None,
                                 reason=f"no Linux peer: {LINUX_REASON}")
OUR_IP_INT = int.from_bytes(socket.inet_aton(linux_peer.OUR_IP), "big")
LINUX_IP_INT = int.from_bytes(socket.inet_aton(linux_peer.LINUX_IP), "big")


def random_writes(rng, data):
    """``data`` cut into writes of mixed sizes."""
    offset = 0
    while offset < len(data):
        size = rng.choice([1, 10, 100, 1000, 1448, 4000, 16384, 65536])
        yield data[offset:offset + size]
        offset += size


def linux_client(total, seed, port):
    """Inside the namespace: connect to our side, write ``total`` random bytes (another
    thread), half-close, read the echo to EOF, close. Returns whether it came back whole."""
    rng = random.Random(seed)
    data = rng.randbytes(total)
    sock = socket.create_connection((linux_peer.OUR_IP, port), timeout=60)

    def writer():
        for chunk in random_writes(rng, data):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    received = bytearray()
    while chunk := sock.recv(1 << 16):
        received += chunk
    thread.join()
    sock.close()
    return bytes(received) == data, len(received)


def linux_echo_server(listening):
    """Inside the namespace: accept one connection, echo it to EOF, close."""
    conn, _ = listening.accept()
    conn.settimeout(60)
    echoed = 0
    while chunk := conn.recv(1 << 16):
        conn.sendall(chunk)
        echoed += len(chunk)
    conn.close()
    listening.close()
    return echoed


class OurSide:
    """Our end of a connection with Linux: frames through a ``LinuxPeer``, each dropped
    with probability ``loss`` in either direction (to make both stacks retransmit)."""

    def __init__(self, peer, settings, rng, loss=0.0):
        self.peer, self.settings, self.rng, self.loss = peer, settings, rng, loss
        self.conn = None
        self.dropped = 0

    def write(self, frames):
        for frame in frames:
            if self.rng.random() < self.loss:
                self.dropped += 1
            else:
                self.peer.write_frame(frame)

    def read(self, timeout):
        frame = self.peer.read_frame(timeout)
        if frame is not None and self.rng.random() < self.loss:
            self.dropped += 1
            return None
        return frame

    def run(self, before_established, application, deadline):
        """Until the connection is closed: frames before it exists go to
        ``before_established(frame, now)`` (which may set ``self.conn``); then to the
        connection; ``application(conn)`` runs after every step."""
        while time.monotonic() < deadline:
            now = time.monotonic()
            wait = 0.02
            if self.conn is not None and self.conn.next_deadline() is not None:
                wait = min(wait, max(0.0, self.conn.next_deadline() - now))
            frame = self.read(wait)
            now = time.monotonic()
            if frame is not None:
                if self.conn is None:
                    before_established(frame, now)
                else:
                    self.conn.receive(frame, now)
            if self.conn is None:
                continue
            application(self.conn)
            self.write(self.conn.poll(now))
            if self.conn.closed:
                return self.conn
        raise AssertionError("the connection did not finish in time")


def echo_application(conn):
    """Send back what arrives; close once the peer closed and all is echoed."""
    data = conn.read()
    if data and not conn.fin_queued:
        conn.send(data)
    if conn.at_eof and not conn.fin_queued:
        conn.close()


@needs_linux
@pytest.mark.parametrize("total,loss", [(200_000, 0.0), (100_000, 0.03)])
def test_linux_client_echo(total, loss):
    """A Linux client; our side answers the handshake as the NIC does (the golden
    model's cookie SYN-ACK), turns its established event into a TcpConnection and echoes."""
    port = 80
    rng = random.Random(17)
    handshake = HandshakeModel()
    handshake.keys.rotate(rng.getrandbits(128))
    handshake.write_listener(0, listener(port, ip=OUR_IP_INT, mss=1460, wscale=7,
                                         window=65535))
    settings = TcpSettings(receive_buffer=1 << 18, time_wait=0.2)
    with linux_peer.LinuxPeer() as peer:
        side = OurSide(peer, settings, rng, loss)

        def handshake_phase(frame, now):
            handshake.ts_clock = settings.ts_clock()
            _, reply, event = handshake.process(parse_frame(frame))
            if reply is not None:
                side.write([frame_from_header(reply)])
            if event is not None:
                side.conn = TcpConnection(event, settings)
                if event["payload_length"]:
                    side.conn.receive(frame, now)

        client = peer.start(linux_client, total, 18, port)
        started, cpu = time.monotonic(), time.process_time()
        conn = side.run(handshake_phase, echo_application, time.monotonic() + 120)
        wall, cpu = time.monotonic() - started, time.process_time() - cpu
        client.join(60)
        assert client.error is None, client.error
        linux = peer.linux_counters()
    assert client.result == (True, total)
    # Linux saw one monotonic TSval clock (SYN-ACK from the model, then the host's).
    assert linux["TcpExt.PAWSEstab"] == 0 and linux["Tcp.InErrs"] == 0
    assert conn.state == State.CLOSED and conn.error is None
    assert conn.ts_ok and conn.wscale_ok and conn.mss == 1448
    if loss:        # lost frames were recovered, by our retransmissions or by Linux's
        recovered = sum(conn.counters.get(k, 0) for k in ("retransmits", "rx_out_of_order",
                                                          "rx_duplicate"))
        assert side.dropped and recovered
    print(f"\nLinux client echo, loss {loss}: {2 * total / 1e6:.1f} MB in {wall:.2f} s wall, "
          f"{cpu:.2f} s CPU ({2 * total / 1e6 / wall:.2f} MB/s); {conn.counters}")


def nic_active_open(side, peer_port, rng, clock, mss=1460, wscale=7, window=64240):
    """What the NIC's active open (CONNECT) does, as ``tb/test_handshake`` checks it:
    our SYN (MSS, SACK-permitted, timestamps, window scale, in Linux's order); then
    ``on_frame`` takes the SYN-ACK, sends the ACK and returns the established event."""
    iss = rng.getrandbits(32)
    local_port = rng.randrange(32768, 61000)
    ends = dict(eth_dst=side.peer.linux_mac, eth_src=linux_peer.OUR_MAC, ip_src=OUR_IP_INT,
                ip_dst=LINUX_IP_INT, sport=local_port, dport=peer_port)
    syn = build_segment(**ends, seq=iss, ack=0, flags=TcpFlags.SYN, window=window, mss=mss,
                        sack_perm=True, timestamp=(clock(), 0), wscale=wscale)

    def on_frame(frame):
        seg = parse_segment(frame)
        if (isinstance(seg, str) or seg.sport != peer_port or seg.dport != local_port
                or seg.flags & (TcpFlags.SYN | TcpFlags.ACK) != TcpFlags.SYN | TcpFlags.ACK
                or seg.ack != (iss + 1) & MASK32):
            return None
        wscale_ok = seg.wscale is not None
        ts = (clock(), seg.tsval) if seg.ts_valid else None
        side.write([build_segment(**ends, seq=iss + 1, ack=seg.seq + 1, flags=TcpFlags.ACK,
                                  window=window >> (wscale if wscale_ok else 0), timestamp=ts)])
        event = make_event((linux_peer.OUR_MAC, OUR_IP_INT, local_port),
                           (side.peer.linux_mac, LINUX_IP_INT, peer_port), iss, seg.seq,
                           mss=seg.mss or 536, wscale=(wscale, min(seg.wscale, 14))
                           if wscale_ok else None, ts=seg.ts_valid, ts_recent=seg.tsval,
                           ts_echo=seg.tsecr, window=seg.window)
        event["active"] = 1
        return event

    return syn, on_frame


@needs_linux
@pytest.mark.parametrize("loss", [0.0, 0.03])
def test_linux_server_echo(loss):
    """A Linux echo server; our side opens the connection as the NIC's active open does,
    then a TcpConnection sends random data, reads the echo and closes first."""
    total, port = 150_000, 7
    rng = random.Random(19)
    settings = TcpSettings(receive_buffer=1 << 17, time_wait=0.2)
    data = rng.randbytes(total)
    with linux_peer.LinuxPeer() as peer:
        listening = peer.call(lambda: socket.create_server((linux_peer.LINUX_IP, port)))
        server = peer.start(linux_echo_server, listening)
        side = OurSide(peer, settings, rng, loss)
        syn, on_frame = nic_active_open(side, port, rng, settings.ts_clock)
        peer.write_frame(syn)           # (the NIC would retransmit a lost SYN)

        def handshake_phase(frame, now):
            event = on_frame(frame)
            if event is not None:
                side.conn = TcpConnection(event, settings)

        writes = list(random_writes(rng, data))
        received = bytearray()

        def application(conn):
            received.extend(conn.read())
            if writes and conn.unsent < 65536:
                conn.send(writes.pop(0))
            elif not writes and not conn.fin_queued:
                conn.close()

        conn = side.run(handshake_phase, application, time.monotonic() + 120)
        received += conn.read()
        server.join(60)
        assert server.error is None, server.error
        linux = peer.linux_counters()
    assert linux["TcpExt.PAWSEstab"] == 0 and linux["Tcp.InErrs"] == 0
    assert server.result == total and bytes(received) == data
    assert conn.state == State.CLOSED and conn.error is None and conn.at_eof
    assert conn.active and conn.ts_ok and conn.wscale_ok
