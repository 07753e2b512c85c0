"""The host driver's socket-like API on the NIC: listen, accept, connect, recv, send, close.

``Driver(bus, agents, width, local_ip, local_mac)`` sits on ``host_driver.device.NicDevice``
(rings, registers) and runs one ``host_driver.tcp.TcpConnection`` per established
connection. It is async and simulator-agnostic (``sim.bus`` adapters), like the device.

* ``await driver.start()``: bring-up, the connection table's hash key and the cookie key
  (random, from ``seed``), the engines' configuration registers (``DEFAULT_CONFIG``,
  scaled for simulation: times in cycles or timer ticks of a few hundred cycles).
* The event pump (``_pump``) runs every ``poll_every`` cycles inside ``driver.run_until``
  (every ``await`` of the API clocks the simulation through it): RX frames go to their
  connection by 4-tuple (ARP requests for ``local_ip`` are answered; segments of unknown
  flows are answered with an RST as Linux does); TX_DONE frees TX buffers;
  COMMAND_DONE completes the command with that tag; ESTABLISHED makes a connection (to the
  listener's accept queue or to ``connect``); FAILED, CLOSE_STATUS, CLOSED, SPLICE_STATUS,
  SPLICE_DONE go to the socket they name. Timers of the connections run there too; the
  frames emitted meanwhile go out through the TX ring at the end of each pump, with one
  doorbell and one TX_DONE for the batch (queued while no TX buffer is free).
* ``listen(port, offload=True, ...)``: a listen-table entry (LISTEN command). Without
  offload the NIC passes SYNs up and the driver answers them itself (SYN-ACK with a random
  ISS, the final ACK makes the connection), so the same server runs either way.
* ``Socket``: ``await recv(n)``, ``send(data)``, ``await sendall(data)``,
  ``await close(offload=True)``: teardown offload with the CLOSE command when the
  connection allows it; if the NIC answers anything but OK, or without offload, the close
  runs in software, and the NIC's connection-table entry of the flow is deleted once the
  connection is gone (TABLE DELETE).
* ``await connect(ip, port, offload=True)``: CONNECT command (ESTABLISHED or FAILED); BUSY
  (or offload=False): a software active open.
* ``await splice(a, b)``: SPLICE command from both sockets' ``splice_side()``; OK: the
  driver forgets both; otherwise both stay with the host (``Socket`` API, proxying).
* ``stats()``: host work so far (events, DMA bytes, MMIO accesses, host packets); see
  ``host_driver.apps.host_work`` for per-transaction figures.

Time: ``now`` is the simulated time (bus cycles / clock), so TCP timers follow the
simulation; ``TcpSettings`` defaults are scaled accordingly (``sim_tcp_settings``).
"""

import random
import struct
from collections import deque
from dataclasses import dataclass, field

from hw.conn_table import Op as TableOp
from hw.conn_table import Status as TableStatus
from hw.handshake import Reason
from hw.headers import EtherType, TcpFlags
from hw.host_formats import CommandOp, CommandStatus, HostEventKind, Ring, RxStatus
from hw.metadata import CloseStatus, EventKind, FailStatus, SpliceStatus
from host_driver.device import NicDevice
from host_driver.segment import MASK32, build_segment, parse_segment
from host_driver.tcp import State, TcpConnection, TcpSettings

__all__ = ["Driver", "Socket", "DriverError", "DEFAULT_CONFIG", "sim_tcp_settings"]

_SYN, _ACK, _RST, _FIN = TcpFlags.SYN, TcpFlags.ACK, TcpFlags.RST, TcpFlags.FIN

#: Engine configuration written at start (register name -> value), scaled for simulation:
#: a timer tick (TICK_PERIOD) is 64 cycles; the timestamp clock ticks every 256 cycles.
DEFAULT_CONFIG = {
    "COOKIE_PERIOD": 1 << 20,     # cycles per cookie-counter tick (a cookie lives 2 ticks+)
    "TS_PERIOD": 256,             # cycles per timestamp tick
    "RST_BAD_COOKIE": 1,          # answer a bad cookie ACK with RST
    "SYN_RTO": 20_000,            # active open: first SYN retransmission (cycles)
    "SYN_RETRIES": 3,
    "TICK_PERIOD": 64,            # cycles per teardown/splice timer tick
    "FIN_RTO": 300,               # ticks (19 200 cycles)
    "FIN_RETRIES": 3,
    "FIN2_TIMEOUT": 2000,         # ticks
    "TIME_WAIT": 16,              # ticks (1 024 cycles): 2*MSL, scaled down
    "IDLE_TIMEOUT": 100_000,      # splice: ticks without a relayed segment
    "LINGER": 16,                 # splice: ticks after both FINs
}

_ARP_REQUEST, _ARP_REPLY = 1, 2


class DriverError(RuntimeError):
    """A user mistake or a refusal the driver cannot work around (clear message)."""


def sim_tcp_settings(clock_mhz, ts_clock):
    """``TcpSettings`` for simulated time: ACK at once, TIME_WAIT of 1 000 cycles, RTOs
    of 100 000 cycles and up (the wire of a simulation loses nothing)."""
    cycle = 1e-6 / clock_mhz
    return TcpSettings(receive_buffer=1 << 16, ts_clock=ts_clock, initial_rto=100_000 * cycle,
                       min_rto=100_000 * cycle, max_rto=10_000_000 * cycle, delayed_ack=0,
                       time_wait=1_000 * cycle)


def _ip_text(value):
    return ".".join(str(value >> s & 0xFF) for s in (24, 16, 8, 0))


def _ip_int(ip):
    if isinstance(ip, int):
        return ip
    parts = [int(p) for p in ip.split(".")]
    if len(parts) != 4 or not all(0 <= p < 256 for p in parts):
        raise DriverError(f"{ip!r} is not an IPv4 address")
    return int.from_bytes(bytes(parts), "big")


def _mac_int(mac):
    return mac if isinstance(mac, int) else int(mac.replace(":", ""), 16)


def _check_port(port):
    if not isinstance(port, int) or not 1 <= port <= 0xFFFF:
        raise DriverError(f"port {port!r} is not a TCP port (1..65535)")


@dataclass(frozen=True)
class FlowKey:
    """A connection's 4-tuple, from our side."""
    peer_ip: int
    peer_port: int
    local_ip: int
    local_port: int

    @classmethod
    def of_event(cls, e):
        return cls(e["peer_ip"], e["peer_port"], e["local_ip"], e["local_port"])

    @classmethod
    def of_segment(cls, seg):
        return cls(seg.ip_src, seg.sport, seg.ip_dst, seg.dport)

    def table_key(self, ingress=0):
        """The connection table's ``FLOW_KEY`` of the flow (as received frames carry it)."""
        return {"port": ingress, "src": self.peer_ip, "dst": self.local_ip,
                "sport": self.peer_port, "dport": self.local_port}

    def __str__(self):
        return (f"{_ip_text(self.local_ip)}:{self.local_port} <-> "
                f"{_ip_text(self.peer_ip)}:{self.peer_port}")


@dataclass
class Listener:
    port: int
    index: int
    offload: bool
    options: dict
    accept_queue: deque = field(default_factory=deque)


class Socket:
    """One connection of the driver. ``events``: what the NIC reported about it
    (CLOSE_STATUS, CLOSED, ... as event dicts), for diagnostics and tests."""

    def __init__(self, driver, conn, in_nic_table):
        self.driver = driver
        self.conn = conn
        self.key = FlowKey(conn.peer_ip, conn.peer_port, conn.local_ip, conn.local_port)
        self.in_nic_table = in_nic_table   # the NIC inserted a HOST flow (its handshake)
        self.events = []
        self.closed_by = None              # "nic" (teardown offload) or "host"
        self.done = False                  # nothing left for the driver to do

    def __repr__(self):
        return f"<Socket {self.key} {self.conn.state.value}>"

    async def recv(self, n=65536, max_cycles=200_000):
        """Up to ``n`` received bytes; b"" once the peer closed and all was read."""
        await self.driver.run_until(lambda: self.conn.readable or self.conn.at_eof
                                    or self.conn.closed, max_cycles, f"data on {self}")
        if self.conn.error:
            raise ConnectionError(f"{self}: {self.conn.error}")
        return self.conn.read(n)

    async def recv_line(self, max_cycles=200_000):
        """Bytes up to and including the next newline (b"" at end of stream)."""
        line = b""
        while not line.endswith(b"\n"):
            await self.driver.run_until(
                lambda: b"\n" in bytes(self.conn.receive_buffer.unread) or self.conn.at_eof
                or self.conn.closed, max_cycles, f"a line on {self}")
            unread = bytes(self.conn.receive_buffer.unread)
            cut = unread.find(b"\n")
            chunk = self.conn.read(cut + 1 if cut >= 0 else None)
            line += chunk
            if not chunk:
                break
        return line

    def send(self, data):
        """Queue ``data`` (all of it); its segments leave, as the windows allow, when the
        simulation next runs (any ``await`` of the driver)."""
        if self.conn.closed or self.conn.fin_queued:
            raise DriverError(f"send on {self} after close")
        count = self.conn.send(bytes(data))
        self.driver._flush(self)
        return count

    async def sendall(self, data, max_cycles=200_000):
        """Send ``data`` and wait until the peer acknowledged it."""
        self.send(data)
        await self.driver.run_until(lambda: self.conn.all_acked or self.conn.closed,
                                    max_cycles, f"the peer's ACK of {len(data)} bytes on {self}")

    async def close(self, offload=True, max_cycles=200_000):
        """Close: hand the close to the NIC (CLOSE) when ``offload`` and the connection
        allows it; else, or when the NIC refuses, close in software. Returns "nic" or
        "host" (who closes). Does not wait for the close to finish (``wait_closed``)."""
        if self.closed_by:
            raise DriverError(f"{self} is already closed ({self.closed_by})")
        if offload and self.conn.can_hand_over_close:
            status = await self.driver._close_offload(self, max_cycles)
            if status == CloseStatus.OK:
                self.closed_by = "nic"
                return "nic"
        self.closed_by = "host"
        self.conn.close()
        self.driver._flush(self)
        return "host"

    async def wait_closed(self, max_cycles=200_000):
        """Until the connection is gone: the NIC's CLOSED event (teardown offload), or the
        software close done (and the table entry deleted)."""
        await self.driver.run_until(lambda: self.done, max_cycles, f"the end of {self}")

    def event(self, kind):
        """The last event of ``kind`` (an EventKind) the NIC reported for this socket."""
        found = [e for e in self.events if e["event"]["kind"] == kind]
        return found[-1] if found else None


class Driver:
    def __init__(self, bus, agents, width, local_ip, local_mac, clock_mhz=156.25, seed=0,
                 config=None, poll_every=8, tcp_settings=None, ring_log2=None):
        self.bus = bus
        self.device = NicDevice(bus, agents, width=width, clock_mhz=clock_mhz,
                                ring_log2=ring_log2)
        self.local_ip, self.local_mac = _ip_int(local_ip), _mac_int(local_mac)
        self.clock_mhz = clock_mhz
        self.rng = random.Random(seed)
        self.config = {**DEFAULT_CONFIG, **(config or {})}
        self.poll_every = poll_every
        self.tcp_settings = tcp_settings or sim_tcp_settings(clock_mhz, self.ts_clock)
        self.listeners = {}            # port -> Listener
        self.sockets = {}              # FlowKey -> Socket (the host handles its segments)
        self.half_open = {}            # FlowKey -> software handshake state
        self.connecting = {}           # FlowKey -> result of a CONNECT / software open
        self.closing = {}              # FlowKey -> [Socket, frames held meanwhile, event]
        self.handed = {}               # FlowKey -> Socket the NIC owns (close or splice)
        self.early = {}                # FlowKey -> frames that came before their event
        self.splices = {}              # tag -> [a, b, SPLICE_STATUS event, SPLICE_DONE event]
        self.completions = {}          # command tag -> COMMAND_DONE event
        self.deletes = set()           # tags of TABLE DELETEs posted without waiting
        self.arp_cache = {}            # IPv4 -> MAC, learnt from received frames
        self.tx_queue = deque()         # frames waiting for the pump (or a TX buffer)
        self.tx_pending = deque()       # TX indices posted, not known done, in order
        self.counts = {"rx_frames": 0, "tx_frames": 0, "rst_sent": 0, "arp_replies": 0,
                       "rx_dropped": 0}
        self.event_log = []            # every event, in order (dicts of EVENT_ENTRY)
        self._next_tag = 1
        self._ts_base = (0, 0)         # (cycle, NIC TS_CLOCK then)
        self._cycles_to_poll = 0

    # ------------------------------------------------------------------ time
    def now(self):
        """Simulated seconds."""
        return self.bus.cycle / (self.clock_mhz * 1e6)

    def ts_clock(self):
        """The NIC's timestamp clock as the host follows it (never ahead of the NIC's)."""
        cycle, value = self._ts_base
        period = self.config["TS_PERIOD"] or 1
        return (value + (self.bus.cycle - cycle) // period) & MASK32

    # ------------------------------------------------------------------ running
    async def run_until(self, predicate, max_cycles=200_000, what="the condition"):
        """Clock the simulation, pumping events every ``poll_every`` cycles, until
        ``predicate()``; DriverError (with the NIC's diagnostics) after ``max_cycles``."""
        def done():
            self._cycles_to_poll -= 1
            if self._cycles_to_poll <= 0:
                self._cycles_to_poll = self.poll_every
                self._pump()
                return predicate()
            return False
        if predicate():
            return
        try:
            await self.device.run_until(done, max_cycles)
        except TimeoutError:
            raise DriverError(f"no {what} after {max_cycles} cycles; the NIC: "
                              f"{await self.device.diagnostics()}") from None

    async def settle(self, max_cycles=50_000):
        """Until the TABLE DELETEs of connections closed in software have completed."""
        await self.run_until(lambda: not self.deletes, max_cycles, "TABLE DELETE completions")

    async def run(self, cycles):
        """Clock ``cycles`` cycles with the pump running."""
        end = self.bus.cycle + cycles
        await self.run_until(lambda: self.bus.cycle >= end, cycles + self.poll_every + 1)

    # ------------------------------------------------------------------ bring-up
    async def start(self):
        """Bring the NIC up and configure it; returns its capabilities."""
        caps = await self.device.bring_up()
        self.capabilities = caps
        done = await self.command(CommandOp.TABLE, {"table": {
            "op": TableOp.SET_KEY, "hash_key": self.rng.getrandbits(128)}})
        if done["table"]["status"] != TableStatus.OK:
            raise DriverError(f"the connection table refused its hash key: "
                              f"{TableStatus(done['table']['status']).name}")
        await self.command(CommandOp.SET_KEY, {"key": self.rng.getrandbits(128)})
        for name, value in self.config.items():
            self.device.write(name, value)
        # Reads follow writes: TS_CLOCK runs from here on; the host follows it.
        value = await self.device.read("TS_CLOCK")
        self._ts_base = (self.bus.cycle, value)
        return caps

    # ------------------------------------------------------------------ commands
    def _tag(self):
        tag = self._next_tag
        self._next_tag = tag % 0xFFFF + 1
        return tag

    def post_command(self, op, body=None, data=b""):
        """Post a command; returns its tag (its COMMAND_DONE lands in ``completions``)."""
        tag = self._tag()
        self.completions.pop(tag, None)
        self.device.post_command(op, tag=tag, body=body, data=data)
        return tag

    async def command(self, op, body=None, max_cycles=50_000):
        """Run a command answered by COMMAND_DONE; its event. DriverError unless OK."""
        tag = self.post_command(op, body)
        await self.run_until(lambda: tag in self.completions, max_cycles,
                             f"COMMAND_DONE for {CommandOp(op).name} (tag {tag})")
        done = self.completions.pop(tag)
        if done["event"]["status"] != CommandStatus.OK:
            raise DriverError(f"{CommandOp(op).name} failed: "
                              f"{CommandStatus(done['event']['status']).name}")
        return done

    async def table_delete(self, key, ingress=0):
        """Delete ``key``'s flow from the NIC's connection table; the table's status
        (OK, or NOT_FOUND for a flow the NIC does not know)."""
        done = await self.command(CommandOp.TABLE, {"table": {
            "op": TableOp.DELETE, "key": key.table_key(ingress)}})
        return TableStatus(done["table"]["status"])

    # ------------------------------------------------------------------ listen / accept
    async def listen(self, port, offload=True, mss=1460, wscale=7, window=65535, ts=True,
                     sack=False):
        """Accept connections on ``port`` of ``local_ip``. Returns the Listener."""
        _check_port(port)
        if port in self.listeners:
            raise DriverError(f"port {port} is already listening")
        if not 536 <= mss <= 9000 or not 0 <= wscale <= 14 or not 1 <= window <= 0xFFFF:
            raise DriverError(f"bad listen options: mss {mss} (536..9000), wscale {wscale} "
                              f"(0..14), window {window} (1..65535)")
        used = {lst.index for lst in self.listeners.values()}
        free = [i for i in range(self.capabilities["listeners"]) if i not in used]
        if not free:
            raise DriverError(f"the listen table is full ({self.capabilities['listeners']} "
                              f"entries): cannot listen on port {port}")
        entry = {"valid": 1, "offload": int(offload), "ip": self.local_ip, "port": port,
                 "mss": mss, "wscale_ok": 1, "wscale": wscale, "sack_ok": int(sack),
                 "ts_ok": int(ts), "window": window}
        await self.command(CommandOp.LISTEN, {"listen": {"index": free[0], "entry": entry}})
        listener = Listener(port, free[0], offload, entry)
        self.listeners[port] = listener
        return listener

    async def unlisten(self, port):
        listener = self.listeners.pop(port, None)
        if listener is None:
            raise DriverError(f"port {port} is not listening")
        await self.command(CommandOp.LISTEN, {"listen": {"index": listener.index,
                                                         "entry": {"valid": 0}}})

    async def accept(self, port, max_cycles=200_000):
        """The next connection established on ``port`` (a Socket)."""
        listener = self.listeners.get(port)
        if listener is None:
            raise DriverError(f"accept on port {port}, which is not listening")
        await self.run_until(lambda: listener.accept_queue, max_cycles,
                             f"connection on port {port}")
        return listener.accept_queue.popleft()

    # ------------------------------------------------------------------ connect
    async def connect(self, ip, port, offload=True, local_port=None, peer_mac=None,
                      mss=1460, wscale=7, window=65535, ts=True, max_cycles=200_000):
        """Active open to ``ip``:``port``; a Socket. ConnectionError on RST or timeout."""
        attempt = self.start_connect(ip, port, offload, local_port, peer_mac, mss, wscale,
                                     window, ts)
        return await self.finish_connect(attempt, max_cycles)

    def start_connect(self, ip, port, offload=True, local_port=None, peer_mac=None,
                      mss=1460, wscale=7, window=65535, ts=True):
        """Start an active open (CONNECT, or our SYN); ``finish_connect`` waits for it.
        Several may be in flight."""
        _check_port(port)
        peer_ip = _ip_int(ip)
        peer_mac = _mac_int(peer_mac) if peer_mac is not None else self.arp_cache.get(peer_ip)
        if peer_mac is None:
            raise DriverError(f"no MAC address known for {_ip_text(peer_ip)} (pass peer_mac)")
        local_port = local_port or self.rng.randrange(32768, 61000)
        key = FlowKey(peer_ip, port, self.local_ip, local_port)
        if key in self.sockets or key in self.connecting:
            raise DriverError(f"{key} is already in use")
        request = {"peer_mac": peer_mac, "local_mac": self.local_mac, "local_ip": self.local_ip,
                   "peer_ip": peer_ip, "local_port": local_port, "peer_port": port,
                   "iss": self.rng.getrandbits(32), "mss": mss, "wscale_ok": 1,
                   "wscale": wscale, "sack_ok": 0, "ts_ok": int(ts), "window": window}
        attempt = self.connecting[key] = {"key": key, "request": request, "result": None,
                                          "tag": None, "software": not offload}
        if offload:
            attempt["tag"] = self.post_command(CommandOp.CONNECT, {"connect": request})
        else:
            self._send_syn(attempt)
        return attempt

    async def finish_connect(self, attempt, max_cycles=200_000):
        """The Socket of an active open ``start_connect`` began. FAILED BUSY (every connect
        slot of the NIC in use): the driver opens it in software."""
        key, tag = attempt["key"], attempt["tag"]
        if not attempt["software"]:
            await self.run_until(lambda: attempt["result"] or tag in self.completions,
                                 max_cycles, f"answer to CONNECT {key}")
            if tag in self.completions and attempt["result"] is None:
                self.connecting.pop(key)
                status = CommandStatus(self.completions.pop(tag)["event"]["status"])
                raise DriverError(f"CONNECT {key} failed: {status.name}")
            kind, value = attempt["result"]
            if kind != "failed" or value != FailStatus.BUSY:
                return self._connect_result(key, attempt)
            attempt["result"], attempt["software"] = None, True
            self._send_syn(attempt)
        try:
            await self.run_until(lambda: attempt["result"], max_cycles, f"SYN-ACK for {key}")
        except DriverError:             # no SYN-ACK (the driver does not retransmit its SYN)
            self.connecting.pop(key, None)
            raise
        return self._connect_result(key, attempt)

    def _connect_result(self, key, state):
        self.connecting.pop(key, None)
        kind, value = state["result"]
        if kind == "failed":
            reason = FailStatus(value).name if value in FailStatus._value2member_map_ else value
            raise ConnectionError(f"connect {key}: {reason}")
        return value

    def _send_syn(self, state):
        r = state["request"]
        state["tsval"] = self.ts_clock()
        self._transmit(build_segment(
            eth_dst=r["peer_mac"], eth_src=self.local_mac, ip_src=self.local_ip,
            ip_dst=r["peer_ip"], sport=r["local_port"], dport=r["peer_port"], seq=r["iss"],
            ack=0, flags=_SYN, window=r["window"], mss=r["mss"], wscale=r["wscale"],
            timestamp=(state["tsval"], 0) if r["ts_ok"] else None))

    # ------------------------------------------------------------------ close / splice
    async def _close_offload(self, sock, max_cycles):
        """CLOSE command for ``sock``; the CLOSE_STATUS (the connection is restored to the
        host when it is not OK)."""
        conn = sock.conn
        saved = (conn.state, conn.rto_deadline, conn.delack_deadline, conn.persist_deadline,
                 conn.close_deadline, conn.ack_now)
        fields, held = conn.close_command()
        entry = self.closing[sock.key] = [sock, [], None]
        del self.sockets[sock.key]
        tag = self.post_command(CommandOp.CLOSE, {"close": fields}, data=held)
        await self.run_until(lambda: entry[2] is not None or tag in self.completions,
                             max_cycles, f"CLOSE_STATUS for {sock.key}")
        del self.closing[sock.key]
        if entry[2] is not None:
            status = CloseStatus(entry[2]["event"]["status"])
        else:   # refused by the command decoder (held data too long, ...)
            status = CommandStatus(self.completions.pop(tag)["event"]["status"])
            sock.events.append({"event": {"kind": "COMMAND_DONE", "status": status}})
        if status == CloseStatus.OK and entry[2] is not None:
            self.handed[sock.key] = sock
            return CloseStatus.OK
        # Refused: the connection is the host's again, with what came meanwhile.
        (conn.state, conn.rto_deadline, conn.delack_deadline, conn.persist_deadline,
         conn.close_deadline, conn.ack_now) = saved
        self.sockets[sock.key] = sock
        for frame in entry[1]:
            conn.receive(frame, self.now())
        return status

    async def splice(self, a, b, max_cycles=200_000):
        """Hand sockets ``a`` and ``b`` to the NIC's splice engine; True when it took
        them (the driver then forgets both), False when they stay with the host."""
        if not (a.conn.all_acked and b.conn.all_acked):
            return False
        saved = [(s.conn.state, s.conn.ack_now) for s in (a, b)]
        tag = self._tag()
        body = {"splice": {"tag": tag, "a": a.conn.splice_side(), "b": b.conn.splice_side()}}
        entry = self.splices[tag] = [a, b, None, None]
        for s in (a, b):
            del self.sockets[s.key]
        self.device.post_command(CommandOp.SPLICE, tag=tag, body=body)
        await self.run_until(lambda: entry[2] is not None, max_cycles, f"SPLICE_STATUS {tag}")
        if entry[2]["event"]["status"] == SpliceStatus.OK:
            for s in (a, b):
                s.closed_by = "nic"
                self.handed[s.key] = s
            return True
        for s, (state, ack_now) in zip((a, b), saved):
            s.conn.state, s.conn.ack_now = state, ack_now
            self.sockets[s.key] = s
        return False

    # ------------------------------------------------------------------ statistics
    def stats(self):
        """Host work so far: events, DMA bytes (both directions), MMIO accesses, host
        packets (RX + TX frames, and each), commands, and the bus cycle."""
        d, tlps = self.device.counts, self.device.host.tlps
        return {"events": d["events"], "dma_bytes": tlps["MWr_bytes"] + tlps["CplD_bytes"],
                "mmio": d["mmio_reads"] + d["mmio_writes"],
                "host_packets": self.counts["rx_frames"] + self.counts["tx_frames"],
                "host_rx": self.counts["rx_frames"], "host_tx": self.counts["tx_frames"],
                "commands": d["commands"], "cycles": self.bus.cycle}

    # ------------------------------------------------------------------ the pump
    def _pump(self):
        events = self.device.poll_events()
        reposted = 0
        for entry in events:
            self.event_log.append(entry)
            kind = entry["event"]["kind"]
            if kind == HostEventKind.RX:
                if entry["event"]["status"] == RxStatus.OK:
                    frame = self.device.rx_frame(entry["ring_index"], entry["length"])
                    self.device.repost_rx(entry["ring_index"], doorbell=False)
                    reposted += 1
                    self._receive_frame(frame, entry["reason"])
                else:
                    self.device.repost_rx(entry["ring_index"], doorbell=False)
                    reposted += 1
            elif kind == HostEventKind.TX_DONE:
                self._tx_done(entry["ring_index"])
            elif kind == HostEventKind.COMMAND_DONE:
                if entry["command_tag"] in self.deletes:
                    self.deletes.discard(entry["command_tag"])
                    if entry["table"]["status"] != TableStatus.OK:
                        self.counts["table_delete_failed"] = \
                            self.counts.get("table_delete_failed", 0) + 1
                else:
                    self.completions[entry["command_tag"]] = entry
            else:
                self._engine_event(entry)
        if reposted:
            self.device.doorbell(Ring.RX)
        now = self.now()
        for sock in list(self.sockets.values()):
            deadline = sock.conn.next_deadline()
            if deadline is not None and deadline <= now:
                self._flush(sock)
        for key, state in list(self.half_open.items()):
            if now > state["deadline"]:
                del self.half_open[key]
        self._drain_tx()

    def _engine_event(self, entry):
        e = entry["event"]
        kind, key = e["kind"], FlowKey.of_event(e)
        if kind == EventKind.ESTABLISHED:
            sock = Socket(self, TcpConnection(e, self.tcp_settings), in_nic_table=True)
            self._established(sock, active=bool(e["active"]))
        elif kind == EventKind.FAILED:
            if key in self.connecting and not self.connecting[key]["software"]:
                self.connecting[key]["result"] = ("failed", e["status"])
        elif kind == EventKind.CLOSE_STATUS:
            if key in self.closing:
                self.closing[key][2] = entry
                self.closing[key][0].events.append(entry)
        elif kind == EventKind.CLOSED:
            sock = self.handed.pop(key, None)
            if sock is not None:
                sock.events.append(entry)
                sock.done = True
        elif kind in (EventKind.SPLICE_STATUS, EventKind.SPLICE_DONE):
            found = self.splices.get(e["tag"])
            if found is not None:
                found[2 if kind == EventKind.SPLICE_STATUS else 3] = entry
                for sock in found[:2]:
                    sock.events.append(entry)
                    if kind == EventKind.SPLICE_DONE:
                        sock.done = True
                        self.handed.pop(sock.key, None)
                if kind == EventKind.SPLICE_DONE:
                    del self.splices[e["tag"]]

    def _established(self, sock, active):
        key = sock.key
        self.sockets[key] = sock
        if active:
            if key in self.connecting:
                self.connecting[key]["result"] = ("established", sock)
        else:
            listener = self.listeners.get(key.local_port)
            if listener is None:        # a listener removed meanwhile: reset it
                sock.conn.abort()
            else:
                listener.accept_queue.append(sock)
        for frame in self.early.pop(key, ()):
            sock.conn.receive(frame, self.now())
        self._flush(sock)

    def _receive_frame(self, frame, reason):
        self.counts["rx_frames"] += 1
        if len(frame) >= 14 and int.from_bytes(frame[12:14], "big") == EtherType.ARP:
            self._arp(frame)
            return
        seg = parse_segment(frame)
        if isinstance(seg, str):
            self.counts["rx_dropped"] += 1
            return
        self.arp_cache[seg.ip_src] = seg.eth_src
        key = FlowKey.of_segment(seg)
        if key in self.sockets:
            sock = self.sockets[key]
            sock.conn.receive(seg, self.now())
            self._flush(sock)
        elif key in self.closing:
            self.closing[key][1].append(seg)
        elif key in self.handed:        # a flow the NIC owns: what it passes up is not ours
            self.counts["rx_dropped"] += 1
        elif key in self.half_open:
            self._handshake_ack(key, seg)
        elif key in self.connecting and self.connecting[key]["software"]:
            self._software_open_reply(key, seg)
        elif reason == Reason.COOKIE_OK:
            self.early.setdefault(key, []).append(seg)
        elif (seg.dport in self.listeners and seg.ip_dst == self.local_ip
              and seg.has(_SYN) and not seg.has(_ACK) and not seg.has(_RST)):
            self._software_syn(key, seg)
        else:
            self._reset(seg)

    # ------------------------------------------------------------------ software handshakes
    def _software_syn(self, key, seg):
        """A SYN the NIC passed up (listener without offload): answer with a SYN-ACK."""
        opts = self.listeners[seg.dport].options
        iss = self.rng.getrandbits(32)
        wscale_ok = seg.wscale is not None
        ts_ok = bool(opts["ts_ok"]) and seg.ts_valid
        tsval = self.ts_clock()
        self.half_open[key] = {
            "iss": iss, "irs": seg.seq, "mss": seg.mss or 536, "wscale_ok": wscale_ok,
            "peer_wscale": min(seg.wscale or 0, 14), "ts_ok": ts_ok, "tsval": tsval,
            "peer_mac": seg.eth_src, "listener": self.listeners[seg.dport],
            "deadline": self.now() + 1e-3}
        self._transmit(build_segment(
            eth_dst=seg.eth_src, eth_src=self.local_mac, ip_src=self.local_ip,
            ip_dst=seg.ip_src, sport=seg.dport, dport=seg.sport, seq=iss, ack=seg.seq + 1,
            flags=_SYN | _ACK, window=opts["window"], mss=opts["mss"],
            wscale=opts["wscale"] if wscale_ok else None,
            timestamp=(tsval, seg.tsval) if ts_ok else None))

    def _handshake_ack(self, key, seg):
        h = self.half_open[key]
        if seg.has(_SYN) and not seg.has(_ACK):        # the SYN again: SYN-ACK again
            del self.half_open[key]
            self._software_syn(key, seg)
            return
        if seg.has(_RST) or not seg.has(_ACK) or seg.ack != (h["iss"] + 1) & MASK32:
            if not seg.has(_RST):
                self._reset(seg)
            return
        del self.half_open[key]
        opts = h["listener"].options
        event = self._event_dict(key, h["peer_mac"], active=0, iss=h["iss"], irs=h["irs"],
                                 mss=h["mss"], wscale_ok=h["wscale_ok"],
                                 peer_wscale=h["peer_wscale"], local_wscale=opts["wscale"],
                                 ts_ok=h["ts_ok"], ts_recent=seg.tsval, ts_echo=h["tsval"],
                                 window=seg.window)
        sock = Socket(self, TcpConnection(event, self.tcp_settings), in_nic_table=False)
        self._established(sock, active=False)
        if seg.payload or seg.has(_FIN):
            sock.conn.receive(seg, self.now())
            self._flush(sock)

    def _software_open_reply(self, key, seg):
        """The answer to our own SYN: SYN-ACK (the connection), or RST (refused)."""
        state = self.connecting[key]
        r = state["request"]
        if seg.has(_RST):
            if seg.has(_ACK) and seg.ack == (r["iss"] + 1) & MASK32:
                state["result"] = ("failed", FailStatus.RESET)
            return
        if not (seg.has(_SYN) and seg.has(_ACK)):
            return
        if seg.ack != (r["iss"] + 1) & MASK32:
            self._reset(seg)
            return
        wscale_ok = seg.wscale is not None
        ts_ok = bool(r["ts_ok"]) and seg.ts_valid
        event = self._event_dict(key, seg.eth_src, active=1, iss=r["iss"], irs=seg.seq,
                                 mss=seg.mss or 536, wscale_ok=wscale_ok,
                                 peer_wscale=min(seg.wscale or 0, 14), local_wscale=r["wscale"],
                                 ts_ok=ts_ok, ts_recent=seg.tsval, ts_echo=state["tsval"],
                                 window=seg.window)
        sock = Socket(self, TcpConnection(event, self.tcp_settings), in_nic_table=False)
        sock.conn.ack_now = True            # the handshake's third segment
        self._established(sock, active=True)

    def _event_dict(self, key, peer_mac, **fields):
        """An ESTABLISHED event (``hw.metadata.EVENT`` fields) for a software handshake."""
        return {"kind": EventKind.ESTABLISHED, "ingress": 0,
                "eth": {"peer": peer_mac, "local": self.local_mac},
                "peer_ip": key.peer_ip, "local_ip": key.local_ip, "peer_port": key.peer_port,
                "local_port": key.local_port, "sack_ok": 0, "payload_length": 0, **fields}

    # ------------------------------------------------------------------ replies
    def _reset(self, seg):
        """Answer a segment of no connection as Linux does (RFC 9293 3.10.7.1)."""
        if seg.has(_RST):
            return
        if seg.has(_ACK):
            seq, ack, flags = seg.ack, 0, _RST
        else:
            seq, ack, flags = 0, seg.seq + seg.length, _RST | _ACK
        self.counts["rst_sent"] += 1
        self._transmit(build_segment(eth_dst=seg.eth_src, eth_src=self.local_mac,
                                     ip_src=seg.ip_dst, ip_dst=seg.ip_src, sport=seg.dport,
                                     dport=seg.sport, seq=seq, ack=ack, flags=flags, window=0))

    def _arp(self, frame):
        """Answer an ARP request for ``local_ip`` (Ethernet/IPv4 ARP only)."""
        if len(frame) < 42:
            return
        htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", frame, 14)
        sha, spa = frame[22:28], frame[28:32]
        tpa = int.from_bytes(frame[38:42], "big")
        if (htype, ptype, hlen, plen) != (1, EtherType.IPV4, 6, 4):
            return
        self.arp_cache[int.from_bytes(spa, "big")] = int.from_bytes(sha, "big")
        if op != _ARP_REQUEST or tpa != self.local_ip:
            return
        mac = self.local_mac.to_bytes(6, "big")
        reply = (sha + mac + struct.pack("!H", EtherType.ARP)
                 + struct.pack("!HHBBH", 1, EtherType.IPV4, 6, 4, _ARP_REPLY)
                 + mac + self.local_ip.to_bytes(4, "big") + sha + spa)
        self.counts["arp_replies"] += 1
        self._transmit(reply + bytes(60 - len(reply)))

    # ------------------------------------------------------------------ transmit
    def _flush(self, sock):
        """Send what ``sock``'s connection has to send; finish it once it is gone."""
        for frame in sock.conn.poll(self.now()):
            self._transmit(frame)
        if sock.conn.state == State.CLOSED and not sock.done:
            del self.sockets[sock.key]
            if sock.in_nic_table:       # the NIC's HOST flow: delete it (no wait)
                self.deletes.add(self.post_command(CommandOp.TABLE, {"table": {
                    "op": TableOp.DELETE, "key": sock.key.table_key(sock.conn.ingress)}}))
            sock.done = True

    def _transmit(self, frame):
        """Queue a frame; the pump posts the queue (one doorbell, one completion)."""
        self.tx_queue.append(frame)

    def _drain_tx(self):
        """Post the queued frames that fit: one doorbell, and a TX_DONE asked for the last
        one only (the NIC reads the TX ring in order: that event frees the buffers of
        every frame posted before it too)."""
        posted = 0
        while self.tx_queue and self.device.tx_room():
            frame = self.tx_queue.popleft()
            last = not self.tx_queue or self.device.tx_room() == 1
            index = self.device.post_tx(frame, completion=last, doorbell=last)
            self.tx_pending.append(index)
            self.counts["tx_frames"] += 1
            posted += 1
        return posted

    def _tx_done(self, index):
        """TX_DONE for TX index ``index``: its buffer and those of the frames before it."""
        while self.tx_pending:
            done = self.tx_pending.popleft()
            self.device.tx_done(done)
            if done == index:
                break
