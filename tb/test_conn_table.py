"""Testbench of hw.conn_table.ConnTable against sim.conn_table_model (cocotb on Verilator and
Icarus; the same jobs run on the Amaranth simulator).

Every command's response is compared field by field with the model's (status, flow index,
slot, key, value), which also checks that the RTL places every entry where the model does.
Lookups run concurrently with random stalls; each result must be exactly the model's
answer in one of the table states the lookup could have seen (the states between the
commands completed before its memory read and those accepted by then): an entry is seen
old or new, never torn, never missing while it moves.
"""

import bisect
import random

import cocotb
import pytest

from hw.conn_table import (FLOW_KEY, ConnTable, Geometry, Op, Status, command_layout,
                           response_layout, result_layout)
from hw.stream import pack_struct, unpack_struct
from sim.bus import StreamSink, StreamSource, run_until
from sim.conn_table_model import ConnTableModel, random_keys

SMALL = {"entries": 64, "value_width": 32, "stash": 4, "max_moves": 16, "state_width": 16}


# ----------------------------------------------------------------------------- helpers

class History:
    """The model's lookup answer for every key, per version (= commands applied)."""

    def __init__(self):
        self.versions = {}      # key -> [version, ...]
        self.answers = {}       # key -> [answer, ...]
        self.clears = [0]       # versions after which every key misses

    def record(self, version, key, answer):
        self.versions.setdefault(key, []).append(version)
        self.answers.setdefault(key, []).append(answer)

    def answer(self, key, version):
        clear = self.clears[bisect.bisect_right(self.clears, version) - 1]
        versions = self.versions.get(key, [])
        k = bisect.bisect_right(versions, version) - 1
        if k < 0 or versions[k] < clear:
            return (0, 0, 0)
        return self.answers[key][k]


def plan_commands(model, rng, n, pool, weights=None, first=()):
    """Random commands (with the model's responses), applied to ``model``.

    Returns (commands as dicts, expected responses, History)."""
    weights = weights or {"insert": 40, "delete": 18, "update": 14, "read": 10, "dup": 6,
                          "absent": 6, "set_key": 2, "bad": 2, "clear": 1}
    names = list(weights)
    history = History()
    commands, expected = [], []
    present = set()
    for cmd in list(first) + [None] * n:
        if cmd is None:
            kind = rng.choices(names, [weights[k] for k in names])[0]
            key = rng.choice(pool)
            value = rng.getrandbits(model.value_width)
            if kind in ("delete", "update", "dup") and present:
                key = rng.choice(sorted(present))
            if kind == "absent":
                kind = rng.choice(["delete", "update"])
                key = rng.getrandbits(FLOW_KEY.size)
            op = {"insert": Op.INSERT, "dup": Op.INSERT, "delete": Op.DELETE,
                  "update": Op.UPDATE, "read": Op.READ, "set_key": Op.SET_KEY,
                  "clear": Op.CLEAR, "bad": rng.choice([6, 7, Op.READ])}[kind]
            slot = rng.randrange(model.geo.slots)
            if kind == "bad" and op == Op.READ:
                slot = rng.randrange(model.geo.slots, 1 << model.geo.slot_bits)
            cmd = {"op": int(op), "key": key, "value": value, "slot": slot,
                   "hash_key": rng.getrandbits(128)}
        resp = model.command(cmd["op"], cmd.get("key", 0), cmd.get("value", 0),
                             cmd.get("slot", 0), cmd.get("hash_key", 0))
        version = len(commands) + 1
        commands.append(cmd)
        expected.append(resp)
        if resp.status == Status.OK and cmd["op"] in (Op.INSERT, Op.DELETE, Op.UPDATE):
            history.record(version, cmd["key"], model.lookup(cmd["key"]))
            if cmd["op"] == Op.DELETE:
                present.discard(cmd["key"])
            else:
                present.add(cmd["key"])
        if resp.status == Status.OK and cmd["op"] == Op.CLEAR:
            history.clears.append(version)
            present.clear()
    return commands, expected, history


def response_dict(resp):
    return {"status": int(resp.status), "op": int(resp.op) & 7, "index": resp.index,
            "slot": resp.slot, "key": resp.key, "value": resp.value}


async def run_table(bus, params, commands, expected, history, lookup_keys, stall=0.3, seed=0,
                    max_cycles=400000):
    """Drive ``commands`` and ``lookup_keys`` at once; check responses and lookups.

    Returns a dict of figures (cycles, lookup rate, command latencies)."""
    geo, V = Geometry(params["entries"], params["stash"], params["max_moves"]), params["value_width"]
    C, R, L = command_layout(geo, V), response_layout(geo, V), result_layout(geo, V)
    rng = random.Random(seed)
    cmd_src = StreamSource(bus, "cmd", stall=stall, rng=random.Random(rng.random()))
    resp_snk = StreamSink(bus, "resp", stall=stall, rng=random.Random(rng.random()))
    lk_src = StreamSource(bus, "i", stall=stall, rng=random.Random(rng.random()))
    lk_snk = StreamSink(bus, "o", stall=stall, rng=random.Random(rng.random()))
    cmd_src.send([pack_struct(C, **{k: v for k, v in c.items()}) for c in commands])
    lk_src.send(list(lookup_keys))
    start = bus.cycle

    def done():
        return len(resp_snk.received) == len(commands) and len(lk_snk.received) == len(lookup_keys)

    await run_until(bus, [cmd_src, resp_snk, lk_src, lk_snk], done, max_cycles=max_cycles)
    for k, (raw, want) in enumerate(zip(resp_snk.received, expected)):
        got = unpack_struct(R, raw)
        got["key"] = pack_struct(FLOW_KEY, **got["key"])
        want = response_dict(want)
        assert got == want, (f"command {k} {commands[k]['op']}: rtl {got} != model {want}")
    # Lookups: the snapshot of a lookup accepted in cycle c is the state after edge
    # c + SNAPSHOT_LATENCY (the hash, then the bucket address registers).
    h = ConnTable.SNAPSHOT_LATENCY
    accepted, answered = cmd_src.sent_cycles, resp_snk.received_cycles
    for k, (key, raw) in enumerate(zip(lookup_keys, lk_snk.received)):
        got = unpack_struct(L, raw)
        got = (got["hit"], got["index"], got["value"])
        snap = lk_src.sent_cycles[k] + h
        vmin = bisect.bisect_left(answered, snap - 1)          # responses sampled before
        vmax = bisect.bisect_right(accepted, snap + 1)         # commands accepted by then
        allowed = {history.answer(key, v) for v in range(vmin, vmax + 1)}
        assert got in allowed, (f"lookup {k} (cycle {lk_src.sent_cycles[k]}) of {key:#x}: "
                                f"{got} not in {allowed} (versions {vmin}..{vmax})")
    cycles = bus.cycle - start
    lat = [r - a for a, r in zip(accepted, answered)]
    figures = {"cycles": cycles, "commands": len(commands), "lookups": len(lookup_keys),
               "command_latency_max": max(lat, default=0),
               "command_latency_mean": round(sum(lat) / max(1, len(lat)), 2), "latencies": lat}
    if len(lk_src.sent_cycles) > 1:
        figures["lookups_per_cycle"] = round(
            len(lk_src.sent_cycles) / (lk_src.sent_cycles[-1] - lk_src.sent_cycles[0] + 1), 4)
        figures["lookup_latency_cycles"] = min(
            r - s for s, r in zip(lk_src.sent_cycles, lk_snk.received_cycles))
    return figures


# ----------------------------------------------------------------------------- jobs

async def random_mix(bus, params, ops=300, stall=0.3, seed=1, lookups_per_op=8):
    """Random mixes of every command with concurrent lookups (keys mostly from the pool)."""
    rng = random.Random(seed)
    geo = Geometry(params["entries"], params["stash"], params["max_moves"])
    model = ConnTableModel(params["entries"], params["value_width"], params["stash"],
                           params["max_moves"])
    pool = random_keys(rng, int(geo.slots * 1.5))
    first = [{"op": int(Op.SET_KEY), "hash_key": rng.getrandbits(128)}]
    commands, expected, history = plan_commands(model, rng, ops, pool, first=first)
    keys = [rng.choice(pool) for _ in range(ops * lookups_per_op)]
    return await run_table(bus, params, commands, expected, history, keys, stall, seed)


async def fill_and_drain(bus, params, stall=0.2, seed=2, adversarial=False):
    """Insert random keys until FULL (twice), check every slot by READ and every key by
    lookup, then delete everything. With ``adversarial``, every key has the same two
    buckets: 8 fit, the stash takes 4, then each insert walks, undoes and fails."""
    rng = random.Random(seed)
    geo = Geometry(params["entries"], params["stash"], params["max_moves"])
    model = ConnTableModel(params["entries"], params["value_width"], params["stash"],
                           params["max_moves"])
    hash_key = rng.getrandbits(128)
    first = [{"op": int(Op.SET_KEY), "hash_key": hash_key}]
    if adversarial:
        probe = ConnTableModel(params["entries"], hash_key=hash_key)
        target = None
        keys = []
        while len(keys) < 20:
            key = rng.getrandbits(FLOW_KEY.size)
            target = target or probe.buckets(key)
            if probe.buckets(key) == target:
                keys.append(key)
    else:
        keys = random_keys(rng, geo.slots + 8)
    commands = list(first)
    for key in keys:
        commands.append({"op": int(Op.INSERT), "key": key, "value": rng.getrandbits(32)})
    commands += [{"op": int(Op.READ), "slot": s} for s in range(geo.slots + 1)]
    commands += [{"op": int(Op.INSERT), "key": key, "value": 1} for key in keys[:4]]   # dups/full
    commands += [{"op": int(Op.DELETE), "key": key} for key in keys]
    commands += [{"op": int(Op.DELETE), "key": key} for key in keys[:3]]                # absent
    commands += [{"op": int(Op.INSERT), "key": key, "value": 7} for key in keys[:5]]    # refill
    filled = []
    history = History()
    expected = []
    for k, cmd in enumerate(commands):
        resp = model.command(cmd["op"], cmd.get("key", 0), cmd.get("value", 0),
                             cmd.get("slot", 0), cmd.get("hash_key", 0))
        expected.append(resp)
        if resp.status == Status.OK and cmd["op"] in (Op.INSERT, Op.DELETE):
            history.record(k + 1, cmd["key"], model.lookup(cmd["key"]))
        filled.append(model.count)
    statuses = [r.status for r in expected]
    assert Status.FULL in statuses
    lookups = [rng.choice(keys) for _ in range(len(commands) * 6)]
    figures = await run_table(bus, params, commands, expected, history, lookups, stall, seed)
    first_full = statuses.index(Status.FULL)
    figures["occupancy_at_first_failure"] = round(filled[first_full] / geo.entries, 4)
    return figures


async def lookup_rate(bus, params, ops=120, seed=3):
    """No stalls: lookups flow at one per cycle while inserts and deletes run."""
    rng = random.Random(seed)
    model = ConnTableModel(params["entries"], params["value_width"], params["stash"],
                           params["max_moves"])
    geo = model.geo
    pool = random_keys(rng, geo.slots)
    weights = {"insert": 55, "delete": 30, "update": 10, "dup": 5}
    commands, expected, history = plan_commands(model, rng, ops, pool, weights)
    # Enough lookups to outlast the commands.
    keys = [rng.choice(pool) for _ in range(ops * 40)]
    figures = await run_table(bus, params, commands, expected, history, keys, stall=0.0, seed=seed)
    assert figures["lookups_per_cycle"] == 1.0, figures
    return figures


# ----------------------------------------------------------------------------- cocotb tests

def _params():
    from tb.harness import tb_params
    return tb_params()


@cocotb.test()
async def ct_random_mix(dut):
    from tb.cocotb_util import start
    bus = await start(dut)
    await random_mix(bus, _params(), ops=400, stall=0.3)


@cocotb.test()
async def ct_fill(dut):
    from tb.cocotb_util import start
    bus = await start(dut)
    await fill_and_drain(bus, _params(), stall=0.2)


@cocotb.test()
async def ct_adversarial(dut):
    from tb.cocotb_util import start
    bus = await start(dut)
    await fill_and_drain(bus, _params(), stall=0.2, seed=5, adversarial=True)


@cocotb.test()
async def ct_lookup_rate(dut):
    from tb.cocotb_util import start
    bus = await start(dut)
    await lookup_rate(bus, _params())


@cocotb.test()
async def ct_reset(dut):
    """A reset in the middle of commands and lookups: afterwards the table is empty, the
    hash key is zero, and it works as a fresh one (checked against a fresh model)."""
    from cocotb.triggers import RisingEdge
    from tb.cocotb_util import start
    params = _params()
    bus = await start(dut)
    rng = random.Random(9)
    model = ConnTableModel(params["entries"], params["value_width"], params["stash"],
                           params["max_moves"])
    geo = model.geo
    C = command_layout(geo, params["value_width"])
    cmd_src = StreamSource(bus, "cmd", stall=0.2, rng=random.Random(1))
    lk_src = StreamSource(bus, "i", stall=0.2, rng=random.Random(2))
    agents = [cmd_src, StreamSink(bus, "resp", 0.2, random.Random(3)), lk_src,
              StreamSink(bus, "o", 0.2, random.Random(4))]
    pool = random_keys(rng, 40)
    cmd_src.send([pack_struct(C, op=int(Op.INSERT), key=k, value=1) for k in pool])
    lk_src.send(pool * 4)
    cycles = rng.randrange(200, 600)
    await run_until(bus, agents, lambda: bus.cycle >= cycles, max_cycles=cycles + 1)
    for name in ("cmd__valid", "i__valid", "resp__ready", "o__ready"):
        bus.set(name, 0)
    for _ in range(rng.randrange(1, 3)):
        dut.rst.value = 1
        await RisingEdge(dut.clk)
    dut.rst.value = 0
    # A fresh table: every slot empty, every key missing; then a random mix.
    model.hw_reset()
    commands = [{"op": int(Op.READ), "slot": s} for s in range(geo.slots)]
    _, expected, history = plan_commands(model, rng, 0, pool, first=commands)
    tail, tail_expected, tail_history = plan_commands(model, rng, 150, pool)
    expected += tail_expected
    for key, versions in tail_history.versions.items():
        for v, a in zip(versions, tail_history.answers[key]):
            history.record(v + len(commands), key, a)
    history.clears += [v + len(commands) for v in tail_history.clears[1:]]
    commands += tail
    await run_table(bus, params, commands, expected, history, [rng.choice(pool) for _ in range(800)],
                    stall=0.3, seed=4)


@cocotb.test()
async def ct_large(dut):
    """65536 entries: the sweep, a few hundred commands, lookups."""
    from tb.cocotb_util import start
    bus = await start(dut)
    await random_mix(bus, _params(), ops=120, stall=0.1, seed=8, lookups_per_op=4)


# ----------------------------------------------------------------------------- pytest entries

def test_conn_table(sim):
    from tb.harness import run_cocotb
    run_cocotb(ConnTable, SMALL, "tb.test_conn_table", sim,
               testcase=["ct_random_mix", "ct_fill", "ct_adversarial", "ct_lookup_rate",
                         "ct_reset"])


def test_conn_table_large(sim):
    from tb.harness import run_cocotb
    params = {"entries": 65536, "value_width": 16, "stash": 4, "max_moves": 256, "state_width": 0}
    run_cocotb(ConnTable, params, "tb.test_conn_table", sim, testcase="ct_large")


def test_conn_table_amaranth():
    """The same random mix on the Amaranth simulator (no build step)."""
    from sim.jobs import run_job
    run_job(ConnTable, SMALL, random_mix, sim="amaranth",
            job_args={"params": SMALL, "ops": 150, "stall": 0.3, "seed": 11})


def test_siphash_iterative():
    """The control path's iterative SipHash (hw.siphash.siphash_iterative) against the
    model: the hash arrives exactly ``siphash_latency`` cycles after ``start`` (as from the
    pipeline) and holds the right value, with the key and message changing after start."""
    from amaranth.hdl import Module, Signal
    from amaranth.sim import Simulator
    from hw.siphash import siphash24, siphash_iterative, siphash_latency

    for nbits in (FLOW_KEY.size, 64, 8):
        m = Module()
        start, key, msg = Signal(), Signal(128), Signal(nbits)
        valid, out = siphash_iterative(m, "h", start, key, msg)
        sim = Simulator(m)
        sim.add_clock(1e-6)

        async def bench(ctx, nbits=nbits, start=start, key=key, msg=msg, valid=valid, out=out):
            rng = random.Random(nbits)
            for _ in range(8):
                k, x = rng.getrandbits(128), rng.getrandbits(nbits)
                ctx.set(key, k)
                ctx.set(msg, x)
                ctx.set(start, 1)
                await ctx.tick()
                ctx.set(start, 0)
                ctx.set(key, rng.getrandbits(128))
                ctx.set(msg, rng.getrandbits(nbits))
                cycles = 1
                while not ctx.get(valid):
                    await ctx.tick()
                    cycles += 1
                    assert cycles <= siphash_latency(nbits)
                assert cycles == siphash_latency(nbits)
                assert ctx.get(out) == siphash24(k, x.to_bytes(nbits // 8, "little"))
                for _ in range(rng.randrange(3)):
                    await ctx.tick()

        sim.add_testbench(bench)
        sim.run()


# ----------------------------------------------------------------------------- model tests

def test_model_fill_65536():
    """The model at 65536 entries: fill to the first failure, then every entry is found
    where READ says, and the occupancy target holds."""
    from sim.conn_table_model import fill_to_failure
    occupancy, moves = fill_to_failure(65536, seed=1)
    assert occupancy >= 0.95, occupancy
    assert max(moves) <= 256


def test_model_failed_insert_leaves_table_unchanged():
    rng = random.Random(4)
    model = ConnTableModel(64, 32, stash=4, max_moves=16, hash_key=rng.getrandbits(128))
    while True:
        key = rng.getrandbits(FLOW_KEY.size)
        before = model.entries()
        resp = model.insert(key, 5)
        if resp.status == Status.FULL:
            assert model.entries() == before
            break
    for k, (slot, index, value) in before.items():
        assert model.lookup(k) == (1, index, value)
        assert model.read(slot).key == k
    assert len({index for _, index, _ in before.values()}) == len(before)


# ----------------------------------------------------------------------------- bench

#: The block's synthesis/bench defaults (sim/blocks.py uses the same).
DEFAULTS = {"entries": 4096, "value_width": 32, "stash": 4, "max_moves": 256, "state_width": 64}


def insert_latency_bound(params):
    """Worst-case INSERT latency in cycles (command accepted -> response valid), from the
    FSM: dispatch, the hash, find, select and decide (``hash + 7`` in all, the latency of
    every command without a walk), the first walk step (3 cycles), ``max_moves`` more of
    4 cycles (set-up, read, data, move), the stash check, ``max_moves`` undo steps of 4."""
    from hw.siphash import siphash_latency
    moves = params["max_moves"]
    return siphash_latency(FLOW_KEY.size) + 7 + 3 + 4 * moves + 1 + 4 * moves


async def bench_conn_table(bus, width=64, entries=4096, load=0.9, mix_ops=300, seeds=20):
    """`acceltcp bench conn_table`: lookups at full rate while the table is filled to
    ``load`` and then ``mix_ops`` random inserts/deletes run (RTL), and the occupancy at the
    first failed insert (bit-exact model, median over ``seeds`` seeds, 4096 and 65536)."""
    import statistics
    import time

    from sim.conn_table_model import fill_to_failure
    params = dict(DEFAULTS, entries=entries)
    rng = random.Random(1)
    model = ConnTableModel(entries, params["value_width"], params["stash"], params["max_moves"])
    pool = random_keys(rng, int(entries * load) + mix_ops)
    fill = int(entries * load)
    commands = [{"op": int(Op.INSERT), "key": k, "value": rng.getrandbits(32)} for k in pool[:fill]]
    present = list(pool[:fill])
    spare = list(pool[fill:])
    for _ in range(mix_ops):
        if rng.random() < 0.5 and spare:
            key = spare.pop()
            present.append(key)
            commands.append({"op": int(Op.INSERT), "key": key, "value": 1})
        else:
            key = present.pop(rng.randrange(len(present)))
            spare.append(key)
            commands.append({"op": int(Op.DELETE), "key": key})
    _, expected, history = plan_commands(model, rng, 0, pool, first=commands)
    lookups = [rng.choice(pool) for _ in range(len(commands) * 30)]
    start = bus.cycle
    figures = await run_table(bus, params, commands, expected, history, lookups, stall=0.0,
                              seed=1, max_cycles=len(commands) * 2000)
    # Latencies per op (accept -> response), from a second pass over the stamps.
    out = {
        "entries": entries,
        "lookups_per_cycle": figures["lookups_per_cycle"],
        "lookup_latency_cycles": figures["lookup_latency_cycles"],
        "load_reached": round(model.count / entries, 4),
        "commands": len(commands),
        "simulated_cycles": bus.cycle - start,
    }
    out.update(_latencies(commands, expected, figures))
    out["insert_latency_bound_cycles"] = insert_latency_bound(params)
    assert out["insert_latency_worst_cycles"] <= out["insert_latency_bound_cycles"], out
    began = time.perf_counter()
    for size in (4096, 65536):
        occ = [fill_to_failure(size, seed, params["stash"], params["max_moves"])[0]
               for seed in range(seeds)]
        out[f"occupancy_at_first_failure_{size}"] = round(statistics.median(occ), 4)
        out[f"occupancy_at_first_failure_{size}_min"] = round(min(occ), 4)
    out["occupancy_seeds"] = seeds
    out["occupancy_model_seconds"] = round(time.perf_counter() - began, 1)
    return out


def _latencies(commands, expected, figures):
    lat = figures["latencies"]
    out = {}
    for name, op in (("insert", Op.INSERT), ("delete", Op.DELETE)):
        values = [lat[k] for k, c in enumerate(commands) if c["op"] == op]
        out[f"{name}_latency_worst_cycles"] = max(values)
        out[f"{name}_latency_mean_cycles"] = round(sum(values) / len(values), 2)
    return out


def test_docs_code_tables():
    """docs/conn_table.md lists every op and status code with the values of hw.conn_table."""
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "docs" / "conn_table.md").read_text()
    for enum in (Op, Status):
        for code in enum:
            assert f"| {code.value} | `{code.name}` |" in text, code
