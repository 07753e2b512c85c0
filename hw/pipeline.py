"""A builder for fixed-latency pipelines that never stall.

Writing a deep pipeline by hand means declaring, for every stage, a register for every
value that later stages still need. ``Pipeline`` does that bookkeeping: a value is
*defined* at the stage where it is computed and *read* at any later stage; the carry
registers in between are made on demand. Each stage is one clock cycle::

    p = Pipeline(m, "parse", valid=start)           # stage 0: combinational inputs
    p.define("hdr", hdr_bytes, at=0)                 # registered: available at stage 1
    ihl = ...from p.get("hdr", 1)...
    p.define("ihl", ihl, at=1)                       # available at stage 2
    total = p.get("ihl", 7)                          # carried through stages 3..7

Values carried over many stages go through small LUT-RAM delay lines (16 deep, in
lanes of 64 bits with their own pointers) instead of chains of flip-flops: a wide
pipeline then stays small and its routing short. ``p.valid(k)`` is stage ``k``'s valid
bit. ``p.inject(name, signal, at)`` adds a value that
another pipeline computes and that belongs to stage ``at``.
"""

from amaranth.hdl import Module, Shape, Signal, Value, unsigned
from amaranth.lib.memory import Memory

__all__ = ["Pipeline", "adder_tree"]


class Pipeline:
    def __init__(self, m, name, valid):
        # The registers live in a module of their own, so that a value read inside an
        # ``m.If`` of the caller is still carried on every cycle.
        self._m = Module()
        m.submodules[f"{name}_pipeline"] = self._m
        self._name = name
        self._values = {}
        self._valids = {0: valid}

    def define(self, name, value, at):
        """Register ``value`` (computed from stage ``at``) as ``name`` in stage ``at + 1``."""
        if name in self._values:
            raise NameError(f"pipeline {self._name}: {name!r} defined twice")
        value = Value.cast(value)
        reg = Signal(value.shape(), name=f"{self._name}_{name}_s{at + 1}")
        self._m.d.sync += reg.eq(value)
        self._values[name] = {at + 1: reg}
        return reg

    def inject(self, name, signal, at):
        """Make ``signal``, which is valid for the frame in stage ``at``, readable as ``name``."""
        if name in self._values:
            raise NameError(f"pipeline {self._name}: {name!r} defined twice")
        self._values[name] = {at: signal}
        return signal

    #: Carry a value in a LUT-RAM delay line when it is this wide and goes this far.
    DELAY_MIN_BITS = 8
    DELAY_MIN_STAGES = 4
    DELAY_MAX_STAGES = 16
    LANE_BITS = 64

    def get(self, name, at):
        """``name`` as seen by stage ``at``."""
        chain = self._values[name]
        first = min(chain)
        if at < first:
            raise ValueError(f"pipeline {self._name}: {name!r} is defined at stage {first}, "
                             f"read at stage {at}")
        if at in chain:
            return chain[at]
        last = max(stage for stage in chain if stage < at)
        source = chain[last]
        distance = at - last
        if (len(Value.cast(source)) >= self.DELAY_MIN_BITS
                and self.DELAY_MIN_STAGES <= distance <= self.DELAY_MAX_STAGES):
            chain[at] = self._delay_line(source, distance, f"{name}_s{last}_to_s{at}")
            return chain[at]
        while last < at:
            reg = Signal(Shape.cast(chain[last].shape()), name=f"{self._name}_{name}_s{last + 1}")
            self._m.d.sync += reg.eq(chain[last])
            chain[last + 1] = reg
            last += 1
        return chain[at]

    def _delay_line(self, value, cycles, name):
        """``value`` delayed by ``cycles`` (2..16) clock cycles, through LUT RAM: written
        every cycle at a running pointer, read ``cycles - 1`` entries behind it, and
        registered."""
        value = Value.cast(value)
        out = Signal(len(value), name=f"{self._name}_{name}")
        for lo in range(0, len(value), self.LANE_BITS):
            width = min(self.LANE_BITS, len(value) - lo)
            mem = Memory(shape=unsigned(width), depth=self.DELAY_MAX_STAGES, init=[])
            self._m.submodules[f"{self._name}_{name}_mem{lo}"] = mem
            write = mem.write_port()
            read = mem.read_port(domain="comb")
            pointer = Signal(range(self.DELAY_MAX_STAGES), name=f"{self._name}_{name}_ptr{lo}")
            self._m.d.sync += pointer.eq(pointer + 1)
            self._m.d.comb += [write.addr.eq(pointer), write.data.eq(value[lo:lo + width]),
                               write.en.eq(1), read.addr.eq(pointer - (cycles - 1))]
            self._m.d.sync += out[lo:lo + width].eq(read.data)
        return out

    def valid(self, at):
        last = max(self._valids)
        while last < at:
            reg = Signal(name=f"{self._name}_valid_s{last + 1}")
            self._m.d.sync += reg.eq(self._valids[last])
            self._valids[last + 1] = reg
            last += 1
        return self._valids[at]


def adder_tree(pipe, name, values, at, width):
    """Sum ``values`` (computed at stage ``at``) with one level of two-input adders per
    stage. Returns (stage at which the sum is available, the sum's name)."""
    level = 0
    names = []
    for k, value in enumerate(values):
        names.append(f"{name}_l0_{k}")
        pipe.inject(names[-1], Value.cast(value), at)
    stage = at
    while len(names) > 1:
        level += 1
        paired = []
        for k in range(0, len(names), 2):
            terms = [pipe.get(n, stage) for n in names[k:k + 2]]
            total = terms[0] + terms[1] if len(terms) == 2 else terms[0]
            paired.append(f"{name}_l{level}_{k // 2}")
            pipe.define(paired[-1], total[:width], stage)
        names = paired
        stage += 1
    return stage, names[0]
