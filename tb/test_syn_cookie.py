"""Tests of hw.syn_cookie: the cookie format and its bit-exact model (pure Python).

The RTL is compared with this model, record by record, in ``tb/test_handshake.py``;
here the model itself is held to what ``docs/setup_offload.md`` promises: Linux's MSS
table, the timestamp-option encoding, the validity window and key rotation, every bit
of the cookie and every field of the message checked, and no forged ACK accepted.

``count_forged(n, seed)`` counts the forged final ACKs the model accepts out of ``n``;
the suite runs it for 200,000, the documented figure is one run by hand for 1,000,000::

    .venv/bin/python -c "from tb.test_syn_cookie import count_forged; print(count_forged(10**6, 1))"
"""

import random
from pathlib import Path

import pytest

from hw.syn_cookie import (COOKIE_ISS, COOKIE_MESSAGE, MAX_WSCALE, MSS_TABLE, TS_SACK,
                           WSCALE_NONE, CookieKeys, cookie_iss, decode_ts_options, mss_index,
                           ts_options)

MASK32 = 0xFFFFFFFF


def linux_mss_index(mss):
    """net/ipv4/syncookies.c, ``__cookie_v4_init_sequence``::

        for (mssind = ARRAY_SIZE(msstab) - 1; mssind ; mssind--)
            if (mss >= msstab[mssind])
                break;
    """
    msstab = [536, 1300, 1440, 1460]
    mssind = len(msstab) - 1
    while mssind:
        if mss >= msstab[mssind]:
            break
        mssind -= 1
    return mssind


# ----------------------------------------------------------------------------- format

def test_layouts():
    """The ISS and message layouts are the ones documented (bit 0 first)."""
    assert [(name, f.offset, f.width) for name, f in COOKIE_ISS] == [
        ("mss_index", 0, 2), ("count_lsb", 2, 1), ("key_gen", 3, 1), ("mac", 4, 28)]
    assert [(name, f.offset, f.width) for name, f in COOKIE_MESSAGE] == [
        ("peer_ip", 0, 32), ("local_ip", 32, 32), ("peer_port", 64, 16),
        ("local_port", 80, 16), ("peer_isn", 96, 32), ("count", 128, 32),
        ("mss_index", 160, 2), ("ts_options", 162, 6), ("ts_ok", 168, 1),
        ("reserved", 169, 7), ("ingress", 176, 8)]
    assert COOKIE_ISS.size == 32 and COOKIE_MESSAGE.size == 23 * 8


@pytest.mark.parametrize("mss, index", [
    (0, 0), (535, 0), (536, 0), (1299, 0), (1300, 1), (1439, 1), (1440, 2), (1459, 2),
    (1460, 3), (9000, 3)])
def test_mss_index(mss, index):
    assert mss_index(mss) == index == linux_mss_index(mss)
    assert MSS_TABLE == (536, 1300, 1440, 1460)


def test_mss_index_all_values():
    assert all(mss_index(mss) == linux_mss_index(mss) for mss in range(1 << 16))


def test_ts_options_round_trip():
    for sack in (False, True):
        for scale in range(MAX_WSCALE + 1):
            options = ts_options(scale, sack)
            assert options == scale | (TS_SACK if sack else 0)
            assert options < 1 << 6
            assert decode_ts_options(options) == (scale, sack)
        # Window scale 15 (and beyond) is used as 14 (RFC 7323, 2.3), so it never reads
        # back as "no window scaling".
        assert ts_options(15, sack) == ts_options(14, sack)
        assert decode_ts_options(ts_options(15, sack)) == (14, sack)
        assert decode_ts_options(ts_options(255, sack)) == (14, sack)
        # No window scaling.
        assert ts_options(None, sack) == WSCALE_NONE | (TS_SACK if sack else 0)
        assert decode_ts_options(ts_options(None, sack)) == (None, sack)


# ----------------------------------------------------------------------------- CookieKeys

def random_connection(rng, ts_ok=None):
    ts = bool(rng.getrandbits(1)) if ts_ok is None else ts_ok
    return {"ingress": rng.getrandbits(8), "peer_ip": rng.getrandbits(32),
            "local_ip": rng.getrandbits(32), "peer_port": rng.getrandbits(16),
            "local_port": rng.getrandbits(16), "peer_isn": rng.getrandbits(32),
            "ts_ok": ts, "ts_options": rng.getrandbits(6) if ts else 0}


def keys_with(rng, count=None):
    """Keys after one rotation (previous key: all zeros) and ``previous_ticks`` run out,
    unless the caller rotates again."""
    keys = CookieKeys()
    keys.count = rng.getrandbits(32) if count is None else count
    keys.rotate(rng.getrandbits(128))
    keys.tick()
    keys.tick()
    assert keys.previous_ticks == 0
    return keys


def test_cookie_fields():
    rng = random.Random(10)
    keys = keys_with(rng)
    for index in range(4):
        connection = random_connection(rng)
        iss = keys.make(mss_index=index, **connection)
        assert iss & 3 == index
        assert (iss >> 2) & 1 == keys.count & 1
        assert (iss >> 3) & 1 == keys.gen
        assert keys.check(iss, **connection) == index


@pytest.mark.parametrize("start", [0, 1, 0x7FFFFFFF, MASK32])   # the counter wraps too
def test_validity_window(start):
    """Valid now and one tick later (between one and two periods), not two ticks later."""
    rng = random.Random(start)
    keys = keys_with(rng, count=start)
    keys.count = start
    for _ in range(20):
        connection = random_connection(rng)
        index = rng.randrange(4)
        iss = keys.make(mss_index=index, **connection)
        saved = keys.count
        assert keys.check(iss, **connection) == index
        keys.tick()
        assert keys.check(iss, **connection) == index
        keys.tick()
        assert keys.check(iss, **connection) is None
        keys.tick()
        assert keys.check(iss, **connection) is None
        keys.count = saved


def test_key_rotation():
    """After ``rotate`` the previous key's cookies stay valid for 2 ticks, then never."""
    rng = random.Random(11)
    keys = keys_with(rng)
    connections = [random_connection(rng) for _ in range(20)]
    old = [keys.make(mss_index=2, **c) for c in connections]
    old_gen, old_key = keys.gen, keys.keys[keys.gen]
    keys.rotate(rng.getrandbits(128))
    assert keys.gen != old_gen
    assert all(keys.check(iss, **c) == 2 for iss, c in zip(old, connections))
    new = [keys.make(mss_index=1, **c) for c in connections]
    assert all((iss >> 3) & 1 == keys.gen for iss in new)
    keys.tick()
    assert all(keys.check(iss, **c) == 2 for iss, c in zip(old, connections))
    assert all(keys.check(iss, **c) == 1 for iss, c in zip(new, connections))
    later = [keys.make(mss_index=0, **c) for c in connections]
    # A cookie of the previous key made at this tick would be fresh enough; it is
    # accepted now (one tick after the rotation) ...
    fresh_old = [cookie_iss(old_key, old_gen, count=keys.count, mss_index=3, **c)
                 for c in connections]
    assert all(keys.check(iss, **c) == 3 for iss, c in zip(fresh_old, connections))
    keys.tick()
    # ... but two ticks after the rotation the previous key is retired: its cookies are
    # rejected although their time is still valid (a leaked key stops working).
    assert all(keys.check(iss, **c) is None for iss, c in zip(fresh_old, connections))
    assert all(keys.check(iss, **c) is None for iss, c in zip(old, connections))
    # The current key's cookies keep their own window.
    assert all(keys.check(iss, **c) is None for iss, c in zip(new, connections))
    assert all(keys.check(iss, **c) == 0 for iss, c in zip(later, connections))
    keys.tick()
    assert all(keys.check(iss, **c) is None for iss, c in zip(later, connections))


def test_rotate_twice():
    """Two rotations within two ticks: the key before the previous one is gone at once
    (its slot holds the new key)."""
    rng = random.Random(12)
    keys = keys_with(rng)
    c = random_connection(rng)
    first = keys.make(mss_index=0, **c)
    keys.rotate(rng.getrandbits(128))
    second = keys.make(mss_index=0, **c)
    keys.rotate(rng.getrandbits(128))
    assert keys.check(first, **c) is None
    assert keys.check(second, **c) == 0
    assert keys.check(keys.make(mss_index=0, **c), **c) == 0


def zero_key_forgery(keys, rng):
    """A cookie made with the all-zero key (the key slots' reset value, known to anyone)
    under the non-current generation: (cookie, connection)."""
    c = random_connection(rng)
    return cookie_iss(0, keys.gen ^ 1, count=keys.count, mss_index=3, **c), c


def test_first_rotation_does_not_accept_zero_key():
    """The reset value of the key slots (all zero) is public: after the first SET_KEY it
    is not a valid "previous" key."""
    rng = random.Random(17)
    keys = CookieKeys()
    keys.rotate(rng.getrandbits(128))
    iss, c = zero_key_forgery(keys, rng)
    assert keys.check(iss, **c) is None


def test_two_rotations_at_start_retire_zero_key():
    """Two SET_KEYs at start-up: both slots secret, the zero key still refused."""
    rng = random.Random(18)
    keys = CookieKeys()
    keys.rotate(rng.getrandbits(128))
    keys.rotate(rng.getrandbits(128))
    assert keys.keys[0] and keys.keys[1]
    for gen in (0, 1):
        c = random_connection(rng)
        assert keys.check(cookie_iss(0, gen, count=keys.count, mss_index=3, **c), **c) is None


@pytest.mark.parametrize("previous_live", [False, True])
def test_every_iss_bit_checked(previous_live):
    """Flipping any one of the 32 ISS bits invalidates the cookie, whether or not the
    other key generation is still accepted."""
    rng = random.Random(13 + previous_live)
    keys = keys_with(rng)
    if previous_live:
        keys.rotate(rng.getrandbits(128))
        assert keys.previous_ticks
    for _ in range(50):
        connection = random_connection(rng)
        iss = keys.make(mss_index=rng.randrange(4), **connection)
        assert keys.check(iss, **connection) is not None
        for bit in range(32):
            assert keys.check(iss ^ (1 << bit), **connection) is None, bit


#: How to change each message field of a connection.
FIELD_CHANGES = {
    "ingress": lambda c, rng: {"ingress": c["ingress"] ^ (1 << rng.randrange(8))},
    "peer_ip": lambda c, rng: {"peer_ip": c["peer_ip"] ^ (1 << rng.randrange(32))},
    "local_ip": lambda c, rng: {"local_ip": c["local_ip"] ^ (1 << rng.randrange(32))},
    "peer_port": lambda c, rng: {"peer_port": c["peer_port"] ^ (1 << rng.randrange(16))},
    "local_port": lambda c, rng: {"local_port": c["local_port"] ^ (1 << rng.randrange(16))},
    "peer_isn": lambda c, rng: {"peer_isn": c["peer_isn"] ^ (1 << rng.randrange(32))},
    # With timestamps, the options come back in TSecr: any change is detected.
    "ts_options": lambda c, rng: {"ts_options": c["ts_options"] ^ (1 << rng.randrange(6))},
    # Timestamps dropped in the final ACK (TSecr no longer brings the options).
    "ts_ok": lambda c, rng: {"ts_ok": False, "ts_options": 0},
}


@pytest.mark.parametrize("field", sorted(FIELD_CHANGES))
def test_every_message_field_checked(field):
    rng = random.Random(field)
    keys = keys_with(rng)
    for _ in range(200):
        connection = random_connection(rng, ts_ok=True)
        iss = keys.make(mss_index=rng.randrange(4), **connection)
        changed = {**connection, **FIELD_CHANGES[field](connection, rng)}
        assert changed != connection
        assert keys.check(iss, **changed) is None, changed


def test_ts_ok_added_checked():
    """A cookie made without timestamps does not validate for an ACK with timestamps."""
    rng = random.Random(14)
    keys = keys_with(rng)
    for _ in range(200):
        connection = random_connection(rng, ts_ok=False)
        iss = keys.make(mss_index=rng.randrange(4), **connection)
        assert keys.check(iss, **{**connection, "ts_ok": True,
                                  "ts_options": rng.getrandbits(6)}) is None


def test_ts_options_ignored_without_timestamps():
    """Without timestamps the message carries ts_options = 0 whatever is passed: there is
    no TSecr to bring options back (the engine then offers MSS only)."""
    rng = random.Random(15)
    keys = keys_with(rng)
    connection = random_connection(rng, ts_ok=False)
    iss = keys.make(mss_index=1, **connection)
    assert keys.check(iss, **{**connection, "ts_options": 0x3F}) == 1


# ----------------------------------------------------------------------------- forgeries

def count_forged(n, seed=0):
    """Forged final ACKs: ``n`` random ISS values (``ack - 1``), each for its own random
    connection (addresses, ports, ingress, peer ISN, with or without timestamps and random
    TSecr options), checked by the model while both key generations are accepted (right
    after a rotation, the attacker's best case). Returns how many are accepted."""
    rng = random.Random(seed)
    keys = CookieKeys()
    keys.count = rng.getrandbits(32)
    keys.rotate(rng.getrandbits(128))
    keys.rotate(rng.getrandbits(128))
    assert keys.previous_ticks and keys.keys[0] and keys.keys[1]
    accepted = 0
    check, getrandbits = keys.check, rng.getrandbits
    for _ in range(n):
        ts_ok = bool(getrandbits(1))
        if check(getrandbits(32), ingress=getrandbits(8), peer_ip=getrandbits(32),
                 local_ip=getrandbits(32), peer_port=getrandbits(16),
                 local_port=getrandbits(16), peer_isn=getrandbits(32), ts_ok=ts_ok,
                 ts_options=getrandbits(6) if ts_ok else 0) is not None:
            accepted += 1
    return accepted


def test_forged_acks():
    """200,000 forged ACKs: none accepted (expected 200,000 / 2**28 = 0.0007)."""
    assert count_forged(200_000, seed=2026) == 0


def test_genuine_acks_counted():
    """The same loop accepts genuine cookies (so a zero above is not a broken check)."""
    rng = random.Random(16)
    keys = CookieKeys()
    keys.rotate(rng.getrandbits(128))
    accepted = 0
    for _ in range(1000):
        c = random_connection(rng)
        if keys.check(keys.make(mss_index=rng.randrange(4), **c), **c) is not None:
            accepted += 1
    assert accepted == 1000


# ----------------------------------------------------------------------------- docs

def test_docs_code_tables():
    """docs/setup_offload.md lists every Reason and ControlOp with its value."""
    from hw.handshake import ControlOp, Reason
    text = (Path(__file__).resolve().parent.parent / "docs" / "setup_offload.md").read_text()
    for enum in (Reason, ControlOp):
        for code in enum:
            assert f"| {code.value} | `{code.name}` |" in text, code
