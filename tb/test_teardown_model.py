"""Tests of the teardown engine's golden model (sim.teardown_model) against the docstring.

Every row of the segment table, every CloseStatus, the timers (backoff, exhaustion,
FIN_WAIT_2, TIME_WAIT and its restart), buffers, stale entries, timestamps and sequence
numbers across 2**32. The scapy peer (``Peer``) is shared with tb/test_teardown.py.
"""

import ipaddress
import random

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from hw.conn_table import Status
from hw.headers import TcpFlags
from hw.metadata import CloseReason, CloseStatus, EventKind, FlowKind
from hw.teardown import MAX_HELD_DATA, TdCounter, TdState
from sim.teardown_model import MASK32, TableModel, TeardownModel, flow_key, seq_gt
from sim.traffic import NIC_MAC, pad

LOCAL_IP = "198.51.100.10"
FA, A, R, RA, S, F = "FA", "A", "R", "RA", "S", "F"


def ip_int(text):
    return int(ipaddress.IPv4Address(text))


def mac_int(text):
    return int(text.replace(":", ""), 16)


class Peer:
    """The far end of a connection the host hands to the NIC to close, played with scapy.

    It knows both sides' sequence numbers: ``seq`` is its next sequence number (our
    RCV.NXT), ``snd_una`` / ``data`` what the host hands over, ``fin_seq`` our FIN's
    number; ``tsval`` its timestamp clock. ``command()`` is the host's CLOSE for it."""

    def __init__(self, rng, *, data_length=0, ts=True, peer_fin=False, wscale=0, window=None,
                 snd_una=None, seq=None, local_port=None, unsent=0):
        self.rng = rng
        self.ip = "192.0.2.%d" % rng.randrange(1, 255)
        self.mac = "02:00:00:00:02:%02x" % rng.randrange(256)
        self.port = rng.randrange(1024, 65536)
        self.local_ip = LOCAL_IP
        self.local_mac = NIC_MAC
        self.local_port = local_port if local_port is not None else rng.randrange(10000, 32000)   # no listener there
        self.snd_una = rng.getrandbits(32) if snd_una is None else snd_una & MASK32
        self.data = rng.randbytes(data_length)
        self.unsent = min(unsent, data_length)
        self.fin_seq = (self.snd_una + data_length) & MASK32
        self.snd_max = (self.fin_seq + 1) & MASK32
        self.seq = rng.getrandbits(32) if seq is None else seq & MASK32
        if peer_fin:
            self.seq = (self.seq + 1) & MASK32      # our RCV.NXT counts its FIN
        self.peer_fin = peer_fin
        self.ts = ts
        self.tsval = rng.getrandbits(32)
        self.ts_offset = rng.getrandbits(32)
        self.wscale = wscale
        self.window = rng.randrange(1000, 65536) if window is None else window

    # The host's side.
    def command(self, **overrides):
        cmd = {"ingress": 0, "peer_mac": mac_int(self.mac), "local_mac": mac_int(self.local_mac),
               "local_ip": ip_int(self.local_ip), "peer_ip": ip_int(self.ip),
               "local_port": self.local_port, "peer_port": self.port,
               "snd_una": self.snd_una,
               "snd_nxt": (self.fin_seq - self.unsent) & MASK32,
               "rcv_nxt": self.seq, "window": self.window, "rcv_wscale": self.wscale,
               "peer_fin": int(self.peer_fin), "ts_ok": int(self.ts),
               "ts_recent": self.tsval if self.ts else 0, "ts_offset": self.ts_offset,
               "data_length": len(self.data)}
        cmd.update(overrides)
        return cmd

    @property
    def key(self):
        return flow_key(0, ip_int(self.ip), ip_int(self.local_ip), self.port, self.local_port)

    # The peer's segments.
    def segment(self, flags, seq=None, ack=None, payload=b"", ts=None, tsval=None,
                window=None, options=None, vlan=None):
        """A frame from the peer; ``seq`` defaults to its next sequence number, ``ack`` to
        SND.MAX (our FIN acknowledged), the TS option to its clock (when ``ts``)."""
        use_ts = self.ts if ts is None else ts
        if options is None:
            options = ([("NOP", None), ("NOP", None),
                        ("Timestamp", (self.tsval if tsval is None else tsval, 0))]
                       if use_ts else [])
        eth = Ether(src=self.mac, dst=self.local_mac)
        if vlan is not None:
            eth = eth / Dot1Q(vlan=vlan)
        frame = (eth
                 / IP(src=self.ip, dst=self.local_ip, flags="DF", ttl=64)
                 / TCP(sport=self.port, dport=self.local_port, flags=flags,
                       seq=(self.seq if seq is None else seq) & MASK32,
                       ack=(self.snd_max if ack is None else ack) & MASK32,
                       window=self.window if window is None else window, options=options))
        return pad(frame / Raw(payload) if payload else frame)

    def fin(self, ack=None, payload=b"", **kw):
        """Its FIN (ACK set, acknowledging ``ack``); advances its sequence number."""
        frame = self.segment(FA, ack=ack, payload=payload, **kw)
        self.seq = (self.seq + len(payload) + 1) & MASK32
        return frame

    def tick(self, step=1):
        self.tsval = (self.tsval + step) & MASK32


def check_segment(seg, peer, seq, ack, flags, payload=b"", tsecr=None, ts_clock=0):
    """A model segment (TX_HEADER dict + payload) against what the peer expects."""
    assert seg["tcp"]["seq"] == seq & MASK32, (hex(seg["tcp"]["seq"]), hex(seq & MASK32))
    assert seg["tcp"]["ack"] == ack & MASK32, (hex(seg["tcp"]["ack"]), hex(ack & MASK32))
    assert seg["tcp"]["flags"] == int(flags), (seg["tcp"]["flags"], int(flags))
    assert seg["payload"] == payload
    assert seg["tcp"]["sport"] == peer.local_port and seg["tcp"]["dport"] == peer.port
    assert seg["ip"]["dst"] == ip_int(peer.ip) and seg["ip"]["src"] == ip_int(peer.local_ip)
    rst = bool(flags & TcpFlags.RST)
    assert seg["tcp"]["window"] == (0 if rst else peer.window)
    assert seg["opt"]["ts_valid"] == int(peer.ts and not rst)
    if peer.ts and not rst:
        assert seg["opt"]["tsval"] == (ts_clock + peer.ts_offset) & MASK32
        assert seg["opt"]["tsecr"] == (peer.tsval if tsecr is None else tsecr)


ACK = TcpFlags.ACK
FINACK = TcpFlags.FIN | TcpFlags.ACK
RSTACK = TcpFlags.RST | TcpFlags.ACK


def opened(rng=None, model=None, now=0, **peer_args):
    """A model and a peer whose connection the host has just handed over (FIN sent)."""
    rng = rng or random.Random(1)
    model = model or TeardownModel(slots=8, buffers=4, fin_rto=10, fin2_timeout=50,
                                   time_wait=40, fin_retries=3)
    peer = Peer(rng, **peer_args)
    out = model.close(peer.command(), peer.data, now=now)
    assert out.status == CloseStatus.OK, out.status
    return model, peer, out


def only_ack(out, peer, tsecr=None):
    seg, = out.segments
    check_segment(seg, peer, peer.snd_max, peer.seq, ACK, tsecr=tsecr)
    return seg


# ----------------------------------------------------------------------------- CLOSE

@pytest.mark.parametrize("length", [0, 1, 100, MAX_HELD_DATA])
def test_close_sends_fin(length):
    model, peer, out = opened(data_length=length)
    event, = out.events
    assert event["kind"] == EventKind.CLOSE_STATUS and event["status"] == CloseStatus.OK
    assert event["peer_port"] == peer.port and event["local_port"] == peer.local_port
    fin, = out.segments
    flags = FINACK | (TcpFlags.PSH if length else 0)
    check_segment(fin, peer, peer.snd_una, peer.seq, flags, peer.data)
    assert model.state_of(peer.key) == TdState.FIN_WAIT_1
    assert model.table.entries[peer.key]["kind"] == FlowKind.CLOSING
    assert model.closing == 1 and model.buffers_free == 4 - bool(length)
    assert model.counters[TdCounter.CLOSE_ACCEPTED] == 1


def test_close_passive_goes_to_last_ack():
    model, peer, out = opened(peer_fin=True)
    assert model.state_of(peer.key) == TdState.LAST_ACK
    check_segment(out.segments[0], peer, peer.snd_una, peer.seq, FINACK)


def _refused(model, cmd, data, status):
    before = (model.closing, model.buffers_free, dict(model.table.entries))
    out = model.close(cmd, data)
    assert out.status == status and out.segments == []
    event, = out.events
    assert event["kind"] == EventKind.CLOSE_STATUS and event["status"] == status
    assert (model.closing, model.buffers_free, model.table.entries) == before
    return out


def test_close_bad_length():
    rng = random.Random(2)
    model = TeardownModel(slots=4, buffers=2)
    peer = Peer(rng, data_length=MAX_HELD_DATA + 1)
    _refused(model, peer.command(), peer.data, CloseStatus.BAD_LENGTH)
    _refused(model, peer.command(data_length=0xFFFF), b"", CloseStatus.BAD_LENGTH)
    peer = Peer(rng, data_length=10, snd_una=0xFFFFFFFA)
    # SND.NXT outside [SND.UNA, FIN_SEQ]: one past the FIN's number, one before SND.UNA.
    _refused(model, peer.command(snd_nxt=(peer.fin_seq + 1) & MASK32), peer.data,
             CloseStatus.BAD_LENGTH)
    _refused(model, peer.command(snd_nxt=(peer.snd_una - 1) & MASK32), peer.data,
             CloseStatus.BAD_LENGTH)
    _refused(model, peer.command(data_length=0, snd_nxt=(peer.snd_una + 1) & MASK32), b"",
             CloseStatus.BAD_LENGTH)
    assert model.counters[TdCounter.CLOSE_REFUSED] == 5
    # Both ends of the range are fine (SND.NXT = SND.UNA: nothing sent; = FIN_SEQ: all sent).
    assert model.close(peer.command(snd_nxt=peer.snd_una), peer.data).status == CloseStatus.OK
    other = Peer(rng, data_length=10, snd_una=0xFFFFFFFA)
    assert model.close(other.command(snd_nxt=other.fin_seq), other.data).status == CloseStatus.OK


def test_close_no_slot_no_buffer():
    rng = random.Random(3)
    model = TeardownModel(slots=3, buffers=1)
    first = Peer(rng, data_length=5)
    assert model.close(first.command(), first.data).status == CloseStatus.OK
    second = Peer(rng, data_length=5)
    _refused(model, second.command(), second.data, CloseStatus.NO_BUFFER)
    assert model.close(second.command(data_length=0, snd_nxt=second.snd_una)).status \
        == CloseStatus.OK                          # no data: no buffer needed
    third = Peer(rng)
    assert model.close(third.command()).status == CloseStatus.OK
    fourth = Peer(rng, data_length=MAX_HELD_DATA + 1)
    _refused(model, fourth.command(), fourth.data, CloseStatus.BAD_LENGTH)   # checked first
    fourth = Peer(rng, data_length=3)
    _refused(model, fourth.command(), fourth.data, CloseStatus.NO_SLOT)      # before NO_BUFFER


def test_close_table_statuses():
    rng = random.Random(4)
    table = TableModel(capacity=2)
    model = TeardownModel(slots=8, buffers=4, table=table)
    host = Peer(rng)
    table.insert(host.key, {"kind": FlowKind.HOST, "slot": 0})
    closing = Peer(rng)
    assert model.close(closing.command()).status == CloseStatus.OK           # fills the table
    # A HOST flow: UPDATE to CLOSING (the table being full does not matter).
    assert model.close(host.command()).status == CloseStatus.OK
    assert table.entries[host.key]["kind"] == FlowKind.CLOSING
    _refused(model, host.command(), b"", CloseStatus.ALREADY_CLOSING)
    _refused(model, closing.command(), b"", CloseStatus.ALREADY_CLOSING)
    _refused(model, Peer(rng).command(), b"", CloseStatus.TABLE_FULL)
    table.capacity = None
    table.fail = Status.BAD_OP
    _refused(model, Peer(rng).command(), b"", CloseStatus.TABLE_ERROR)


# ----------------------------------------------------------------------------- rules

def test_rule1_rst_exact():
    model, peer, _ = opened()
    out = model.frame(peer.segment(R, ack=0))
    assert out.claimed and not out.to_host and out.rule == 1 and out.segments == []
    event, = out.events
    assert event["kind"] == EventKind.CLOSED and event["status"] == CloseReason.RESET
    assert (event["segments_in"], event["segments_out"], event["retransmits"]) == (1, 1, 0)
    assert model.closing == 0 and model.counters[TdCounter.RST_ACCEPTED] == 1
    # The table entry stays until the DELETE lands: records that hit it meanwhile are stale.
    out = model.frame(peer.segment(A))
    assert not out.claimed and model.counters[TdCounter.STALE] == 1
    model.apply_deletes()
    assert not model.frame(peer.segment(A)).claimed and model.counters[TdCounter.STALE] == 1


def test_rule2_rst_in_window_challenged():
    model, peer, _ = opened(window=1000)
    out = model.frame(peer.segment(R, seq=peer.seq + 999, ack=0))
    assert out.rule == 2
    only_ack(out, peer)
    out = model.frame(peer.segment(RA, seq=peer.seq + 1))
    assert out.rule == 2 and model.counters[TdCounter.RST_CHALLENGED] == 2
    assert model.state_of(peer.key) == TdState.FIN_WAIT_1


def test_rule3_rst_outside_ignored():
    model, peer, _ = opened(window=1000)
    for seq in (peer.seq + 1000, peer.seq - 1, peer.seq + (1 << 31)):
        out = model.frame(peer.segment(R, seq=seq, ack=0))
        assert out.claimed and out.rule == 3 and not out.segments and not out.events
    assert model.counters[TdCounter.RST_IGNORED] == 3


def _time_wait(**kw):
    model, peer, _ = opened(**kw)
    model.frame(peer.segment(A))                   # FIN_WAIT_2
    out = model.frame(peer.fin())                  # TIME_WAIT
    assert out.rule == 12 and model.state_of(peer.key) == TdState.TIME_WAIT
    return model, peer


@pytest.mark.parametrize("ts", [True, False])
def test_rule4_syn_in_time_wait(ts):
    model, peer = _time_wait(ts=ts)
    peer.tick()
    syn = peer.segment(S, seq=peer.seq + 100000, ack=0,
                       tsval=None if ts else None)
    out = model.frame(syn)
    assert out.rule == 4 and out.claimed and out.to_host and out.segments == []
    event, = out.events
    assert event["status"] == CloseReason.NEW_SYN and model.closing == 0


def test_rule4_unacceptable_syns_are_challenged():
    model, peer = _time_wait(ts=True)
    # Timestamps in use: an old TSval is not acceptable whatever its sequence number.
    out = model.frame(peer.segment(S, seq=peer.seq + 100000, ack=0, tsval=peer.tsval - 1))
    assert out.rule == 5
    only_ack(out, peer)
    # Equal TSval: not newer.
    assert model.frame(peer.segment(S, seq=peer.seq + 5, ack=0)).rule == 5
    # Without the option on the SYN: the sequence number decides.
    assert model.frame(peer.segment(S, seq=peer.seq, ack=0, ts=False)).rule == 5
    assert model.frame(peer.segment(S, seq=peer.seq + 1, ack=0, ts=False)).rule == 4
    model, peer = _time_wait(ts=False)
    assert model.frame(peer.segment(S, seq=peer.seq - 1, ack=0)).rule == 5
    assert model.counters[TdCounter.SYN_CHALLENGED] == 1


def test_rule4_needs_a_syn_without_ack():
    """As Linux's tcp_timewait_state_process: only a SYN without ACK can reopen; an
    acceptable-looking SYN|ACK in TIME_WAIT gets a challenge ACK (rule 5)."""
    model, peer = _time_wait(ts=False)
    out = model.frame(peer.segment("SA", seq=peer.seq + 100000))
    assert out.rule == 5 and model.closing == 1
    only_ack(out, peer)


def test_rule5_syn_outside_time_wait():
    model, peer, _ = opened()
    peer.tick()
    out = model.frame(peer.segment(S, seq=peer.seq + 7, ack=0))
    assert out.rule == 5 and not out.to_host
    only_ack(out, peer, tsecr=peer.tsval - 1)        # rule 5: TSval not taken
    assert model.state_of(peer.key) == TdState.FIN_WAIT_1


def test_rule6_fin_again_restarts_time_wait():
    model, peer = _time_wait()
    first_deadline = model.slot_of(peer.key).deadline
    model.advance(30)
    peer.tick()
    again = peer.segment(FA, seq=peer.seq - 1)
    out = model.frame(again, now=30)
    assert out.rule == 6
    only_ack(out, peer, tsecr=peer.tsval - 1)        # TSval not taken: SEQ is not RCV.NXT
    assert model.slot_of(peer.key).deadline == 30 + model.time_wait != first_deadline
    assert not model.advance(69).events
    event, = model.advance(70).events
    assert event["status"] == CloseReason.NORMAL
    assert event["segments_in"] == 3 and event["segments_out"] == 3


def test_rule7_out_of_window():
    model, peer, _ = opened(window=100, wscale=2)       # RCV.WND = 400
    for seq, payload in ((peer.seq + 400, b""), (peer.seq - 1, b""), (peer.seq - 10, b"x" * 5),
                         (peer.seq + 400, b"y")):
        out = model.frame(peer.segment(A, seq=seq, payload=payload))
        assert out.rule == 7
        only_ack(out, peer)
    # Inside: the last byte inside the window, or the first.
    assert model.frame(peer.segment(A, seq=peer.seq + 399)).rule == 13
    assert model.state_of(peer.key) == TdState.FIN_WAIT_2
    model, peer, _ = opened(window=0)
    assert model.frame(peer.segment(A, seq=peer.seq, ack=peer.snd_una)).rule == 13
    assert model.frame(peer.segment(A, seq=peer.seq + 1, ack=peer.snd_una)).rule == 7
    assert model.frame(peer.segment(A, payload=b"z", ack=peer.snd_una)).rule == 7
    assert model.counters[TdCounter.OUT_OF_WINDOW] == 2


def test_rule8_no_ack():
    model, peer, _ = opened()
    out = model.frame(peer.segment(F, ack=0))
    assert out.rule == 8 and not out.segments and model.state_of(peer.key) == TdState.FIN_WAIT_1


def test_rule9_ack_of_unsent():
    model, peer, _ = opened(data_length=10)
    out = model.frame(peer.segment(A, ack=peer.snd_max + 1))
    assert out.rule == 9
    only_ack(out, peer)
    assert model.frame(peer.fin(ack=peer.snd_max + 1000)).rule == 9
    assert model.state_of(peer.key) == TdState.FIN_WAIT_1


@pytest.mark.parametrize("state", ["fw1", "fw2"])
def test_rule10_data_after_close(state):
    model, peer, _ = opened(data_length=20)
    if state == "fw2":
        model.frame(peer.segment(A))
    ack = peer.snd_una + 5
    out = model.frame(peer.segment("PA", ack=ack, payload=b"hello"))
    assert out.rule == 10
    rst, = out.segments
    check_segment(rst, peer, ack, 0, TcpFlags.RST)
    event, = out.events
    assert event["status"] == CloseReason.DATA and model.closing == 0
    assert model.buffers_free == model.buffers


def test_rule11_data_after_peer_fin():
    model, peer, _ = opened(peer_fin=True)
    out = model.frame(peer.segment("PA", payload=b"late", ack=peer.snd_una))
    assert out.rule == 11
    only_ack(out, peer)
    assert model.state_of(peer.key) == TdState.LAST_ACK
    # Old data (a retransmission below RCV.NXT, overlapping it) is not new data.
    out = model.frame(peer.segment("PA", seq=peer.seq - 3, payload=b"abc"))
    assert out.rule == 7


def test_rule12_fin_to_closing_then_time_wait():
    model, peer, _ = opened(data_length=4)
    out = model.frame(peer.fin(ack=peer.snd_una))        # our FIN not acknowledged
    assert out.rule == 12 and model.state_of(peer.key) == TdState.CLOSING
    only_ack(out, peer)
    assert model.buffers_free == model.buffers - 1
    # The FIN timer runs on in CLOSING: the FIN (with the data) again, with the new ACK.
    fin, = model.advance(10).segments
    check_segment(fin, peer, peer.snd_una, peer.seq, FINACK | TcpFlags.PSH, peer.data)
    out = model.frame(peer.segment(A))
    assert out.rule == 13 and model.state_of(peer.key) == TdState.TIME_WAIT
    assert model.buffers_free == model.buffers


def test_rule12_fin_with_ack_to_time_wait():
    model, peer, _ = opened()
    out = model.frame(peer.fin(payload=b""))
    assert out.rule == 12 and model.state_of(peer.key) == TdState.TIME_WAIT
    only_ack(out, peer)
    # A FIN carrying old data up to RCV.NXT counts too.
    model, peer, _ = opened()
    peer.seq = (peer.seq - 3) & MASK32
    out = model.frame(peer.fin(payload=b"old"))
    assert out.rule == 12 and model.state_of(peer.key) == TdState.TIME_WAIT


def test_rule13_transitions():
    model, peer, _ = opened()
    assert model.frame(peer.segment(A, ack=peer.snd_una)).rule == 13     # old ACK: nothing
    assert model.state_of(peer.key) == TdState.FIN_WAIT_1
    assert model.frame(peer.segment(A)).rule == 13
    assert model.state_of(peer.key) == TdState.FIN_WAIT_2
    assert model.frame(peer.segment(A)).rule == 13                       # nothing more
    model, peer, _ = opened(peer_fin=True)
    out = model.frame(peer.segment(A))
    assert out.rule == 13 and out.events[0]["status"] == CloseReason.NORMAL
    assert model.closing == 0


def test_ts_recent_update_and_echo():
    model, peer, _ = opened(window=5000)
    old = peer.tsval
    peer.tick(5)
    out = model.frame(peer.segment(A, ack=peer.snd_max + 9))             # rule 9, SEQ = RCV.NXT
    check_segment(out.segments[0], peer, peer.snd_max, peer.seq, ACK, tsecr=peer.tsval)
    peer.tick(5)
    out = model.frame(peer.segment(A, seq=peer.seq + 1, ack=peer.snd_max + 9))  # SEQ != RCV.NXT
    check_segment(out.segments[0], peer, peer.snd_max, peer.seq, ACK, tsecr=old + 5)
    out = model.frame(peer.segment(A, ack=peer.snd_max + 9, tsval=old))  # older: not taken
    check_segment(out.segments[0], peer, peer.snd_max, peer.seq, ACK, tsecr=old + 5)
    # Rules 1-5 never take it.
    out = model.frame(peer.segment(S, ack=0, tsval=old + 100))
    check_segment(out.segments[0], peer, peer.snd_max, peer.seq, ACK, tsecr=old + 5)


# ----------------------------------------------------------------------------- timers

def test_backoff_and_exhaustion():
    model, peer, _ = opened(data_length=3, now=100)
    sends = []
    for now in range(100, 100 + 10 * 32):
        out = model.advance(now)
        for seg in out.segments:
            sends.append((now, seg))
        if out.events:
            break
    times = [t for t, _ in sends]
    assert times == [110, 130, 170, 250], times
    for _, seg in sends[:3]:
        check_segment(seg, peer, peer.snd_una, peer.seq, FINACK | TcpFlags.PSH, peer.data)
    check_segment(sends[3][1], peer, peer.snd_max, peer.seq, RSTACK)
    event, = out.events
    assert event["status"] == CloseReason.TIMEOUT and event["retransmits"] == 3
    assert event["segments_out"] == 5 and model.closing == 0
    assert model.counters[TdCounter.FIN_RETRANSMIT] == 3
    assert model.counters[TdCounter.FIN_TIMEOUT] == 1


def test_no_retries_and_saturated_backoff():
    model = TeardownModel(slots=2, buffers=1, fin_rto=1 << 29, fin_retries=0)
    peer = Peer(random.Random(5))
    model.close(peer.command(), now=0)
    assert not model.advance((1 << 29) - 1).segments
    out = model.advance(1 << 29)
    assert out.segments[0]["tcp"]["flags"] == RSTACK and out.events
    model = TeardownModel(slots=2, buffers=1, fin_rto=1 << 29, fin_retries=5)
    model.close(peer.command(), now=0)
    model.advance(1 << 29)                          # first retransmission: then 2**30 ...
    assert model.slot_of(peer.key).deadline == (1 << 29) + (1 << 30)
    model.advance((1 << 29) + (1 << 30))            # ... and 2**30 again (saturated)
    assert model.slot_of(peer.key).deadline == ((1 << 29) + (2 << 30)) & MASK32


def test_fin_wait_2_timeout():
    model, peer, _ = opened(now=0)
    model.frame(peer.segment(A), now=3)
    assert not model.advance(52).events
    out = model.advance(53)
    assert out.segments == [] and out.events[0]["status"] == CloseReason.TIMEOUT
    assert model.counters[TdCounter.FIN2_TIMEOUT] == 1


def test_time_wait_expiry_and_last_ack_retransmission():
    model, peer = _time_wait()
    assert model.advance(39).events == []
    event, = model.advance(40).events
    assert event["status"] == CloseReason.NORMAL and model.counters[TdCounter.TIME_WAIT_DONE] == 1
    model, peer, _ = opened(peer_fin=True, now=0)
    fin, = model.advance(10).segments
    check_segment(fin, peer, peer.snd_una, peer.seq, FINACK)
    assert model.frame(peer.segment(A)).events[0]["retransmits"] == 1


def test_wraparound():
    """SND.UNA, FIN_SEQ and RCV.NXT straddling 2**32."""
    model, peer, out = opened(data_length=8, snd_una=MASK32 - 3, seq=MASK32, window=50)
    assert peer.fin_seq == 4 and peer.snd_max == 5
    check_segment(out.segments[0], peer, MASK32 - 3, MASK32, FINACK | TcpFlags.PSH, peer.data)
    assert model.frame(peer.segment(A, ack=4)).rule == 13                 # FIN not yet acked
    assert model.frame(peer.segment(A, ack=6)).rule == 9                  # after SND.MAX
    assert model.frame(peer.segment(A, seq=MASK32 + 49)).rule == 13       # window wraps
    assert model.state_of(peer.key) == TdState.FIN_WAIT_2
    out = model.frame(peer.fin())
    assert out.rule == 12 and peer.seq == 0
    only_ack(out, peer)
    assert seq_gt(0, MASK32) and not seq_gt(MASK32, 0)


def test_buffers_released():
    model = TeardownModel(slots=4, buffers=1, fin_rto=10)
    rng = random.Random(6)
    a = Peer(rng, data_length=9)
    assert model.close(a.command(), a.data).status == CloseStatus.OK
    b = Peer(rng, data_length=9)
    assert model.close(b.command(), b.data).status == CloseStatus.NO_BUFFER
    model.frame(a.segment(A))                       # our FIN acknowledged: buffer free
    assert model.close(b.command(), b.data).status == CloseStatus.OK
    model.frame(b.segment(R, ack=0))                # freed by RST: buffer free
    c = Peer(rng, data_length=9)
    assert model.close(c.command(), c.data).status == CloseStatus.OK


def test_vlan_tagged_segment_claimed():
    model, peer, _ = opened()
    out = model.frame(peer.segment(A, vlan=7))
    assert out.claimed and out.rule == 13 and model.state_of(peer.key) == TdState.FIN_WAIT_2


def test_not_claimed():
    model, peer, _ = opened()
    other = Peer(random.Random(9))
    assert not model.frame(other.segment(FA)).claimed
    bad = bytearray(peer.segment(FA))
    bad[-1] ^= 0xFF                                   # bad TCP checksum: the parser flags it
    assert not model.frame(bytes(bad)).claimed
    assert model.counters[TdCounter.CLAIMED] == 0 and model.state_of(peer.key) == TdState.FIN_WAIT_1
