"""SipHash-2-4 (Aumasson and Bernstein, 2012): a keyed 64-bit hash, fully pipelined.

``siphash24(key, message)`` is the bit-exact Python model (bytes in, int out, as in the
reference implementation: the 16-byte key is k0 || k1 little-endian, the output is the
64-bit integer whose little-endian bytes are the reference digest).

``SipHash(message_bits)`` hashes a fixed-length message of ``message_bits // 8`` bytes
(byte ``i`` of the message is ``message[8*i:8*i+8]``) with the 128-bit ``key`` input
(byte ``i`` of the key is ``key[8*i:8*i+8]``), one message per clock.

Structure: a SipRound is two dependent halves, each one 64-bit addition followed by
rotations and XORs; every pipeline stage is one half round (one carry chain and one XOR
level), so that it meets 156.25 MHz on an ECP5 -8. A message of ``n`` bytes has
``w = n // 8 + 1`` words (the last one carries the length byte), hence ``2*2*w`` half
rounds of compression and ``2*4`` of finalisation.

Latency: ``LATENCY = 1 + 4*w + 8 + 1`` cycles (input register, half rounds, output XOR)
from an accepted message to its hash (18 for a 13-byte connection key). Throughput:
one hash per cycle while ``o`` is ready. The key is sampled in the input stage, so a
key change applies to messages accepted from then on.

Ports
  key  In(128)                        the secret key, settable at any time
  i    In(stream of message_bits)     messages
  o    Out(stream of 64)              hashes, in order

``i.ready`` is a credit check (messages in flight + the output FIFO below
``fifo_depth``), so the pipeline itself never stalls. ``siphash_pipeline`` is the bare
valid-only pipeline for blocks that embed it (``hw.conn_table``); ``siphash_iterative``
computes the same hash with the same latency on one set of registers (one half round per
cycle), for a user that starts at most one message per ``LATENCY`` cycles.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

__all__ = ["siphash24", "SipHash", "siphash_pipeline", "siphash_iterative", "siphash_latency"]

_MASK = (1 << 64) - 1
_C = (0x736F6D6570736575, 0x646F72616E646F6D, 0x6C7967656E657261, 0x7465646279746573)


# ----------------------------------------------------------------------------- Python model

def _rotl(x, b):
    return ((x << b) | (x >> (64 - b))) & _MASK


def _half_a(v0, v1, v2, v3):
    v0 = (v0 + v1) & _MASK
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = (v2 + v3) & _MASK
    v3 = _rotl(v3, 16) ^ v2
    return v0, v1, v2, v3


def _half_b(v0, v1, v2, v3):
    v0 = (v0 + v3) & _MASK
    v3 = _rotl(v3, 21) ^ v0
    v2 = (v2 + v1) & _MASK
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def message_words(message):
    """The 64-bit words SipHash compresses for ``message`` (bytes), the length word last."""
    n = len(message)
    tail = n & ~7
    words = [int.from_bytes(message[k:k + 8], "little") for k in range(0, tail, 8)]
    words.append(int.from_bytes(message[tail:], "little") | ((n & 0xFF) << 56))
    return words


def siphash24(key, message):
    """SipHash-2-4 of ``message`` (bytes) under ``key`` (16 bytes or a 128-bit int)."""
    if isinstance(key, int):
        key = key.to_bytes(16, "little")
    k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:16], "little")
    v = [k0 ^ _C[0], k1 ^ _C[1], k0 ^ _C[2], k1 ^ _C[3]]
    for m in message_words(bytes(message)):
        v[3] ^= m
        for _ in range(2):
            v = list(_half_b(*_half_a(*v)))
        v[0] ^= m
    v[2] ^= 0xFF
    for _ in range(4):
        v = list(_half_b(*_half_a(*v)))
    return v[0] ^ v[1] ^ v[2] ^ v[3]


# ----------------------------------------------------------------------------- RTL

def _r(x, b):
    return Cat(x[64 - b:], x[:64 - b])     # rotate left by b


def _hw_half(v, which):
    v0, v1, v2, v3 = v
    if which == "a":
        s0 = (v0 + v1)[:64]
        s2 = (v2 + v3)[:64]
        return [_r(s0, 32), _r(v1, 13) ^ s0, s2, _r(v3, 16) ^ s2]
    s0 = (v0 + v3)[:64]
    s2 = (v2 + v1)[:64]
    return [s0, _r(v1, 17) ^ s2, _r(s2, 32), _r(v3, 21) ^ s0]


def siphash_latency(message_bits):
    words = message_bits // 64 + 1
    return 1 + 4 * words + 8 + 1


def _words(message):
    """The 64-bit words of a whole-byte message, the length byte in the last one."""
    nbits = len(message)
    assert nbits % 8 == 0, "SipHash messages are whole bytes"
    nbytes = nbits // 8
    nwords = nbytes // 8 + 1
    words = []
    for k in range(nwords):
        lo, hi = 64 * k, min(64 * k + 64, nbits)
        word = message[lo:hi] if hi > lo else Const(0, 0)
        if k == nwords - 1:
            word = Cat(word, Const(0, 56 - (hi - lo) if hi > lo else 56), Const(nbytes & 0xFF, 8))
        words.append(word)
    return words


def siphash_iterative(m, name, start, key, message):
    """Add an iterative SipHash-2-4 unit to module ``m``: one half round per cycle.

    ``key`` and ``message`` are sampled in the cycle ``start`` is high; returns
    ``(hash_valid, hash)``: ``hash_valid`` is high for one cycle ``siphash_latency(len)``
    cycles later (as with ``siphash_pipeline``) and ``hash`` holds the result in that
    cycle. ``start`` must not be high again before ``hash_valid`` has been (one message at
    a time). About a tenth of the pipeline's size: four 64-bit adders and the state.
    """
    words = _words(message)
    nwords = len(words)
    halves = 4 * nwords + 8
    # run[j] is high in the cycle that computes half round j + 1 (run[halves]: the output).
    run = Signal(halves + 1, name=f"{name}_run")
    m.d.sync += run.eq(Cat(start, run[:-1]))
    v = [Signal(64, name=f"{name}_v{j}") for j in range(4)]
    msg = [Signal(64, name=f"{name}_m{k}") for k in range(nwords)]
    # Registered one cycle ahead: the half round of the next cycle is a "b" half, and the
    # XORs after it (a word's last half round folds that word into v0 and the next word
    # into v3, or 0xFF into v2 after the last word).
    half_b = Signal(name=f"{name}_half_b")
    mask0, mask2, mask3 = (Signal(64, name=f"{name}_mask{j}") for j in (0, 2, 3))
    m.d.sync += half_b.eq(Cat(*[run[j] for j in range(0, halves, 2)]).any())
    word_last = [run[4 * k + 2] for k in range(nwords)]     # the cycle before half 4k + 4
    m.d.sync += [
        mask0.eq(Mux(Cat(*word_last).any(), msg[0], 0)),
        mask3.eq(Mux(Cat(*word_last[:-1]).any(), msg[1] if nwords > 1 else 0, 0)),
        mask2.eq(Mux(word_last[-1], 0xFF, 0)),
    ]
    va, vb = _hw_half(v, "a"), _hw_half(v, "b")
    nv = [Mux(half_b, b, a) for a, b in zip(va, vb)]
    nv[0] = nv[0] ^ mask0
    nv[2] = nv[2] ^ mask2
    nv[3] = nv[3] ^ mask3
    k0, k1 = key[:64], key[64:128]
    init = [k0 ^ _C[0], k1 ^ _C[1], k0 ^ _C[2], k1 ^ _C[3] ^ words[0]]
    m.d.sync += [x.eq(Mux(start, i, n)) for x, i, n in zip(v, init, nv)]
    # The words, shifted after each word's last half round (msg[0]: the current word).
    shift = Cat(*[run[4 * k + 3] for k in range(nwords)]).any()
    with m.If(start):
        m.d.sync += [x.eq(w) for x, w in zip(msg, words)]
    with m.Elif(shift):
        m.d.sync += [msg[k].eq(msg[k + 1]) for k in range(nwords - 1)]
    out = Signal(64, name=f"{name}_out")
    valid = Signal(name=f"{name}_valid")
    m.d.sync += [out.eq(v[0] ^ v[1] ^ v[2] ^ v[3]), valid.eq(run[halves])]
    assert halves + 2 == siphash_latency(len(message))
    return valid, out


def siphash_pipeline(m, name, valid, key, message):
    """Add a SipHash-2-4 pipeline to module ``m``.

    ``valid``, ``key`` (128 bits) and ``message`` (a multiple of 8 bits) are sampled
    every cycle; returns ``(hash_valid, hash)``, registers valid ``siphash_latency(len)``
    cycles later. The pipeline never stalls.
    """
    nbits = len(message)
    words = _words(message)
    nwords = len(words)

    def reg(value, tag, width=64):
        r = Signal(width, name=f"{name}_{tag}")
        m.d.sync += r.eq(value)
        return r

    # Stage 0: register the initial state (key ^ constants) and the words.
    k0, k1 = key[:64], key[64:128]
    valid_r = reg(valid, "valid_s1", 1)
    v = [reg(k0 ^ _C[0], "v0_s1"), reg(k1 ^ _C[1], "v1_s1"), reg(k0 ^ _C[2], "v2_s1"),
         reg(k1 ^ _C[3], "v3_s1")]
    pending = [reg(w, f"m{k}_s1") for k, w in enumerate(words)]
    stage = 1
    schedule = []                        # (word index or None, half, first, last)
    for k in range(nwords):
        for h in range(4):
            schedule.append((k, "ab"[h % 2], h == 0, h == 3))
    for h in range(8):
        schedule.append((None, "ab"[h % 2], h == 0, False))
    for k, half, first, last in schedule:
        v = list(v)
        if k is not None and first:
            v[3] = v[3] ^ pending[0]
        if k is None and first:
            v[2] = v[2] ^ 0xFF
        v = _hw_half(v, half)
        if k is not None and last:
            v[0] = v[0] ^ pending[0]
        stage += 1
        v = [reg(x, f"v{j}_s{stage}") for j, x in enumerate(v)]
        valid_r = reg(valid_r, f"valid_s{stage}", 1)
        if k is not None and last:
            pending = pending[1:]
        pending = [reg(w, f"m{j}_s{stage}") for j, w in enumerate(pending)]
    stage += 1
    out = reg(v[0] ^ v[1] ^ v[2] ^ v[3], "out")
    valid_r = reg(valid_r, "valid_out", 1)
    assert stage == siphash_latency(nbits), (stage, siphash_latency(nbits))
    return valid_r, out


class SipHash(wiring.Component):
    """SipHash-2-4 of a ``message_bits``-bit message, one per cycle (see module doc)."""

    def __init__(self, message_bits=104, fifo_depth=None):
        assert message_bits % 8 == 0 and message_bits > 0
        self.message_bits = message_bits
        self.latency = siphash_latency(message_bits)
        depth = 1
        while depth < self.latency + 4:
            depth *= 2
        self.fifo_depth = fifo_depth or depth
        super().__init__({
            "key": In(128),
            "i": In(stream.Signature(message_bits)),
            "o": Out(stream.Signature(64)),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.fifo = fifo = SyncFIFOBuffered(width=64, depth=self.fifo_depth)
        # Credits: messages accepted and not yet read out never exceed the FIFO depth.
        outstanding = Signal(range(self.fifo_depth + 1))
        took = self.i.valid & self.i.ready
        gave = self.o.valid & self.o.ready
        m.d.comb += self.i.ready.eq(outstanding < self.fifo_depth)
        m.d.sync += outstanding.eq(outstanding + took - gave)
        hv, h = siphash_pipeline(m, "sip", took, self.key, self.i.payload)
        m.d.comb += [fifo.w_en.eq(hv), fifo.w_data.eq(h),
                     self.o.valid.eq(fifo.r_rdy), self.o.payload.eq(fifo.r_data),
                     fifo.r_en.eq(self.o.ready)]
        return m
