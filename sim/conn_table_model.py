"""Bit-exact Python reference model of hw.conn_table.ConnTable, at the level of commands.

``ConnTableModel`` applies the same hash (SipHash-2-4 of the flow key under the host's
hash key), the same bucket choice, the same random walk (the same xorshift32 draws), the
same stash policy, the same flow-index allocation (a LIFO of freed indices, then fresh
ones) and the same status codes as the RTL, so that after the same sequence of commands
it holds every entry in the same slot with the same flow index. The testbench checks the
RTL against it response by response; the host driver can use it to predict placement.

``fill_to_failure`` measures the occupancy at the first failed insert with random keys
(the bench's ``occupancy_at_first_failure_*``), hashing keys in bulk with numpy.
"""

import random
from dataclasses import dataclass, replace

from hw.conn_table import (FLOW_KEY, TABLES, WAYS, Geometry, Op, Status, flow_key_bytes,
                           RNG_SEED, xorshift32)
from hw.siphash import siphash24
from hw.stream import pack_struct

__all__ = ["ConnTableModel", "Response", "Entry", "fill_to_failure", "siphash24_batch",
           "random_keys", "pack_key"]


def pack_key(key):
    """A flow key as the flat integer of ``FLOW_KEY`` (from a dict or an int)."""
    return pack_struct(FLOW_KEY, **key) if isinstance(key, dict) else int(key)


@dataclass
class Entry:
    key: int          # flat FLOW_KEY integer
    value: int
    index: int        # flow index (stable for the entry's lifetime)
    alt: int = 0      # the entry's bucket in the other table (slots of the tables only)


@dataclass(frozen=True)
class Response:
    status: Status
    op: Op
    index: int = 0
    slot: int = 0
    key: int = 0
    value: int = 0


class ConnTableModel:
    """The connection table, one command at a time (see hw/conn_table.py and docs/)."""

    def __init__(self, entries=4096, value_width=32, stash=4, max_moves=256, hash_key=0):
        self.geo = Geometry(entries, stash, max_moves)
        self.value_width = value_width
        self.hash_key = hash_key
        self._hash_cache = {}
        self.reset()

    # --- state ------------------------------------------------------------------------
    def reset(self):
        """What a reset (or CLEAR) leaves: an empty table. The hash key survives CLEAR,
        but a hardware reset sets it to zero (call ``reset(); hash_key = 0``)."""
        g = self.geo
        self.tables = [[[None] * WAYS for _ in range(g.buckets)] for _ in range(TABLES)]
        self.stash = [None] * g.stash
        self.free = []                # LIFO of freed flow indices
        self.fresh = 0                # next never-used flow index
        self.count = 0
        self.rng = RNG_SEED
        self.moves = 0                # statistics: cuckoo moves of the last insert

    def hw_reset(self):
        self.reset()
        self.hash_key = 0
        self._hash_cache.clear()

    def _draw(self):
        self.rng = xorshift32(self.rng)
        return self.rng

    # --- hashing and addressing -------------------------------------------------------
    def hash(self, key):
        key = pack_key(key)
        h = self._hash_cache.get(key)
        if h is None:
            h = self._hash_cache[key] = siphash24(self.hash_key, flow_key_bytes(key))
        return h

    def buckets(self, key):
        return self.geo.buckets_of(self.hash(key))

    def slot_of(self, t, b, w):
        return self.geo.slot(t, b, w)

    def _find(self, key):
        """(slot, entry) of ``key``, or (None, None)."""
        b = self.buckets(key)
        for t in range(TABLES):
            for w, e in enumerate(self.tables[t][b[t]]):
                if e is not None and e.key == key:
                    return self.slot_of(t, b[t], w), e
        for s, e in enumerate(self.stash):
            if e is not None and e.key == key:
                return self.geo.entries + s, e
        return None, None

    def _peek_index(self):
        return self.free[-1] if self.free else self.fresh

    def _commit_index(self):
        if self.free:
            self.free.pop()
        else:
            self.fresh += 1
        self.count += 1

    # --- commands ---------------------------------------------------------------------
    def lookup(self, key):
        """(hit, flow index, value) as the lookup port returns it."""
        _, e = self._find(pack_key(key))
        return (1, e.index, e.value) if e else (0, 0, 0)

    def command(self, op, key=0, value=0, slot=0, hash_key=0):
        op = int(op)
        if op == Op.INSERT:
            return self.insert(key, value)
        if op == Op.DELETE:
            return self.delete(key)
        if op == Op.UPDATE:
            return self.update(key, value)
        if op == Op.READ:
            return self.read(slot)
        if op == Op.SET_KEY:
            return self.set_key(hash_key)
        if op == Op.CLEAR:
            return self.clear()
        return Response(Status.BAD_OP, op)

    def insert(self, key, value):
        g = self.geo
        key, value = pack_key(key), value & ((1 << self.value_width) - 1)
        self.moves = 0
        slot, e = self._find(key)
        if e is not None:
            return Response(Status.DUPLICATE, Op.INSERT, e.index, slot, key, e.value)
        if self.count == g.capacity:
            return Response(Status.FULL, Op.INSERT, 0, 0, key, value)
        b = self.buckets(key)
        index = self._peek_index()
        used = [sum(e is not None for e in self.tables[t][b[t]]) for t in range(TABLES)]
        if min(used) < WAYS:
            t = 0 if used[0] <= used[1] else 1
            w = self.tables[t][b[t]].index(None)
            self.tables[t][b[t]][w] = Entry(key, value, index, b[1 - t])
            self._commit_index()
            return Response(Status.OK, Op.INSERT, index, self.slot_of(t, b[t], w), key, value)
        # Random walk: the carried entry goes into bucket (t, dest); when the bucket is
        # full it takes a random way and the entry there becomes the carried one.
        t = self._draw() & 1
        carry, dest = Entry(key, value, index, b[1 - t]), b[t]
        undo = []                                   # (t, b, w, previous entry)
        new_slot = None
        while True:
            bucket = self.tables[t][dest]
            if None in bucket:
                w = bucket.index(None)
                bucket[w] = carry
                if carry.key == key:
                    new_slot = self.slot_of(t, dest, w)
                self._commit_index()
                return Response(Status.OK, Op.INSERT, index, new_slot, key, value)
            if len(undo) == g.max_moves:
                break
            w = self._draw() & (WAYS - 1)
            victim = bucket[w]
            undo.append((t, dest, w, victim))
            bucket[w] = carry
            if carry.key == key:
                new_slot = self.slot_of(t, dest, w)
            self.moves += 1
            carry, t, dest = replace(victim, alt=dest), 1 - t, victim.alt
        if None in self.stash:
            s = self.stash.index(None)
            self.stash[s] = carry
            if carry.key == key:
                new_slot = g.entries + s
            self._commit_index()
            return Response(Status.OK, Op.INSERT, index, new_slot, key, value)
        for t, dest, w, victim in reversed(undo):  # the hardware swaps back, step by step
            self.tables[t][dest][w] = victim
        return Response(Status.FULL, Op.INSERT, 0, 0, key, value)

    def _remove_or_update(self, op, key, value=None):
        key = pack_key(key)
        slot, e = self._find(key)
        if e is None:
            return Response(Status.NOT_FOUND, op, 0, 0, key, 0)
        if value is not None:
            e.value = value & ((1 << self.value_width) - 1)
        else:
            if slot >= self.geo.entries:
                self.stash[slot - self.geo.entries] = None
            else:
                t, b, w = self.geo.position(slot)
                self.tables[t][b][w] = None
            self.free.append(e.index)
            self.count -= 1
        return Response(Status.OK, op, e.index, slot, key, e.value)

    def delete(self, key):
        return self._remove_or_update(Op.DELETE, key)

    def update(self, key, value):
        return self._remove_or_update(Op.UPDATE, key, value)

    def read(self, slot):
        g = self.geo
        if not 0 <= slot < g.slots:
            return Response(Status.BAD_INDEX, Op.READ, 0, slot)
        if slot >= g.entries:
            e = self.stash[slot - g.entries]
        else:
            t, b, w = g.position(slot)
            e = self.tables[t][b][w]
        if e is None:
            return Response(Status.NOT_FOUND, Op.READ, 0, slot)
        return Response(Status.OK, Op.READ, e.index, slot, e.key, e.value)

    def set_key(self, hash_key):
        if self.count:
            return Response(Status.NOT_EMPTY, Op.SET_KEY)
        self.hash_key = hash_key & ((1 << 128) - 1)
        self._hash_cache.clear()
        return Response(Status.OK, Op.SET_KEY)

    def clear(self):
        self.reset()
        return Response(Status.OK, Op.CLEAR)

    # --- helpers for tests and the driver ---------------------------------------------
    def entries(self):
        """{key: (slot, index, value)} of every entry."""
        out = {}
        for slot in range(self.geo.slots):
            r = self.read(slot)
            if r.status == Status.OK:
                out[r.key] = (slot, r.index, r.value)
        return out


# ----------------------------------------------------------------------------- bulk hashing

def random_keys(rng, n):
    """``n`` distinct random flow keys (flat integers)."""
    keys = set()
    while len(keys) < n:
        keys.add(rng.getrandbits(FLOW_KEY.size))
    return list(keys)


def siphash24_batch(hash_key, keys, nbytes):
    """SipHash-2-4 of many ``nbytes``-byte messages (ints, little-endian) with numpy."""
    import numpy as np
    mask = (1 << 64) - 1
    k0, k1 = np.uint64(hash_key & mask), np.uint64(hash_key >> 64 & mask)
    nwords = nbytes // 8 + 1
    words = []
    for k in range(nwords):
        lo = 64 * k
        vals = [(key >> lo) & mask for key in keys]
        if k == nwords - 1:
            vals = [v & ((1 << (8 * (nbytes - 8 * k))) - 1) | (nbytes & 0xFF) << 56 for v in vals]
        words.append(np.array(vals, dtype=np.uint64))
    c = (0x736F6D6570736575, 0x646F72616E646F6D, 0x6C7967656E657261, 0x7465646279746573)
    n = len(keys)
    v0 = np.full(n, k0 ^ np.uint64(c[0]), dtype=np.uint64)
    v1 = np.full(n, k1 ^ np.uint64(c[1]), dtype=np.uint64)
    v2 = np.full(n, k0 ^ np.uint64(c[2]), dtype=np.uint64)
    v3 = np.full(n, k1 ^ np.uint64(c[3]), dtype=np.uint64)

    def rotl(x, b):
        return (x << np.uint64(b)) | (x >> np.uint64(64 - b))

    def sipround(v0, v1, v2, v3):
        v0 = v0 + v1; v1 = rotl(v1, 13) ^ v0; v0 = rotl(v0, 32)
        v2 = v2 + v3; v3 = rotl(v3, 16) ^ v2
        v0 = v0 + v3; v3 = rotl(v3, 21) ^ v0
        v2 = v2 + v1; v1 = rotl(v1, 17) ^ v2; v2 = rotl(v2, 32)
        return v0, v1, v2, v3

    with np.errstate(over="ignore"):
        for m in words:
            v3 = v3 ^ m
            for _ in range(2):
                v0, v1, v2, v3 = sipround(v0, v1, v2, v3)
            v0 = v0 ^ m
        v2 = v2 ^ np.uint64(0xFF)
        for _ in range(4):
            v0, v1, v2, v3 = sipround(v0, v1, v2, v3)
    return [int(x) for x in (v0 ^ v1 ^ v2 ^ v3)]


def fill_to_failure(entries, seed, stash=4, max_moves=256):
    """Insert random keys under a random hash key until the first insert fails; return
    (occupancy = entries held / slots in the tables, moves per insert list)."""
    rng = random.Random(seed)
    model = ConnTableModel(entries, value_width=1, stash=stash, max_moves=max_moves,
                           hash_key=rng.getrandbits(128))
    keys = random_keys(rng, model.geo.capacity + 1)
    hashes = siphash24_batch(model.hash_key, keys, FLOW_KEY.size // 8)
    model._hash_cache.update(zip(keys, hashes))
    moves = []
    for key in keys:
        if model.insert(key, 0).status != Status.OK:
            break
        moves.append(model.moves)
    return model.count / entries, moves
