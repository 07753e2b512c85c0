"""The driver's socket API (``host_driver.driver``) and its servers, through the whole NIC.

scapy clients on the wire (``mac_rx``/``mac_tx`` of ``hw.nic.Nic``) talk to the echo and
key-value servers of ``host_driver.apps``: connect, request, response, close (the client
first, and the server first), with setup offload and without, with teardown offload and
without. Checks: the bytes, the CLOSE_STATUS / CLOSED events, the FIN exchange the client
sees (sequence numbers, ACKs), the NIC's connection table empty at the end. Faults: a
TABLE command for a flow the NIC does not know, a segment of an unknown flow (RST), a
CLOSE the NIC refuses (falls back to a software close), user mistakes (clear errors).

``host_work_figures()`` prints per-transaction host work with and without offloads
(events, DMA bytes, MMIO, host packets); ``python -m tb.test_driver`` runs it.
"""

import random

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from hw.conn_table import Status as TableStatus
from hw.handshake import DEFAULT_CONNECTS
from hw.host_formats import CommandStatus
from hw.metadata import CloseReason, CloseStatus, EventKind, FailStatus, SpliceEnd
from hw.nic import Nic
from hw.stream import frame_to_beats
from hw.teardown import MAX_HELD_DATA
from host_driver.apps import echo_session, format_host_work, host_work, kv_session
from host_driver.driver import Driver, DriverError, FlowKey, Listener
from sim.bus import StreamSource
from sim.traffic import NIC_MAC, pad
from tb.test_handshake import LISTEN_IP, Client
from tb.test_nic import FrameSink

#: The configuration tb/test_host_interface.py builds (one Verilator build for both).
PARAMS = {"width": 64, "entries": 256}
ECHO, ECHO_SOFT, KV, KV_SOFT = 7, 8, 6379, 6380


class WireClient:
    """One scapy TCP client on the NIC's wire. It reacts to the frames the NIC sends it
    (``on_frame``): completes its handshake (the request rides on the final ACK),
    acknowledges data and FINs, closes once ``close_after`` bytes came back, or after the
    server's FIN when ``close_on_fin``. No loss on a simulated wire: no retransmission."""

    def __init__(self, wire, rng, dport, request=b"", close_after=None, close_on_fin=True):
        self.wire = wire
        self.c = Client(rng, dport, layout="linux", randomize=False)
        self.request, self.close_after, self.close_on_fin = request, close_after, close_on_fin
        self.seq = self.c.isn
        self.rcv_nxt = None
        self.received = bytearray()
        self.ts_echo = 0
        self.tsval = self.c.ts
        self.state = "CLOSED"
        self.fin_sent_seq = None          # our FIN's sequence number once sent
        self.our_fin_acked = False
        self.peer_fin = None              # the server's FIN segment (TCP layer)
        self.rst = None
        self.errors = []
        self.frames = []                  # every segment received (scapy TCP layers)
        self.echo = False                 # send back what arrives (the passive side)
        self.syn = None                   # the SYN received (passive side)
        self.silent = False               # passive side: take the SYN, do not answer yet

    def _send(self, flags, payload=b"", seq=None):
        self.tsval += 1
        options = [("NOP", None), ("NOP", None), ("Timestamp", (self.tsval, self.ts_echo))]
        frame = pad(Ether(src=self.c.mac, dst=NIC_MAC)
                    / IP(src=self.c.src, dst=self.c.dst, flags="DF", ttl=64)
                    / TCP(sport=self.c.sport, dport=self.c.dport, flags=flags,
                          seq=(self.seq if seq is None else seq) & 0xFFFFFFFF,
                          ack=(self.rcv_nxt or 0) & 0xFFFFFFFF, window=65535, options=options)
                    / Raw(payload))
        self.wire.send(frame)

    def listen(self, port):
        """Be the passive side on ``port`` (the driver connects to it); it echoes."""
        self.wire.clients.pop(self.c.sport, None)
        self.c.sport, self.state, self.echo = port, "LISTEN", True
        self.wire.clients[port] = self

    def refuse(self):
        """Passive side: answer the SYN taken with an RST (connection refused)."""
        self.wire.send(pad(Ether(src=self.c.mac, dst=NIC_MAC)
                           / IP(src=self.c.src, dst=self.c.dst, flags="DF", ttl=64)
                           / TCP(sport=self.c.sport, dport=self.c.dport, flags="RA", seq=0,
                                 ack=self.syn.seq + 1, window=0)))

    def connect(self):
        self.state = "SYN_SENT"
        self.wire.send(self.c.syn())
        self.seq += 1

    def send(self, data):
        self._send("PA", data)
        self.seq += len(data)

    def close(self):
        self.fin_sent_seq = self.seq
        self._send("FA")
        self.seq += 1
        self.state = "FIN_SENT"

    def on_frame(self, tcp):
        self.frames.append(tcp)
        flags = int(tcp.flags)
        if flags & 0x04:
            self.rst = tcp
            self.state = "RESET"
            return
        if dict(tcp.options).get("Timestamp"):
            self.ts_echo = dict(tcp.options)["Timestamp"][0]
        if self.state == "LISTEN" and flags & 0x12 == 0x02:
            self.syn, self.c.dport = tcp, tcp.sport
            if self.silent:
                return
            self.rcv_nxt = (tcp.seq + 1) & 0xFFFFFFFF
            self.tsval += 1
            self.wire.send(pad(
                Ether(src=self.c.mac, dst=NIC_MAC)
                / IP(src=self.c.src, dst=self.c.dst, flags="DF", ttl=64)
                / TCP(sport=self.c.sport, dport=self.c.dport, flags="SA", seq=self.seq,
                      ack=self.rcv_nxt, window=65535,
                      options=[("MSS", 1460), ("SAckOK", b""),
                               ("Timestamp", (self.tsval, self.ts_echo)), ("NOP", None),
                               ("WScale", 7)])))
            self.seq += 1
            self.state = "SYN_RCVD"
            return
        if self.state == "SYN_RCVD" and flags & 0x10 and tcp.ack == self.seq:
            self.state = "ESTABLISHED"
        if flags & 0x12 == 0x12:
            if tcp.ack != (self.c.isn + 1) & 0xFFFFFFFF:
                self.errors.append(f"SYN-ACK acknowledges {tcp.ack}")
            self.rcv_nxt = (tcp.seq + 1) & 0xFFFFFFFF
            self.state = "ESTABLISHED"
            if self.request:
                self._send("PA", self.request)
                self.seq += len(self.request)
            else:
                self._send("A")
            return
        if self.rcv_nxt is None:
            self.errors.append("a segment before the SYN-ACK")
            return
        payload = bytes(tcp.payload)
        offset = (self.rcv_nxt - tcp.seq) & 0xFFFFFFFF
        if payload and offset < len(payload):          # new bytes (overlap trimmed)
            if offset > 0x7FFFFFFF:
                self.errors.append(f"a hole: segment {tcp.seq}, expected {self.rcv_nxt}")
            else:
                self.received += payload[offset:]
                self.rcv_nxt = (tcp.seq + len(payload)) & 0xFFFFFFFF
        if self.fin_sent_seq is not None and tcp.ack == (self.fin_sent_seq + 1) & 0xFFFFFFFF:
            self.our_fin_acked = True
        new_fin = False
        if flags & 0x01:
            if (tcp.seq + len(payload)) & 0xFFFFFFFF == self.rcv_nxt:
                self.rcv_nxt = (self.rcv_nxt + 1) & 0xFFFFFFFF
                self.peer_fin = tcp
                new_fin = True
            elif self.peer_fin is None:
                self.errors.append(f"FIN at {tcp.seq + len(payload)}, expected {self.rcv_nxt}")
        if payload and self.echo and self.fin_sent_seq is None:
            self.send(payload[offset:] if offset < len(payload) else b"")
        elif payload or flags & 0x01:
            self._send("A")
        if self.state == "ESTABLISHED" and (
                (self.close_after is not None and len(self.received) >= self.close_after)
                or (new_fin and self.close_on_fin)):
            self.close()

    @property
    def finished(self):
        """Both FINs exchanged and acknowledged (as far as the client can tell)."""
        return self.peer_fin is not None and self.our_fin_acked


class Wire:
    """The NIC's wire: the ``mac_rx`` source and a ``mac_tx`` sink that hands each frame
    to its client (by TCP port); an agent of the bus loop."""

    def __init__(self, bus, width, rng):
        self.width = width
        self.mac_rx = StreamSource(bus, "mac_rx", stall=0.05, rng=random.Random(rng.random()))
        self.mac_tx = FrameSink(bus, "mac_tx", width, 0.05, random.Random(rng.random()))
        self.clients = {}
        self.other = []                   # frames for no client (ARP replies, ...)

    def client(self, rng, dport, **kw):
        client = WireClient(self, rng, dport, **kw)
        self.clients[client.c.sport] = client
        return client

    def send(self, frame):
        self.mac_rx.send(frame_to_beats(bytes(frame), self.width))

    def drive(self):
        self.mac_tx.drive()

    def sample(self):
        self.mac_tx.sample()
        while self.mac_tx.frames:
            packet = Ether(self.mac_tx.frames.pop(0))
            client = self.clients.get(packet[TCP].dport) if TCP in packet else None
            if client is None:
                self.other.append(packet)
            else:
                client.on_frame(packet[TCP])


# --------------------------------------------------------------------------- scenarios


async def _transaction(driver, wire, rng, port, session, request, expected, client_first,
                       setup, teardown, close_command=None):
    """One connection: the client connects with ``request``, the server answers it with
    ``session``; returns (socket, client, host work)."""
    if port not in driver.listeners:
        await driver.listen(port, offload=setup)
    before = driver.stats()
    client = wire.client(rng, port, request=request,
                         close_after=len(expected) if client_first else None)
    client.connect()
    sock = await driver.accept(port)
    if close_command:
        close_command(sock)
    closed_by = await session(sock)
    await sock.wait_closed()
    await driver.run_until(lambda: client.finished or client.rst, 20_000, "the client's end")
    work = host_work(before, driver.stats())
    assert not client.errors, client.errors
    assert client.rst is None, f"the client got an RST: {client.rst.summary()}"
    assert bytes(client.received) == expected, (bytes(client.received), expected)
    assert client.finished
    if client_first:      # our FIN after the client's: acknowledges it
        assert client.peer_fin.ack == (client.fin_sent_seq + 1) & 0xFFFFFFFF
    fin_seq = (client.peer_fin.seq + len(bytes(client.peer_fin.payload))) & 0xFFFFFFFF
    assert fin_seq == (client.rcv_nxt - 1) & 0xFFFFFFFF
    if teardown and closed_by == "nic":
        assert sock.event(EventKind.CLOSE_STATUS)["event"]["status"] == CloseStatus.OK
        closed = sock.event(EventKind.CLOSED)["event"]
        assert closed["status"] == CloseReason.NORMAL, closed
        assert closed["segments_out"] >= 1
    else:
        assert sock.event(EventKind.CLOSED) is None
    return sock, client, work


async def echo_client_closes(driver, wire, rng, setup=True, teardown=True):
    request = b"hello, echo %d\n" % rng.randrange(1000)
    sock, _, work = await _transaction(
        driver, wire, rng, ECHO if setup else ECHO_SOFT,
        lambda s: echo_session(s, close_offload=teardown), request, request, True, setup,
        teardown)
    assert sock.closed_by == ("nic" if teardown else "host")
    return work


async def kv_server_closes(driver, wire, rng, setup=True, teardown=True, store=None):
    request = b"SET colour blue\nGET colour\nGET size\nQUIT\n"
    expected = b"OK\nVALUE blue\nNOT_FOUND\nBYE\n"
    store = {} if store is None else store
    sock, _, work = await _transaction(
        driver, wire, rng, KV if setup else KV_SOFT,
        lambda s: kv_session(s, store, close_offload=teardown), request, expected, False,
        setup, teardown)
    assert store == {"colour": "blue"}
    assert sock.closed_by == ("nic" if teardown else "host")
    return work


async def faults(driver, wire, rng):
    """Commands and segments for unknown flows, a refused CLOSE, user mistakes."""
    # A TABLE DELETE of a flow the NIC does not know: NOT_FOUND, nothing else changes.
    assert await driver.table_delete(FlowKey(0x0A000001, 1234, driver.local_ip, 4321)) == \
        TableStatus.NOT_FOUND
    # A segment of no connection (an ACK to a port nobody listens on): RST seq = its ACK.
    stray = wire.client(rng, 9)
    stray.rcv_nxt = 1000
    stray._send("A", seq=stray.seq)
    await driver.run_until(lambda: stray.rst is not None, 20_000, "the RST")
    assert int(stray.rst.flags) & 0x04 and stray.rst.seq == 1000
    # CLOSEs the NIC refuses: the close goes on in software, and completes.
    refusals = {}

    def too_much_data(sock):          # the command decoder refuses it: BAD_LENGTH
        original = sock.conn.close_command

        def command():
            fields, held = original()
            fields["data_length"] = MAX_HELD_DATA + 8
            return fields, held + bytes(MAX_HELD_DATA + 8 - len(held))
        sock.conn.close_command = command
        refusals["decoder"] = sock

    def snd_nxt_outside(sock):        # the teardown engine refuses it: BAD_LENGTH
        original = sock.conn.close_command

        def command():
            fields, held = original()
            fields["snd_nxt"] = (fields["snd_una"] + len(held) + 5) & 0xFFFFFFFF
            return fields, held
        sock.conn.close_command = command
        refusals["engine"] = sock

    request = b"refuse me\n"
    for hook in (too_much_data, snd_nxt_outside):
        await _transaction(driver, wire, rng, ECHO, echo_session, request, request, True,
                           True, True, close_command=hook)
    done = refusals["decoder"].events[-1]["event"]
    assert done["kind"] == "COMMAND_DONE" and done["status"] == CommandStatus.BAD_LENGTH
    assert refusals["decoder"].closed_by == "host"
    status = refusals["engine"].event(EventKind.CLOSE_STATUS)["event"]["status"]
    assert status == CloseStatus.BAD_LENGTH and refusals["engine"].closed_by == "host"
    # User mistakes: clear errors, nothing posted.
    for call, text in ((driver.listen(0), "not a TCP port"),
                       (driver.listen(ECHO), "already listening"),
                       (driver.accept(4444), "not listening"),
                       (refusals["engine"].close(), "already closed")):
        with pytest.raises(DriverError, match=text):
            await call
    return {}


async def connect_and_close(driver, wire, rng, offload=True, teardown=True,
                            expect_software=False):
    """Active open to a scapy echo peer (CONNECT, or the driver's own SYN), a request, its
    echo, our close first (teardown offload or not)."""
    peer = wire.client(rng, 0)
    peer.listen(5000 + rng.randrange(1000))
    before = driver.stats()
    sock = await driver.connect(peer.c.src, peer.c.sport, offload=offload, peer_mac=peer.c.mac)
    assert peer.syn is not None
    if offload and not expect_software:   # the NIC's SYN: the options of the CONNECT
        assert dict(peer.syn.options)["MSS"] == 1460 and dict(peer.syn.options)["WScale"] == 7
    assert sock.conn.active
    request = b"ping %d\n" % rng.randrange(1000)
    sock.send(request)
    reply = b""
    while len(reply) < len(request):
        reply += await sock.recv()
    assert reply == request
    assert await sock.close(offload=teardown) == ("nic" if teardown else "host")
    await sock.wait_closed()
    await driver.run_until(lambda: peer.finished or peer.rst, 20_000, "the peer's end")
    assert peer.rst is None and not peer.errors and peer.finished
    assert bytes(peer.received) == request
    if teardown:
        assert sock.event(EventKind.CLOSED)["event"]["status"] == CloseReason.NORMAL
    return host_work(before, driver.stats())


async def splice_proxy(driver, wire, rng):
    """A proxy: a client's request forwarded to a server and the answer back by the host,
    then SPLICE: the next request and answer, and both closes, relayed by the NIC."""
    port = 9000
    if port not in driver.listeners:
        await driver.listen(port)
    server = wire.client(rng, 0)
    server.listen(6000 + rng.randrange(1000))
    first, second = b"first through the host\n", b"second through the NIC\n"
    client = wire.client(rng, port, request=first, close_after=len(first + second))
    client.connect()
    a = await driver.accept(port)
    b = await driver.connect(server.c.src, server.c.sport, peer_mac=server.c.mac)
    await b.sendall(await a.recv())
    reply = b""
    while len(reply) < len(first):
        reply += await b.recv()
    await a.sendall(reply)
    assert await driver.splice(a, b), a.event(EventKind.SPLICE_STATUS)
    client.send(second)
    await a.wait_closed()
    assert b.done
    await driver.run_until(lambda: client.finished and server.finished, 20_000, "both ends")
    assert bytes(client.received) == first + second == bytes(server.received)
    assert not client.errors and not server.errors and not client.rst and not server.rst
    done = a.event(EventKind.SPLICE_DONE)["event"]
    assert done["status"] == SpliceEnd.NORMAL, done
    assert done["bytes_a"] == len(second) and done["bytes_b"] == len(second), done
    return {}


async def connect_busy(driver, wire, rng):
    """Every connect slot taken by opens to peers that do not answer (yet): the next
    CONNECT answers FAILED BUSY and the driver opens it in software; then the silent
    peers refuse with RSTs (FAILED RESET: ConnectionError)."""
    silent = []
    for _ in range(DEFAULT_CONNECTS):
        peer = wire.client(rng, 0)
        peer.listen(7000 + rng.randrange(1000))
        peer.silent = True
        silent.append((peer, driver.start_connect(peer.c.src, peer.c.sport,
                                                  peer_mac=peer.c.mac)))
    await driver.run_until(lambda: all(p.syn is not None for p, _ in silent), 20_000,
                           "the silent peers' SYNs")
    work = await connect_and_close(driver, wire, rng, offload=True, teardown=True,
                                   expect_software=True)
    assert any(e["event"]["kind"] == EventKind.FAILED and e["event"]["status"] == FailStatus.BUSY
               for e in driver.event_log)
    for peer, attempt in silent:
        peer.refuse()
    for _, attempt in silent:
        with pytest.raises(ConnectionError, match="RESET"):
            await driver.finish_connect(attempt)
    return work


SCENARIOS = {
    "connect_busy": connect_busy,
    "splice": splice_proxy,
    "connect": connect_and_close,
    "connect_software": lambda d, w, r: connect_and_close(d, w, r, offload=False,
                                                          teardown=False),
    "echo": echo_client_closes,
    "kv": kv_server_closes,
    "echo_no_offload": lambda d, w, r: echo_client_closes(d, w, r, setup=False, teardown=False),
    "kv_no_offload": lambda d, w, r: kv_server_closes(d, w, r, setup=False, teardown=False),
    "echo_setup_only": lambda d, w, r: echo_client_closes(d, w, r, setup=True, teardown=False),
    "kv_teardown_only": lambda d, w, r: kv_server_closes(d, w, r, setup=False, teardown=True),
    "faults": faults,
}


async def driver_session(bus, width, scenarios, seed=1):
    """Run ``scenarios`` (names of SCENARIOS) on one NIC; their host work, per name."""
    rng = random.Random(seed)
    wire = Wire(bus, width, rng)
    driver = Driver(bus, [wire.mac_rx, wire], width, LISTEN_IP, NIC_MAC, seed=seed)
    await driver.start()
    # ARP: the driver answers requests for its address.
    arp = pad(Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:01:99")
              / ARP(op=1, hwsrc="02:00:00:00:01:99", psrc="192.0.2.99", pdst=LISTEN_IP))
    wire.send(arp)
    await driver.run_until(lambda: wire.other, 20_000, "the ARP reply")
    reply = wire.other.pop()
    assert reply[ARP].op == 2 and reply[ARP].psrc == LISTEN_IP and reply[Ether].src == NIC_MAC
    results = {"start_cycle": bus.cycle, "work": [], "cycles": []}
    for name in scenarios:
        start = bus.cycle
        results["work"].append([name, await SCENARIOS[name](driver, wire, rng)])
        results["cycles"].append([name, bus.cycle - start])
    await driver.settle()       # the last TABLE DELETEs
    assert "table_delete_failed" not in driver.counts, driver.counts
    assert await driver.device.read("FLOWS") == 0, "flows left in the NIC's table"
    assert await driver.device.read("CLOSING") == 0
    assert await driver.device.read("INSERT_FAILURES") == 0
    assert not driver.device.host.faults, driver.device.host.faults
    assert not driver.sockets, driver.sockets
    results["stats"] = driver.stats()
    return results


# --------------------------------------------------------------------------- tests


def _run(sim, scenarios, seed=1):
    from sim.jobs import run_job
    return run_job(Nic, PARAMS, driver_session, sim=sim,
                   job_args={"width": PARAMS["width"], "scenarios": scenarios, "seed": seed})


def test_driver_servers_rtl(sim):
    """Every scenario on Verilator; one small session on Icarus."""
    scenarios = list(SCENARIOS) if sim == "verilator" else ["echo"]
    result = _run(sim, scenarios)
    assert result.value["stats"]["events"] > 0


def test_driver_servers_amaranth():
    _run("amaranth", ["echo"])


#: The transactions of the host-work figures: (label, scenario).
FIGURE_ROWS = (("echo: setup + teardown offload", "echo"),
               ("echo: setup offload only", "echo_setup_only"),
               ("echo: no offload", "echo_no_offload"),
               ("kv: setup + teardown offload", "kv"),
               ("kv: teardown offload only", "kv_teardown_only"),
               ("kv: no offload", "kv_no_offload"),
               ("connect: CONNECT + teardown offload", "connect"),
               ("connect: software", "connect_software"))


class _NoBus:
    """A bus that is never clocked: for the checks the driver makes before any command."""
    cycle = 0

    def set(self, port, value):
        pass

    def get(self, port):
        return 0


def test_driver_user_errors():
    """Mistakes are refused with a clear DriverError before anything reaches the NIC."""
    import asyncio
    driver = Driver(_NoBus(), [], 64, LISTEN_IP, NIC_MAC)
    driver.capabilities = {"listeners": 2}
    driver.listeners = {1: Listener(1, 0, True, {}), 2: Listener(2, 1, True, {})}
    for call, text in ((driver.listen(3), r"listen table is full \(2 entries\)"),
                       (driver.listen(70000), "not a TCP port"),
                       (driver.listen(2), "already listening"),
                       (driver.accept(5), "not listening"),
                       (driver.connect("192.0.2.1", 80), "no MAC address known"),
                       (driver.connect("192.0.2", 80), "not an IPv4 address"),
                       (driver.unlisten(9), "not listening")):
        with pytest.raises(DriverError, match=text):
            asyncio.run(call)
    assert driver.device.counts["commands"] == 0 and driver.device.counts["mmio_writes"] == 0


def host_work_job(sim="verilator", transactions=2, seed=5):
    """Per-transaction host work (events, DMA bytes, MMIO accesses, host packets,
    commands) of the echo and key-value servers and of an active open, with and without
    the offloads: one session, ``transactions`` of each kind, averaged. Returns
    ``({label: {figure: value}}, the session's JobResult)`` (its cycles and seconds)."""
    names = [name for _, name in FIGURE_ROWS for _ in range(transactions)]
    result = _run(sim, names, seed)
    rows = {}
    for label, name in FIGURE_ROWS:
        works = [work for n, work in result.value["work"] if n == name]
        rows[label] = {key: sum(w[key] for w in works) / len(works) for key in works[0]}
    return rows, result


def host_work_figures(sim="verilator", transactions=2, seed=5):
    """``host_work_job``'s table: printed, and returned as ``{label: {figure: value}}``."""
    rows, _ = host_work_job(sim, transactions, seed)
    print(format_host_work(rows))
    return rows


if __name__ == "__main__":
    from tb.test_driver import host_work_figures as figures   # the job must be importable
    figures()
