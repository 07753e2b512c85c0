"""The teardown engine: the NIC completes a TCP close the host handed over, with real timers.

``TeardownEngine(width=64, slots=1024, buffers=16, table=Geometry(4096))`` owns up to
``slots`` closing connections. The host hands a connection over with a CLOSE command
(``CLOSE_COMMAND`` on ``close``, its held data on ``close_data``) and forgets it; the
engine inserts the 4-tuple into the connection table (``FlowKind.CLOSING``, value ``slot``),
sends our FIN (with the held data), and from then on answers the peer's segments and its
own timers until the connection is gone, then deletes the table entry and reports a
CLOSED event with the reason and the flow's counters.

CLOSE command (``CLOSE_COMMAND``, one beat; then ``ceil(data_length / (W/8))`` beats on
``close_data``, whatever their ``keep``/``last``):

* the held data are the bytes ``[snd_una, snd_una + data_length)`` the peer has not
  acknowledged (those the host already sent and those it never sent); our FIN's sequence
  number is ``fin_seq = snd_una + data_length``; ``snd_nxt`` must lie in
  ``[snd_una, fin_seq]`` (``BAD_LENGTH`` otherwise), and ``data_length <= max_data``
  (``MAX_FRAME_BYTES`` - 54 - 12 = 1452 bytes: one frame with timestamps);
* ``peer_fin`` = 1: the peer's FIN was received before (``rcv_nxt`` counts it): we are the
  passive closer and go to LAST_ACK; otherwise to FIN_WAIT_1;
* ``window`` is the window field we send, ``rcv_wscale`` our receive window scale (the
  receive window is ``window << rcv_wscale``), ``ts_ok`` whether timestamps are in use,
  ``ts_recent`` the peer's last TSval, ``ts_offset``: our TSval is ``ts_clock + ts_offset``.

It is checked in this order; each failure answers CLOSE_STATUS with its ``CloseStatus``,
consumes the data beats, and leaves nothing behind: ``data_length > max_data`` or
``snd_nxt`` outside the data -> BAD_LENGTH; no free slot -> NO_SLOT; data and no free
buffer -> NO_BUFFER; then the table INSERT: FULL -> TABLE_FULL; DUPLICATE of a CLOSING
flow -> ALREADY_CLOSING; DUPLICATE of another kind (a HOST flow the NIC established)
-> UPDATE to CLOSING; any other failure -> TABLE_ERROR. On success: CLOSE_STATUS OK, the
FIN segment (``seq = snd_una``, the held data, FIN|ACK, plus PSH with data) and the RTO
timer armed. CLOSEs are executed one at a time, in order.

Segments (a record is *claimed* when the lookup hit a CLOSING flow, the frame is TCP
without parser errors and the slot holds that 4-tuple; anything else is not claimed and
the handshake engine's verdict stands). Notation: ``RCV.NXT``; ``SND.MAX = fin_seq + 1``;
``L`` = payload length + SYN + FIN; ``RCV.WND = window << rcv_wscale``; the sequence test
of RFC 9293 3.10.7.4 (``L = 0``: ``RCV.NXT <= SEQ < RCV.NXT + max(RCV.WND, 1)``;
``L > 0``: the first or the last sequence number in that window, RCV.WND = 0 never);
"ACK" below is our ACK segment: ``seq = SND.MAX``, ``ack = RCV.NXT``, flags ACK. Checked in
this order; the first rule that applies decides (every claimed frame is dropped unless
the rule says "to the host"):

====  ===================================================  ===================================
 1    RST, SEQ = RCV.NXT                                   freed, CLOSED/RESET
 2    RST, sequence test passes                            challenge ACK (RFC 5961)
 3    RST                                                  nothing
 4    SYN without ACK in TIME_WAIT, acceptable (RFC     freed, CLOSED/NEW_SYN, frame to
      6191: TSval > ts_recent when both use timestamps,    the host
      else SEQ > RCV.NXT)
 5    SYN                                                  challenge ACK (RFC 5961 4.2)
 6    TIME_WAIT, FIN, SEQ + payload + 1 = RCV.NXT (the     ACK, TIME_WAIT restarted
      peer's FIN again)
 7    sequence test fails                                  ACK
 8    no ACK flag                                          nothing
 9    ACK after SND.MAX (acknowledges nothing we sent)     ACK
10    new data (payload > 0 and SEQ + payload after        RST (seq = the segment's ACK), freed,
      RCV.NXT) in FIN_WAIT_1 or FIN_WAIT_2                 CLOSED/DATA (Linux after close())
11    new data in CLOSING, LAST_ACK or TIME_WAIT (after    ACK
      the peer's FIN: not possible from a correct peer)
12    FIN at RCV.NXT (SEQ + payload = RCV.NXT), in         RCV.NXT += 1, ACK;
      FIN_WAIT_1 or FIN_WAIT_2                             -> TIME_WAIT if this segment or an
                                                           earlier one acknowledged our FIN,
                                                           else -> CLOSING
13    anything else                                        our FIN acknowledged (ACK = SND.MAX):
                                                           FIN_WAIT_1 -> FIN_WAIT_2,
                                                           CLOSING -> TIME_WAIT, LAST_ACK ->
                                                           freed (CLOSED/NORMAL); else nothing
====  ===================================================  ===================================

After rules 6-13, when timestamps are in use, the segment has them, SEQ = RCV.NXT (before
the segment) and its TSval is not older than ``ts_recent``, ``ts_recent`` takes its TSval
(before the answer is built: our ACK echoes it, as Linux's does).
Challenge ACKs are not rate limited; PAWS is not applied (documented limits).

Segment formats: FINs and ACKs carry the CLOSE's window and, when ``ts_ok``, the
timestamp option (TSval = ``ts_clock + ts_offset``, TSecr = ``ts_recent``); RSTs carry
window 0 and no option, as Linux's ``tcp_v4_send_reset`` (the rule-10 RST is
``<SEQ = SEG.ACK><CTL = RST>``, RFC 9293 3.10.7.1; the RST|ACK that ends an exhausted
FIN has ``SEQ = SND.MAX``; Linux's active reset there would carry timestamps). A frame is
claimed whatever its VLAN tag; the 4-tuple match ignores the ingress port.
``segments_out`` counts every segment sent for the flow (the RST that ends it included),
``segments_in`` every claimed segment (the one that ends the flow included).

Timers: each slot has one deadline in ticks of the timer clock (``now``, one tick every
``tick_period`` cycles; 0 stops it). FIN_WAIT_1, CLOSING and LAST_ACK: the FIN (with the
held data) is sent again ``fin_rto`` ticks after the last send, then ``2 * fin_rto``,
``4 * fin_rto``... (the shift saturates at 2**30 ticks), ``fin_retries`` times; the next
expiry sends RST|ACK (``seq = SND.MAX``) and frees the slot: CLOSED/TIMEOUT. (The first
interval is ``fin_rto``; after the k-th retransmission it is ``min(fin_rto << k, 2**30)``.) FIN_WAIT_2:
after ``fin2_timeout`` ticks the slot is freed, CLOSED/TIMEOUT, nothing sent. TIME_WAIT:
``time_wait`` (2*MSL) ticks after entering it (or after the last retransmitted peer FIN),
freed, CLOSED/NORMAL. Deadlines must lie less than 2**31 ticks ahead.
The timer mechanism is a round-robin sweep (``hw.timer_scan``): one slot's deadline is
compared per cycle, so its cost per cycle does not depend on the number of slots, and a
timer fires at most ``slots`` cycles (+ the job queue) after its deadline.

Freeing a slot: the slot is marked free at once (later records of the flow are not
claimed: they go to the host), the table DELETE is queued, the held data's buffer is
released once every segment that reads it has been sent, and the CLOSED event reports
``retransmits``, ``segments_in`` (claimed segments) and ``segments_out`` (segments sent).
A buffer is also released as soon as the peer acknowledges our FIN.

Latency and throughput: records of other flows pass in 1 cycle each (verdict
``claimed`` = 0), in order. A segment of a closing flow, a timer expiry and an accepted
CLOSE are jobs of ``job_cycles`` (6) cycles from acceptance to the state written and the
segment, event and verdict queued (then the builder's latency to the wire); records and
other jobs alternate when both wait. After a reset the slot memory is cleared (``slots``
cycles); records of other flows pass meanwhile. A CLOSE takes the table INSERT's time
(mean about 26 cycles) plus a few cycles; CLOSEs are done one at a time.

Ports
  rx          In(stream of TEARDOWN_IN)    one record per received frame, in frame order
  verdict     Out(stream of TEARDOWN_VERDICT)  one per record, in order
  close       In(stream of CLOSE_COMMAND)  the host's CLOSE commands
  close_data  In(packet stream)            their held data
  tx          Out(stream of TX_HEADER)     segments to send (``hw.builder.TxBuilder``)
  tx_payload  Out(packet stream)           the data of the segments that carry data, in order
  event       Out(stream of EVENT)         CLOSE_STATUS and CLOSED events
  table_cmd   Out / table_resp In          the connection table's control port
  ts_clock    In(32)                       the NIC's timestamp clock
  tick_period, fin_rto, fin2_timeout, time_wait  In(32);  fin_retries In(4)
  now         Out(32)                      the timer clock
  closing     Out                          slots in use
  counters    Out(32 * len(TdCounter))     flat, 32 bits per ``TdCounter``
"""

import enum

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from hw.conn_table import FLOW_KEY, Geometry, Op, Status, command_layout, response_layout
from hw.free_list import FreeList
from hw.headers import MAX_FRAME_BYTES, TcpFlags
from hw.hold_buffer import HoldBuffer
from hw.metadata import (EVENT, FLOW_RECORD, FLOW_VALUE, TX_HEADER, CloseReason,
                         CloseStatus, EventKind, FlowKind, FrameClass)
from hw.stream import beat_bytes, packet_signature, struct_value
from hw.timer_scan import TimerScan, deadline_passed

__all__ = ["TdState", "TdCounter", "CLOSE_COMMAND", "TEARDOWN_IN", "TEARDOWN_VERDICT",
           "MAX_HELD_DATA", "TS_OPTION_BYTES"]

#: The timestamp option as the builder lays it out (NOP, NOP, kind, length, TSval, TSecr).
TS_OPTION_BYTES = 12

#: The most data a CLOSE can hand over: one untagged frame with the timestamp option.
MAX_HELD_DATA = MAX_FRAME_BYTES - 54 - TS_OPTION_BYTES


class TdState(enum.IntEnum):
    """A teardown slot's TCP state (RFC 9293 names)."""
    FREE = 0                # the slot holds no flow
    FIN_WAIT_1 = 1          # our FIN sent, not acknowledged; the peer's FIN not received
    FIN_WAIT_2 = 2          # our FIN acknowledged; waiting for the peer's FIN
    CLOSING = 3             # both FINs sent, ours not acknowledged yet (simultaneous close)
    TIME_WAIT = 4           # both FINs acknowledged; held for 2*MSL to answer a lost ACK
    LAST_ACK = 5            # passive close: the peer's FIN came first; our FIN not acknowledged


class TdCounter(enum.IntEnum):
    """The engine's counters (one 32-bit field each in ``counters``)."""
    CLAIMED = 0             # segments of closing flows handled by the NIC
    STALE = 1               # hit a CLOSING entry whose slot no longer holds the flow: to the host
    RST_ACCEPTED = 2        # rule 1
    RST_CHALLENGED = 3      # rule 2
    RST_IGNORED = 4         # rule 3
    SYN_REOPEN = 5          # rule 4
    SYN_CHALLENGED = 6      # rule 5
    FIN_AGAIN = 7           # rule 6
    OUT_OF_WINDOW = 8       # rule 7
    NO_ACK = 9              # rule 8
    ACK_TOO_NEW = 10        # rule 9
    DATA_ABORT = 11         # rule 10
    DATA_IGNORED = 12       # rule 11
    PEER_FIN = 13           # rule 12
    ACK_SEGMENT = 14        # rule 13
    FIN_RETRANSMIT = 15     # timer: FIN sent again
    FIN_TIMEOUT = 16        # timer: retries exhausted, RST sent
    FIN2_TIMEOUT = 17       # timer: FIN_WAIT_2 expired
    TIME_WAIT_DONE = 18     # timer: TIME_WAIT expired
    CLOSE_ACCEPTED = 19     # CLOSE commands answered OK
    CLOSE_REFUSED = 20      # CLOSE commands answered with an error
    DELETE_FAILED = 21      # a table DELETE of a freed flow did not answer OK (never expected)


#: The host's CLOSE command (see the module docstring).
CLOSE_COMMAND = data.StructLayout({
    "ingress": 8,
    "peer_mac": 48, "local_mac": 48,
    "local_ip": 32, "peer_ip": 32, "local_port": 16, "peer_port": 16,
    "snd_una": 32, "snd_nxt": 32, "rcv_nxt": 32,
    "window": 16, "rcv_wscale": 4,
    "peer_fin": 1,
    "ts_ok": 1, "ts_recent": 32, "ts_offset": 32,
    "data_length": 16,
})

#: One record per received frame: the parser's metadata and the table lookup's result.
TEARDOWN_IN = FLOW_RECORD

#: The engine's decision for one record. ``claimed`` = 0: not a closing flow's segment,
#: the other engines decide; 1: ``to_host`` says where the frame goes.
TEARDOWN_VERDICT = data.StructLayout({"claimed": 1, "to_host": 1})


# ------------------------------------------------------------------------------ the engine


__all__ += ["TeardownEngine", "slot_state_layout", "REPLY_TTL", "MAX_BACKOFF"]

#: TTL of the segments the engine sends.
REPLY_TTL = 64

#: The retransmission timeout never grows beyond this many ticks.
MAX_BACKOFF = 1 << 30


def slot_state_layout(buffers):
    """What the engine keeps per slot (one word of the state memory)."""
    return data.StructLayout({
        "state": 3, "retries": 4, "deadline": 32,
        "ingress": 8, "peer_mac": 48, "local_mac": 48,
        "local_ip": 32, "peer_ip": 32, "local_port": 16, "peer_port": 16,
        "data_seq": 32, "data_length": 16, "has_buffer": 1, "buffer": range(buffers),
        "rcv_nxt": 32, "window": 16, "rcv_wscale": 4,
        "ts_ok": 1, "ts_recent": 32, "ts_offset": 32,
        "segments_in": 16, "segments_out": 16,
    })


class _Send(enum.IntEnum):
    NONE = 0
    ACK = 1             # seq = SND.MAX, ack = RCV.NXT
    FIN = 2             # the held data and FIN, seq = data_seq
    RST_SEGACK = 3      # RST, seq = the segment's ACK
    RST_ACK = 4         # RST|ACK, seq = SND.MAX


class _Timer(enum.IntEnum):
    KEEP = 0
    FIN_RTO = 1         # now + fin_rto (install)
    BACKOFF = 2         # now + fin_rto << retries (after a retransmission)
    FIN2 = 3            # now + fin2_timeout
    TIME_WAIT = 4       # now + time_wait


class _Job(enum.IntEnum):
    RX = 0
    TIMER = 1
    INSTALL = 2


def _saturating_add16(value):
    return Mux(value == 0xFFFF, value, value + 1)[:16]


class TeardownEngine(wiring.Component):
    def __init__(self, width=64, slots=1024, buffers=16, table=None, max_data=MAX_HELD_DATA):
        self.width, self.slots, self.buffers = width, slots, buffers
        self.max_data = max_data
        self.geo = table if table is not None else Geometry(4096, stash=4, max_moves=256)
        self.state_layout = slot_state_layout(buffers)
        #: Cycles of one segment's processing (accept -> state written): the engine
        #: takes a segment of a closing flow every ``job_cycles`` cycles at most.
        self.job_cycles = 6
        super().__init__({
            "rx": In(stream.Signature(TEARDOWN_IN)),
            "verdict": Out(stream.Signature(TEARDOWN_VERDICT)),
            "close": In(stream.Signature(CLOSE_COMMAND)),
            "close_data": In(packet_signature(width)),
            "tx": Out(stream.Signature(TX_HEADER)),
            "tx_payload": Out(packet_signature(width)),
            "event": Out(stream.Signature(EVENT)),
            "table_cmd": Out(stream.Signature(command_layout(self.geo, FLOW_VALUE.size))),
            "table_resp": In(stream.Signature(response_layout(self.geo, FLOW_VALUE.size))),
            "ts_clock": In(32),
            "tick_period": In(32), "fin_rto": In(32), "fin2_timeout": In(32),
            "time_wait": In(32), "fin_retries": In(4),
            "now": Out(32),
            "closing": Out(range(slots + 1)),
            "counters": Out(32 * len(TdCounter)),
        })

    def elaborate(self, platform):
        m = Module()
        nb = beat_bytes(self.width)
        S = self.state_layout
        m.submodules.slot_pool = slot_pool = FreeList(self.slots)
        m.submodules.hold = hold = HoldBuffer(self.width, self.buffers, self.max_data)
        m.submodules.timers = timers = TimerScan(self.slots)
        m.submodules.state_mem = state_mem = Memory(shape=S, depth=self.slots, init=[])
        st_wr = state_mem.write_port()
        st_rd = state_mem.read_port()
        wiring.connect(m, hold.o, wiring.flipped(self.tx_payload))
        m.d.comb += self.closing.eq(self.slots - slot_pool.free)

        # ---- the timer clock ----------------------------------------------------------
        ticks = Signal(32)
        with m.If(self.tick_period != 0):
            with m.If(ticks + 1 >= self.tick_period):
                m.d.sync += [ticks.eq(0), self.now.eq(self.now + 1)]
            with m.Else():
                m.d.sync += ticks.eq(ticks + 1)
        m.d.comb += timers.now.eq(self.now)

        # ---- output queues (the job machine checks room before it starts a job) ---------
        m.submodules.tx_fifo = tx_fifo = SyncFIFOBuffered(width=TX_HEADER.size, depth=16)
        m.submodules.event_fifo = event_fifo = SyncFIFOBuffered(width=EVENT.size, depth=16)
        m.submodules.verdict_fifo = verdict_fifo = SyncFIFOBuffered(
            width=TEARDOWN_VERDICT.size, depth=64)
        m.submodules.delete_fifo = delete_fifo = SyncFIFOBuffered(width=FLOW_KEY.size, depth=16)
        for fifo, port in ((tx_fifo, self.tx), (event_fifo, self.event),
                           (verdict_fifo, self.verdict)):
            m.d.comb += [port.valid.eq(fifo.r_rdy), port.payload.eq(fifo.r_data),
                         fifo.r_en.eq(port.ready)]
        # Room for one more entry in every output queue, from registered levels: a job
        # writes at most one entry to each, and the levels lag by one cycle, so two free
        # entries a cycle ago mean at least one now.
        room = Signal()
        m.d.sync += room.eq((tx_fifo.level < tx_fifo.depth - 2)
                            & (event_fifo.level < event_fifo.depth - 2)
                            & (verdict_fifo.level < verdict_fifo.depth - 2)
                            & (delete_fifo.level < delete_fifo.depth - 2)
                            & (hold.job_level < hold.job_depth - 2))

        counters = [Signal(32, name=f"count_{c.name.lower()}") for c in TdCounter]
        m.d.comb += self.counters.eq(Cat(*counters))
        count_en = Signal()
        count_which = Signal(range(len(TdCounter)))
        delete_failed = Signal()
        claimed_now = Signal()
        for c, counter in enumerate(counters):
            if c in (TdCounter.DELETE_FAILED, TdCounter.CLAIMED):
                # Counted on their own: they coincide with other counters.
                with m.If(delete_failed if c == TdCounter.DELETE_FAILED else claimed_now):
                    m.d.sync += counter.eq(counter + 1)
            else:
                with m.If(count_en & (count_which == c)):
                    m.d.sync += counter.eq(counter + 1)

        # ================================================================ CLOSE intake
        cmd = Signal(CLOSE_COMMAND)
        i_status = Signal(3)
        own_slot, own_buffer = Signal(), Signal()
        i_slot = Signal(range(self.slots))
        i_buffer = Signal(range(self.buffers))
        beats_left = Signal(16)
        beat_index = Signal(range(hold.stride))
        handoff = Signal()               # the intake's result waits for the job machine
        handoff_taken = Signal()
        key = struct_value(FLOW_KEY, {"port": cmd.ingress, "src": cmd.peer_ip,
                                      "dst": cmd.local_ip, "sport": cmd.peer_port,
                                      "dport": cmd.local_port})
        value = struct_value(FLOW_VALUE, {"kind": FlowKind.CLOSING, "slot": i_slot})
        cmd_layout = command_layout(self.geo, FLOW_VALUE.size)
        resp = self.table_resp.payload
        bad_length, has_data = Signal(), Signal()
        take_slot, take_buffer = Signal(), Signal()
        m.d.sync += [take_slot.eq(0), take_buffer.eq(0)]
        m.d.comb += [slot_pool.alloc.ready.eq(take_slot), hold.alloc.ready.eq(take_buffer)]
        m.d.comb += [hold.wr_buffer.eq(i_buffer), hold.wr_beat.eq(beat_index),
                     hold.wr_data.eq(self.close_data.payload.data)]

        with m.FSM(name="intake"):
            with m.State("IDLE"):
                with m.If(delete_fifo.r_rdy):
                    m.next = "DELETE"
                with m.Elif(self.close.valid):
                    m.d.comb += self.close.ready.eq(1)
                    m.d.sync += cmd.eq(self.close.payload)
                    m.next = "LENGTHS"
            with m.State("LENGTHS"):
                m.d.sync += [bad_length.eq((cmd.data_length > self.max_data)
                                           | ((cmd.snd_nxt - cmd.snd_una)[:32] > cmd.data_length)),
                             has_data.eq(cmd.data_length != 0)]
                m.next = "CHECK"
            with m.State("CHECK"):
                m.d.sync += [beats_left.eq((cmd.data_length + nb - 1) >> (nb.bit_length() - 1)),
                             beat_index.eq(0), own_slot.eq(0), own_buffer.eq(0),
                             i_slot.eq(slot_pool.alloc.payload),
                             i_buffer.eq(hold.alloc.payload)]
                with m.If(bad_length):
                    m.d.sync += i_status.eq(CloseStatus.BAD_LENGTH)
                with m.Elif(~slot_pool.alloc.valid):
                    m.d.sync += i_status.eq(CloseStatus.NO_SLOT)
                with m.Elif(has_data & ~hold.alloc.valid):
                    m.d.sync += i_status.eq(CloseStatus.NO_BUFFER)
                with m.Else():
                    # The slot and buffer shown now are taken at the next edge but one
                    # (from registers: nothing else takes from these pools).
                    m.d.sync += [i_status.eq(CloseStatus.OK), own_slot.eq(1),
                                 own_buffer.eq(has_data), take_slot.eq(1),
                                 take_buffer.eq(has_data)]
                m.next = "DATA"
            with m.State("DATA"):
                with m.If(beats_left == 0):
                    with m.If(i_status == CloseStatus.OK):
                        m.next = "INSERT"
                    with m.Else():
                        m.next = "REPORT"
                with m.Else():
                    m.d.comb += self.close_data.ready.eq(1)
                    with m.If(self.close_data.valid):
                        m.d.comb += hold.wr_en.eq(own_buffer)
                        m.d.sync += [beats_left.eq(beats_left - 1), beat_index.eq(beat_index + 1)]
            with m.State("INSERT"):
                m.d.comb += [self.table_cmd.valid.eq(1), self.table_cmd.payload.eq(
                    struct_value(cmd_layout, {"op": Op.INSERT, "key": key, "value": value}))]
                with m.If(self.table_cmd.ready):
                    m.next = "INSERT_WAIT"
            with m.State("INSERT_WAIT"):
                m.d.comb += self.table_resp.ready.eq(1)
                with m.If(self.table_resp.valid):
                    with m.If(resp.status == Status.OK):
                        m.next = "REPORT"
                    with m.Elif((resp.status == Status.DUPLICATE)
                                & (FLOW_VALUE(resp.value).kind != FlowKind.CLOSING)):
                        m.next = "UPDATE"
                    with m.Else():
                        m.d.sync += i_status.eq(Mux(
                            resp.status == Status.DUPLICATE, CloseStatus.ALREADY_CLOSING,
                            Mux(resp.status == Status.FULL, CloseStatus.TABLE_FULL,
                                CloseStatus.TABLE_ERROR)))
                        m.next = "REPORT"
            with m.State("UPDATE"):
                m.d.comb += [self.table_cmd.valid.eq(1), self.table_cmd.payload.eq(
                    struct_value(cmd_layout, {"op": Op.UPDATE, "key": key, "value": value}))]
                with m.If(self.table_cmd.ready):
                    m.next = "UPDATE_WAIT"
            with m.State("UPDATE_WAIT"):
                m.d.comb += self.table_resp.ready.eq(1)
                with m.If(self.table_resp.valid):
                    with m.If(resp.status != Status.OK):
                        m.d.sync += i_status.eq(CloseStatus.TABLE_ERROR)
                    m.next = "REPORT"
            with m.State("REPORT"):
                m.d.sync += handoff.eq(~handoff_taken)
                with m.If(handoff_taken):
                    m.next = "IDLE"
            with m.State("DELETE"):
                m.d.comb += [self.table_cmd.valid.eq(1), self.table_cmd.payload.eq(
                    struct_value(cmd_layout, {"op": Op.DELETE, "key": delete_fifo.r_data}))]
                with m.If(self.table_cmd.ready):
                    m.d.comb += delete_fifo.r_en.eq(1)
                    m.next = "DELETE_WAIT"
            with m.State("DELETE_WAIT"):
                m.d.comb += self.table_resp.ready.eq(1)
                with m.If(self.table_resp.valid):
                    m.d.comb += delete_failed.eq(resp.status != Status.OK)
                    m.next = "IDLE"

        # ================================================================ the job machine
        meta = self.rx.payload.meta
        rec_flags = Signal(8)
        rec_seq, rec_ack = Signal(32), Signal(32)
        rec_payload = Signal(16)
        rec_ts_valid, rec_tsval = Signal(), Signal(32)
        rec_src, rec_dst = Signal(32), Signal(32)
        rec_sport, rec_dport = Signal(16), Signal(16)
        job = Signal(_Job)
        slot = Signal(range(self.slots))
        st = Signal(S)                          # the slot's state, as read
        rx_served_last = Signal()               # fairness between records and other jobs

        candidate = Signal()
        m.d.comb += candidate.eq(self.rx.payload.hit
                                 & (self.rx.payload.value.kind == FlowKind.CLOSING)
                                 & (meta.frame_class == FrameClass.TCP)
                                 & (meta.errors.as_value() == 0))

        # Comparisons (stage C, from the state as read) and decisions (stage D).
        claim = Signal()
        c_d, c_wnd, c_last, c_end = Signal(32), Signal(32), Signal(32), Signal(32)
        c_acknew, c_tsdiff = Signal(32), Signal(32)
        c_passed, c_retry_ok = Signal(), Signal()
        c_shifted, c_backoff = Signal(48), Signal(32)
        tests = {name: Signal(name=f"t_{name}") for name in (
            "d_zero", "seq_ok", "syn_ok", "fin_again", "ack_too_new", "fin_acked", "new_data",
            "fin_in_order", "ts_newer")}
        snd_max = Signal(32)

        a_claimed, a_to_host = Signal(), Signal()
        a_send = Signal(_Send)
        a_free = Signal()
        a_reason = Signal(4)
        a_state = Signal(3)
        a_rcv_inc, a_ts_update, a_retry_inc, a_release = Signal(), Signal(), Signal(), Signal()
        a_timer = Signal(_Timer)
        a_count, a_count_en = Signal(range(len(TdCounter))), Signal()
        a_seg_in = Signal()
        a_status_event = Signal()             # a CLOSE_STATUS OK event (install)
        a_write = Signal()                    # the slot's state is written

        # The slot memory is read speculatively for the job IDLE would start (a read has no
        # side effect), so that the address does not wait for the queue checks.
        others = Signal()
        serve_rx = Signal()
        m.d.comb += [others.eq(handoff | timers.expired.valid),
                     serve_rx.eq(self.rx.valid & ~(rx_served_last & others)),
                     st_rd.addr.eq(Mux(serve_rx, self.rx.payload.value.slot,
                                       timers.expired.payload))]

        def flag(name):
            return rec_flags[TcpFlags[name].bit_length() - 1]
        rst, syn, fin, ack = flag("RST"), flag("SYN"), flag("FIN"), flag("ACK")

        sweep_slot = Signal(range(self.slots))
        with m.FSM(name="job"):
            with m.State("SWEEP"):
                # After a reset: every slot free (the memory has no reset), one slot per
                # cycle, while the timers clear theirs. Records of other flows pass.
                m.d.comb += [st_wr.en.eq(1), st_wr.addr.eq(sweep_slot), st_wr.data.eq(0)]
                with m.If(sweep_slot != self.slots - 1):
                    m.d.sync += sweep_slot.eq(sweep_slot + 1)
                with m.If(self.rx.valid & ~candidate & verdict_fifo.w_rdy):
                    m.d.comb += [self.rx.ready.eq(1), verdict_fifo.w_en.eq(1),
                                 verdict_fifo.w_data.eq(0)]
                with m.If((sweep_slot == self.slots - 1) & timers.ready):
                    m.next = "IDLE"

            with m.State("IDLE"):
                with m.If(serve_rx):
                    with m.If(~candidate):
                        with m.If(verdict_fifo.w_rdy):
                            m.d.comb += [self.rx.ready.eq(1), verdict_fifo.w_en.eq(1),
                                         verdict_fifo.w_data.eq(0)]
                            m.d.sync += rx_served_last.eq(1)
                    with m.Elif(room):
                        m.d.comb += self.rx.ready.eq(1)
                        m.d.sync += [
                            job.eq(_Job.RX), slot.eq(self.rx.payload.value.slot),
                            rec_flags.eq(meta.tcp.flags), rec_seq.eq(meta.tcp.seq),
                            rec_ack.eq(meta.tcp.ack), rec_payload.eq(meta.payload_length),
                            rec_ts_valid.eq(meta.opt.ts_valid), rec_tsval.eq(meta.opt.tsval),
                            rec_src.eq(meta.ip.src), rec_dst.eq(meta.ip.dst),
                            rec_sport.eq(meta.tcp.sport), rec_dport.eq(meta.tcp.dport),
                            rx_served_last.eq(1)]
                        m.next = "LOAD"
                with m.Elif(handoff & room):
                    m.d.comb += handoff_taken.eq(1)
                    m.d.sync += [rx_served_last.eq(0), job.eq(_Job.INSTALL), slot.eq(i_slot)]
                    with m.If(i_status == CloseStatus.OK):
                        m.next = "INSTALL"
                    with m.Else():
                        m.next = "REFUSE"
                with m.Elif(timers.expired.valid & room):
                    m.d.comb += timers.expired.ready.eq(1)
                    m.d.sync += [job.eq(_Job.TIMER), slot.eq(timers.expired.payload),
                                 rx_served_last.eq(0)]
                    m.next = "LOAD"

            with m.State("REFUSE"):
                # A refused CLOSE: its event, and back what it had taken.
                m.d.comb += [
                    event_fifo.w_en.eq(1),
                    event_fifo.w_data.eq(struct_value(EVENT, {
                        "kind": EventKind.CLOSE_STATUS, "status": i_status,
                        "ingress": cmd.ingress,
                        "eth": {"peer": cmd.peer_mac, "local": cmd.local_mac},
                        "peer_ip": cmd.peer_ip, "local_ip": cmd.local_ip,
                        "peer_port": cmd.peer_port, "local_port": cmd.local_port})),
                    slot_pool.release.valid.eq(own_slot),
                    slot_pool.release.payload.eq(i_slot),
                    hold.job.valid.eq(own_buffer),
                    hold.job.payload.eq(struct_value(hold.job_layout, {
                        "buffer": i_buffer, "release": 1})),
                    count_en.eq(1), count_which.eq(TdCounter.CLOSE_REFUSED)]
                m.next = "IDLE"

            with m.State("LOAD"):
                m.d.sync += st.eq(st_rd.data)
                m.next = "COMPARE"

            with m.State("COMPARE"):
                s = st
                length = rec_payload + syn + fin
                m.d.sync += [
                    claim.eq((s.state != TdState.FREE) & (s.peer_ip == rec_src)
                             & (s.local_ip == rec_dst) & (s.peer_port == rec_sport)
                             & (s.local_port == rec_dport)),
                    c_d.eq(rec_seq - s.rcv_nxt),
                    c_wnd.eq(s.window << s.rcv_wscale),
                    c_last.eq(rec_seq + length - 1 - s.rcv_nxt),
                    c_end.eq(rec_seq + rec_payload - s.rcv_nxt),
                    c_acknew.eq(rec_ack - s.data_seq - s.data_length - 1),
                    c_tsdiff.eq(rec_tsval - s.ts_recent),
                    c_passed.eq((s.state != TdState.FREE) & deadline_passed(self.now, s.deadline)),
                    c_retry_ok.eq(s.retries < self.fin_retries),
                    snd_max.eq(s.data_seq + s.data_length + 1),
                ]
                m.d.sync += c_shifted.eq(self.fin_rto << (s.retries + 1))
                m.next = "TEST"

            with m.State("TEST"):
                for name, expr in self._tests(st, syn, fin, rec_payload, rec_ts_valid, c_d,
                                              c_wnd, c_last, c_end, c_acknew,
                                              c_tsdiff).items():
                    m.d.sync += tests[name].eq(expr)
                m.d.sync += c_backoff.eq(Mux(c_shifted[30:] != 0, MAX_BACKOFF, c_shifted))
                m.next = "DECIDE"

            with m.State("DECIDE"):
                self._decide(m, st, job, claim, rst, syn, ack, c_passed, c_retry_ok, tests,
                             dict(claimed=a_claimed, to_host=a_to_host,
                                              send=a_send, free=a_free, reason=a_reason,
                                              state=a_state, rcv_inc=a_rcv_inc,
                                              ts_update=a_ts_update, retry_inc=a_retry_inc,
                                              release=a_release, timer=a_timer,
                                              count=a_count, count_en=a_count_en,
                                              seg_in=a_seg_in, write=a_write))
                m.d.sync += a_status_event.eq(0)
                m.next = "ACT"

            with m.State("INSTALL"):
                fin_seq_plus = cmd.snd_una + cmd.data_length + 1
                m.d.sync += [
                    st.eq(struct_value(S, {
                        "state": Mux(cmd.peer_fin, TdState.LAST_ACK, TdState.FIN_WAIT_1),
                        "retries": 0, "deadline": 0,
                        "ingress": cmd.ingress, "peer_mac": cmd.peer_mac,
                        "local_mac": cmd.local_mac, "local_ip": cmd.local_ip,
                        "peer_ip": cmd.peer_ip, "local_port": cmd.local_port,
                        "peer_port": cmd.peer_port, "data_seq": cmd.snd_una,
                        "data_length": cmd.data_length, "has_buffer": own_buffer,
                        "buffer": i_buffer, "rcv_nxt": cmd.rcv_nxt, "window": cmd.window,
                        "rcv_wscale": cmd.rcv_wscale, "ts_ok": cmd.ts_ok,
                        "ts_recent": cmd.ts_recent, "ts_offset": cmd.ts_offset,
                        "segments_in": 0, "segments_out": 0})),
                    snd_max.eq(fin_seq_plus),
                    a_claimed.eq(0), a_to_host.eq(0), a_send.eq(_Send.FIN), a_free.eq(0),
                    a_state.eq(Mux(cmd.peer_fin, TdState.LAST_ACK, TdState.FIN_WAIT_1)),
                    a_rcv_inc.eq(0), a_ts_update.eq(0), a_retry_inc.eq(0), a_release.eq(0),
                    a_timer.eq(_Timer.FIN_RTO), a_count.eq(TdCounter.CLOSE_ACCEPTED),
                    a_count_en.eq(1), a_seg_in.eq(0), a_write.eq(1), a_status_event.eq(1),
                ]
                m.next = "ACT"

            with m.State("ACT"):
                self._act(m, st, job, slot, snd_max, c_backoff, rec_ack, rec_tsval,
                          dict(claimed=a_claimed, to_host=a_to_host, send=a_send, free=a_free,
                               reason=a_reason, state=a_state, rcv_inc=a_rcv_inc,
                               ts_update=a_ts_update, retry_inc=a_retry_inc,
                               release=a_release, timer=a_timer, count=a_count,
                               count_en=a_count_en, seg_in=a_seg_in, write=a_write,
                               status_event=a_status_event),
                          st_wr, timers, tx_fifo, event_fifo, verdict_fifo, delete_fifo,
                          slot_pool, hold, count_en, count_which)
                m.d.comb += claimed_now.eq((job == _Job.RX) & a_claimed)
                m.next = "IDLE"
        return m

    # ---------------------------------------------------------------- decision (stage D)
    @staticmethod
    def _tests(st, syn, fin, payload, ts_valid, c_d, c_wnd, c_last, c_end, c_acknew, c_tsdiff):
        """The segment's tests (stage T), as expressions of the registered differences."""
        d_zero = c_d == 0
        empty = (payload == 0) & ~syn & ~fin
        window_nonzero = c_wnd != 0
        ts_both = st.ts_ok & ts_valid
        return {
            "d_zero": d_zero,
            "seq_ok": Mux(empty, c_d < Mux(window_nonzero, c_wnd, 1),
                          window_nonzero & ((c_d < c_wnd) | (c_last < c_wnd))),
            "syn_ok": Mux(ts_both, ~c_tsdiff[31] & (c_tsdiff != 0), ~c_d[31] & ~d_zero),
            "fin_again": fin & (c_end == 0xFFFFFFFF),
            "ack_too_new": ~c_acknew[31] & (c_acknew != 0),
            "fin_acked": c_acknew == 0,
            "new_data": (payload != 0) & ~c_end[31] & (c_end != 0),
            "fin_in_order": fin & (c_end == 0),
            "ts_newer": ts_both & d_zero & ~c_tsdiff[31],
        }

    def _decide(self, m, st, job, claim, rst, syn, ack, c_passed, c_retry_ok, t, a):
        """The rules of the module docstring, from registered tests ``t``, into ``a``."""
        state = st.state
        d_zero, seq_ok, syn_ok = t["d_zero"], t["seq_ok"], t["syn_ok"]
        fin_again, ack_too_new, fin_acked = t["fin_again"], t["ack_too_new"], t["fin_acked"]
        new_data, fin_in_order = t["new_data"], t["fin_in_order"]
        waiting_fin = (state == TdState.FIN_WAIT_1) | (state == TdState.FIN_WAIT_2)
        fin_unacked = ((state == TdState.FIN_WAIT_1) | (state == TdState.CLOSING)
                       | (state == TdState.LAST_ACK))
        time_wait = state == TdState.TIME_WAIT

        # Defaults: nothing happens, the slot keeps its state.
        m.d.sync += [a["claimed"].eq(0), a["to_host"].eq(0), a["send"].eq(_Send.NONE),
                     a["free"].eq(0), a["reason"].eq(0), a["state"].eq(state),
                     a["rcv_inc"].eq(0), a["ts_update"].eq(0), a["retry_inc"].eq(0),
                     a["release"].eq(0), a["timer"].eq(_Timer.KEEP), a["count_en"].eq(1),
                     a["seg_in"].eq(0), a["write"].eq(0)]

        def do(counter, send=_Send.NONE, free=None, timer=None, to_host=0, new_state=None,
               rcv_inc=0, release=None, ts=0):
            out = [a["count"].eq(counter), a["send"].eq(send), a["to_host"].eq(to_host),
                   a["rcv_inc"].eq(rcv_inc), a["write"].eq(1)]
            if free is not None:
                out += [a["free"].eq(1), a["reason"].eq(free), a["release"].eq(st.has_buffer)]
            if timer is not None:
                out.append(a["timer"].eq(timer))
            if new_state is not None:
                out.append(a["state"].eq(new_state))
            if release is not None:
                out.append(a["release"].eq(release & st.has_buffer))
            if ts:
                out.append(a["ts_update"].eq(t["ts_newer"]))
            return out

        with m.If(job == _Job.TIMER):
            with m.If(~c_passed):
                m.d.sync += a["count_en"].eq(0)              # a stale expiry: nothing
            with m.Elif(fin_unacked & c_retry_ok):
                m.d.sync += do(TdCounter.FIN_RETRANSMIT, _Send.FIN, timer=_Timer.BACKOFF)
                m.d.sync += a["retry_inc"].eq(1)
            with m.Elif(fin_unacked):
                m.d.sync += do(TdCounter.FIN_TIMEOUT, _Send.RST_ACK, free=CloseReason.TIMEOUT)
            with m.Elif(state == TdState.FIN_WAIT_2):
                m.d.sync += do(TdCounter.FIN2_TIMEOUT, free=CloseReason.TIMEOUT)
            with m.Else():
                m.d.sync += do(TdCounter.TIME_WAIT_DONE, free=CloseReason.NORMAL)
        with m.Elif(~claim):
            m.d.sync += a["count"].eq(TdCounter.STALE)
        with m.Else():
            m.d.sync += [a["claimed"].eq(1), a["seg_in"].eq(1)]
            with m.If(rst & d_zero):
                m.d.sync += do(TdCounter.RST_ACCEPTED, free=CloseReason.RESET)
            with m.Elif(rst & seq_ok):
                m.d.sync += do(TdCounter.RST_CHALLENGED, _Send.ACK)
            with m.Elif(rst):
                m.d.sync += do(TdCounter.RST_IGNORED)
            with m.Elif(syn & ~ack & time_wait & syn_ok):
                m.d.sync += do(TdCounter.SYN_REOPEN, free=CloseReason.NEW_SYN, to_host=1)
            with m.Elif(syn):
                m.d.sync += do(TdCounter.SYN_CHALLENGED, _Send.ACK)
            with m.Elif(time_wait & fin_again):
                m.d.sync += do(TdCounter.FIN_AGAIN, _Send.ACK, timer=_Timer.TIME_WAIT, ts=1)
            with m.Elif(~seq_ok):
                m.d.sync += do(TdCounter.OUT_OF_WINDOW, _Send.ACK, ts=1)
            with m.Elif(~ack):
                m.d.sync += do(TdCounter.NO_ACK, ts=1)
            with m.Elif(ack_too_new):
                m.d.sync += do(TdCounter.ACK_TOO_NEW, _Send.ACK, ts=1)
            with m.Elif(new_data & waiting_fin):
                m.d.sync += do(TdCounter.DATA_ABORT, _Send.RST_SEGACK, free=CloseReason.DATA)
            with m.Elif(new_data):
                m.d.sync += do(TdCounter.DATA_IGNORED, _Send.ACK, ts=1)
            with m.Elif(fin_in_order & waiting_fin):
                done = (state == TdState.FIN_WAIT_2) | fin_acked
                m.d.sync += do(TdCounter.PEER_FIN, _Send.ACK, rcv_inc=1, ts=1,
                               release=fin_acked,
                               new_state=Mux(done, TdState.TIME_WAIT, TdState.CLOSING),
                               timer=Mux(done, _Timer.TIME_WAIT, _Timer.KEEP))
            with m.Elif(fin_acked & (state == TdState.LAST_ACK)):
                m.d.sync += do(TdCounter.ACK_SEGMENT, free=CloseReason.NORMAL)
            with m.Elif(fin_acked & (state == TdState.FIN_WAIT_1)):
                m.d.sync += do(TdCounter.ACK_SEGMENT, new_state=TdState.FIN_WAIT_2,
                               timer=_Timer.FIN2, release=1, ts=1)
            with m.Elif(fin_acked & (state == TdState.CLOSING)):
                m.d.sync += do(TdCounter.ACK_SEGMENT, new_state=TdState.TIME_WAIT,
                               timer=_Timer.TIME_WAIT, release=1, ts=1)
            with m.Else():
                m.d.sync += do(TdCounter.ACK_SEGMENT, ts=1)

    # ---------------------------------------------------------------- action (stage A)
    def _act(self, m, st, job, slot, snd_max, backoff, rec_ack, rec_tsval, a, st_wr, timers,
             tx_fifo, event_fifo, verdict_fifo, delete_fifo, slot_pool, hold,
             count_en, count_which):
        """Write the slot, arm its timer, queue the segment, event, verdict and cleanup."""
        S = self.state_layout
        send = a["send"]
        sending = send != _Send.NONE
        rcv_nxt = st.rcv_nxt + a["rcv_inc"]
        ts_recent = Mux(a["ts_update"], rec_tsval, st.ts_recent)
        segments_in = Mux(a["seg_in"], _saturating_add16(st.segments_in), st.segments_in)
        segments_out = Mux(sending, _saturating_add16(st.segments_out), st.segments_out)
        retries = st.retries + a["retry_inc"]
        timer = a["timer"]
        delay = Mux(timer == _Timer.FIN_RTO, self.fin_rto,
                    Mux(timer == _Timer.BACKOFF, backoff,
                        Mux(timer == _Timer.FIN2, self.fin2_timeout, self.time_wait)))
        deadline = Mux(timer == _Timer.KEEP, st.deadline, (self.now + delay)[:32])
        new_state = Mux(a["free"], TdState.FREE, a["state"])
        has_buffer = st.has_buffer & ~a["release"]
        m.d.comb += [
            st_wr.en.eq(a["write"]), st_wr.addr.eq(slot),
            st_wr.data.eq(struct_value(S, {
                "state": new_state, "retries": retries, "deadline": deadline,
                "ingress": st.ingress, "peer_mac": st.peer_mac, "local_mac": st.local_mac,
                "local_ip": st.local_ip, "peer_ip": st.peer_ip, "local_port": st.local_port,
                "peer_port": st.peer_port, "data_seq": st.data_seq,
                "data_length": st.data_length, "has_buffer": has_buffer, "buffer": st.buffer,
                "rcv_nxt": rcv_nxt, "window": st.window, "rcv_wscale": st.rcv_wscale,
                "ts_ok": st.ts_ok, "ts_recent": ts_recent, "ts_offset": st.ts_offset,
                "segments_in": segments_in, "segments_out": segments_out})),
            timers.set_en.eq(a["write"] & ((timer != _Timer.KEEP) | a["free"])),
            timers.set_slot.eq(slot), timers.set_armed.eq(~a["free"]),
            timers.set_deadline.eq(deadline),
        ]

        # The segment.
        is_rst = (send == _Send.RST_SEGACK) | (send == _Send.RST_ACK)
        is_fin = send == _Send.FIN
        with_data = is_fin & (st.data_length != 0)
        flags = Mux(send == _Send.RST_SEGACK, TcpFlags.RST,
                    Mux(send == _Send.RST_ACK, TcpFlags.RST | TcpFlags.ACK,
                        Mux(is_fin, Mux(with_data, TcpFlags.FIN | TcpFlags.ACK | TcpFlags.PSH,
                                        TcpFlags.FIN | TcpFlags.ACK), TcpFlags.ACK)))
        seq = Mux(send == _Send.RST_SEGACK, rec_ack, Mux(is_fin, st.data_seq, snd_max))
        m.d.comb += [
            tx_fifo.w_en.eq(sending),
            tx_fifo.w_data.eq(struct_value(TX_HEADER, {
                "eth": {"dst": st.peer_mac, "src": st.local_mac},
                "ip": {"src": st.local_ip, "dst": st.peer_ip, "ttl": REPLY_TTL, "df": 1},
                "tcp": {"sport": st.local_port, "dport": st.peer_port, "seq": seq,
                        "ack": Mux(send == _Send.RST_SEGACK, 0, rcv_nxt), "flags": flags,
                        "window": Mux(is_rst, 0, st.window)},
                "opt": {"ts_valid": st.ts_ok & ~is_rst,
                        "tsval": self.ts_clock + st.ts_offset, "tsecr": ts_recent},
                "payload_length": Mux(is_fin, st.data_length, 0)})),
        ]
        # The held data of a FIN segment, or the release of its buffer (never both).
        m.d.comb += [
            hold.job.valid.eq(with_data | a["release"]),
            hold.job.payload.eq(struct_value(hold.job_layout, {
                "buffer": st.buffer, "length": st.data_length, "release": a["release"]})),
        ]
        # The verdict of a record.
        m.d.comb += [
            verdict_fifo.w_en.eq(job == _Job.RX),
            verdict_fifo.w_data.eq(struct_value(TEARDOWN_VERDICT, {
                "claimed": a["claimed"], "to_host": a["to_host"]})),
        ]
        # Freeing: the table entry, the slot, the CLOSED event.
        m.d.comb += [
            delete_fifo.w_en.eq(a["free"]),
            delete_fifo.w_data.eq(struct_value(FLOW_KEY, {
                "port": st.ingress, "src": st.peer_ip, "dst": st.local_ip,
                "sport": st.peer_port, "dport": st.local_port})),
            slot_pool.release.valid.eq(a["free"]),
            slot_pool.release.payload.eq(slot),
            event_fifo.w_en.eq(a["free"] | a["status_event"]),
            event_fifo.w_data.eq(struct_value(EVENT, {
                "kind": Mux(a["free"], EventKind.CLOSED, EventKind.CLOSE_STATUS),
                "status": Mux(a["free"], a["reason"], CloseStatus.OK),
                "ingress": st.ingress, "eth": {"peer": st.peer_mac, "local": st.local_mac},
                "peer_ip": st.peer_ip, "local_ip": st.local_ip,
                "peer_port": st.peer_port, "local_port": st.local_port,
                # CLOSED events only (the other kinds leave unused fields 0).
                "retransmits": Mux(a["free"], retries, 0),
                "segments_in": Mux(a["free"], segments_in, 0),
                "segments_out": Mux(a["free"], segments_out, 0)})),
            count_en.eq(a["count_en"]), count_which.eq(a["count"]),
        ]
