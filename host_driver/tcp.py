"""The host's TCP stack for one established connection: sans-IO, frames in and out.

The NIC completes the handshake (SYN cookies) and reports an *established* event
(``hw.metadata.EVENT``); the host builds a ``TcpConnection`` from it and runs the
established phase in software, until it closes the connection itself (``close()``), hands
the close to the NIC (``close_command()``, teardown offload) or splices it with another
connection (``splice_side()``).

Use::

    conn = TcpConnection(event, TcpSettings(receive_buffer=1 << 18, ts_clock=clock))
    conn.receive(frame, now)     # every frame of the connection (the event's frame too
                                 # when it carried data or FIN: payload_length > 0)
    conn.send(data); conn.close()
    frames = conn.poll(now)      # after every call above, and at conn.next_deadline()
    data = conn.read()

``now`` is in seconds (any origin, never decreasing). Nothing happens between calls:
timers fire in ``poll``.

Behaviour (RFC 9293 unless said otherwise):

* Receive: segments must pass the acceptability test against our window (the free space
  of the receive buffer; the window we advertise never shrinks). In-order data goes to
  the receive buffer (``read``/``readable``); **out-of-order segments inside the window
  are held** and delivered when the hole is filled; each one is answered at once with a
  duplicate ACK. In-order data is acknowledged at once for every second full segment,
  else after ``delayed_ack`` seconds (0: at once). No SACK blocks are sent or used.
* RST (RFC 5961 3): SEQ = RCV.NXT closes (``error = "reset"``, unless both FINs were
  received and all our data acknowledged: LAST_ACK, TIME_WAIT); another RST in the window
  gets a challenge ACK; others are ignored. A SYN gets a challenge ACK (RFC 5961 4).
* ACKs (RFC 5961 5.2): an ACK of data not sent yet is answered with an ACK and dropped;
  one older than SND.UNA - MAX.SND.WND is dropped; the window is taken with SND.WL1/WL2
  and scaled by the peer's shift.
* Timestamps (RFC 7323), when negotiated: every segment we send carries TSval =
  ``ts_clock() + ts_offset`` and TSecr = TS.Recent; PAWS drops (and ACKs) segments whose
  TSval is older than TS.Recent; TS.Recent takes a segment's TSval when its SEQ <= the
  last ACK we sent. Segments without the option are accepted (as Linux does).
  ``ts_offset`` is fixed at creation so that our TSvals continue the SYN-ACK's: the
  SYN-ACK's TSval (the event's ``ts_echo``) is the NIC's clock with its low
  ``TS_OPTION_BITS`` replaced by the cookie's option bits, so it may lie up to 63 ticks
  ahead of the clock; the offset makes the first TSval at least ``ts_echo``.
* Send: segments of at most ``mss`` payload bytes (the event's MSS, minus 12 with
  timestamps), within the peer's window and the congestion window (RFC 5681 + NewReno),
  no Nagle (a short segment goes out when it is all that is queued). Retransmission:
  RFC 6298 timer with exponential backoff; on expiry the sender goes back to SND.UNA;
  after ``max_retries`` expirations without progress the connection is aborted (an RST
  is sent, ``error = "timeout"``). Three duplicate ACKs: fast retransmit.
* Zero window: a persist timer (the RTO, doubling up to ``max_rto``) sends Linux's probe,
  an ACK with SEQ = SND.UNA - 1, which the peer answers with its window; probes continue
  while the peer answers. The same timer sends what fits when the window is non-zero
  but too small for the sender's SWS rule and nothing is in flight. ACKs without data
  carry SEQ = SND.MAX (clamped to the peer's window), so they stay acceptable after a
  go-back-N retransmission.
* Close: ``close()`` is a half close (shutdown of the sending side, the application may
  still read): FIN after the queued data; FIN_WAIT_1/2, CLOSING, TIME_WAIT
  (``time_wait`` seconds, short by default), CLOSE_WAIT, LAST_ACK, CLOSED. FIN_WAIT_2
  lasts until the peer's FIN (a half close), or ``fin_wait_2_timeout`` seconds if set.
  A CLOSED connection (not a HANDED_OVER one) answers segments with an RST (RFC 9293
  3.10.7.1), e.g. a peer still sending after a timeout.

Counters (``counters``, a dict): every frame dropped and why, and what was sent.
"""

import enum
import time
from dataclasses import dataclass
from typing import Callable

from hw.headers import TcpFlags
from hw.splice import SPLICE_SIDE
from hw.syn_cookie import DEFAULT_MSS
from hw.teardown import CLOSE_COMMAND, MAX_HELD_DATA
from host_driver.segment import (MASK32, TS_OPTION_LENGTH, Segment, build_segment,
                                 parse_segment, seq_diff, seq_ge, seq_gt, seq_le, seq_lt)
from host_driver.tcp_parts import ReceiveBuffer, RenoCongestion, RttEstimator, SendBuffer

__all__ = ["TcpConnection", "TcpSettings", "State", "millisecond_clock"]

_FIN, _SYN, _RST, _PSH, _ACK = (TcpFlags.FIN, TcpFlags.SYN, TcpFlags.RST, TcpFlags.PSH,
                                TcpFlags.ACK)


class State(enum.Enum):
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN_WAIT_1"   # our FIN sent, not acknowledged
    FIN_WAIT_2 = "FIN_WAIT_2"   # our FIN acknowledged, the peer's not received
    CLOSING = "CLOSING"         # both FINs sent, ours not acknowledged
    TIME_WAIT = "TIME_WAIT"     # both done; answering a repeated FIN for ``time_wait``
    CLOSE_WAIT = "CLOSE_WAIT"   # the peer's FIN received, ours not sent
    LAST_ACK = "LAST_ACK"       # the peer's FIN first, then ours, not acknowledged
    CLOSED = "CLOSED"           # gone (``error`` says whether it ended badly)
    HANDED_OVER = "HANDED_OVER"  # given to the NIC (CLOSE or SPLICE): the host is done


#: States in which the peer may still send data.
_RECEIVING = {State.ESTABLISHED, State.FIN_WAIT_1, State.FIN_WAIT_2}


def millisecond_clock():
    """A default timestamp clock: milliseconds of ``time.monotonic``, 32 bits."""
    return int(time.monotonic() * 1000) & MASK32


@dataclass
class TcpSettings:
    """Local settings of a connection (times in seconds)."""
    receive_buffer: int = 1 << 18           # bytes; our window is its free space
    ts_clock: Callable[[], int] = millisecond_clock  # the NIC's TSval clock, in its ticks
    initial_rto: float = 1.0                # RFC 6298 2.1
    min_rto: float = 0.2                    # Linux's; RFC 6298 says 1 s
    max_rto: float = 60.0
    max_retries: int = 15                   # RTO expirations without progress, then abort
    delayed_ack: float = 0.04               # 0: acknowledge every segment at once
    time_wait: float = 1.0                  # 2*MSL is 60 s or more; short by default
    fin_wait_2_timeout: float | None = None  # None: wait for the peer's FIN (half close)
    congestion_control: bool = True
    ttl: int = 64


class TcpConnection:
    """One established connection (see the module docstring). ``event``: the
    established event as ``hw.stream.unpack_struct(EVENT, ...)`` gives it."""

    def __init__(self, event, settings=None):
        self.settings = settings = settings or TcpSettings()
        e = event
        if e["wscale_ok"] and settings.receive_buffer < 4 << e["local_wscale"]:
            raise ValueError(f"a receive buffer of {settings.receive_buffer} bytes is too small "
                             f"for window scale {e['local_wscale']} (at least 4 << scale)")
        # Who we talk to (integers, as in the event).
        self.ingress = e.get("ingress", 0)
        self.peer_mac, self.local_mac = e["eth"]["peer"], e["eth"]["local"]
        self.peer_ip, self.local_ip = e["peer_ip"], e["local_ip"]
        self.peer_port, self.local_port = e["peer_port"], e["local_port"]
        # Options negotiated by the NIC.
        self.wscale_ok = bool(e["wscale_ok"])
        self.peer_wscale = e["peer_wscale"] if self.wscale_ok else 0     # shift of its windows
        self.local_wscale = e["local_wscale"] if self.wscale_ok else 0   # shift of ours
        self.ts_ok = bool(e["ts_ok"])
        self.ts_recent = e["ts_recent"] if self.ts_ok else 0    # the peer's last TSval
        clock = settings.ts_clock()
        self.ts_offset = (seq_diff(e["ts_echo"], clock) if self.ts_ok
                          and seq_gt(e["ts_echo"], clock) else 0)
        #: Payload bytes per segment we send.
        self.mss = (e["mss"] or DEFAULT_MSS) - (TS_OPTION_LENGTH if self.ts_ok else 0)
        # Send sequence space: SND.UNA = send.una; SND.NXT; SND.MAX (highest sent).
        iss1 = (e["iss"] + 1) & MASK32
        self.send_buffer = SendBuffer(iss1)
        self.snd_nxt = self.snd_max = iss1
        # The event's segment: the final ACK of a passive open (its window is scaled) or
        # the SYN-ACK of an active one (never scaled, RFC 7323 2.2).
        self.active = bool(e.get("active", 0))
        self.snd_wnd = e["window"] if self.active else e["window"] << self.peer_wscale
        self.max_snd_wnd = self.snd_wnd
        self.snd_wl1 = e["irs"] if self.active else (e["irs"] + 1) & MASK32
        self.snd_wl2 = iss1
        self.fin_queued = False                 # close() called: FIN after the queued data
        self.fin_acked = False                  # the peer acknowledged our FIN
        self.retransmit_first = False           # resend the segment at SND.UNA at the next poll
        # Receive sequence space.
        self.receive_buffer = ReceiveBuffer((e["irs"] + 1) & MASK32, settings.receive_buffer)
        self.rcv_adv = self.receive_buffer.nxt  # right edge of the window we advertised
        self.last_ack_sent = self.receive_buffer.nxt
        self.peer_fin = False
        # Control.
        self.rtt = RttEstimator(settings.initial_rto, settings.min_rto, settings.max_rto)
        self.congestion = RenoCongestion(self.mss, settings.congestion_control)
        self.dup_acks = 0
        self.retries = 0                        # RTO expirations since the last progress
        self.timed = None                       # (seq, send time) of the segment being timed
        self.state = State.ESTABLISHED
        self.error = None       # why it ended badly: "reset", "timeout" or "aborted" (abort())
        self.ack_now = False                    # an ACK must go out at the next poll
        self.unacked_segments = 0               # in-order segments since our last ACK
        self.rto_deadline = None
        self.delack_deadline = None
        self.persist_deadline = None
        self.persist_backoffs = 0
        self.close_deadline = None              # TIME_WAIT or FIN_WAIT_2 end
        self.pending_rst = None                 # an RST frame to send at the next poll
        self.counters = {}

    # ------------------------------------------------------------------ application side
    def send(self, data):
        """Queue ``data``; returns the bytes queued (all of them: the buffer is unbounded,
        watch ``unsent``). ConnectionError after ``close()`` or once the connection ended."""
        if self.fin_queued or self.state not in (State.ESTABLISHED, State.CLOSE_WAIT):
            raise ConnectionError(f"cannot send in {self.state.value}")
        self.send_buffer.append(data)
        return len(data)

    def read(self, count=None):
        """Up to ``count`` (all when None) received in-order bytes."""
        return self.receive_buffer.read(count)

    @property
    def readable(self):
        """Received bytes waiting for ``read``."""
        return len(self.receive_buffer.unread)

    @property
    def at_eof(self):
        """The peer closed its side and everything it sent has been read."""
        return self.peer_fin and not self.receive_buffer.unread

    @property
    def unsent(self):
        """Queued bytes not sent yet."""
        return self.send_buffer.after(self.snd_max)

    @property
    def all_acked(self):
        """Everything queued was sent and acknowledged (the SPLICE hand-over condition)."""
        return len(self.send_buffer) == 0 and self.snd_una == self.snd_max

    @property
    def snd_una(self):
        """SND.UNA: the send buffer's start, plus one once our FIN is acknowledged."""
        return (self.send_buffer.una + self.fin_acked) & MASK32

    @property
    def rcv_nxt(self):
        return self.receive_buffer.nxt

    @property
    def closed(self):
        return self.state in (State.CLOSED, State.HANDED_OVER)

    def close(self):
        """Close our sending side: a FIN goes out after the queued data."""
        if self.state in (State.ESTABLISHED, State.CLOSE_WAIT) and not self.fin_queued:
            self.fin_queued = True

    def abort(self):
        """Reset the connection: an RST goes out at the next poll."""
        if not self.closed:
            self.pending_rst = self._frame(self._ack_seq(), _RST | _ACK, window=0, timestamp=False)
            self._enter_closed("aborted")

    # ------------------------------------------------------------------ hand-overs
    @property
    def fin_seq(self):
        """Sequence number of our FIN (valid once ``close`` was called)."""
        return self.send_buffer.end

    @property
    def max_held_data(self):
        """The most unacknowledged bytes a CLOSE can hand over: the NIC sends them in
        one segment with its FIN, so ``MAX_HELD_DATA`` and the peer's MSS bound them."""
        return min(MAX_HELD_DATA, self.mss)

    @property
    def can_hand_over_close(self):
        """The NIC can take the close: our FIN not sent, at most ``max_held_data`` bytes
        not acknowledged (sent or not)."""
        return (self.state in (State.ESTABLISHED, State.CLOSE_WAIT)
                and len(self.send_buffer) <= self.max_held_data)

    def close_command(self):
        """Hand the close to the NIC. Returns ``(fields, held)``: the ``CLOSE_COMMAND``
        field dict and the bytes ``[SND.UNA, SND.UNA + data_length)`` the NIC must hold
        (sent and unacknowledged, then unsent). The connection is then ``HANDED_OVER``.
        Raises ValueError when ``can_hand_over_close`` is false."""
        if not self.can_hand_over_close:
            raise ValueError(f"cannot hand the close over in {self.state.value} with "
                             f"{len(self.send_buffer)} bytes not acknowledged")
        held = bytes(self.send_buffer.data)
        fields = {
            "ingress": self.ingress, "peer_mac": self.peer_mac, "local_mac": self.local_mac,
            "local_ip": self.local_ip, "peer_ip": self.peer_ip,
            "local_port": self.local_port, "peer_port": self.peer_port,
            "snd_una": self.snd_una, "snd_nxt": self.snd_max, "rcv_nxt": self.rcv_nxt,
            "window": self._window_field(), "rcv_wscale": self.local_wscale,
            "peer_fin": int(self.peer_fin), "ts_ok": int(self.ts_ok),
            "ts_recent": self.ts_recent, "ts_offset": self.ts_offset,
            "data_length": len(held),
        }
        _check_fields(fields, CLOSE_COMMAND)
        self._hand_over()
        return fields, held

    def splice_side(self, ttl=0):
        """Hand the connection to a SPLICE: the ``SPLICE_SIDE`` field dict (``ttl`` as
        there: 0 forwards with the arriving TTL - 1). Only when ``all_acked``
        (docs/splice.md rule 1; ValueError otherwise). Unread received data stays in
        ``read()``: the proxy must have forwarded it. The connection is then
        ``HANDED_OVER``."""
        if self.closed or not self.all_acked or self.fin_queued:
            raise ValueError("splice only when everything sent is acknowledged and no FIN")
        fields = {
            "ingress": self.ingress, "peer_mac": self.peer_mac, "local_mac": self.local_mac,
            "peer_ip": self.peer_ip, "local_ip": self.local_ip,
            "peer_port": self.peer_port, "local_port": self.local_port,
            "snd_nxt": self.snd_max, "rcv_nxt": self.rcv_nxt,
            "ts_ok": int(self.ts_ok), "ts_recent": self.ts_recent, "ts_now": self._tsval(),
            "wscale_ok": int(self.wscale_ok), "peer_wscale": self.peer_wscale,
            "local_wscale": self.local_wscale, "ttl": ttl,
        }
        _check_fields(fields, SPLICE_SIDE)
        self._hand_over()
        return fields

    def _hand_over(self):
        self.state = State.HANDED_OVER
        self.rto_deadline = self.delack_deadline = self.persist_deadline = None
        self.close_deadline = None
        self.ack_now = False

    # ------------------------------------------------------------------ receive
    def matches(self, segment):
        """The segment belongs to this connection's 4-tuple."""
        return (segment.ip_src == self.peer_ip and segment.ip_dst == self.local_ip
                and segment.sport == self.peer_port and segment.dport == self.local_port)

    def _count(self, name, n=1):
        self.counters[name] = self.counters.get(name, 0) + n

    def receive(self, frame, now):
        """Process one received frame (bytes, or a ``Segment`` a demultiplexer already
        parsed). Returns True when it was a valid segment of this connection (processed,
        even if then dropped by TCP's rules), False when it was dropped before:
        malformed, bad checksum, another 4-tuple (``counters`` says which)."""
        segment = frame if isinstance(frame, Segment) else parse_segment(frame)
        if isinstance(segment, str):
            self._count("rx_" + segment)
            return False
        if not self.matches(segment):
            self._count("rx_other_flow")
            return False
        self._count("rx_segments")
        if self.closed:
            self._count("rx_after_close")
            if self.state == State.CLOSED and not segment.has(_RST):
                self._reset_answer(segment)
            return True
        self._segment_arrives(segment, now)
        return True

    def _reset_answer(self, seg):
        """RFC 9293 3.10.7.1: a segment for a closed connection gets an RST."""
        self._count("rst_sent")
        if seg.has(_ACK):
            seq, ack, flags = seg.ack, 0, _RST
        else:
            seq, ack, flags = 0, (seg.seq + seg.length) & MASK32, _RST | _ACK
        self.pending_rst = build_segment(
            eth_dst=self.peer_mac, eth_src=self.local_mac, ip_src=self.local_ip,
            ip_dst=self.peer_ip, sport=self.local_port, dport=self.peer_port, seq=seq,
            ack=ack, flags=flags, window=0, ttl=self.settings.ttl)

    def _receive_window(self):
        """Bytes we accept beyond RCV.NXT: the advertised window, or more."""
        return max(self.receive_buffer.free, seq_diff(self.rcv_adv, self.rcv_nxt))

    def _acceptable(self, seg, window):
        """RFC 9293 3.10.7.4's sequence test."""
        length = seg.length
        if length == 0:
            if window == 0:
                return seg.seq == self.rcv_nxt
            return 0 <= seq_diff(seg.seq, self.rcv_nxt) < window
        if window == 0:
            return False
        first = seq_diff(seg.seq, self.rcv_nxt)
        last = seq_diff((seg.seq + length - 1) & MASK32, self.rcv_nxt)
        return 0 <= first < window or 0 <= last < window

    def _segment_arrives(self, seg, now):
        rst = seg.has(_RST)
        # PAWS (RFC 7323 5.3).
        if (self.ts_ok and seg.ts_valid and not rst and seq_lt(seg.tsval, self.ts_recent)):
            self._count("rx_paws")
            self.ack_now = True
            return
        window = self._receive_window()
        acceptable = self._acceptable(seg, window)
        if not acceptable and window == 0 and seg.seq == self.rcv_nxt:
            # Data into our zero window: none taken, its ACK counts, we answer (RFC 9293).
            acceptable, seg.payload, seg.flags = True, b"", seg.flags & ~_FIN
            self._count("rx_zero_window_data")
            self.ack_now = True
        if not acceptable:
            if rst:
                self._count("rst_ignored")
            else:
                self._count("rx_out_of_window")
                self.ack_now = True
                if self.state == State.TIME_WAIT and seg.has(_FIN):
                    self.close_deadline = now + self.settings.time_wait
            return
        if rst:
            if seg.seq == self.rcv_nxt:
                self._count("rst_accepted")
                # After both FINs, with all our data acknowledged, nothing was lost.
                done = self.peer_fin and not len(self.send_buffer)
                self._enter_closed(None if done else "reset")
            else:
                self._count("rst_challenged")
                self.ack_now = True
            return
        if seg.has(_SYN):
            self._count("syn_challenged")
            self.ack_now = True
            return
        if not seg.has(_ACK):
            self._count("rx_no_ack")
            return
        # TS.Recent (RFC 7323 4.3).
        if (self.ts_ok and seg.ts_valid and seq_ge(seg.tsval, self.ts_recent)
                and seq_le(seg.seq, self.last_ack_sent)):
            self.ts_recent = seg.tsval
        if not self._process_ack(seg, now):
            return
        if self.state == State.CLOSED:
            return
        self._process_data(seg, now)

    def _process_ack(self, seg, now):
        """ACK field and window. False: drop the rest of the segment."""
        ack = seg.ack
        if seq_gt(ack, self.snd_max):
            self._count("rx_ack_too_new")
            self.ack_now = True
            return False
        if seq_lt(ack, (self.snd_una - self.max_snd_wnd) & MASK32):
            self._count("rx_ack_too_old")
            self.ack_now = True
            return False
        window = seg.window << self.peer_wscale
        if seq_gt(ack, self.snd_una):
            self._new_ack(ack, now)
        elif (ack == self.snd_una and not seg.payload and not seg.has(_FIN)
              and window == self.snd_wnd and window and self.snd_max != self.snd_una):
            self._duplicate_ack()
        if seq_lt(self.snd_wl1, seg.seq) or (self.snd_wl1 == seg.seq
                                             and seq_le(self.snd_wl2, ack)):
            if window and not self.snd_wnd:
                self.persist_deadline, self.persist_backoffs = None, 0
            self.snd_wnd, self.snd_wl1, self.snd_wl2 = window, seg.seq, ack
            self.max_snd_wnd = max(self.max_snd_wnd, window)
        return True

    def _new_ack(self, ack, now):
        acked = self.send_buffer.acknowledge(ack)       # data bytes (the FIN is not in it)
        fin_acked = self.fin_queued and ack == (self.fin_seq + 1) & MASK32
        self.fin_acked = fin_acked
        if seq_gt(ack, self.snd_nxt):
            self.snd_nxt = ack
        if self.timed and seq_ge(ack, self.timed[0]):
            self.rtt.sample(now - self.timed[1])
            self.timed = None
        self.rtt.reset_backoff()
        self.retries = 0
        self.persist_backoffs = 0
        cc = self.congestion
        if cc.in_recovery:
            if cc.on_ack_in_recovery(ack, acked):
                self._retransmit_first()
        else:
            cc.on_ack(acked)
        self.dup_acks = 0
        self.rto_deadline = (now + self.rtt.rto) if self.snd_una != self.snd_max else None
        if fin_acked:
            self._our_fin_acked(now)

    def _duplicate_ack(self):
        self.dup_acks += 1
        self._count("rx_dup_acks")
        cc = self.congestion
        if cc.in_recovery:
            cc.on_dup_ack_in_recovery()
        elif self.dup_acks == 3:
            self._count("fast_retransmits")
            cc.enter_recovery(seq_diff(self.snd_max, self.snd_una), self.snd_max)
            self._retransmit_first()

    def _retransmit_first(self):
        """Queue the segment at SND.UNA again (fast retransmit / NewReno partial ACK)."""
        self.retransmit_first = True

    def _our_fin_acked(self, now):
        if self.state == State.FIN_WAIT_1:
            self.state = State.FIN_WAIT_2
            if self.settings.fin_wait_2_timeout is not None:
                self.close_deadline = now + self.settings.fin_wait_2_timeout
        elif self.state == State.CLOSING:
            self._enter_time_wait(now)
        elif self.state == State.LAST_ACK:
            self._enter_closed(None)

    def _enter_time_wait(self, now):
        self.state = State.TIME_WAIT
        self.rto_deadline = self.persist_deadline = None
        self.close_deadline = now + self.settings.time_wait

    def _enter_closed(self, error):
        self.state = State.CLOSED
        self.error = error
        self.rto_deadline = self.delack_deadline = self.persist_deadline = None
        self.close_deadline = None

    def _process_data(self, seg, now):
        rb = self.receive_buffer
        if seg.payload:
            if self.state in _RECEIVING:
                filling_a_hole = bool(rb.held)
                delivered, out_of_order = rb.accept(seg.seq, seg.payload, self._receive_window())
                if delivered:
                    self._count("rx_bytes", delivered)
                elif not out_of_order:
                    self._count("rx_duplicate")
                if out_of_order:
                    self._count("rx_out_of_order")
                if out_of_order or not delivered or filling_a_hole:
                    self.ack_now = True     # RFC 5681 4.2: at once for these
                else:
                    self.unacked_segments += 1
                    if self.unacked_segments >= 2 or not self.settings.delayed_ack:
                        self.ack_now = True
                    elif self.delack_deadline is None:
                        self.delack_deadline = now + self.settings.delayed_ack
            else:
                self._count("rx_data_after_fin")
                self.ack_now = True
        if seg.has(_FIN):
            rb.note_fin((seg.seq + len(seg.payload)) & MASK32)
            self.ack_now = True
        if rb.fin_in_order() and not self.peer_fin:
            rb.take_fin()
            self.peer_fin = True
            self.ack_now = True
            if self.state == State.ESTABLISHED:
                self.state = State.CLOSE_WAIT
            elif self.state == State.FIN_WAIT_1:
                self.state = State.CLOSING
            elif self.state == State.FIN_WAIT_2:
                self._enter_time_wait(now)
        elif self.state == State.TIME_WAIT and seg.has(_FIN):
            self.close_deadline = now + self.settings.time_wait

    # ------------------------------------------------------------------ transmit
    def _tsval(self):
        return (self.settings.ts_clock() + self.ts_offset) & MASK32

    def _ack_seq(self):
        """SEQ of a segment without data: SND.MAX (after a go-back-N retransmission
        SND.NXT may lie before the peer's RCV.NXT, which would make the ACK
        unacceptable), but not beyond the peer's window (Linux's tcp_acceptable_seq)."""
        window_end = (self.snd_una + self.snd_wnd) & MASK32
        return self.snd_max if seq_le(self.snd_max, window_end) else window_end

    def _window_field(self):
        """The window field to send now: the free buffer space, scaled, never shrinking
        the right edge we advertised before."""
        shift = self.local_wscale
        free = self.receive_buffer.free
        promised = seq_diff(self.rcv_adv, self.rcv_nxt)
        value = max(free >> shift, (promised + (1 << shift) - 1) >> shift if promised > 0 else 0)
        return min(value, 0xFFFF)

    def _frame(self, seq, flags, payload=b"", window=None, timestamp=True):
        if flags & _ACK:
            if window is None:
                window = self._window_field()
                edge = (self.rcv_nxt + (window << self.local_wscale)) & MASK32
                if seq_gt(edge, self.rcv_adv):
                    self.rcv_adv = edge
            self.last_ack_sent = self.rcv_nxt
            self.ack_now = False
            self.unacked_segments = 0
            self.delack_deadline = None
        ts = (self._tsval(), self.ts_recent) if self.ts_ok and timestamp else None
        self._count("tx_segments")
        return build_segment(
            eth_dst=self.peer_mac, eth_src=self.local_mac, ip_src=self.local_ip,
            ip_dst=self.peer_ip, sport=self.local_port, dport=self.peer_port, seq=seq,
            ack=self.rcv_nxt, flags=flags, window=window or 0, payload=payload, timestamp=ts,
            ttl=self.settings.ttl)

    def _data_segment(self, seq, count, now):
        """The segment of ``count`` bytes at ``seq`` (FIN added when it reaches the end
        and the FIN is queued); advances SND.NXT / SND.MAX."""
        payload = self.send_buffer.bytes_at(seq, count)
        end = (seq + len(payload)) & MASK32
        flags = _ACK | (_PSH if payload and end == self.send_buffer.end else 0)
        if self.fin_queued and end == self.fin_seq:
            flags |= _FIN
            end = (end + 1) & MASK32
            if self.state == State.ESTABLISHED:
                self.state = State.FIN_WAIT_1
            elif self.state == State.CLOSE_WAIT:
                self.state = State.LAST_ACK
        if seq_lt(seq, self.snd_max):
            self._count("retransmits")
            if self.timed and seq_lt(seq, self.timed[0]):
                self.timed = None                       # Karn: not a clean sample any more
        elif self.timed is None:
            self.timed = (end, now)
        if seq_gt(end, self.snd_nxt):
            self.snd_nxt = end
        if seq_gt(end, self.snd_max):
            self.snd_max = end
        if self.rto_deadline is None:
            self.rto_deadline = now + self.rtt.rto
        return self._frame(seq, flags, payload)

    def poll(self, now):
        """Frames to send now (timers that expired first). Call after every other call
        and at ``next_deadline()``."""
        out = []
        if self.pending_rst is not None:
            out.append(self.pending_rst)
            self.pending_rst = None
        if self.closed:
            return out
        self._run_timers(now, out)
        if self.closed:
            return out
        if self.retransmit_first:
            self.retransmit_first = False
            count = min(self.mss, len(self.send_buffer))
            if count or self.fin_queued:
                out.append(self._data_segment(self.snd_una, count, now))
        self._send_data(now, out)
        if self.ack_now and self.state != State.CLOSED:
            out.append(self._frame(self._ack_seq(), _ACK))
        elif self._window_update_due():
            self._count("window_updates")
            out.append(self._frame(self._ack_seq(), _ACK))
        return out

    def _send_data(self, now, out):
        if self.state not in (State.ESTABLISHED, State.CLOSE_WAIT, State.FIN_WAIT_1,
                              State.LAST_ACK, State.CLOSING):
            return
        while True:
            remaining = self.send_buffer.after(self.snd_nxt)
            fin_due = (self.fin_queued and remaining == 0
                       and seq_le(self.snd_nxt, self.fin_seq))
            if remaining == 0 and not fin_due:
                return
            flight = seq_diff(self.snd_nxt, self.snd_una)
            usable = min(self.snd_wnd, self.congestion.window) - flight
            count = min(self.mss, remaining, max(usable, 0))
            if remaining and count < remaining and count < self.mss and (
                    count == 0 or count < self.max_snd_wnd // 2):
                if flight == 0:                 # nothing will ACK us: probe on a timer
                    self._arm_persist(now)
                return
            out.append(self._data_segment(self.snd_nxt, count, now))

    def _arm_persist(self, now):
        if self.persist_deadline is None:
            interval = min(self.rtt.base_rto * (1 << min(self.persist_backoffs, 30)),
                           self.settings.max_rto)
            self.persist_deadline = now + interval

    def _window_update_due(self):
        """Reading made room (RFC 9293 receiver SWS avoidance, with Linux's rule of
        thumb): tell the peer when the window we can offer moved the right edge by at
        least min(buffer / 2, one MSS) and is at least twice what the peer still sees."""
        if self.state not in _RECEIVING or self.peer_fin:
            return False
        seen = max(0, seq_diff(self.rcv_adv, self.rcv_nxt))
        offer = self._window_field() << self.local_wscale
        return (offer - seen >= min(self.receive_buffer.capacity // 2, self.mss)
                and offer >= 2 * seen)

    def _run_timers(self, now, out):
        if self.close_deadline is not None and now >= self.close_deadline:
            self._count("fin_wait_2_timeouts" if self.state == State.FIN_WAIT_2
                        else "time_wait_done")
            self._enter_closed(None if self.state == State.TIME_WAIT else "timeout")
            return
        if self.rto_deadline is not None and now >= self.rto_deadline:
            self._retransmission_timeout(now, out)
            if self.closed:
                return
        if self.persist_deadline is not None and now >= self.persist_deadline:
            self.persist_deadline = None
            remaining = self.send_buffer.after(self.snd_nxt)
            if remaining and self.snd_wnd == 0:
                # Zero window: Linux's probe, an ACK with SEQ = SND.UNA - 1 (an old
                # sequence number): the peer must answer it with an ACK and its window.
                self._count("window_probes")
                out.append(self._frame((self.snd_una - 1) & MASK32, _ACK))
                self.persist_backoffs += 1
                self._arm_persist(now)
            elif remaining:
                # A window too small for the sender's SWS rule, and no ACK to wait for:
                # send what fits (RFC 9293 3.8.6.2.1's override timeout).
                self._count("small_window_sends")
                usable = self.snd_wnd - seq_diff(self.snd_nxt, self.snd_una)
                out.append(self._data_segment(self.snd_nxt, min(self.mss, remaining,
                                                                max(usable, 1)), now))
        if self.delack_deadline is not None and now >= self.delack_deadline:
            self.delack_deadline = None
            self.ack_now = True

    def _retransmission_timeout(self, now, out):
        self.rto_deadline = None
        if self.snd_una == self.snd_max:
            return
        if self.snd_wnd == 0:
            # What is in flight lies beyond a closed window: not a loss; the persist
            # timer takes over (the bytes are sent again once the window opens).
            self._count("rto_zero_window")
            self.snd_nxt, self.timed = self.snd_una, None
            self._arm_persist(now)
            return
        self.retries += 1
        self._count("rto_expired")
        if self.retries > self.settings.max_retries:
            self._count("aborted_timeout")
            out.append(self._frame(self._ack_seq(), _RST | _ACK, window=0, timestamp=False))
            self._enter_closed("timeout")
            return
        self.congestion.on_timeout(seq_diff(self.snd_max, self.snd_una))
        self.rtt.back_off()
        self.timed = None
        self.dup_acks = 0
        self.snd_nxt = self.snd_una                     # go back to the first unacknowledged
        count = min(self.mss, len(self.send_buffer))
        out.append(self._data_segment(self.snd_una, count, now))
        self.rto_deadline = now + self.rtt.rto

    def next_deadline(self):
        """The earliest time ``poll`` must be called (seconds), or None."""
        deadlines = [d for d in (self.rto_deadline, self.delack_deadline, self.persist_deadline,
                                 self.close_deadline) if d is not None]
        return min(deadlines) if deadlines else None


def _check_fields(fields, layout):
    """The dict names exactly the layout's fields (the layout is the source of truth)."""
    names = {name for name, _ in layout}
    if set(fields) != names:
        raise AssertionError(f"fields {sorted(set(fields) ^ names)} differ from the layout")
