"""SYN cookies: the format, declared once, and its bit-exact Python model.

A SYN cookie is the initial sequence number (ISS) of the SYN-ACK that the NIC sends for
an offloaded listener. The NIC keeps no state for the SYN: everything it needs when the
handshake's final ACK arrives is in the cookie (``ack - 1``) and, when the peer uses
timestamps, in the low bits of the timestamp value it echoes (``tsecr``).

ISS layout (``COOKIE_ISS``, bit 0 first)::

    bits 0-1   mss_index   the peer's MSS: the largest of Linux's table (536, 1300, 1440, 1460)
                           not above it, and 536 for anything below 1300
    bit  2     count_lsb   bit 0 of the coarse time counter when the cookie was made
    bit  3     key_gen     which of the two hash keys made it (the key generation's parity)
    bits 4-31  mac         28 bits of SipHash-2-4(key, COOKIE_MESSAGE)

The message (``COOKIE_MESSAGE``, 23 bytes) covers the connection (ingress port, both
addresses and ports), the peer's ISN, the full 32-bit coarse time counter, the MSS index
and the timestamp options. The final ACK is accepted when all 32 bits agree: the MSS
index, the counter (the current period when ``count_lsb`` matches the counter's bit 0,
else the previous one: a cookie lives between one and two periods), the key generation
(the previous key only for two periods after a rotation) and the 28-bit MAC recomputed
from the ACK. A forged ACK is accepted with probability 2**-28 per try.

Timestamp options (``ts_options``, 6 bits, as Linux's ``cookie_init_timestamp``): when
the peer and the listener both use timestamps, our SYN-ACK's TSval is
``(ts_clock & ~0x3F) | ts_options``, where bits 0-3 hold the peer's window scale
(``WSCALE_NONE`` = 0xF when window scaling is not used) and bit 4 says SACK is permitted.
The peer echoes TSval in every segment, so the final ACK's TSecr brings them back; they
are covered by the MAC, so a peer cannot change them either. Without timestamps there is
nowhere to keep them, and the NIC does not promise what it cannot remember: like Linux
with syncookies, the SYN-ACK then offers neither window scaling nor SACK (MSS only), and
``ts_options`` is 0 in the message.
"""

from amaranth.lib import data

from hw.siphash import siphash24

__all__ = ["MSS_TABLE", "WSCALE_NONE", "TS_SACK", "TS_OPTION_BITS", "MAX_WSCALE",
           "COOKIE_ISS", "COOKIE_MESSAGE", "DEFAULT_MSS", "mss_index", "ts_options",
           "decode_ts_options", "cookie_iss", "CookieKeys"]

#: Linux's SYN-cookie MSS table (net/ipv4/syncookies.c, ``msstab``).
MSS_TABLE = (536, 1300, 1440, 1460)
#: The MSS a peer that sends no MSS option gets (RFC 9293, 3.7.1).
DEFAULT_MSS = 536
#: ``ts_options`` bits 0-3 when the peer does not use window scaling.
WSCALE_NONE = 0xF
#: ``ts_options`` bit: the peer permits SACK.
TS_SACK = 1 << 4
#: Low bits of TSval that carry ``ts_options``.
TS_OPTION_BITS = 6
#: The largest window scale (RFC 7323, 2.3: larger values are used as 14).
MAX_WSCALE = 14

COOKIE_ISS = data.StructLayout({
    "mss_index": 2,
    "count_lsb": 1,
    "key_gen": 1,
    "mac": 28,
})

COOKIE_MESSAGE = data.StructLayout({
    "peer_ip": 32,
    "local_ip": 32,
    "peer_port": 16,
    "local_port": 16,
    "peer_isn": 32,
    "count": 32,
    "mss_index": 2,
    "ts_options": 6,
    "ts_ok": 1,
    "reserved": 7,
    "ingress": 8,
})
assert COOKIE_MESSAGE.size == 23 * 8


def mss_index(mss):
    """Index of the largest table MSS not above ``mss`` (0 for anything below 1300)."""
    for index in range(len(MSS_TABLE) - 1, 0, -1):
        if mss >= MSS_TABLE[index]:
            return index
    return 0


def ts_options(peer_wscale, sack_ok):
    """``ts_options`` for a peer window scale (None: not used) and SACK permission."""
    scale = WSCALE_NONE if peer_wscale is None else min(peer_wscale, MAX_WSCALE)
    return scale | (TS_SACK if sack_ok else 0)


def decode_ts_options(options):
    """(peer window scale or None, SACK permitted) from ``ts_options``."""
    scale = options & 0xF
    return (None if scale == WSCALE_NONE else scale), bool(options & TS_SACK)


def _message(*, ingress, peer_ip, local_ip, peer_port, local_port, peer_isn, count,
             mss_index, ts_ok, ts_options):
    fields = {"peer_ip": peer_ip, "local_ip": local_ip, "peer_port": peer_port,
              "local_port": local_port, "peer_isn": peer_isn, "count": count,
              "mss_index": mss_index, "ts_options": ts_options if ts_ok else 0,
              "ts_ok": int(bool(ts_ok)), "reserved": 0, "ingress": ingress}
    value = 0
    for name, field in COOKIE_MESSAGE:
        value |= (fields[name] & ((1 << field.width) - 1)) << field.offset
    return value.to_bytes(COOKIE_MESSAGE.size // 8, "little")


def cookie_iss(key, key_gen, *, count, mss_index, **connection):
    """The ISS (32-bit int) of a SYN-ACK. ``key`` is the 16-byte key (or its int),
    ``connection`` the other ``COOKIE_MESSAGE`` fields by name (``ts_ok``, ``ts_options``,
    ``ingress``, addresses, ports, ``peer_isn``)."""
    if isinstance(key, int):
        key = key.to_bytes(16, "little")
    digest = siphash24(key, _message(count=count & 0xFFFFFFFF, mss_index=mss_index,
                                     **connection))
    return (mss_index | (count & 1) << 2 | (key_gen & 1) << 3
            | (digest & ((1 << 28) - 1)) << 4)


class CookieKeys:
    """The NIC's two cookie keys, their rotation and the coarse counter (model).

    ``rotate(key)`` writes ``key`` into the slot of the other generation and makes it
    current; the previous key stays valid for ``2`` counter ticks (``tick()``), except
    after the first rotation: the all-zero key of a reset is public and never valid.
    Until a key has been set (``key_set``) the NIC does not offload.
    """

    PREVIOUS_KEY_TICKS = 2

    def __init__(self):
        self.keys = [0, 0]
        self.gen = 0
        self.previous_ticks = 0
        self.count = 0
        self.key_set = False

    def rotate(self, key):
        self.gen ^= 1
        self.keys[self.gen] = key if isinstance(key, int) else int.from_bytes(key, "little")
        self.previous_ticks = self.PREVIOUS_KEY_TICKS if self.key_set else 0
        self.key_set = True

    def tick(self):
        self.count = (self.count + 1) & 0xFFFFFFFF
        self.previous_ticks = max(0, self.previous_ticks - 1)

    def make(self, *, mss_index, **connection):
        """The cookie for a SYN now."""
        return cookie_iss(self.keys[self.gen], self.gen, count=self.count,
                          mss_index=mss_index, **connection)

    def check(self, iss, **connection):
        """For a final ACK whose ``ack - 1`` is ``iss``: the MSS index if the cookie is
        valid now, else None."""
        index, count_lsb, gen = iss & 3, (iss >> 2) & 1, (iss >> 3) & 1
        if gen != self.gen and not self.previous_ticks:
            return None
        count = self.count if (self.count & 1) == count_lsb else (self.count - 1) & 0xFFFFFFFF
        if cookie_iss(self.keys[gen], gen, count=count, mss_index=index, **connection) != iss:
            return None
        return index
