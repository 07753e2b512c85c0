"""One's-complement arithmetic (RFC 1071, RFC 1624) for Amaranth values.

Helpers, not a component: the builder and the patch buffer's users sum 16-bit words
with them.
"""

from amaranth.hdl import Cat, Const, Mux, Value

__all__ = ["ones_add", "fold", "tree_sum", "beat_words", "word_sum", "checksum_update"]


def ones_add(a, b):
    """One's-complement sum of two 16-bit values (end-around carry)."""
    total = a + b                       # 17 bits
    return (total[:16] + total[16])[:16]


def fold(value):
    """Fold a wide sum of 16-bit words into a 16-bit one's-complement sum."""
    while len(value) > 17:
        value = value[:16] + value[16:]
    if len(value) == 17:                # at most 0x1FFFE here, so this cannot carry again
        value = (value[:16] + value[16])[:16]
    return value


def tree_sum(values):
    """Sum a list of values with a balanced adder tree (0 for an empty list)."""
    values = list(values)
    if not values:
        return Const(0, 1)
    while len(values) > 1:
        pairs = [values[i] + values[i + 1] for i in range(0, len(values) - 1, 2)]
        values = pairs + values[len(values) - len(values) % 2:]
    return values[0]


def beat_words(beat_data):
    """The 16-bit big-endian words of a beat: byte 2j is the high byte of word j."""
    return [Cat(beat_data[16 * j + 8:16 * j + 16], beat_data[16 * j:16 * j + 8])
            for j in range(len(beat_data) // 16)]


def word_sum(beat_data, lane_enable):
    """Plain (unfolded) sum of the beat's 16-bit words whose bit in ``lane_enable`` is set."""
    return tree_sum(Mux(lane_enable[j], word, 0) for j, word in enumerate(beat_words(beat_data)))


def checksum_update(checksum, old_words, new_words):
    """RFC 1624 eqn. 3: the checksum after 16-bit words ``old_words`` of the covered data
    became ``new_words``: ``~(~HC + ~m + m')`` in one's-complement arithmetic, without
    reading the rest of the data. Unlike eqn. 2 it never turns a correct checksum into
    0xFFFF where a full recomputation gives 0x0000, and it keeps a wrong checksum wrong by
    the same amount (it adds the same difference), so it never "repairs" a corrupted
    packet. Pure combinational: one adder tree and a fold."""
    terms = [~checksum[:16]] + [~Value.cast(w)[:16] for w in old_words] + list(new_words)
    return ~fold(tree_sum(terms))[:16]
