"""Tests of hw.siphash: the Python model against the reference vectors, and the pipelined
RTL against the model on cocotb (Verilator, Icarus) and the Amaranth simulator.

The 64 vectors are those of the SipHash reference implementation (vectors.h: key
00 01 .. 0f, message 00 01 .. len-1 for len 0..63; the digest bytes as printed there).
"""

import random

import cocotb
import pytest

from hw.siphash import SipHash, siphash24
from sim.bus import StreamSink, StreamSource, run_until

KEY = bytes(range(16))
VECTORS = [bytes.fromhex(h) for h in (
    "310e0edd47db6f72", "fd67dc93c539f874", "5a4fa9d909806c0d", "2d7efbd796666785",
    "b7877127e09427cf", "8da699cd64557618", "cee3fe586e46c9cb", "37d1018bf50002ab",
    "6224939a79f5f593", "b0e4a90bdf82009e", "f3b9dd94c5bb5d7a", "a7ad6b22462fb3f4",
    "fbe50e86bc8f1e75", "903d84c02756ea14", "eef27a8e90ca23f7", "e545be4961ca29a1",
    "db9bc2577fcc2a3f", "9447be2cf5e99a69", "9cd38d96f0b3c14b", "bd6179a71dc96dbb",
    "98eea21af25cd6be", "c7673b2eb0cbf2d0", "883ea3e395675393", "c8ce5ccd8c030ca8",
    "94af49f6c650adb8", "eab8858ade92e1bc", "f315bb5bb835d817", "adcf6b0763612e2f",
    "a5c91da7acaa4dde", "716595876650a2a6", "28ef495c53a387ad", "42c341d8fa92d832",
    "ce7cf2722f512771", "e37859f94623f3a7", "381205bb1ab0e012", "ae97a10fd434e015",
    "b4a31508beff4d31", "81396229f0907902", "4d0cf49ee5d4dcca", "5c73336a76d8bf9a",
    "d0a704536ba93e0e", "925958fcd6420cad", "a915c29bc8067318", "952b79f3bc0aa6d4",
    "f21df2e41d4535f9", "87577519048f53a9", "10a56cf5dfcd9adb", "eb75095ccd986cd0",
    "51a9cb9ecba312e6", "96afadfc2ce666c7", "72fe52975a4364ee", "5a1645b276d592a1",
    "b274cb8ebf87870a", "6f9bb4203de7b381", "eaecb2a30b22a87f", "9924a43cc1315724",
    "bd838d3aafbf8db7", "0b1a2a3265d51aea", "135079a3231ce660", "932b2846e4d70666",
    "e1915f5cb1eca46c", "f325965ca16d629f", "575ff28e60381be5", "724506eb4c328a95",
)]


def test_model_vectors():
    assert len(VECTORS) == 64
    for n, digest in enumerate(VECTORS):
        assert siphash24(KEY, bytes(range(n))).to_bytes(8, "little") == digest, n


def test_model_int_key():
    assert siphash24(int.from_bytes(KEY, "little"), b"abc") == siphash24(KEY, b"abc")


# ----------------------------------------------------------------------------- shared job

async def hash_batches(bus, message_bits, batches=4, per_batch=60, stall=0.3, seed=0):
    """Hash random messages (plus the reference vector of this length) under a few keys,
    changing the key while earlier messages are still in the pipeline; check every hash
    with the model and, with no stalls, the rate and the latency."""
    rng = random.Random(seed)
    nbytes = message_bits // 8
    src = StreamSource(bus, "i", stall=stall, rng=random.Random(rng.random()))
    snk = StreamSink(bus, "o", stall=stall, rng=random.Random(rng.random()))
    expected = []
    for batch in range(batches):
        key = KEY if batch == 0 else rng.randbytes(16)
        bus.set("key", int.from_bytes(key, "little"))
        msgs = [bytes(range(nbytes))] if batch == 0 else []
        msgs += [rng.randbytes(nbytes) for _ in range(per_batch)]
        src.send([int.from_bytes(msg, "little") for msg in msgs])
        expected += [siphash24(key, msg) for msg in msgs]
        await run_until(bus, [src, snk], lambda: src.idle, max_cycles=50 * per_batch + 200)
    await run_until(bus, [src, snk], lambda: len(snk.received) == len(expected),
                    max_cycles=1000)
    for k, (got, want) in enumerate(zip(snk.received, expected)):
        assert got == want, f"message {k}: {got:#018x} != {want:#018x}"
    if nbytes < 64:
        assert snk.received[0] == int.from_bytes(VECTORS[nbytes], "little")
    figures = {"hashes": len(expected)}
    if not stall:
        figures["hashes_per_cycle"] = round(
            len(src.sent_cycles) / (src.sent_cycles[-1] - src.sent_cycles[0] + 1), 3)
        figures["latency_cycles"] = snk.received_cycles[0] - src.sent_cycles[0]
    return figures


# ----------------------------------------------------------------------------- cocotb tests

@cocotb.test()
async def siphash_random(dut):
    """Random messages and key changes, random stalls on both streams."""
    from tb.cocotb_util import start
    from tb.harness import tb_params
    bus = await start(dut)
    await hash_batches(bus, tb_params()["message_bits"], stall=0.3)


@cocotb.test()
async def siphash_full_rate(dut):
    """No stalls: one hash per cycle, latency as documented."""
    from tb.cocotb_util import start
    from tb.harness import tb_params
    bus = await start(dut)
    bits = tb_params()["message_bits"]
    figures = await hash_batches(bus, bits, batches=2, per_batch=100, stall=0.0, seed=3)
    assert figures["hashes_per_cycle"] == 1.0, figures
    assert figures["latency_cycles"] <= SipHash(bits).latency + 2, figures


# ----------------------------------------------------------------------------- pytest entries

@pytest.mark.parametrize("message_bits", [104, 64])
def test_siphash_rtl(sim, message_bits):
    from tb.harness import run_cocotb
    run_cocotb(SipHash, {"message_bits": message_bits}, "tb.test_siphash", sim,
               testcase=["siphash_random", "siphash_full_rate"])


def test_siphash_amaranth():
    from sim.jobs import run_job
    result = run_job(SipHash, {"message_bits": 128}, hash_batches, sim="amaranth",
                     job_args={"message_bits": 128, "batches": 2, "per_batch": 40, "stall": 0.0})
    assert result.value["hashes_per_cycle"] == 1.0
