"""The cocotb side of ``sim.jobs.run_job``: runs one job in a Verilator or Icarus simulation.

``run_job`` starts cocotb on this module with three environment variables:

  ACCELTCP_JOB          the job to run, as "module:qualname"
  ACCELTCP_JOB_ARGS_FILE  a file holding its keyword arguments, as a JSON object
  ACCELTCP_JOB_RESULT   the file where this module writes the outcome, as JSON:
                        {"ok": true, "value": <job's dict>, "cycles": n, "seconds": s}
                        or {"ok": false, "error": "<traceback>"}

The test below is not named ``test_*`` so that pytest never collects this module.
"""

import json
import os
import time
import traceback

import cocotb

from sim.jobs import load_job
from tb.cocotb_util import start


def _write(record):
    with open(os.environ["ACCELTCP_JOB_RESULT"], "w") as out:
        json.dump(record, out)


@cocotb.test()
async def run_job_in_cocotb(dut):
    try:
        job = load_job(os.environ["ACCELTCP_JOB"])
        with open(os.environ["ACCELTCP_JOB_ARGS_FILE"]) as args:
            job_args = json.load(args)
        bus = await start(dut)                 # clock running, reset done
        began = time.perf_counter()
        value = await job(bus, **job_args)
        seconds = time.perf_counter() - began
        record = {"ok": True, "value": value, "cycles": bus.cycle, "seconds": seconds}
        json.dumps(record)                     # a non-JSON result fails here, with its reason
    except Exception:
        _write({"ok": False, "error": traceback.format_exc()})
        raise
    _write(record)
