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
 4    SYN in TIME_WAIT, acceptable (RFC 6191: TSval >      freed, CLOSED/NEW_SYN, frame to
      ts_recent when both use timestamps, else SEQ >       the host
      RCV.NXT)
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
the segment) and its TSval is not older than ``ts_recent``, ``ts_recent`` takes its TSval.
Challenge ACKs are not rate limited; PAWS is not applied (documented limits).

Timers: each slot has one deadline in ticks of the timer clock (``now``, one tick every
``tick_period`` cycles; 0 stops it). FIN_WAIT_1, CLOSING and LAST_ACK: the FIN (with the
held data) is sent again ``fin_rto`` ticks after the last send, then ``2 * fin_rto``,
``4 * fin_rto``... (the shift saturates at 2**30 ticks), ``fin_retries`` times; the next
expiry sends RST|ACK (``seq = SND.MAX``) and frees the slot: CLOSED/TIMEOUT. FIN_WAIT_2:
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

from amaranth.lib import data

from hw.metadata import FLOW_VALUE, PARSER_META
from hw.headers import MAX_FRAME_BYTES

__all__ = ["TdState", "TdCounter", "CLOSE_COMMAND", "TEARDOWN_IN", "TEARDOWN_VERDICT",
           "MAX_HELD_DATA", "TS_OPTION_BYTES"]

#: The timestamp option as the builder lays it out (NOP, NOP, kind, length, TSval, TSecr).
TS_OPTION_BYTES = 12

#: The most data a CLOSE can hand over: one untagged frame with the timestamp option.
MAX_HELD_DATA = MAX_FRAME_BYTES - 54 - TS_OPTION_BYTES


class TdState(enum.IntEnum):
    """A teardown slot's TCP state (RFC 9293 names)."""
    FREE = 0
    FIN_WAIT_1 = 1
    FIN_WAIT_2 = 2
    CLOSING = 3
    TIME_WAIT = 4
    LAST_ACK = 5


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
TEARDOWN_IN = data.StructLayout({
    "meta": PARSER_META,
    "ingress": 8,
    "hit": 1,
    "value": FLOW_VALUE,
})

#: The engine's decision for one record. ``claimed`` = 0: not a closing flow's segment,
#: the other engines decide; 1: ``to_host`` says where the frame goes.
TEARDOWN_VERDICT = data.StructLayout({"claimed": 1, "to_host": 1})
