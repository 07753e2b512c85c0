"""Testbench of ``CommandDecoder``: every command op, and every way a command can be bad.

The decoder runs alone: command entries come in as a ``RingFetcher`` hands them on, the
engines' ports are sinks with random stalls, the connection table is a Python responder
and a CLOSE's held data comes from ``sim.dma_responder``. A random sequence of commands
(all ops, CLOSEs with and without data, held data too long, misaligned or outside host
memory, entries the fetcher could not read, unknown ops) must give, in order, exactly
the records each engine port should see and the COMMAND_DONE events the host should
get. Amaranth simulator, Verilator and Icarus, W=64 and W=512.
"""

import random

import cocotb
import pytest

from hw.command_decoder import CommandDecoder
from hw.conn_table import FLOW_KEY, Geometry, command_layout, response_layout
from hw.handshake import CONNECT_REQUEST, ControlOp, control_layout
from hw.host_formats import (COMMAND_ENTRY, EVENT_ENTRY, CommandOp, CommandStatus,
                             HostEventKind)
from hw.listen_table import LISTEN_ENTRY
from hw.metadata import FLOW_VALUE
from hw.ring_fetch import fetched_entry_layout
from hw.splice import SPLICE_COMMAND
from hw.stream import pack_struct, unpack_beat, unpack_struct
from hw.teardown import CLOSE_COMMAND, MAX_HELD_DATA
from sim.bus import StreamSink, StreamSource, run_until
from sim.dma_responder import DmaReadResponder
from sim.pcie import HostMemory

DATA_BASE = 0x100000
GEO = Geometry(4096, stash=4, max_moves=256)


def _random(layout, rng):
    return rng.getrandbits(layout.size)


class TableResponder:
    """The connection table's command port: answers each command after a few cycles."""

    def __init__(self, bus, rng, stall):
        self.rng = rng
        self.commands = StreamSink(bus, "table_cmd", stall=stall, rng=random.Random(rng.random()))
        self.responses = StreamSource(bus, "table_resp", stall=stall,
                                      rng=random.Random(rng.random()))
        self.answers = []

    def drive(self):
        self.commands.drive()
        self.responses.drive()

    def sample(self):
        before = len(self.commands.received)
        self.commands.sample()
        for _ in self.commands.received[before:]:
            answer = self.rng.getrandbits(response_layout(GEO, FLOW_VALUE.size).size)
            self.answers.append(answer)
            self.responses.send([answer])
        self.responses.sample()


async def decoder_job(bus, width, seed=1, stall=0.3, count=60):
    rng = random.Random(seed)
    memory = HostMemory()
    memory.register(DATA_BASE, 64 * 1024, "held data")
    dma = DmaReadResponder(bus, memory, width, latency=rng.randrange(2, 20), stall=stall,
                           rng=random.Random(rng.random()))
    entries = StreamSource(bus, "entry", stall=stall, rng=random.Random(rng.random()))
    sinks = {name: StreamSink(bus, name, stall=stall, rng=random.Random(rng.random()))
             for name in ("control", "close", "close_data", "splice", "done")}
    table = TableResponder(bus, rng, stall)
    agents = [dma, entries, table, *sinks.values()]
    beat_bytes = width // 8
    expected = {name: [] for name in ("control", "close", "close_data", "splice")}
    done = []                                     # (index, tag, status, table answer or None)
    tables = 0
    table_commands = []
    entry_layout = fetched_entry_layout(128)

    for index in range(count):
        tag = rng.getrandbits(16)
        op = rng.choice(list(CommandOp) + [9, 200])
        fields = {"op": op, "tag": tag}
        error = rng.random() < 0.05
        status = CommandStatus.DMA_ERROR if error else None
        if op == CommandOp.NOP:
            status = status if error else CommandStatus.OK
        elif op == CommandOp.LISTEN:
            listen = {"index": rng.randrange(16), "entry": _random(LISTEN_ENTRY, rng)}
            fields["body"] = {"listen": listen}
            if not error:
                expected["control"].append(pack_struct(
                    control_layout(16), op=ControlOp.WRITE_LISTENER, **listen))
                status = CommandStatus.OK
        elif op == CommandOp.SET_KEY:
            key = rng.getrandbits(128)
            fields["body"] = {"key": key}
            if not error:
                expected["control"].append(pack_struct(control_layout(16), op=ControlOp.SET_KEY,
                                                       key=key))
                status = CommandStatus.OK
        elif op == CommandOp.CONNECT:
            connect = _random(CONNECT_REQUEST, rng)
            fields["body"] = {"connect": connect}
            if not error:
                expected["control"].append(pack_struct(control_layout(16), op=ControlOp.CONNECT,
                                                       connect=connect))
        elif op == CommandOp.CLOSE:
            close = unpack_struct(CLOSE_COMMAND, _random(CLOSE_COMMAND, rng))
            case = rng.choice(["data", "data", "none", "long", "misaligned", "unreadable"])
            addr = DATA_BASE + rng.randrange(0, 32 * 1024, beat_bytes)
            length = rng.randrange(1, MAX_HELD_DATA + 1)
            if case == "none":
                length = 0
            elif case == "long":
                length = rng.randrange(MAX_HELD_DATA + 1, 1 << 16)
            elif case == "misaligned":
                addr += rng.randrange(1, beat_bytes)
            elif case == "unreadable":
                addr = 0x9000000
            close["data_length"] = length
            fields["body"] = {"close": close}
            fields["addr"] = addr
            data = rng.randbytes(length)
            if case == "data":
                memory.write(addr, data)
            if not error:
                if case in ("data", "none"):
                    expected["close"].append(pack_struct(CLOSE_COMMAND, **close))
                    padded = data + bytes(-len(data) % beat_bytes)
                    expected["close_data"] += [padded[k:k + beat_bytes]
                                               for k in range(0, len(padded), beat_bytes)]
                elif case in ("long", "misaligned"):
                    status = CommandStatus.BAD_LENGTH
                else:
                    status = CommandStatus.DMA_ERROR
        elif op == CommandOp.SPLICE:
            splice = _random(SPLICE_COMMAND, rng)
            fields["body"] = {"splice": splice}
            if not error:
                expected["splice"].append(splice)
        elif op == CommandOp.TABLE:
            command = {"op": rng.randrange(6), "key": _random(FLOW_KEY, rng),
                       "value": rng.getrandbits(16), "slot": rng.randrange(GEO.slots),
                       "hash_key": rng.getrandbits(128)}
            fields["body"] = {"table": command}
            if not error:
                table_commands.append(pack_struct(command_layout(GEO, FLOW_VALUE.size),
                                                  **command))
                tables += 1
                done.append((index, tag, CommandStatus.OK, tables))
        else:
            status = status if error else CommandStatus.UNKNOWN_OP
        if status is not None:
            done.append((index, tag, status, None))
        raw = pack_struct(COMMAND_ENTRY, **fields)
        entries.send([pack_struct(entry_layout, index=index, error=int(error), data=raw)])

    def finished():
        return (len(sinks["done"].received) == len(done)
                and all(len(sinks[name].received) == len(want) for name, want in expected.items()))
    await run_until(bus, agents, finished, 200000)

    ctl = control_layout(16)
    for got, want in zip(sinks["control"].received, expected["control"]):
        got, want = unpack_struct(ctl, got), unpack_struct(ctl, want)
        assert got["op"] == want["op"]
        if want["op"] == ControlOp.WRITE_LISTENER:
            assert (got["index"], got["entry"]) == (want["index"], want["entry"])
        elif want["op"] == ControlOp.SET_KEY:
            assert got["key"] == want["key"]
        else:
            assert got["connect"] == want["connect"]
    assert table.commands.received == table_commands
    assert sinks["close"].received == expected["close"]
    assert sinks["splice"].received == expected["splice"]
    got_data = [unpack_beat(width, p)[0] for p in sinks["close_data"].received]
    # keep/last are not the engine's concern; the data beats are.
    assert [b + bytes(beat_bytes - len(b)) for b in got_data] == expected["close_data"]
    resp = response_layout(GEO, FLOW_VALUE.size)
    for got, (index, tag, status, table_k) in zip(sinks["done"].received, done):
        event = unpack_struct(EVENT_ENTRY, got)
        assert event["event"]["kind"] == HostEventKind.COMMAND_DONE
        assert (event["ring_index"], event["command_tag"], event["event"]["status"]) == \
            (index, tag, status), index
        if table_k is not None:
            answer = unpack_struct(resp, table.answers[table_k - 1])
            assert event["table"]["status"] == answer["status"]
            assert event["table"]["index"] == answer["index"]
            assert event["table"]["value"] == answer["value"]
            assert pack_struct(FLOW_KEY, **event["table"]["key"]) == \
                pack_struct(FLOW_KEY, **answer["key"])
    return {"commands": count, "events": len(done)}


@cocotb.test()
async def command_decoder(dut):
    from tb.cocotb_util import start
    from tb.harness import tb_params
    await decoder_job(await start(dut), tb_params()["width"])


@pytest.mark.parametrize("width", [64, 512])
def test_command_decoder_rtl(sim, width):
    from tb.harness import run_cocotb
    run_cocotb(CommandDecoder, {"width": width}, "tb.test_command_decoder", sim)


def test_command_decoder_amaranth():
    from sim.jobs import run_job
    run_job(CommandDecoder, {"width": 64}, decoder_job, sim="amaranth", job_args={"width": 64})
