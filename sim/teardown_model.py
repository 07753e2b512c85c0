"""Golden model of ``hw.teardown.TeardownEngine``: the specification of its docstring, in Python.

``TeardownModel(slots, buffers)`` holds the engine's state (slots, held-data buffers, the
CLOSING entries of the connection table, the counters) and answers the three things that
happen to the engine:

* ``close(cmd, data, now)``: a CLOSE command (a ``CLOSE_COMMAND`` dict) and its held data
  (bytes) -> ``Outputs`` with the CLOSE_STATUS event and, when accepted, our FIN segment;
* ``segment(meta, now)`` (or ``frame(frame_bytes, now)``): one received frame, as the
  parser's metadata (``sim.reference.parse_frame``) -> ``Outputs`` with ``claimed``,
  ``to_host``, the segments we send, the CLOSED event, and ``rule`` (1..13, the row of the
  docstring's table that decided);
* ``advance(now)``: the timer clock reached ``now`` -> ``Outputs`` of every timer that
  fired (FIN retransmissions, RST|ACK on exhaustion, FIN_WAIT_2 and TIME_WAIT expiry).

Segments are ``TX_HEADER`` dicts (the fields ``hw.builder.TxBuilder`` takes) plus
``payload`` (the bytes the segment carries); events are ``EVENT`` dicts with every field.
``ts_clock`` is the NIC's timestamp clock as the engine sees it when it builds a segment
(the tests keep it still, or allow for its ticks).

Readings of the specification where its text leaves a choice (closest to Linux/RFC 9293):

* the ACK that answers a segment echoes the ``ts_recent`` that segment set (Linux updates
  ``ts_recent`` before it sends the ACK, in ESTABLISHED-like states and in TIME_WAIT);
* FINs and ACKs carry the CLOSE command's window and, when ``ts_ok``, the timestamp
  option (TSval = ts_clock + ts_offset, TSecr = ts_recent); RSTs (rule 10 and the
  RST|ACK of an exhausted FIN) carry window 0 and no option, as Linux's
  ``tcp_v4_send_reset`` does;
* the rule-10 RST is ``<SEQ = SEG.ACK><CTL = RST>`` (RFC 9293 3.10.7.1: no ACK flag, ACK 0);
* the first FIN timeout is ``fin_rto`` ticks; after the k-th retransmission the interval
  is ``min(fin_rto << k, 2**30)`` ticks ("the shift saturates"), the next deadline
  counted from the tick in which the timer fired;
* ``segments_out`` counts every segment sent for the flow, the RST that ends it included;
  ``segments_in`` every claimed segment, the one that ends the flow included;
* rule 4 takes a SYN without ACK (as Linux's ``tcp_timewait_state_process``); a SYN|ACK
  goes on to rule 5 (challenge ACK);
* a frame is claimed whatever its VLAN tag (the docstring asks for TCP without parser
  errors only); the 4-tuple match ignores the ingress port;
* between a flow's freeing and its table DELETE landing, its frames hit a CLOSING entry
  whose slot is free: not claimed, counted STALE (``apply_deletes`` ends that window);
* CLOSE_STATUS events carry the command's 4-tuple, ingress and MACs; their CLOSED
  counters (retransmits, segments_in, segments_out) are 0.
"""

import dataclasses

from hw.conn_table import Status
from hw.headers import TcpFlags
from hw.metadata import (CloseReason, CloseStatus, EventKind, FlowKind, FrameClass, EVENT)
from hw.teardown import MAX_HELD_DATA, TdCounter, TdState

__all__ = ["TeardownModel", "Outputs", "TableModel", "seq_gt", "seq_lt", "flow_key",
           "zero_event", "MASK32", "REPLY_TTL", "MAX_SHIFTED_RTO"]

MASK32 = 0xFFFFFFFF
REPLY_TTL = 64
#: The retransmission interval saturates here (ticks).
MAX_SHIFTED_RTO = 1 << 30


def seq_gt(a, b):
    """``a`` after ``b`` in sequence space (RFC 9293 modular comparison)."""
    d = (a - b) & MASK32
    return 0 < d < 1 << 31


def seq_lt(a, b):
    return seq_gt(b, a)


def _in_window(x, start, size):
    return ((x - start) & MASK32) < size


def flow_key(ingress, peer_ip, local_ip, peer_port, local_port):
    """The connection table's key of a flow, received-segment orientation, as a tuple
    (port, src, dst, sport, dport) = ``FLOW_KEY``'s fields."""
    return (ingress, peer_ip, local_ip, peer_port, local_port)


def zero_event():
    def zero(layout):
        return {name: (zero(f.shape) if hasattr(f.shape, "members") else 0) for name, f in layout}
    return zero(EVENT)


@dataclasses.dataclass
class Outputs:
    """What one input to the engine produced."""
    claimed: bool = False
    to_host: bool = False
    segments: list = dataclasses.field(default_factory=list)
    events: list = dataclasses.field(default_factory=list)
    rule: int | None = None          # the table row that decided (segments only)
    status: int | None = None        # CloseStatus (CLOSE commands only)

    def extend(self, other):
        self.segments += other.segments
        self.events += other.events


class TableModel:
    """The connection table as the engine sees it: key -> ``{"kind", "slot"}``.

    ``capacity``: entries it holds before an INSERT answers FULL (None: never full).
    ``fail``: a ``Status`` every INSERT answers (to model a table that refuses)."""

    def __init__(self, capacity=None):
        self.entries = {}
        self.capacity = capacity
        self.fail = None

    def insert(self, key, value):
        if key in self.entries:
            return Status.DUPLICATE
        if self.fail is not None:
            return self.fail
        if self.capacity is not None and len(self.entries) >= self.capacity:
            return Status.FULL
        self.entries[key] = dict(value)
        return Status.OK

    def update(self, key, value):
        if key not in self.entries:
            return Status.NOT_FOUND
        self.entries[key] = dict(value)
        return Status.OK

    def delete(self, key):
        return Status.OK if self.entries.pop(key, None) is not None else Status.NOT_FOUND


@dataclasses.dataclass
class Slot:
    """One closing connection."""
    key: tuple
    cmd: dict
    data: bytes
    state: TdState
    snd_una: int
    snd_max: int                     # fin_seq + 1
    rcv_nxt: int
    ts_recent: int
    deadline: int
    retries: int = 0                 # FIN retransmissions so far
    fin_acked: bool = False
    buffer: bool = False             # holds a data buffer
    segments_in: int = 0
    segments_out: int = 0


class TeardownModel:
    def __init__(self, slots=1024, buffers=16, max_data=MAX_HELD_DATA, table=None,
                 fin_rto=100, fin2_timeout=1000, time_wait=1000, fin_retries=3):
        self.slot_count = slots
        self.slots = [None] * slots
        self.buffers = buffers
        self.buffers_free = buffers
        self.max_data = max_data
        self.table = table if table is not None else TableModel()
        self.fin_rto = fin_rto
        self.fin2_timeout = fin2_timeout
        self.time_wait = time_wait
        self.fin_retries = fin_retries
        self.ts_clock = 0
        self.now = 0
        self.counters = {c: 0 for c in TdCounter}
        self.deleting = []               # keys whose table DELETE is queued
        self.closed = []                 # every CLOSED event, in order

    # ------------------------------------------------------------------ state views
    @property
    def closing(self):
        """Slots in use (the ``closing`` port)."""
        return sum(s is not None for s in self.slots)

    def slot_of(self, key):
        for s in self.slots:
            if s is not None and s.key == key:
                return s
        return None

    def state_of(self, key):
        s = self.slot_of(key)
        return TdState.FREE if s is None else s.state

    def apply_deletes(self):
        """The queued table DELETEs have landed."""
        for key in self.deleting:
            self.table.delete(key)
        self.deleting = []

    # ------------------------------------------------------------------ outputs
    def _segment(self, s, seq, ack, flags, payload=b""):
        c = s.cmd
        s.segments_out = min(s.segments_out + 1, 0xFFFF)
        rst = bool(flags & TcpFlags.RST)
        ts = bool(c["ts_ok"]) and not rst
        return {
            "eth": {"dst": c["peer_mac"], "src": c["local_mac"]},
            "ip": {"src": c["local_ip"], "dst": c["peer_ip"], "ttl": REPLY_TTL,
                   "identification": 0, "df": 1, "dscp": 0, "ecn": 0},
            "tcp": {"sport": c["local_port"], "dport": c["peer_port"], "seq": seq & MASK32,
                    "ack": ack & MASK32, "flags": int(flags),
                    "window": 0 if rst else c["window"]},
            "opt": {"mss_valid": 0, "mss": 0, "wscale_valid": 0, "wscale": 0, "sack_perm": 0,
                    "ts_valid": int(ts),
                    "tsval": (self.ts_clock + c["ts_offset"]) & MASK32 if ts else 0,
                    "tsecr": s.ts_recent if ts else 0},
            "payload_length": len(payload),
            "payload": bytes(payload),
        }

    def _fin(self, s):
        flags = TcpFlags.FIN | TcpFlags.ACK | (TcpFlags.PSH if s.data else 0)
        return self._segment(s, s.snd_una, s.rcv_nxt, flags, s.data)

    def _ack(self, s):
        return self._segment(s, s.snd_max, s.rcv_nxt, TcpFlags.ACK)

    @staticmethod
    def _event(kind, status, cmd):
        event = zero_event()
        event.update(kind=int(kind), status=int(status), ingress=cmd["ingress"],
                     peer_ip=cmd["peer_ip"], local_ip=cmd["local_ip"],
                     peer_port=cmd["peer_port"], local_port=cmd["local_port"])
        event["eth"] = {"peer": cmd["peer_mac"], "local": cmd["local_mac"]}
        return event

    def _free(self, index, reason):
        s = self.slots[index]
        self.slots[index] = None
        if s.buffer:
            self.buffers_free += 1
            s.buffer = False
        self.deleting.append(s.key)
        event = self._event(EventKind.CLOSED, reason, s.cmd)
        event.update(retransmits=min(s.retries, 15), segments_in=s.segments_in,
                     segments_out=s.segments_out)
        self.closed.append(event)
        return event

    def _our_fin_acked(self, s):
        s.fin_acked = True
        if s.buffer:
            self.buffers_free += 1
            s.buffer = False

    def _rto(self, retries):
        if retries == 0:
            return self.fin_rto
        return min(self.fin_rto << retries, MAX_SHIFTED_RTO)

    # ------------------------------------------------------------------ CLOSE
    def close(self, cmd, data=b"", now=None):
        """One CLOSE command and its held data."""
        if now is not None:
            self.now = now
        cmd = dict(cmd)
        length = cmd["data_length"]
        data = bytes(data)[:length]
        assert len(data) == length or length > self.max_data, "held data shorter than data_length"
        out = Outputs()
        key = flow_key(cmd["ingress"], cmd["peer_ip"], cmd["local_ip"], cmd["peer_port"],
                       cmd["local_port"])
        free = [i for i, s in enumerate(self.slots) if s is None]
        status = CloseStatus.OK
        if length > self.max_data or ((cmd["snd_nxt"] - cmd["snd_una"]) & MASK32) > length:
            status = CloseStatus.BAD_LENGTH
        elif not free:
            status = CloseStatus.NO_SLOT
        elif length and not self.buffers_free:
            status = CloseStatus.NO_BUFFER
        else:
            index = free[0]
            value = {"kind": FlowKind.CLOSING, "slot": index}
            answer = self.table.insert(key, value)
            if answer == Status.DUPLICATE:
                if self.table.entries[key]["kind"] == FlowKind.CLOSING:
                    status = CloseStatus.ALREADY_CLOSING
                elif self.table.update(key, value) != Status.OK:
                    status = CloseStatus.TABLE_ERROR
            elif answer == Status.FULL:
                status = CloseStatus.TABLE_FULL
            elif answer != Status.OK:
                status = CloseStatus.TABLE_ERROR
        out.status = status
        out.events.append(self._event(EventKind.CLOSE_STATUS, status, cmd))
        if status != CloseStatus.OK:
            self.counters[TdCounter.CLOSE_REFUSED] += 1
            return out
        self.counters[TdCounter.CLOSE_ACCEPTED] += 1
        fin_seq = (cmd["snd_una"] + length) & MASK32
        s = Slot(key=key, cmd=cmd, data=data,
                 state=TdState.LAST_ACK if cmd["peer_fin"] else TdState.FIN_WAIT_1,
                 snd_una=cmd["snd_una"], snd_max=(fin_seq + 1) & MASK32,
                 rcv_nxt=cmd["rcv_nxt"], ts_recent=cmd["ts_recent"] if cmd["ts_ok"] else 0,
                 deadline=(self.now + self._rto(0)) & MASK32, buffer=bool(length))
        if length:
            self.buffers_free -= 1
        self.slots[index] = s
        out.segments.append(self._fin(s))
        return out

    # ------------------------------------------------------------------ segments
    def frame(self, frame, now=None, ingress=0):
        from sim.reference import parse_frame
        return self.segment(parse_frame(bytes(frame)), now, ingress)

    def _claim(self, meta, ingress):
        ip, tcp = meta["ip"], meta["tcp"]
        key = flow_key(ingress, ip["src"], ip["dst"], tcp["sport"], tcp["dport"])
        entry = self.table.entries.get(key)
        if entry is None or entry["kind"] != FlowKind.CLOSING:
            return None
        if meta["frame_class"] != FrameClass.TCP or any(meta["errors"].values()):
            return None
        index = entry["slot"]
        s = self.slots[index] if index < len(self.slots) else None
        if s is None or s.key != key:
            self.counters[TdCounter.STALE] += 1
            return None
        return index

    def segment(self, meta, now=None, ingress=0):
        """One received frame (parser metadata): the engine's decision and what it sends."""
        if now is not None:
            self.now = now
        out = Outputs()
        index = self._claim(meta, ingress)
        if index is None:
            return out
        s = self.slots[index]
        out.claimed = True
        self.counters[TdCounter.CLAIMED] += 1
        s.segments_in = min(s.segments_in + 1, 0xFFFF)
        tcp, opt = meta["tcp"], meta["opt"]
        flags = tcp["flags"]
        syn, ack, rst, fin = (bool(flags & f) for f in (TcpFlags.SYN, TcpFlags.ACK,
                                                         TcpFlags.RST, TcpFlags.FIN))
        seq, ack_no, payload = tcp["seq"], tcp["ack"], meta["payload_length"]
        length = payload + syn + fin
        rcv_nxt, snd_max = s.rcv_nxt, s.snd_max
        wnd = s.cmd["window"] << s.cmd["rcv_wscale"]
        if length == 0:
            seq_ok = _in_window(seq, rcv_nxt, max(wnd, 1))
        else:
            seq_ok = wnd > 0 and (_in_window(seq, rcv_nxt, wnd)
                                  or _in_window(seq + length - 1, rcv_nxt, wnd))
        new_data = payload > 0 and seq_gt(seq + payload, rcv_nxt)
        state = s.state
        early = (TdState.FIN_WAIT_1, TdState.FIN_WAIT_2)

        def rule(n, counter):
            out.rule = n
            self.counters[counter] += 1

        # Rules 1-5 end without the timestamp update.
        if rst:
            if seq == rcv_nxt:
                rule(1, TdCounter.RST_ACCEPTED)
                out.events.append(self._free(index, CloseReason.RESET))
            elif seq_ok:
                rule(2, TdCounter.RST_CHALLENGED)
                out.segments.append(self._ack(s))
            else:
                rule(3, TdCounter.RST_IGNORED)
            return out
        if syn and not ack and state == TdState.TIME_WAIT and (
                seq_gt(opt["tsval"], s.ts_recent) if (s.cmd["ts_ok"] and opt["ts_valid"])
                else seq_gt(seq, rcv_nxt)):
            rule(4, TdCounter.SYN_REOPEN)
            out.to_host = True
            out.events.append(self._free(index, CloseReason.NEW_SYN))
            return out
        if syn:
            rule(5, TdCounter.SYN_CHALLENGED)
            out.segments.append(self._ack(s))
            return out

        # Rules 6-13: the timestamp update first, so that our answer echoes it.
        if (s.cmd["ts_ok"] and opt["ts_valid"] and seq == rcv_nxt
                and not seq_lt(opt["tsval"], s.ts_recent)):
            s.ts_recent = opt["tsval"]
        if state == TdState.TIME_WAIT and fin and ((seq + payload + 1) & MASK32) == rcv_nxt:
            rule(6, TdCounter.FIN_AGAIN)
            s.deadline = (self.now + self.time_wait) & MASK32
            out.segments.append(self._ack(s))
        elif not seq_ok:
            rule(7, TdCounter.OUT_OF_WINDOW)
            out.segments.append(self._ack(s))
        elif not ack:
            rule(8, TdCounter.NO_ACK)
        elif seq_gt(ack_no, snd_max):
            rule(9, TdCounter.ACK_TOO_NEW)
            out.segments.append(self._ack(s))
        elif new_data and state in early:
            rule(10, TdCounter.DATA_ABORT)
            rst_segment = self._segment(s, ack_no, 0, TcpFlags.RST)
            out.segments.append(rst_segment)
            out.events.append(self._free(index, CloseReason.DATA))
        elif new_data:
            rule(11, TdCounter.DATA_IGNORED)
            out.segments.append(self._ack(s))
        elif fin and ((seq + payload) & MASK32) == rcv_nxt and state in early:
            rule(12, TdCounter.PEER_FIN)
            s.rcv_nxt = (rcv_nxt + 1) & MASK32
            if ack_no == snd_max:
                self._our_fin_acked(s)
            if s.fin_acked:
                s.state = TdState.TIME_WAIT
                s.deadline = (self.now + self.time_wait) & MASK32
            else:
                s.state = TdState.CLOSING           # the FIN timer runs on
            out.segments.append(self._ack(s))
        else:
            rule(13, TdCounter.ACK_SEGMENT)
            if ack_no == snd_max and state in (TdState.FIN_WAIT_1, TdState.CLOSING,
                                               TdState.LAST_ACK):
                self._our_fin_acked(s)
                if state == TdState.FIN_WAIT_1:
                    s.state = TdState.FIN_WAIT_2
                    s.deadline = (self.now + self.fin2_timeout) & MASK32
                elif state == TdState.CLOSING:
                    s.state = TdState.TIME_WAIT
                    s.deadline = (self.now + self.time_wait) & MASK32
                else:
                    out.events.append(self._free(index, CloseReason.NORMAL))
        return out

    # ------------------------------------------------------------------ timers
    def advance(self, now):
        """The timer clock is at ``now``: every deadline reached fires (in slot order)."""
        self.now = now & MASK32
        out = Outputs()
        for index, s in enumerate(self.slots):
            if s is None or ((self.now - s.deadline) & MASK32) >= 1 << 31:
                continue
            if s.state in (TdState.FIN_WAIT_1, TdState.CLOSING, TdState.LAST_ACK):
                if s.retries < self.fin_retries:
                    s.retries += 1
                    self.counters[TdCounter.FIN_RETRANSMIT] += 1
                    out.segments.append(self._fin(s))
                    s.deadline = (self.now + self._rto(s.retries)) & MASK32
                else:
                    self.counters[TdCounter.FIN_TIMEOUT] += 1
                    out.segments.append(self._segment(s, s.snd_max, s.rcv_nxt,
                                                      TcpFlags.RST | TcpFlags.ACK))
                    out.events.append(self._free(index, CloseReason.TIMEOUT))
            elif s.state == TdState.FIN_WAIT_2:
                self.counters[TdCounter.FIN2_TIMEOUT] += 1
                out.events.append(self._free(index, CloseReason.TIMEOUT))
            elif s.state == TdState.TIME_WAIT:
                self.counters[TdCounter.TIME_WAIT_DONE] += 1
                out.events.append(self._free(index, CloseReason.NORMAL))
        return out

    def next_deadline(self):
        """The earliest deadline of a slot in use (None when every slot is free)."""
        pending = [s.deadline for s in self.slots if s is not None]
        if not pending:
            return None
        return min(pending, key=lambda d: (d - self.now) & MASK32)
