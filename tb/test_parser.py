"""Testbench of hw.parser.Parser: cocotb on Verilator and Icarus, scapy as the reference.

Every frame's metadata is compared, field by field, with ``sim.reference.parse_frame``
(whose field values are in turn checked against scapy's own dissection in
``test_reference_matches_scapy``), and the frames must come out unchanged. All three
streams (``i``, ``o``, ``meta``) see random valid/ready stalls.
"""

import random

import cocotb
import pytest

from hw.metadata import PARSER_META, FrameClass
from hw.parser import Parser
from hw.stream import beats_to_frame, frame_to_beats, unpack_struct
from sim.bus import StreamSink, StreamSource, run_until
from sim.reference import parse_frame
from sim.traffic import GOOD_LABELS, traffic_mix

# ----------------------------------------------------------------------------- shared job

def meta_diff(got, want, path=""):
    """List of 'field: got != want' strings between two metadata dicts."""
    out = []
    for key, value in want.items():
        if isinstance(value, dict):
            out += meta_diff(got[key], value, f"{path}{key}.")
        elif got[key] != value:
            out.append(f"{path}{key}: rtl {got[key]:#x} != reference {value:#x}")
    return out


async def run_frames(bus, width, frames, stall=0.0, seed=0, max_frame_bytes=1518):
    """Push ``frames`` through a Parser on ``bus``; check every record and frame.

    Returns the number of cycles taken. Raises AssertionError on the first mismatch.
    Runs unchanged on cocotb and on the Amaranth simulator.
    """
    rng = random.Random(seed)
    src = StreamSource(bus, "i", stall=stall, rng=random.Random(rng.random()))
    out = StreamSink(bus, "o", stall=stall, rng=random.Random(rng.random()))
    meta = StreamSink(bus, "meta", stall=stall, rng=random.Random(rng.random()))
    beats = [frame_to_beats(f, width) for f in frames]
    for b in beats:
        src.send(b)
    total_beats = sum(len(b) for b in beats)
    cycles = await run_until(bus, [src, out, meta],
                             lambda: len(meta.received) == len(frames) and len(out.received) == total_beats,
                             max_cycles=20 * total_beats + 1000)
    pos = 0
    for k, (frame, record) in enumerate(zip(frames, meta.received)):
        got = unpack_struct(PARSER_META, record)
        want = parse_frame(frame, max_frame_bytes)
        problems = meta_diff(got, want)
        assert not problems, f"frame {k} ({len(frame)} bytes {frame[:64].hex()}...): " + "; ".join(problems)
        n = len(beats[k])
        assert beats_to_frame(out.received[pos:pos + n], width) == frame, f"frame {k} changed on its way through"
        pos += n
    return cycles


def fuzz_frames(rng, n):
    """Frames of random bytes and lengths, half of them with IPv4/TCP-looking headers."""
    base = [f for _, f in traffic_mix(64, seed=rng.randrange(1 << 30), bad_fraction=0.0)]
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            f = bytearray(rng.choice(base))
            for _ in range(rng.randrange(1, 6)):          # flip header bytes
                k = rng.randrange(min(len(f), 80))
                f[k] = rng.randrange(256)
            if rng.random() < 0.3:
                f = f[:rng.randrange(1, len(f) + 1)]
        else:
            f = bytearray(rng.randbytes(rng.randrange(1, 200)))
            if len(f) > 23 and rng.random() < 0.7:
                f[12:14] = b"\x08\x00"
                f[14] = 0x40 | rng.randrange(16)
                f[23] = 6
        if rng.random() < 0.03:
            f += rng.randbytes(rng.randrange(1500, 2100))  # oversized
        out.append(bytes(f))
    return out


# ----------------------------------------------------------------------------- cocotb tests

def _width():
    from tb.harness import tb_params
    return tb_params()["width"]


@cocotb.test()
async def parser_traffic_mix(dut):
    """A realistic mix (good, pass-to-host and corrupted frames) with random stalls everywhere."""
    from tb.cocotb_util import start
    bus = await start(dut)
    frames = [f for _, f in traffic_mix(250, seed=11)]
    await run_frames(bus, _width(), frames, stall=0.3, seed=1)


@cocotb.test()
async def parser_fuzz(dut):
    """Garbled, truncated, random and oversized frames: defined metadata, no hang, no shift."""
    from tb.cocotb_util import start
    bus = await start(dut)
    rng = random.Random(5)
    await run_frames(bus, _width(), fuzz_frames(rng, 300), stall=0.3, seed=2)


@cocotb.test()
async def parser_back_to_back(dut):
    """Minimum frames back to back and every size 60..1518 with ready sinks: no bubbles."""
    from tb.cocotb_util import start
    bus = await start(dut)
    width = _width()
    rng = random.Random(3)
    frames = [f for _, f in traffic_mix(40, seed=3, bad_fraction=0.0)]
    frames = [f[:60] if len(f) >= 60 else f for f in frames]                  # runts of good headers
    frames += [rng.randbytes(size) for size in (60, 61, 64, 65, 127, 128, 129, 1514, 1518)]
    beats = sum(len(frame_to_beats(f, width)) for f in frames)
    cycles = await run_frames(bus, width, frames, stall=0.0)
    # Beats enter one per cycle; after the last one the pipeline drains in `latency` cycles.
    assert cycles <= beats + Parser(width).latency + 2, f"{beats} beats took {cycles} cycles"


@cocotb.test()
async def parser_smoke(dut):
    """Short check used for the secondary widths."""
    from tb.cocotb_util import start
    bus = await start(dut)
    frames = [f for _, f in traffic_mix(40, seed=7)]
    await run_frames(bus, _width(), frames, stall=0.3)


# ----------------------------------------------------------------------------- pytest entries

@pytest.mark.parametrize("width", [64, 512])
def test_parser(sim, width):
    from tb.harness import run_cocotb
    run_cocotb(Parser, {"width": width}, "tb.test_parser", sim,
               testcase=["parser_traffic_mix", "parser_fuzz", "parser_back_to_back"])


@pytest.mark.parametrize("width", [128, 256])
def test_parser_smoke(sim, width):
    from tb.harness import run_cocotb
    run_cocotb(Parser, {"width": width}, "tb.test_parser", sim, testcase="parser_smoke")


def test_reference_matches_scapy():
    """The reference model's fields agree with scapy's dissection of well-formed frames."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Dot1Q, Ether
    checked = 0
    for label, frame in traffic_mix(400, seed=21, bad_fraction=0.0):
        meta = parse_frame(frame)
        pkt = Ether(frame)
        assert not any(meta["errors"].values()), (label, meta["errors"])
        assert label in GOOD_LABELS
        if Dot1Q in pkt:
            assert meta["eth"]["vlan_valid"] and meta["eth"]["vlan_vid"] == pkt[Dot1Q].vlan
        if label in ("arp", "ipv6", "udp", "icmp", "fragment"):
            assert meta["frame_class"] != FrameClass.TCP
            continue
        assert meta["frame_class"] == FrameClass.TCP
        ip, tcp = pkt[IP], pkt[TCP]
        assert (meta["ip"]["src"], meta["ip"]["dst"], meta["ip"]["ttl"]) == (
            int.from_bytes(bytes(map(int, ip.src.split("."))), "big"),
            int.from_bytes(bytes(map(int, ip.dst.split("."))), "big"), ip.ttl)
        t = meta["tcp"]
        assert (t["sport"], t["dport"], t["seq"], t["ack"], t["flags"], t["window"]) == (
            tcp.sport, tcp.dport, tcp.seq, tcp.ack, int(tcp.flags), tcp.window)
        opts = dict((k, v) for k, v in tcp.options if isinstance(k, str))
        o = meta["opt"]
        assert o["mss_valid"] == ("MSS" in opts) and (not o["mss_valid"] or o["mss"] == opts["MSS"])
        assert o["wscale_valid"] == ("WScale" in opts) and (not o["wscale_valid"] or o["wscale"] == opts["WScale"])
        assert o["sack_perm"] == ("SAckOK" in opts)
        assert o["ts_valid"] == ("Timestamp" in opts)
        if o["ts_valid"]:
            assert (o["tsval"], o["tsecr"]) == opts["Timestamp"]
        if "SAck" in opts:
            assert o["sack_blocks"] == len(opts["SAck"]) // 2
        assert o["unknown"] == any(isinstance(k, int) for k, _ in tcp.options)
        assert meta["payload_length"] == ip.len - 4 * ip.ihl - 4 * tcp.dataofs
        assert frame[meta["payload_offset"]:meta["payload_offset"] + meta["payload_length"]] == bytes(tcp.payload)[:meta["payload_length"]]
        checked += 1
    assert checked > 100


def test_reference_flags_corruption():
    """Every corruption kind in the traffic mix is caught by the reference model."""
    from sim.traffic import CORRUPTIONS
    expect = {"bad_ip_checksum": "bad_ip_checksum", "bad_tcp_checksum": "bad_tcp_checksum",
              "truncated": "truncated", "bad_ihl": "bad_ihl", "bad_data_offset": "bad_data_offset",
              "malformed_options": None, "runt": "truncated", "garbage": None,
              "oversize": "oversize", "length_mismatch": "length_mismatch"}
    assert set(expect) == set(CORRUPTIONS)
    for label, frame in traffic_mix(2000, seed=4, bad_fraction=1.0):
        flag = expect[label]
        if flag:
            assert parse_frame(frame)["errors"][flag], (label, frame.hex())
