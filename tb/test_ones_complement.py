"""RFC 1624 incremental checksum update: the Python model against scapy's full
recomputation, and the RTL expression (hw.ones_complement.checksum_update) against the model.

The splice rewriter changes addresses, ports and sequence numbers of packets it does
not re-read; these tests pin down what the update must do: agree with a full
recomputation, including the 0x0000/0xFFFF corner case of RFC 1624 section 3, and keep a
wrong checksum wrong.
"""

import random

from amaranth.hdl import Elaboratable, Module, Signal
from amaranth.sim import Simulator
from scapy.layers.inet import IP, TCP

from hw.ones_complement import checksum_update as hw_checksum_update
from sim.reference import checksum_update, ones_sum


def words(data):
    return [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]


def ip_header(rng, **fields):
    header = IP(src="192.0.2.%d" % rng.randrange(1, 255), dst="198.51.100.%d" % rng.randrange(1, 255),
                ttl=rng.randrange(1, 256), id=rng.getrandbits(16), flags="DF", **fields)
    return bytes(header)[:20]


def rewrite(header, rng):
    """Change source, destination and TTL (what a forwarding rewrite does)."""
    new = bytearray(header)
    new[8] = rng.randrange(1, 256)
    new[12:20] = rng.randbytes(8)
    return bytes(new)


def recomputed(header):
    """The checksum of ``header`` computed from scratch (its checksum field ignored)."""
    blank = header[:10] + b"\0\0" + header[12:]
    return ~ones_sum(blank) & 0xFFFF


def verifies(header):
    return ones_sum(header) == 0xFFFF


def test_update_agrees_with_full_recomputation():
    rng = random.Random(1)
    for _ in range(5000):
        old = ip_header(rng)
        new = rewrite(old, rng)
        check = checksum_update(int.from_bytes(old[10:12], "big"), words(old[8:10] + old[12:20]),
                                words(new[8:10] + new[12:20]))
        assert check == recomputed(new)
        assert verifies(new[:10] + check.to_bytes(2, "big") + new[12:])


def test_update_corner_case_zero_checksum():
    """RFC 1624 section 3: a header whose correct checksum is 0x0000 (its other words sum
    to 0xFFFF); eqn. 2 would give 0xFFFF there, eqn. 3 gives 0x0000 like a recomputation."""
    rng = random.Random(2)
    found = 0
    for _ in range(2000):
        new = bytearray(ip_header(rng))
        new[10:12] = b"\0\0"
        # Choose the identification so that the words sum to 0xFFFF: checksum 0x0000.
        new[4:6] = b"\0\0"
        ident = (0xFFFF - ones_sum(bytes(new))) & 0xFFFF
        if ident == 0:
            continue
        new[4:6] = ident.to_bytes(2, "big")
        assert ones_sum(bytes(new)) == 0xFFFF and recomputed(bytes(new)) == 0
        old = rewrite(bytes(new), rng)
        old = old[:10] + recomputed(old).to_bytes(2, "big") + old[12:]
        check = checksum_update(int.from_bytes(old[10:12], "big"),
                                words(old[8:10] + old[12:20]), words(new[8:10] + new[12:20]))
        assert check == 0x0000
        found += 1
    assert found > 1000


def test_bad_checksum_stays_bad():
    """A packet with a wrong checksum is never repaired by the update: the result is off
    by the same amount (0x0000 and 0xFFFF are the same one's-complement number, so that
    swap is not an error and is excluded)."""
    rng = random.Random(3)
    for _ in range(5000):
        old = ip_header(rng)
        good = int.from_bytes(old[10:12], "big")
        bad = good ^ rng.randrange(1, 0x10000)
        if {good, bad} == {0, 0xFFFF}:
            continue
        new = rewrite(old, rng)
        check = checksum_update(bad, words(old[8:10] + old[12:20]), words(new[8:10] + new[12:20]))
        assert not verifies(new[:10] + check.to_bytes(2, "big") + new[12:])


def test_tcp_sequence_rewrite():
    """A 32-bit field (a TCP sequence number) as two words, checked against scapy."""
    rng = random.Random(4)
    for _ in range(2000):
        seq, new_seq = rng.getrandbits(32), rng.getrandbits(32)
        seg = IP(src="192.0.2.1", dst="198.51.100.2") / TCP(seq=seq, ack=rng.getrandbits(32),
                                                             flags="A") / rng.randbytes(rng.randrange(40))
        old = bytes(seg)
        fixed = IP(old)
        fixed[TCP].seq = new_seq
        del fixed[TCP].chksum
        expected = IP(bytes(fixed))[TCP].chksum
        check = checksum_update(IP(old)[TCP].chksum, [seq >> 16, seq & 0xFFFF],
                                [new_seq >> 16, new_seq & 0xFFFF])
        assert check == expected


class _Update(Elaboratable):
    """checksum_update on three old and three new words, for the simulator."""

    def __init__(self):
        self.checksum = Signal(16)
        self.old = [Signal(16, name=f"old{i}") for i in range(3)]
        self.new = [Signal(16, name=f"new{i}") for i in range(3)]
        self.result = Signal(16)

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.result.eq(hw_checksum_update(self.checksum, self.old, self.new))
        return m


def test_rtl_matches_model():
    dut = _Update()
    rng = random.Random(5)
    vectors = [(rng.getrandbits(16), [rng.getrandbits(16) for _ in range(3)],
                [rng.getrandbits(16) for _ in range(3)]) for _ in range(3000)]
    vectors += [(0, [0] * 3, [0] * 3), (0xFFFF, [0xFFFF] * 3, [0xFFFF] * 3),
                (0, [0xFFFF] * 3, [0] * 3), (0xFFFF, [0] * 3, [0xFFFF] * 3)]

    async def bench(ctx):
        for checksum, old, new in vectors:
            ctx.set(dut.checksum, checksum)
            for signal, value in zip(dut.old + dut.new, old + new):
                ctx.set(signal, value)
            assert ctx.get(dut.result) == checksum_update(checksum, old, new), (checksum, old, new)

    sim = Simulator(dut)
    sim.add_testbench(bench)
    sim.run()
