"""The parts of a host TCP connection that have one concern each.

* ``RttEstimator``: RFC 6298 retransmission timeout (SRTT, RTTVAR, backoff).
* ``RenoCongestion``: RFC 5681 congestion window in bytes (slow start, congestion
  avoidance, fast retransmit / recovery with RFC 6582 NewReno partial ACKs).
* ``SendBuffer``: the bytes from SND.UNA on: sent-not-acknowledged, then not sent yet.
* ``ReceiveBuffer``: in-order bytes the application has not read, and out-of-order
  segments held until the hole before them is filled.

Sequence numbers are absolute 32-bit TCP sequence numbers (``host_driver.segment.seq_*``).
"""

from host_driver.segment import MASK32, seq_diff, seq_le, seq_lt

__all__ = ["RttEstimator", "RenoCongestion", "SendBuffer", "ReceiveBuffer"]


class RttEstimator:
    """RFC 6298. Times are seconds. ``rto`` is the current timeout (with backoff)."""

    #: The clock granularity G of RFC 6298 (seconds).
    GRANULARITY = 0.001

    def __init__(self, initial_rto=1.0, min_rto=0.2, max_rto=60.0):
        self.min_rto, self.max_rto = min_rto, max_rto
        self.srtt = None                # smoothed round-trip time
        self.rttvar = None              # its variation
        self.base_rto = initial_rto     # the timeout before backoff
        self.backoffs = 0               # consecutive expirations (each doubles the timeout)

    @property
    def rto(self):
        return min(self.base_rto * (1 << self.backoffs), self.max_rto)

    def sample(self, rtt):
        """One RTT measurement (Karn: never of a retransmitted segment)."""
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        rto = self.srtt + max(self.GRANULARITY, 4 * self.rttvar)
        self.base_rto = min(max(rto, self.min_rto), self.max_rto)

    def back_off(self):
        """The timer expired: double the timeout (RFC 6298 5.5), up to ``max_rto``."""
        if self.rto < self.max_rto:
            self.backoffs += 1

    def reset_backoff(self):
        """New data was acknowledged."""
        self.backoffs = 0


class RenoCongestion:
    """RFC 5681 with NewReno recovery (RFC 6582), in bytes. ``mss``: payload bytes per
    full segment. ``enabled`` = False keeps the window unlimited (the peer's window alone
    limits the sender)."""

    def __init__(self, mss, enabled=True):
        self.mss = mss
        self.enabled = enabled
        self.cwnd = min(4 * mss, max(2 * mss, 4380))     # RFC 5681 initial window
        self.ssthresh = 1 << 30
        self.in_recovery = False
        self.recover = 0                # SND.MAX when fast recovery started

    @property
    def window(self):
        return self.cwnd if self.enabled else 1 << 30

    def on_ack(self, acked):
        """``acked`` new bytes acknowledged outside recovery."""
        if self.cwnd < self.ssthresh:
            self.cwnd += min(acked, self.mss)
        else:
            self.cwnd += max(1, self.mss * self.mss // self.cwnd)

    def on_timeout(self, flight):
        """The retransmission timer expired (RFC 5681 eq. 4, then one segment)."""
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.mss
        self.in_recovery = False

    def enter_recovery(self, flight, snd_max):
        """Third duplicate ACK: fast retransmit, then fast recovery."""
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.ssthresh + 3 * self.mss
        self.in_recovery, self.recover = True, snd_max

    def on_dup_ack_in_recovery(self):
        self.cwnd += self.mss

    def on_ack_in_recovery(self, ack, acked):
        """A new ACK during recovery. True: a partial ACK (retransmit the next hole)."""
        if seq_lt(ack, self.recover):
            self.cwnd = max(self.cwnd - acked + self.mss, self.mss)
            return True
        self.cwnd = self.ssthresh
        self.in_recovery = False
        return False


class SendBuffer:
    """Bytes ``[una, una + len)``: sent and not acknowledged, then queued and not sent."""

    def __init__(self, una):
        self.una = una
        self.data = bytearray()

    @property
    def end(self):
        """Sequence number after the last queued byte."""
        return (self.una + len(self.data)) & MASK32

    def __len__(self):
        return len(self.data)

    def append(self, data):
        self.data += data

    def acknowledge(self, ack):
        """Drop the bytes before ``ack`` (clamped to the buffer); returns how many."""
        count = max(0, min(seq_diff(ack, self.una), len(self.data)))
        del self.data[:count]
        self.una = (self.una + count) & MASK32
        return count

    def bytes_at(self, seq, count):
        """Up to ``count`` queued bytes from sequence number ``seq``."""
        start = seq_diff(seq, self.una)
        return bytes(self.data[start:start + count])

    def after(self, seq):
        """Queued bytes from ``seq`` to the end."""
        return max(0, len(self.data) - seq_diff(seq, self.una))


class ReceiveBuffer:
    """In-order bytes not read yet (``unread``) and held out-of-order segments. ``nxt`` is
    RCV.NXT (the next in-order sequence number); ``capacity`` bounds the window."""

    def __init__(self, nxt, capacity):
        self.nxt = nxt
        self.capacity = capacity
        self.unread = bytearray()
        self.held = {}                  # seq -> bytes, out of order, after nxt
        self.fin_seq = None             # the peer's FIN, seen but maybe not yet in order

    @property
    def free(self):
        return max(0, self.capacity - len(self.unread))

    @property
    def held_bytes(self):
        return sum(len(d) for d in self.held.values())

    def read(self, count=None):
        count = len(self.unread) if count is None else min(count, len(self.unread))
        out = bytes(self.unread[:count])
        del self.unread[:count]
        return out

    def accept(self, seq, payload, window):
        """Take a segment's payload (any position; trimmed to ``[nxt, nxt + window)``).
        Returns (bytes delivered in order, whether the payload was out of order)."""
        offset = seq_diff(self.nxt, seq)
        if offset > 0:                  # starts before RCV.NXT: drop the old part
            payload, seq = payload[offset:], self.nxt
        payload = payload[:max(0, window - seq_diff(seq, self.nxt))]
        if not payload:
            return 0, False
        if seq != self.nxt:
            if len(self.held.get(seq, b"")) < len(payload):
                self.held[seq] = payload
            return 0, True
        self.unread += payload
        delivered = len(payload)
        self.nxt = (self.nxt + delivered) & MASK32
        delivered += self._drain_held()
        return delivered, False

    def _drain_held(self):
        """Move held segments that now start at or before ``nxt`` into ``unread``."""
        delivered = 0
        while self.held:
            progress = False
            for seq in list(self.held):
                data = self.held[seq]
                if seq_le(seq, self.nxt):
                    del self.held[seq]
                    tail = data[seq_diff(self.nxt, seq):]
                    if tail:
                        self.unread += tail
                        self.nxt = (self.nxt + len(tail)) & MASK32
                        delivered += len(tail)
                    progress = True
            if not progress:
                break
        return delivered

    def fin_in_order(self):
        """The peer's FIN is the next thing in sequence."""
        return self.fin_seq is not None and self.fin_seq == self.nxt and not self.held

    def take_fin(self):
        self.nxt = (self.nxt + 1) & MASK32
        self.fin_seq = None

    def note_fin(self, seq):
        """A FIN at sequence number ``seq`` (after the segment's payload)."""
        if self.fin_seq is None and not seq_lt(seq, self.nxt):
            self.fin_seq = seq
