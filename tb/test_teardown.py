"""End-to-end tests of the teardown engine through the NIC (hw.datapath.Datapath), against its model.

The host hands connections over on ``close``/``close_data``; scapy peers (``Peer`` of
tb/test_teardown_model.py) answer on ``mac_rx`` like TCP endpoints, and the testbench
drops the segments a lossy network would. The golden model (``sim.teardown_model``)
predicts every frame the NIC sends and every event: each frame on ``mac_tx`` is parsed
with scapy (checksums recomputed, flags, sequence numbers, options, payload) and compared
with the model's, flow by flow, in order; events field by field; frames that go to the
host byte for byte; the ``closing`` port and every ``td_counters`` field after each step.

Timers: a monitor reads ``timer_now`` every cycle and advances the model at each tick,
so the model fires the timers the engine fires. Tests that check timers use a tick
period longer than one sweep of the slots (so that a timer fires in the tick of its
deadline) and measure, in cycles, each timer's lateness from the start of that tick.
While nothing is expected and nothing is to be sent, ``TdBench.skip`` lets the simulator
run on its own until an output or the next tick (cocotb only), which keeps long timers
cheap.
"""

import collections
import random

import cocotb
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from hw.conn_table import Op, Status
from hw.headers import TcpFlags
from hw.metadata import EVENT, FLOW_VALUE, CloseReason, CloseStatus, EventKind, FlowKind
from hw.stream import beats_to_frame, frame_to_beats, pack_struct, packet_layout, unpack_struct
from hw.teardown import CLOSE_COMMAND, MAX_HELD_DATA, TdCounter, TdState
from sim.bus import CocotbBus
from sim.demo import _checksums_ok
from sim.teardown_model import MASK32, TableModel, TeardownModel
from tb.test_nic import CLOCK_MHZ, FrameSink, NicBench
from tb.test_teardown_model import FA, A, R, RA, S, F, Peer, ip_int

#: The Datapath configuration the tests build (shared with tb/test_nic.py).
NIC_PARAMS = {"width": 64, "entries": 256}
SLOTS = 1024
BUFFERS = 16
#: A tick period longer than one sweep of the 1024 slots plus the job queue and the
#: segment's way out: a timer fires in the tick of its deadline.
SLOW_TICK = 1152
#: How late (cycles after the start of its deadline's tick) a timer's segment may leave.
LATENESS_LIMIT = SLOTS + 160
NEVER = 1 << 30


class TimedFrameSink(FrameSink):
    """A FrameSink that also notes the cycle of each frame's first beat."""

    def __init__(self, *args):
        super().__init__(*args)
        self.first_cycles = []

    def sample(self):
        self.sink.sample()
        for beat, cycle in zip(self.sink.received, self.sink.received_cycles):
            if not self._beats:
                self.first_cycles.append(cycle)
            self._beats.append(beat)
            if beat >> (self.width + self.width // 8) & 1:
                self.frames.append(beats_to_frame(self._beats, self.width))
                self._beats = []
        self.sink.received.clear()
        self.sink.received_cycles.clear()


class TimerMonitor:
    """Reads ``timer_now`` each cycle; at each new tick the model advances."""

    def __init__(self, bench):
        self.bench = bench
        self.now = None
        self.tick_cycles = {}            # tick -> cycle in which the NIC's clock showed it

    def drive(self):
        pass

    def sample(self):
        now = self.bench.bus.get("timer_now")
        if now != self.now:
            self.now = now
            self.tick_cycles[now] = self.bench.bus.cycle
            self.bench.on_tick(now)


def seg_of(pkt):
    """The fields of a frame the NIC sent, as the model writes them."""
    ip, tcp = pkt[IP], pkt[TCP]
    length = ip.len - 4 * ip.ihl - 4 * tcp.dataofs
    return {"eth": (pkt[Ether].src, pkt[Ether].dst),
            "ip": (ip.src, ip.dst, ip.ttl, ip.id, int(ip.flags), ip.tos, ip.ihl, ip.proto),
            "tcp": (tcp.sport, tcp.dport, tcp.seq, tcp.ack, int(tcp.flags), tcp.window,
                    tcp.urgptr),
            "options": list(tcp.options),
            "payload": bytes(tcp.payload)[:length]}


def mac_text(value):
    return value.to_bytes(6, "big").hex(":")


def ip_text(value):
    import ipaddress
    return str(ipaddress.IPv4Address(value))


def expected_fields(seg, tsval=None):
    opt = seg["opt"]
    options = ([("NOP", None), ("NOP", None),
                ("Timestamp", (opt["tsval"] if tsval is None else tsval, opt["tsecr"]))]
               if opt["ts_valid"] else [])
    return {"eth": (mac_text(seg["eth"]["src"]), mac_text(seg["eth"]["dst"])),
            "ip": (ip_text(seg["ip"]["src"]), ip_text(seg["ip"]["dst"]), 64, 0, 2, 0, 5, 6),
            "tcp": (seg["tcp"]["sport"], seg["tcp"]["dport"], seg["tcp"]["seq"],
                    seg["tcp"]["ack"], seg["tcp"]["flags"], seg["tcp"]["window"], 0),
            "options": options,
            "payload": seg["payload"]}


def flow_of_segment(seg):
    return (seg["ip"]["dst"], seg["tcp"]["dport"], seg["tcp"]["sport"])


def flow_of_event(event):
    return (event["peer_ip"], event["peer_port"], event["local_port"])


def flow_of_peer(peer):
    return (ip_int(peer.ip), peer.port, peer.local_port)


class TdBench(NicBench):
    """The Datapath, its stream agents, the teardown model and the expectations."""

    def __init__(self, bus, width, stall=0.2, seed=1, entries=256, slots=SLOTS, buffers=BUFFERS,
                 tick_period=0, fin_rto=NEVER, fin2_timeout=NEVER, time_wait=NEVER,
                 fin_retries=3, ts_period=0):
        super().__init__(bus, width, stall, seed)
        self.entries = entries
        self.stall = stall

        def r():
            return random.Random(self.rng.random())
        # NicBench's ``close`` source is ``close_src`` here (``close`` is the method that
        # hands a connection over); the mac_tx sink also notes first-beat cycles.
        self.close_src = self.__dict__.pop("close")
        self.agents.remove(self.mac_tx)
        self.mac_tx = TimedFrameSink(bus, "mac_tx", width, stall, r())
        self.monitor = TimerMonitor(self)
        self.agents += [self.mac_tx, self.monitor]
        self.model = TeardownModel(slots, buffers, table=TableModel())
        self.expected = collections.defaultdict(collections.deque)     # flow -> segments
        self.expected_events = collections.defaultdict(collections.deque)
        self.expected_host = collections.deque()
        self.expected_reasons = collections.deque()
        self.fired = {}                 # tick -> keys of the flows whose timer fired in it
        self._meta_checked = 0
        self.timer_segments = {}        # id(segment) -> deadline tick of the timer that sent it
        self.lateness = []              # (flow, cycles after the start of the deadline's tick)
        self.sent_log = []              # (cycle, flow, scapy packet) of every NIC frame
        self.events_log = []            # every event, in order
        self._tx_checked = 0
        self._events_checked = 0
        self._host_checked = 0
        self.ts_period = ts_period
        bus.set("ts_period", ts_period)
        self.configure(tick_period=tick_period, fin_rto=fin_rto, fin2_timeout=fin2_timeout,
                       time_wait=time_wait, fin_retries=fin_retries)

    # ------------------------------------------------------------------ configuration
    def configure(self, **values):
        for name, value in values.items():
            self.bus.set(name, value)
            if name != "tick_period":
                setattr(self.model, name, value)
            else:
                self.tick_period = value

    @property
    def now(self):
        return self.bus.get("timer_now")

    def _ts_clock(self):
        return self.bus.get("ts_clock")

    # ------------------------------------------------------------------ inputs
    def _expect(self, out, deadline=None):
        for seg in out.segments:
            self.expected[flow_of_segment(seg)].append(seg)
            if deadline is not None:
                self.timer_segments[id(seg)] = deadline
        for event in out.events:
            self.expected_events[flow_of_event(event)].append(event)

    def close(self, peer, data=None, mangle=False, **overrides):
        """The host's CLOSE for ``peer``'s connection; returns the model's status.
        ``mangle``: the data beats have random ``keep`` and ``last`` and junk after the
        data (the engine counts beats by ``data_length`` and must ignore all three)."""
        cmd = peer.command(**overrides)
        length = cmd["data_length"]
        if data is None:
            data = peer.data if length == len(peer.data) else self.rng.randbytes(length)
        self.model.ts_clock = self._ts_clock()
        out = self.model.close(cmd, data, now=self.now)
        self._expect(out)
        self.close_src.send([pack_struct(CLOSE_COMMAND, **cmd)])
        if length:
            beats = frame_to_beats(data, self.width)
            if mangle:
                nb = self.width // 8
                beats = [pack_struct(packet_layout(self.width),
                                     data=int.from_bytes(data[i:i + nb].ljust(nb, b"\xa5"), "little"),
                                     keep=self.rng.getrandbits(nb), last=self.rng.getrandbits(1))
                         for i in range(0, len(data), nb)]
            self.close_data.send(beats)
        return out.status

    def deliver(self, frames):
        """Frames from peers to the NIC; the model decides each one now."""
        outs = []
        for frame in frames:
            self.model.ts_clock = self._ts_clock()
            out = self.model.frame(frame, now=self.now)
            self._expect(out)
            if not out.claimed or out.to_host:
                self.expected_host.append(bytes(frame))
                self.expected_reasons.append(self._host_reason(frame, out))
            self.mac_rx.send(frame_to_beats(frame, self.width))
            outs.append(out)
        return outs

    def _host_reason(self, frame, out):
        """The reason on host_rx_meta of a frame the model sends to the host: the
        teardown engine's (FLOW) when it claims it, else the handshake engine's."""
        from hw.handshake import Reason
        from sim.reference import parse_frame
        if out.claimed:
            return Reason.FLOW
        meta = parse_frame(frame)
        if any(meta["errors"].values()):
            return Reason.PARSE_ERROR
        if meta["eth"]["vlan_valid"]:
            return Reason.VLAN
        ip, tcp = meta["ip"], meta["tcp"]
        if (0, ip["src"], ip["dst"], tcp["sport"], tcp["dport"]) in self.model.table.entries:
            return Reason.FLOW
        return Reason.NO_LISTENER            # the tests' local ports have no listener

    def on_tick(self, now):
        self.fired[now] = {s.key for s in self.model.slots if s is not None
                           and ((now - s.deadline) & MASK32) < 1 << 31}
        self.model.ts_clock = self._ts_clock()
        out = self.model.advance(now)
        self._expect(out, deadline=now)

    def insert_host_flow(self, peer):
        """The host's INSERT of an established flow (FlowKind.HOST) into the table."""
        key = dict(zip(("port", "src", "dst", "sport", "dport"), peer.key))
        self.table_cmd.send([self._table_command(Op.INSERT, key=key,
                                                 value=pack_struct(FLOW_VALUE, kind=FlowKind.HOST))])
        return key

    # ------------------------------------------------------------------ checking
    def pending(self):
        return (sum(len(q) for q in self.expected.values())
                + sum(len(q) for q in self.expected_events.values())
                + len(self.expected_host) + len(self.expected_reasons))

    def _check_outputs(self):
        frames = self.mac_tx.frames
        while self._tx_checked < len(frames):
            k = self._tx_checked
            frame = frames[k]
            assert _checksums_ok(frame), Ether(frame).show(dump=True)
            pkt = Ether(frame)
            assert TCP in pkt, pkt.show(dump=True)
            flow = (ip_int(pkt[IP].dst), pkt[TCP].dport, pkt[TCP].sport)
            self.sent_log.append((self.mac_tx.first_cycles[k], flow, pkt))
            queue = self.expected[flow]
            assert queue, f"unexpected frame from the NIC: {pkt.summary()} {pkt[TCP].options}"
            want = queue.popleft()
            got = seg_of(pkt)
            tsval = None
            if want["opt"]["ts_valid"] and self.ts_period:
                # The timestamp clock runs: TSval lies between the prediction and now.
                got_ts = dict(pkt[TCP].options).get("Timestamp", (None,))[0]
                low = want["opt"]["tsval"]
                high = (self._ts_clock() + (want["opt"]["tsval"] - self.model.ts_clock)) & MASK32
                if got_ts is not None and ((got_ts - low) & MASK32) <= ((high - low) & MASK32) + 1:
                    tsval = got_ts
            expected = expected_fields(want, tsval)
            assert got == expected, (f"frame #{k} for flow {flow}:\n  rtl   {got}\n"
                                     f"  model {expected}")
            deadline = self.timer_segments.pop(id(want), None)
            if deadline is not None and deadline in self.monitor.tick_cycles:
                self.lateness.append((flow, self.mac_tx.first_cycles[k]
                                      - self.monitor.tick_cycles[deadline]))
            self._tx_checked += 1
        events = self.event.received
        while self._events_checked < len(events):
            event = unpack_struct(EVENT, events[self._events_checked])
            self.events_log.append(event)
            flow = flow_of_event(event)
            queue = self.expected_events[flow]
            assert queue, f"unexpected event: {event}"
            want = queue.popleft()
            if event != want:
                diff = {k: (event[k], want[k]) for k in want if event[k] != want[k]}
                raise AssertionError(f"event for flow {flow} (kind {want['kind']}, status "
                                     f"{want['status']}): fields differ (rtl, model): {diff}")
            self._events_checked += 1
        host = self.host_rx.frames
        while self._host_checked < len(host):
            assert self.expected_host, f"unexpected host frame: {Ether(host[self._host_checked]).summary()}"
            want = self.expected_host.popleft()
            got = host[self._host_checked]
            assert got == want, f"host frame:\n  rtl   {Ether(got).summary()}\n  sent  {Ether(want).summary()}"
            self._host_checked += 1
        metas = self.host_rx_meta.received
        while self._meta_checked < len(metas):
            from hw.handshake import VERDICT
            verdict = unpack_struct(VERDICT, metas[self._meta_checked])
            assert self.expected_reasons, f"unexpected host_rx_meta record {verdict}"
            want = self.expected_reasons.popleft()
            assert verdict == {"to_host": 1, "reason": want}, (verdict, want)
            self._meta_checked += 1

    def _sources_idle(self):
        return all(s.idle for s in (self.mac_rx, self.host_tx, self.control, self.table_cmd,
                                    self.close_src, self.close_data))

    async def run(self, cycles):
        count = [0]

        def done():
            count[0] += 1
            return count[0] > cycles
        await self.until(done, max_cycles=cycles + 1)
        self._check_outputs()

    async def settle(self, max_cycles=20000, idle=64):
        """Run until every expected output has arrived and been checked, ``idle`` cycles
        more (nothing else may come), the queued table DELETEs have landed; then compare
        ``closing`` and every counter with the model."""
        def done():
            self._check_outputs()
            return self._sources_idle() and self.pending() == 0
        await self.until(done, max_cycles=max_cycles)
        await self.run(idle)
        assert self.pending() == 0
        await self.deletes_landed()
        self.check_state()

    async def deletes_landed(self, max_cycles=2000):
        target = len(self.model.table.entries) - len(set(self.model.deleting))
        await self.until(lambda: self.bus.get("flows") == target, max_cycles=max_cycles)
        self.model.apply_deletes()

    def counters(self):
        flat = self.bus.get("td_counters")
        return {c: flat >> (32 * c) & MASK32 for c in TdCounter}

    def check_state(self):
        assert self.bus.get("closing") == self.model.closing, \
            (self.bus.get("closing"), self.model.closing)
        got = self.counters()
        want = self.model.counters
        diff = {c.name: (got[c], want[c]) for c in TdCounter if got[c] != want[c]}
        assert not diff, f"counters (rtl, model): {diff}"

    async def skip(self, max_cycles):
        """Let up to ``max_cycles`` pass with nothing to send and nothing expected: on
        cocotb the simulator runs alone (every sink not ready, so nothing is missed) until
        an output becomes valid or the timer clock moves; elsewhere, cycle by cycle."""
        bus = self.bus
        if not isinstance(bus, CocotbBus):
            await self.run(min(max_cycles, 64))
            return
        from cocotb.simtime import get_sim_time
        from cocotb.triggers import ClockCycles, First, ReadOnly, RisingEdge, ValueChange
        from tb.cocotb_util import CLOCK_NS
        dut = bus.dut
        sinks = ("mac_tx", "host_rx", "host_rx_meta", "event", "table_resp")
        for name in sinks:
            bus.set(f"{name}__ready", 0)
        await ReadOnly()
        busy = any(bus.get(f"{name}__valid") for name in sinks)
        await RisingEdge(dut.clk)
        bus.cycle += 1
        if busy or max_cycles <= 1:
            return
        start = get_sim_time("ns")
        await First(ClockCycles(dut.clk, max_cycles - 1),
                    *(RisingEdge(getattr(dut, f"{name}__valid")) for name in sinks),
                    ValueChange(dut.timer_now))
        bus.cycle += round((get_sim_time("ns") - start) / CLOCK_NS)

    async def wait_for(self, done, max_cycles=200000):
        """Run until ``done()``, skipping the quiet stretches (timers)."""
        start = self.bus.cycle
        while True:
            self._check_outputs()
            if done():
                return
            if self.bus.cycle - start > max_cycles:
                raise TimeoutError(f"no completion after {max_cycles} cycles")
            if self._sources_idle() and self.pending() == 0:
                await self.skip(4096)
                await self.run(2)        # the monitor samples the clock, sinks take beats
            else:
                await self.run(16)

    async def wait_ticks(self, ticks):
        """Let the timer clock advance by ``ticks``, then settle."""
        target = (self.now + ticks) & MASK32
        await self.wait_for(lambda: self.monitor.now == target
                            and self.bus.cycle - self.monitor.tick_cycles[target] > 0,
                            max_cycles=(ticks + 1) * max(self.tick_period, 1) + 1000)

    async def align(self):
        """Wait for the start of the next tick (sends made right after it are decided in it)."""
        if self.tick_period:
            await self.wait_ticks(1)

    def tick_at(self, cycle):
        """The timer clock's value in ``cycle``."""
        return max((t for t, c in self.monitor.tick_cycles.items() if c <= cycle),
                   key=lambda t: self.monitor.tick_cycles[t])

    def closed_events(self):
        return [e for e in self.events_log if e["kind"] == EventKind.CLOSED]


async def td_start(bus, width, **kw):
    bench = TdBench(bus, width, **kw)
    await bench.setup()
    await bench.run(8)
    return bench


# ----------------------------------------------------------------------------- scenarios

async def td_transitions(bus, width=64, stall=0.3, seed=11, ts_period=5):
    """Every way to the end: FIN_WAIT_1 -> FIN_WAIT_2 -> TIME_WAIT -> freed; FIN_WAIT_1 ->
    CLOSING -> TIME_WAIT (simultaneous close); FIN_WAIT_1 -> TIME_WAIT (a FIN that acks
    ours); LAST_ACK -> freed. Data held or not, timestamps or not, sequence numbers
    across 2**32, window scaling; the timestamp clock runs (``ts_period``)."""
    bench = await td_start(bus, width, stall=stall, seed=seed, tick_period=SLOW_TICK,
                           time_wait=2, ts_period=ts_period)
    rng = bench.rng
    a = Peer(rng, data_length=100, ts=True, unsent=40)
    b = Peer(rng, ts=False, snd_una=MASK32 - 0, wscale=3)
    c = Peer(rng, data_length=MAX_HELD_DATA, ts=True, seq=MASK32 - 1)
    d = Peer(rng, data_length=7, peer_fin=True, wscale=7, snd_una=MASK32 - 3)
    peers = [a, b, c, d]
    await bench.align()
    for peer in peers:
        assert bench.close(peer) == CloseStatus.OK
    await bench.settle()
    assert bench.model.closing == 4
    states = {flow_of_peer(p): bench.model.state_of(p.key) for p in peers}
    assert states[flow_of_peer(d)] == TdState.LAST_ACK
    await bench.align()
    peer_fin_b = b.fin(ack=b.snd_una)         # crossed our FIN: does not ack it
    bench.deliver([a.segment(A), peer_fin_b, c.fin(), d.segment(A)])
    await bench.settle()
    assert bench.model.state_of(a.key) == TdState.FIN_WAIT_2
    assert bench.model.state_of(b.key) == TdState.CLOSING
    assert bench.model.state_of(c.key) == TdState.TIME_WAIT
    assert bench.model.state_of(d.key) == TdState.FREE
    await bench.align()
    bench.deliver([a.fin(), b.segment(A)])
    await bench.settle()
    assert bench.model.state_of(a.key) == TdState.TIME_WAIT
    assert bench.model.state_of(b.key) == TdState.TIME_WAIT
    await bench.wait_for(lambda: bench.model.closing == 0 and bench.pending() == 0,
                         max_cycles=6 * SLOW_TICK)
    await bench.settle()
    reasons = {flow_of_event(e): (e["status"], e["segments_in"], e["segments_out"])
               for e in bench.closed_events()}
    assert reasons == {flow_of_peer(a): (CloseReason.NORMAL, 2, 2),
                       flow_of_peer(b): (CloseReason.NORMAL, 2, 2),
                       flow_of_peer(c): (CloseReason.NORMAL, 1, 2),
                       flow_of_peer(d): (CloseReason.NORMAL, 1, 1)}, reasons
    # The flows are gone from the table: a late segment goes to the host.
    bench.deliver([a.segment(A)])
    await bench.settle()
    return {"cycles": bus.cycle, "lateness": max((l for _, l in bench.lateness), default=None)}


async def td_loss(bus, width=64, stall=0.2, seed=12):
    """Each segment of a close lost once, and the recovery: our FIN (retransmitted), the
    peer's ACK (our FIN again, the peer acks again), the peer's FIN (it retransmits it),
    our ACK of its FIN (the peer's FIN again in TIME_WAIT: ACK, TIME_WAIT restarted; in
    CLOSING: ACK); our FIN lost in CLOSING and in LAST_ACK; held data retransmitted with
    the FIN."""
    bench = await td_start(bus, width, stall=stall, seed=seed, tick_period=SLOW_TICK,
                           fin_rto=2, fin_retries=5, time_wait=3, fin2_timeout=200)
    rng = bench.rng
    lost_fin = Peer(rng, data_length=50)           # our FIN lost
    lost_ack = Peer(rng, data_length=0, ts=False)  # the peer's ACK lost
    lost_pfin = Peer(rng, data_length=3)           # the peer's FIN lost
    lost_our_ack = Peer(rng)                       # our ACK of the peer's FIN lost
    closing = Peer(rng, data_length=9)             # CLOSING, our FIN lost again
    last_ack = Peer(rng, peer_fin=True, data_length=1)  # LAST_ACK, our FIN lost
    peers = [lost_fin, lost_ack, lost_pfin, lost_our_ack, closing, last_ack]
    await bench.align()
    for peer in peers:
        bench.close(peer)
    await bench.settle()
    # The peers that did get our FIN answer; two answers are lost.
    await bench.align()                                         # start + 1
    bench.deliver([lost_pfin.segment(A), lost_our_ack.fin(), closing.fin(ack=closing.snd_una)])
    lost_ack.segment(A)                             # lost on the way: never delivered
    lost_pfin.fin()                                 # lost on the way
    await bench.settle()
    # start + 2: the FIN timers fire (lost_fin, lost_ack, closing, last_ack).
    await bench.wait_ticks(1)
    await bench.settle()
    fins = collections.Counter(f for _, f, p in bench.sent_log if int(p[TCP].flags) & TcpFlags.FIN)
    assert all(fins[flow_of_peer(p)] == 2 for p in (lost_fin, lost_ack, closing, last_ack)), fins
    assert fins[flow_of_peer(lost_pfin)] == fins[flow_of_peer(lost_our_ack)] == 1
    # The peers answer the retransmissions; the peer whose FIN was lost sends it again;
    # the peer whose ACK from us was lost sends its FIN again (TIME_WAIT restarted).
    lost_pfin.seq = (lost_pfin.seq - 1) & MASK32
    lost_our_ack.seq = (lost_our_ack.seq - 1) & MASK32
    await bench.align()                                         # start + 3
    # closing's peer did not get our ACK of its FIN either: its FIN again, in CLOSING
    # (rule 7: ACK), then its ACK of our retransmitted FIN.
    closing.seq = (closing.seq - 1) & MASK32
    bench.deliver([closing.fin(ack=closing.snd_una)])
    bench.deliver([lost_fin.fin(), lost_ack.segment(A), closing.segment(A),
                   last_ack.segment(A), lost_pfin.fin(), lost_our_ack.fin()])
    await bench.settle()
    assert bench.model.state_of(lost_ack.key) == TdState.FIN_WAIT_2
    assert bench.model.state_of(lost_our_ack.key) == TdState.TIME_WAIT
    await bench.align()
    bench.deliver([lost_ack.fin()])
    await bench.settle()
    await bench.wait_for(lambda: bench.model.closing == 0 and bench.pending() == 0,
                         max_cycles=10 * SLOW_TICK)
    await bench.settle()
    events = {flow_of_event(e): e for e in bench.closed_events()}
    assert all(events[flow_of_peer(p)]["status"] == CloseReason.NORMAL for p in peers)
    assert events[flow_of_peer(last_ack)]["retransmits"] == 1
    assert events[flow_of_peer(lost_our_ack)]["retransmits"] == 0
    return {"cycles": bus.cycle}


async def td_timers(bus, width=64, stall=0.2, seed=13):
    """Exact timers: a silent peer (FIN retransmitted after fin_rto << k ticks, then
    RST|ACK and CLOSED/TIMEOUT), FIN_WAIT_2 timeout, TIME_WAIT expiry and its restart by
    the peer's FIN again; every timer's lateness in cycles is measured."""
    bench = await td_start(bus, width, stall=stall, seed=seed, tick_period=SLOW_TICK,
                           fin_rto=1, fin_retries=2, time_wait=4, fin2_timeout=3)
    rng = bench.rng
    silent = Peer(rng, data_length=20)
    fin2 = Peer(rng, ts=False)
    tw = Peer(rng)
    await bench.align()
    start = bench.now
    for peer in (silent, fin2, tw):
        bench.close(peer)
    await bench.settle(idle=8)
    # Still in tick `start` (the FIN timers expire at start + 1):
    bench.deliver([fin2.segment(A), tw.fin()])          # FIN_WAIT_2 to start + 3, TIME_WAIT to + 4
    await bench.settle()
    assert bench.now == start
    await bench.wait_ticks(2)                           # start + 2: the peer's FIN again
    tw.seq = (tw.seq - 1) & MASK32
    bench.deliver([tw.fin()])                           # TIME_WAIT restarted: to start + 6
    await bench.settle()
    await bench.wait_for(lambda: bench.model.closing == 0 and bench.pending() == 0,
                         max_cycles=20 * SLOW_TICK)
    await bench.settle()
    sends = [(bench.tick_at(c) - start, p) for c, f, p in bench.sent_log
             if f == flow_of_peer(silent)]
    assert [t for t, _ in sends] == [0, 1, 3, 7], sends
    assert [int(p[TCP].flags) for _, p in sends] == [0x19] * 3 + [0x14]
    # In cycles: send k+1 follows send k by (fin_rto << k) ticks, within one sweep.
    cycles = [c for c, f, _ in bench.sent_log if f == flow_of_peer(silent)]
    for k, (before, after) in enumerate(zip(cycles, cycles[1:])):
        interval = (1 << k) * SLOW_TICK
        assert abs(after - before - interval) <= LATENESS_LIMIT, (k, after - before, interval)
    events = {flow_of_event(e): e for e in bench.closed_events()}
    timeout = events[flow_of_peer(silent)]
    assert (timeout["status"], timeout["retransmits"], timeout["segments_out"]) == \
        (CloseReason.TIMEOUT, 2, 4)
    assert events[flow_of_peer(fin2)]["status"] == CloseReason.TIMEOUT
    assert events[flow_of_peer(tw)]["status"] == CloseReason.NORMAL
    event_ticks = {flow_of_event(unpack_struct(EVENT, e)): bench.tick_at(c) - start
                   for e, c in zip(bench.event.received, bench.event.received_cycles)
                   if unpack_struct(EVENT, e)["kind"] == EventKind.CLOSED}
    assert event_ticks == {flow_of_peer(silent): 7, flow_of_peer(fin2): 3,
                           flow_of_peer(tw): 6}, event_ticks
    assert bench.lateness and all(0 <= l <= LATENESS_LIMIT for _, l in bench.lateness), \
        bench.lateness
    return {"cycles": bus.cycle, "lateness": [l for _, l in bench.lateness]}


async def td_rules(bus, width=64, stall=0.3, seed=14):
    """The segment rules a well-behaved close does not meet: peer RSTs (exact, in the
    window: challenge ACK, outside), SYNs (in TIME_WAIT acceptable: to the host, NEW_SYN;
    not acceptable and outside TIME_WAIT: challenge ACK), data after close (RST,
    CLOSED/DATA), data after the peer's FIN, out-of-window segments, ACKs of unsent data,
    segments without ACK, a bad checksum (not claimed: to the host), FINs of unknown
    flows (to the host, nothing changes)."""
    bench = await td_start(bus, width, stall=stall, seed=seed)     # timers stopped
    rng = bench.rng
    rst_exact = Peer(rng, data_length=5)
    rst_window = Peer(rng, window=3000, ts=False)
    syn_fw1 = Peer(rng)
    tw_ts = Peer(rng, ts=True)
    tw_seq = Peer(rng, ts=False, seq=MASK32 - 10)
    data_fw1 = Peer(rng, data_length=30)
    data_fw2 = Peer(rng, ts=False)
    last_ack = Peer(rng, peer_fin=True)
    window = Peer(rng, window=10, wscale=2)
    peers = [rst_exact, rst_window, syn_fw1, tw_ts, tw_seq, data_fw1, data_fw2, last_ack, window]
    for peer in peers:
        bench.close(peer)
    await bench.settle()
    bench.deliver([tw_ts.segment(A), tw_seq.segment(A), data_fw2.segment(A)])
    await bench.settle()
    bench.deliver([tw_ts.fin(), tw_seq.fin()])
    await bench.settle()

    # RSTs.
    outs = bench.deliver([
        rst_window.segment(R, seq=rst_window.seq + 2999, ack=0),      # in window: challenge
        rst_window.segment(RA, seq=rst_window.seq + 3000),            # outside: nothing
        rst_window.segment(R, seq=rst_window.seq - 1, ack=0),         # outside: nothing
        rst_exact.segment(R, ack=0),                                  # exact: freed
    ])
    assert [o.rule for o in outs] == [2, 3, 3, 1]
    await bench.settle()
    # SYNs: in FIN_WAIT_1, in TIME_WAIT unacceptable then acceptable.
    tw_ts.tick(10)
    outs = bench.deliver([
        syn_fw1.segment(S, seq=syn_fw1.seq + 5, ack=0),
        tw_ts.segment(S, seq=tw_ts.seq + 1000, ack=0, tsval=tw_ts.tsval - 20),
        tw_seq.segment(S, seq=tw_seq.seq, ack=0),
        tw_seq.segment("SA", seq=tw_seq.seq + 100000),     # SYN|ACK: never reopens
        tw_ts.segment(S, seq=tw_ts.seq - 1000, ack=0),
        tw_seq.segment(S, seq=tw_seq.seq + 100000, ack=0),
    ])
    assert [o.rule for o in outs] == [5, 5, 5, 5, 4, 4]
    await bench.settle()
    # Data after close; out-of-window; no ACK; ACK of unsent data; data after the peer's FIN.
    outs = bench.deliver([
        data_fw1.segment("PA", ack=data_fw1.snd_una + 10, payload=b"more data"),
        data_fw2.segment("PA", payload=b"x" * 300),
        window.segment(A, seq=window.seq + 40),
        window.segment(A, seq=window.seq - 5, payload=b"old"),
        window.segment(F, ack=0),
        window.segment(A, ack=window.snd_max + 1),
        last_ack.segment("PA", payload=b"late", ack=last_ack.snd_una),
        window.segment(A, seq=window.seq + 39, ack=window.snd_una),     # in window, old ACK
        window.segment(A, ack=window.snd_una, vlan=5),                  # VLAN-tagged: claimed
    ])
    assert [o.rule for o in outs] == [10, 10, 7, 7, 8, 9, 11, 13, 13]
    await bench.settle()
    # A FIN of a closing flow with a bad checksum: not claimed, to the host as it is.
    bad = bytearray(window.segment(FA))
    bad[-1 if len(bad) > 60 else 40] ^= 0xFF
    outs = bench.deliver([bytes(bad)])
    assert not outs[0].claimed
    # FINs (and RSTs) of flows the NIC does not close: to the host, nothing changes.
    strangers = [Peer(rng) for _ in range(40)]
    flood = bench.deliver([p.segment(rng.choice([FA, F, R, A])) for p in strangers])
    assert not any(o.claimed for o in flood)
    await bench.settle()
    states = {p: bench.model.state_of(p.key) for p in peers}
    assert states[window] == TdState.FIN_WAIT_1 and states[last_ack] == TdState.LAST_ACK
    assert states[rst_window] == TdState.FIN_WAIT_1 and states[syn_fw1] == TdState.FIN_WAIT_1
    events = {flow_of_event(e): e["status"] for e in bench.closed_events()}
    assert events == {flow_of_peer(rst_exact): CloseReason.RESET,
                      flow_of_peer(tw_ts): CloseReason.NEW_SYN,
                      flow_of_peer(tw_seq): CloseReason.NEW_SYN,
                      flow_of_peer(data_fw1): CloseReason.DATA,
                      flow_of_peer(data_fw2): CloseReason.DATA}, events
    return {"cycles": bus.cycle}


async def td_close_statuses(bus, width=64, stall=0.2, seed=15, table_full=False):
    """CLOSE answers: BAD_LENGTH (too much data, SND.NXT outside: the data beats are
    consumed), NO_BUFFER (16 buffers), ALREADY_CLOSING, a HOST flow taken over (UPDATE),
    TABLE_FULL (the table filled with HOST flows: long at 256 entries, so only when
    ``table_full``; test_teardown_small_nic_amaranth fills a 64-entry table)."""
    bench = await td_start(bus, width, stall=stall, seed=seed)
    rng = bench.rng
    # BAD_LENGTH, then a good CLOSE with data (the refused data beats were consumed).
    big = Peer(rng, data_length=MAX_HELD_DATA + 1)
    assert bench.close(big) == CloseStatus.BAD_LENGTH
    odd = Peer(rng, data_length=12)
    assert bench.close(odd, snd_nxt=(odd.fin_seq + 1) & MASK32) == CloseStatus.BAD_LENGTH
    assert bench.close(odd, snd_nxt=(odd.snd_una - 1) & MASK32) == CloseStatus.BAD_LENGTH
    assert bench.close(odd, snd_nxt=odd.snd_una) == CloseStatus.OK
    await bench.settle()
    # NO_BUFFER: 15 more closes with data fill the 16 buffers.
    holders = [Peer(rng, data_length=rng.randrange(1, 200)) for _ in range(BUFFERS - 1)]
    for k, peer in enumerate(holders):
        assert bench.close(peer, mangle=k % 2 == 1) == CloseStatus.OK
    extra = Peer(rng, data_length=10)
    assert bench.close(extra) == CloseStatus.NO_BUFFER
    plain = Peer(rng)
    assert bench.close(plain) == CloseStatus.OK          # no data: no buffer needed
    await bench.settle()
    bench.deliver([holders[0].segment(A)])               # our FIN acked: its buffer is free
    await bench.settle()
    assert bench.close(extra) == CloseStatus.OK
    # ALREADY_CLOSING (and NO_BUFFER before it when the command holds data).
    assert bench.close(plain) == CloseStatus.ALREADY_CLOSING
    assert bench.close(holders[1]) == CloseStatus.NO_BUFFER
    assert bench.close(holders[0], data=b"", data_length=0,
                       snd_nxt=holders[0].snd_una) == CloseStatus.ALREADY_CLOSING
    await bench.settle()
    bench.deliver([holders[2].segment(A)])               # a buffer for the next one
    await bench.settle()
    # A HOST flow: its segments go to the host, then the host closes it through the NIC.
    host = Peer(rng, data_length=64)
    bench.insert_host_flow(host)
    bench.model.table.insert(host.key, {"kind": FlowKind.HOST, "slot": 0})
    await bench.until(lambda: len(bench.table_resp.received) == 2)
    resp = unpack_struct(bench._resp_layout, bench.table_resp.received[-1])
    assert resp["status"] == Status.OK
    bench.deliver([host.segment("PA", payload=b"request", ack=host.snd_una)])
    host.seq = (host.seq + 7) & MASK32
    await bench.settle()
    assert bench.close(host) == CloseStatus.OK
    await bench.settle()
    bench.deliver([host.fin()])
    await bench.settle()
    assert bench.model.state_of(host.key) == TdState.TIME_WAIT
    result = {"cycles": bus.cycle}
    if table_full:
        result["filled"] = await fill_table(bench)
    return result


async def fill_table(bench):
    """Insert HOST flows until the table answers FULL; then a CLOSE of a new flow is
    TABLE_FULL and a CLOSE of a HOST flow already there still takes it over."""
    rng = bench.rng
    inserted = []
    answers = len(bench.table_resp.received)
    while True:
        peer = Peer(rng)
        bench.insert_host_flow(peer)
        await bench.until(lambda: len(bench.table_resp.received) == answers + 1, max_cycles=20000)
        answers += 1
        status = unpack_struct(bench._resp_layout, bench.table_resp.received[-1])["status"]
        if status != Status.OK:
            assert status == Status.FULL, status
            break
        bench.model.table.insert(peer.key, {"kind": FlowKind.HOST, "slot": 0})
        inserted.append(peer)
    bench.model.table.capacity = len(bench.model.table.entries)
    assert bench.bus.get("flows") == len(bench.model.table.entries)
    assert bench.close(Peer(rng)) == CloseStatus.TABLE_FULL
    await bench.settle()
    victim = inserted[len(inserted) // 2]
    assert bench.close(victim) == CloseStatus.OK
    await bench.settle()
    bench.deliver([victim.segment(R, ack=0)])
    await bench.settle()
    return len(bench.model.table.entries)


async def td_smoke(bus, width=512, stall=0.3, seed=16):
    """A close with held data at another width: FIN, the peer's ACK and FIN, TIME_WAIT
    ended by an acceptable SYN, and LAST_ACK."""
    bench = await td_start(bus, width, stall=stall, seed=seed)
    rng = bench.rng
    a = Peer(rng, data_length=777)
    b = Peer(rng, data_length=MAX_HELD_DATA, peer_fin=True, ts=False)
    bench.close(a)
    bench.close(b)
    await bench.settle()
    bench.deliver([a.segment(A), b.segment(A)])
    await bench.settle()
    bench.deliver([a.fin()])
    await bench.settle()
    a.tick()
    bench.deliver([a.segment(S, seq=a.seq + 5000, ack=0)])
    await bench.settle()
    assert {e["status"] for e in bench.closed_events()} == {CloseReason.NORMAL, CloseReason.NEW_SYN}
    return {"cycles": bus.cycle}


async def td_burst(bus, width=64, seed=18):
    """Segments at line rate, no stalls: bursts of one flow back to back (each record must
    see the state the previous one left: FIN_WAIT_2, TIME_WAIT, the FIN again, a SYN that
    frees the flow, then a record that finds the slot free: stale, to the host), and the
    same bursts interleaved across flows."""
    bench = await td_start(bus, width, stall=0.0, seed=seed)
    rng = bench.rng
    peers = [Peer(rng, data_length=rng.choice([0, 20]), ts=k % 2 == 0) for k in range(6)]
    for peer in peers:
        bench.close(peer)
    await bench.settle()
    bursts = []
    for peer in peers:
        burst = [peer.segment(A), peer.fin()]               # rule 13, rule 12
        peer.seq = (peer.seq - 1) & MASK32
        burst.append(peer.fin())                            # rule 6
        burst.append(peer.segment(A, seq=peer.seq - 1))     # rule 7 (before RCV.NXT): ACK
        peer.tick()
        burst.append(peer.segment(S, seq=peer.seq + 1000, ack=0))   # rule 4: freed
        burst.append(peer.segment(A))                       # stale: to the host
        bursts.append(burst)
    frames = [f for burst in bursts[:3] for f in burst]
    frames += [burst[i] for i in range(len(bursts[3])) for burst in bursts[3:]]
    outs = bench.deliver(frames)
    await bench.settle()
    assert [o.rule for o in outs[:6]] == [13, 12, 6, 7, 4, None], [o.rule for o in outs[:6]]
    assert bench.model.closing == 0 and bench.model.counters[TdCounter.STALE] == 6
    return {"cycles": bus.cycle}


def _random_segment(rng, peer):
    """One segment of a peer that may be right, late, duplicated or wrong."""
    kind = rng.choices(["ack", "old_ack", "fin", "oow", "rst_out", "rst_window", "syn",
                        "data", "too_new", "rst"],
                       weights=[6, 2, 5, 2, 1, 1, 1, 1, 1, 1])[0]
    if rng.random() < 0.3:
        peer.tick(rng.randrange(1, 5))
    if kind == "ack":
        return peer.segment(A)
    if kind == "old_ack":
        return peer.segment(A, ack=peer.snd_una)
    if kind == "fin":
        if not getattr(peer, "fin_done", False):
            peer.fin_done = True
            return peer.fin(ack=rng.choice([peer.snd_max, peer.snd_una]))
        return peer.segment(FA, seq=peer.seq - 1)             # its FIN again
    if kind == "oow":
        return peer.segment(A, seq=peer.seq - rng.randrange(1, 5000))
    if kind == "rst_out":
        return peer.segment(R, seq=peer.seq - rng.randrange(1, 5000), ack=0)
    if kind == "rst_window":
        return peer.segment(RA, seq=peer.seq + 1)
    if kind == "syn":
        return peer.segment(S, seq=peer.seq + rng.choice([0, 100000]), ack=0)
    if kind == "data":
        return peer.segment("PA", payload=rng.randbytes(rng.randrange(1, 40)))
    if kind == "too_new":
        return peer.segment(A, ack=peer.snd_max + rng.randrange(1, 1000))
    return peer.segment(R, ack=0)


async def td_random(bus, width=64, stall=0.2, seed=19, flows=10, steps=5):
    """Random peers (right, late, duplicated and wrong segments, losses) on flows in every
    state, with the timers running, for ``steps`` ticks, then until every flow is gone.
    A peer is silent in a tick in which its flow's timer fires (the engine may take the
    timer before or after the segment: both are right, the model picks one order)."""
    bench = await td_start(bus, width, stall=stall, seed=seed, tick_period=SLOW_TICK,
                           fin_rto=2, fin_retries=1, fin2_timeout=5, time_wait=3)
    rng = bench.rng
    peers = [Peer(rng, data_length=rng.choice([0, 0, 10, 300]), ts=rng.random() < 0.5,
                  peer_fin=rng.random() < 0.25, wscale=rng.choice([0, 2, 7]),
                  snd_una=rng.choice([None, MASK32 - 5]), seq=rng.choice([None, MASK32 - 2]))
             for _ in range(flows)]
    await bench.align()
    for peer in peers:
        bench.close(peer)
    await bench.settle()
    rules = collections.Counter()
    for _ in range(steps):
        await bench.align()
        fired = bench.fired.get(bench.now, set())
        frames = []
        for peer in peers:
            if bench.model.slot_of(peer.key) is None or peer.key in fired:
                continue
            if rng.random() < 0.3:
                continue                                      # nothing, or lost
            frames.append(_random_segment(rng, peer))
        for out in bench.deliver(frames):
            rules[out.rule] += 1
        await bench.settle()
    await bench.wait_for(lambda: bench.model.closing == 0 and bench.pending() == 0,
                         max_cycles=12 * SLOW_TICK)
    await bench.settle()
    reasons = collections.Counter(CloseReason(e["status"]).name for e in bench.closed_events())
    assert sum(reasons.values()) == flows
    return {"cycles": bus.cycle, "rules": dict(rules), "reasons": dict(reasons)}


# ----------------------------------------------------------------------------- cocotb tests

def _width():
    from tb.harness import tb_params
    return tb_params()["width"]


@cocotb.test()
async def td_transitions_test(dut):
    from tb.cocotb_util import start
    if _width() != 64:
        result = await td_smoke(await start(dut), _width())
    else:
        result = await td_transitions(await start(dut))
    dut._log.info(f"transitions: {result}")


@cocotb.test()
async def td_burst_test(dut):
    from tb.cocotb_util import start
    dut._log.info(f"burst: {await td_burst(await start(dut), _width())}")


@cocotb.test()
async def td_random_test(dut):
    from tb.cocotb_util import start
    import os
    if _width() == 64:
        # TD_RANDOM_SEED / TD_RANDOM_FLOWS / TD_RANDOM_STEPS: other and longer scenarios.
        args = {name: int(os.environ[f"TD_RANDOM_{name.upper()}"])
                for name in ("seed", "flows", "steps") if f"TD_RANDOM_{name.upper()}" in os.environ}
        dut._log.info(f"random: {await td_random(await start(dut), **args)}")


@cocotb.test()
async def td_loss_test(dut):
    from tb.cocotb_util import start
    if _width() == 64:
        dut._log.info(f"loss: {await td_loss(await start(dut))}")


@cocotb.test()
async def td_timers_test(dut):
    from tb.cocotb_util import start
    if _width() == 64:
        dut._log.info(f"timers: {await td_timers(await start(dut))}")


@cocotb.test()
async def td_rules_test(dut):
    from tb.cocotb_util import start
    if _width() == 64:
        dut._log.info(f"rules: {await td_rules(await start(dut))}")


@cocotb.test()
async def td_close_statuses_test(dut):
    from tb.cocotb_util import start
    if _width() == 64:
        dut._log.info(f"close statuses: {await td_close_statuses(await start(dut))}")


# ----------------------------------------------------------------------------- pytest entries

TESTS = ["td_transitions_test", "td_burst_test", "td_loss_test", "td_timers_test",
         "td_rules_test", "td_close_statuses_test", "td_random_test"]


@pytest.mark.parametrize("width", [64, 512])
def test_teardown_rtl(sim, width):
    from hw.datapath import Datapath
    from tb.harness import run_cocotb
    run_cocotb(Datapath, {"width": width, "entries": 256}, "tb.test_teardown", sim,
               testcase=TESTS if width == 64 else TESTS[:2])



# ----------------------------------------------------------------------------- small NIC

async def td_small(bus, width=64, stall=0.1, seed=17):
    """A small NIC (4 slots, 3 buffers, 64 table entries): NO_BUFFER, NO_SLOT (after
    BAD_LENGTH, before NO_BUFFER), a slot reused after a RST, TABLE_FULL."""
    bench = await td_start(bus, width, stall=stall, seed=seed, entries=64, slots=4, buffers=3)
    rng = bench.rng
    held = [Peer(rng, data_length=rng.randrange(1, 100)) for _ in range(3)]
    for peer in held:
        assert bench.close(peer) == CloseStatus.OK
    assert bench.close(Peer(rng, data_length=5)) == CloseStatus.NO_BUFFER
    plain = Peer(rng)
    assert bench.close(plain) == CloseStatus.OK
    assert bench.close(Peer(rng)) == CloseStatus.NO_SLOT
    assert bench.close(Peer(rng, data_length=5)) == CloseStatus.NO_SLOT
    assert bench.close(Peer(rng, data_length=MAX_HELD_DATA + 1)) == CloseStatus.BAD_LENGTH
    await bench.settle()
    bench.deliver([plain.segment(R, ack=0)])
    await bench.settle()
    again = Peer(rng)
    assert bench.close(again) == CloseStatus.OK
    await bench.settle()
    bench.deliver([again.segment(R, ack=0)])
    await bench.settle()
    filled = await fill_table(bench)
    return {"cycles": bus.cycle, "filled": filled}


def test_teardown_small_nic_amaranth():
    """NO_SLOT and TABLE_FULL need a NIC with few slots and a small table: a build of its
    own, on the built-in simulator (no Verilator or Icarus build for one test)."""
    from hw.datapath import Datapath
    from sim.jobs import run_job
    result = run_job(Datapath, {"width": 64, "entries": 64, "teardown_slots": 4,
                           "teardown_buffers": 3}, td_small, sim="amaranth")
    assert result.value["filled"] >= 48, result.value


@pytest.mark.parametrize("n", [1, 2, 3, 16])
def test_free_list_hands_out_every_index(n):
    """hw.free_list.FreeList(n) must offer all n indices after its reset fill (the NIC
    with teardown_buffers=2 or teardown_slots=2 relies on it)."""
    from amaranth.sim import Simulator

    from hw.free_list import FreeList
    dut = FreeList(n)
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    got = []

    async def bench(ctx):
        for _ in range(n + 4):
            await ctx.tick()
        ctx.set(dut.alloc.ready, 1)
        for _ in range(n + 4):
            if ctx.get(dut.alloc.valid):
                got.append(ctx.get(dut.alloc.payload))
            await ctx.tick()
    sim.add_testbench(bench)
    sim.run()
    assert sorted(got) == list(range(n)), got


# ----------------------------------------------------------------------------- bench

async def bench_teardown(bus, width, entries=4096, slots=SLOTS, closes=128, timed=8, seed=9):
    """``acceltcp bench teardown``: the NIC closes connections with peers that answer at
    once, then holds as many closing flows as it can. Figures:

    * ``latency_cycles``: a peer's FIN in on mac_rx (first beat) -> our ACK out on mac_tx
      (first beat), nothing else going on;
    * ``timer_error_cycles``: the worst lateness of a timer (FIN retransmissions and the
      RST|ACK of ``timed`` silent peers): its segment's first beat minus the cycle in
      which the timer clock reached the deadline (tick period = slots + 512);
    * ``closes_per_cycle``: ``closes`` CLOSE commands back to back while every peer
      answers our FIN with its FIN|ACK as soon as it is out and the NIC acks those:
      closes per cycle from the first CLOSE taken to the last ACK out;
    * ``max_closing_flows``: CLOSE commands until one is refused (the flows stay in
      TIME_WAIT, timers stopped), with the refusal's status.
    Every frame and event is checked against the model on the way."""
    bench = TdBench(bus, width, stall=0.0, seed=seed, entries=entries, slots=slots)
    await bench.setup()
    rng = bench.rng
    figures = {"slots": slots, "entries": entries}

    # Latency.
    peer = Peer(rng)
    bench.close(peer)
    await bench.settle()
    before_in = len(bench.mac_rx.sent_cycles)
    before_out = len(bench.mac_tx.first_cycles)
    bench.deliver([peer.fin()])
    await bench.settle()
    figures["latency_cycles"] = (bench.mac_tx.first_cycles[before_out]
                                 - bench.mac_rx.sent_cycles[before_in])

    # Timers.
    bench.configure(tick_period=slots + 512, fin_rto=1, fin_retries=2)
    silent = [Peer(rng) for _ in range(timed)]
    await bench.align()
    for peer in silent:
        bench.close(peer)
    await bench.settle()
    await bench.wait_for(lambda: all(bench.model.slot_of(p.key) is None for p in silent)
                         and bench.pending() == 0, max_cycles=12 * (slots + 512))
    await bench.settle()
    figures["timer_error_cycles"] = max(l for _, l in bench.lateness)
    figures["timers_measured"] = len(bench.lateness)
    bench.configure(tick_period=0, fin_rto=NEVER, fin_retries=3)
    await bench.run(4)

    # Closes at line rate.
    peers = {}
    for _ in range(closes):
        peer = Peer(rng)
        peers[flow_of_peer(peer)] = peer
        bench.close(peer)
    answered = set()
    first_close = len(bench.close_src.sent_cycles)
    last_ack = [None]

    def answer():
        bench._check_outputs()
        replies = []
        for cycle, flow, pkt in bench.sent_log:
            peer = peers.get(flow)
            if peer is None:
                continue
            flags = int(pkt[TCP].flags)
            if flags & TcpFlags.FIN and flow not in answered:
                answered.add(flow)
                replies.append(peer.fin())
            elif flags == TcpFlags.ACK and flow in answered:
                last_ack[0] = max(last_ack[0] or 0, cycle)
        if replies:
            bench.deliver(replies)
        bench.sent_log = [e for e in bench.sent_log if e[1] not in peers]
        return len(answered) == closes and bench._sources_idle() and bench.pending() == 0
    await bench.until(answer, max_cycles=400 * closes + 5000)
    await bench.settle()
    start = bench.close_src.sent_cycles[first_close]
    figures["closes"] = closes
    figures["closes_per_cycle"] = round(closes / (last_ack[0] - start + 1), 4)
    if width in CLOCK_MHZ:
        figures["closes_per_second_millions"] = round(
            figures["closes_per_cycle"] * CLOCK_MHZ[width], 2)

    # Fill.
    status = CloseStatus.OK
    while status == CloseStatus.OK:
        for _ in range(64):                 # the model knows which one will be refused
            status = bench.close(Peer(rng))
            if status != CloseStatus.OK:
                break
        await bench.settle(idle=4, max_cycles=100000)
        bench.sent_log.clear()
    figures["max_closing_flows"] = bench.model.closing
    figures["refused_with"] = CloseStatus(status).name
    figures["counters"] = {c.name: v for c, v in bench.counters().items() if v}
    return figures
