"""Connection table: a keyed two-choice cuckoo hash of flows, one lookup per clock.

``ConnTable(entries, value_width, stash, max_moves, state_width)`` maps a flow key
(``FLOW_KEY``: ingress port, IPv4 source/destination, TCP ports) to a value of
``value_width`` bits and a stable *flow index* (0 .. entries + stash - 1) that addresses
the per-flow state memory. Design, occupancy argument and figures: docs/conn_table.md.

Organisation
  * SipHash-2-4 of the key under the host's 128-bit hash key gives bucket ``h[0:k]`` in
    table 0 and ``h[32:32+k]`` in table 1; each table has ``entries/8`` buckets of 4 ways,
    one memory per (table, way), so a lookup reads its 8 candidate slots in one cycle.
    A stash of ``stash`` registers holds entries the cuckoo walk could not place.
  * Memory words hold valid, pending, key, value, flow index and the entry's bucket in
    the other table (so a move never re-hashes).
  * Each memory has three ports: the lookup read port, and the control read and write
    ports, which share one address (one RAM port). A lookup that reads a word at the
    edge that writes it takes the written word from the write register (so it never
    sees a half-written word, and Yosys adds no transparency logic); lookups never stall.

Lookup (``i`` -> ``o``): one key per cycle, in order, ``lookup_latency`` cycles (25) with
a ready sink: the hash (18), the bucket address registers (duplicated), the memory
read, the keys compared in parts, the compares completed, the hit selection, the result
FIFO. A lookup
accepted in cycle c sees the table as it is after the edge ending cycle
c + ``SNAPSHOT_LATENCY`` (19). ``i.ready`` is a credit check on the result FIFO, so only a
stalled ``o`` can slow lookups; control commands never do.

Control (``cmd`` -> ``resp``): one command at a time (``Op``), one response each with a
``Status``; its hash is an iterative SipHash unit (same latency as the lookup's pipeline). INSERT places the key in the less loaded of its two buckets; when both are
full it does a random walk (xorshift32 draws): the carried entry takes a random way and
the entry there becomes the carried one, at most ``max_moves`` times; a homeless carried
entry goes to the stash, and when the stash is full the walk is undone step by step and
the answer is FULL with the table unchanged. Each move is one write of the memory and
one update of the carry register at the same clock edge, and lookups compare the carry
register too, so every entry is visible at every instant (in exactly one place). The
inserted entry is written *pending* (invisible to lookups) until the insert succeeds.
SET_KEY is only accepted while the table is empty (NOT_EMPTY otherwise); to rotate the
hash key the host reads its flows (READ by slot), CLEARs, sets the key and re-inserts.

Reset: the memories are swept (``entries/8`` cycles) after a reset and on CLEAR; during
the sweep ``cmd.ready`` is low and lookups miss. A reset drops in-flight lookups and the
command being executed (no response); the hash key returns to zero.

Ports
  i      In(stream FLOW_KEY)                     lookup keys
  o      Out(stream {hit, index, value})         lookup results, in order
  cmd    In(stream command_layout(...))          control commands
  resp   Out(stream response_layout(...))        one response per command
  count  Out                                     entries held (tables + stash); it
                                                 changes one cycle after the response
  state_raddr/state_rdata, state_waddr/state_wdata/state_we
         the per-flow state memory (``state_width`` bits per flow index; synchronous
         read, one cycle), for the engines; the table never touches it.
"""

from enum import IntEnum

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .pipeline import Pipeline
from .siphash import siphash_iterative, siphash_latency, siphash_pipeline
from .stream import lowest_set, one_hot_select, pack_struct, struct_value

__all__ = ["FLOW_KEY", "Op", "Status", "TABLES", "WAYS", "RNG_SEED", "Geometry",
           "flow_key_bytes", "xorshift32", "ConnTable", "entry_layout", "result_layout",
           "command_layout", "response_layout"]

#: The flow key: ingress port, IPv4 source and destination, TCP ports. The SipHash
#: message is this flat value's 13 bytes, little-endian (``flow_key_bytes``).
FLOW_KEY = data.StructLayout({"port": 8, "src": 32, "dst": 32, "sport": 16, "dport": 16})

TABLES = 2          # two hash choices, one per table
WAYS = 4            # entries per bucket
RNG_SEED = 0x2545F491


class Op(IntEnum):
    """Control commands (the ``op`` field of a command)."""
    INSERT = 0      # key, value -> flow index, slot
    DELETE = 1      # key
    UPDATE = 2      # key, value: replace the value
    READ = 3        # slot -> key, value, flow index of the entry in that slot
    SET_KEY = 4     # hash_key: only while the table is empty
    CLEAR = 5       # empty the table (keeps the hash key)


class Status(IntEnum):
    """Response status codes."""
    OK = 0
    DUPLICATE = 1   # INSERT of a key already present (index/slot: the existing entry)
    FULL = 2        # INSERT found no place; the table is unchanged
    NOT_FOUND = 3   # DELETE/UPDATE of an absent key, READ of an empty slot
    BAD_INDEX = 4   # READ of a slot >= entries + stash
    NOT_EMPTY = 5   # SET_KEY while entries are present
    BAD_OP = 6      # unknown op code


def xorshift32(x):
    """The walk's random generator (one step)."""
    x ^= (x << 13) & 0xFFFFFFFF
    x ^= x >> 17
    x ^= (x << 5) & 0xFFFFFFFF
    return x


def flow_key_bytes(key):
    """The SipHash message of a flow key (flat integer or dict)."""
    if isinstance(key, dict):
        key = pack_struct(FLOW_KEY, **key)
    return int(key).to_bytes(FLOW_KEY.size // 8, "little")


class Geometry:
    """Sizes and slot numbering of a table of ``entries`` slots plus ``stash``.

    Slot ``s < entries`` is way ``s % 4`` of bucket ``(s // 4) % buckets`` of table
    ``s // (entries // 2)``; slot ``entries + k`` is stash entry ``k``.
    """

    def __init__(self, entries, stash=4, max_moves=64):
        if entries < 16 or entries & (entries - 1):
            raise ValueError(f"entries must be a power of two >= 16, not {entries}")
        self.entries, self.stash, self.max_moves = entries, stash, max_moves
        self.buckets = entries // (TABLES * WAYS)
        self.bucket_bits = self.buckets.bit_length() - 1
        self.slots = entries + stash
        self.capacity = self.slots
        self.index_bits = max(1, (self.slots - 1).bit_length())
        self.slot_bits = self.index_bits

    def buckets_of(self, h):
        """(bucket in table 0, bucket in table 1) of a 64-bit hash."""
        return h & (self.buckets - 1), (h >> 32) & (self.buckets - 1)

    def slot(self, t, b, w):
        return (t * self.buckets + b) * WAYS + w

    def position(self, slot):
        return slot // (self.buckets * WAYS), (slot // WAYS) % self.buckets, slot % WAYS


# ----------------------------------------------------------------------------- layouts

def entry_layout(geo, value_width):
    """One slot of a table memory."""
    return data.StructLayout({"valid": 1, "pending": 1, "key": FLOW_KEY, "value": value_width,
                              "index": geo.index_bits, "alt": max(1, geo.bucket_bits)})


def result_layout(geo, value_width):
    """A lookup result: hit, flow index and value (index and value are 0 on a miss)."""
    return data.StructLayout({"hit": 1, "index": geo.index_bits, "value": value_width})


def command_layout(geo, value_width):
    """A control command; the fields an op does not use are ignored."""
    return data.StructLayout({"op": 3, "key": FLOW_KEY, "value": value_width,
                              "slot": geo.slot_bits, "hash_key": 128})


def response_layout(geo, value_width):
    """A control response: the entry concerned (key, value, flow index, slot)."""
    return data.StructLayout({"status": 3, "op": 3, "index": geo.index_bits,
                              "slot": geo.slot_bits, "key": FLOW_KEY, "value": value_width})


#: The control FSM's states (see ``ConnTable.elaborate``).
STATES = ("SWEEP", "IDLE", "DISPATCH", "HASH", "RD", "DATA", "READ", "CMP", "SELECT", "DECIDE",
          "WALK", "HOMELESS", "UNDO", "SETUP", "FINALIZE", "FINALIZE_WRITE", "RESPOND")


def _eq_parts(a, b, part):
    """Equality of ``a`` and ``b`` per ``part``-bit slice (a bit each): all ones when a == b.

    A register of these between two stages splits a wide compare: 2-bit parts are one
    LUT4 level, 8-bit parts two."""
    return Cat(*[a[i:i + part] == b[i:i + part] for i in range(0, len(a), part)])


def _hw_xorshift32(x):
    x = x ^ (x << 13)[:32]
    x = x ^ (x >> 17)
    return x ^ (x << 5)[:32]


# ----------------------------------------------------------------------------- the block

class ConnTable(wiring.Component):
    """The connection table (see the module docstring)."""

    #: A lookup accepted in cycle c sees the table as it is after the clock edge that ends
    #: cycle c + SNAPSHOT_LATENCY: the hash, then the memories' address registers.
    SNAPSHOT_LATENCY = siphash_latency(FLOW_KEY.size) + 1

    def __init__(self, entries=4096, value_width=32, stash=4, max_moves=256, state_width=64):
        self.geo = Geometry(entries, stash, max_moves)
        assert stash >= 1 and max_moves >= 1
        self.value_width = value_width
        self.state_width = state_width
        self.entry = entry_layout(self.geo, value_width)
        self.hash_latency = siphash_latency(FLOW_KEY.size)
        self.pipe_latency = self.hash_latency + 5    # accepted key -> result into the FIFO
        depth = 4
        while depth < self.pipe_latency + 4:
            depth *= 2
        self.fifo_depth = depth
        self.lookup_latency = self.pipe_latency + 2  # + SyncFIFOBuffered
        ports = {
            "i": In(stream.Signature(FLOW_KEY)),
            "o": Out(stream.Signature(result_layout(self.geo, value_width))),
            "cmd": In(stream.Signature(command_layout(self.geo, value_width))),
            "resp": Out(stream.Signature(response_layout(self.geo, value_width))),
            "count": Out(range(self.geo.slots + 1)),
        }
        if state_width:
            ports.update({"state_raddr": In(self.geo.index_bits), "state_rdata": Out(state_width),
                          "state_waddr": In(self.geo.index_bits), "state_wdata": In(state_width),
                          "state_we": In(1)})
        super().__init__(ports)

    def elaborate(self, platform):
        m = Module()
        geo, E = self.geo, self.entry
        V, IB, BB = self.value_width, geo.index_bits, max(1, geo.bucket_bits)
        S, M = geo.stash, geo.max_moves
        H = self.hash_latency

        def bucket_bits(h, t):
            return h[32 * t:32 * t + geo.bucket_bits] if geo.bucket_bits else Const(0, 1)

        # ---- state shared by both paths ----------------------------------------------
        hash_key = Signal(128)
        sweeping = Signal(init=1)           # the SWEEP state, as a register of its own
        stash_valid = [Signal(name=f"stash{s}_valid") for s in range(S)]
        stash_key = [Signal(FLOW_KEY.size, name=f"stash{s}_key") for s in range(S)]
        stash_value = [Signal(V, name=f"stash{s}_value") for s in range(S)]
        stash_index = [Signal(IB, name=f"stash{s}_index") for s in range(S)]
        carry_valid = Signal()
        carry_pending = Signal()
        carry_key = Signal(FLOW_KEY.size)
        carry_value = Signal(V)
        carry_index = Signal(IB)
        carry_t = Signal()
        carry_b = Signal(BB)
        carry_alt = Signal(BB)
        cn_load = Signal()
        cn_valid = Signal(name="cn_valid")
        cn_pending = Signal(name="cn_pending")
        cn_t = Signal(name="cn_t")
        cn_key = Signal(FLOW_KEY.size, name="cn_key")
        cn_value = Signal(V, name="cn_value")
        cn_index = Signal(IB, name="cn_index")
        cn_b, cn_alt = Signal(BB, name="cn_b"), Signal(BB, name="cn_alt")
        m.d.sync += cn_load.eq(0)
        with m.If(cn_load):
            m.d.sync += [carry_valid.eq(cn_valid), carry_pending.eq(cn_pending),
                         carry_t.eq(cn_t), carry_key.eq(cn_key), carry_value.eq(cn_value),
                         carry_index.eq(cn_index), carry_b.eq(cn_b), carry_alt.eq(cn_alt)]

        ctl_addr = [Signal(BB, name=f"ctl_addr{t}") for t in range(TABLES)]
        # Control writes are decided in one cycle (we, we_t, we_w, w_*) and done in the
        # next from registers (wq_*), at the same edge as the carry register update they
        # go with (cn_* -> carry_*), which keeps every entry visible exactly once.
        # The wide fields of a written word (key, value) come from the command or from the
        # carry register, chosen by one register (``src_carry``: a walk or its undo); the
        # narrow ones are set per state. A word written with ``w_valid`` low (a delete,
        # the sweep) is empty whatever its other fields hold.
        we = Signal()
        we_t = Signal()
        we_w = Signal(2)
        src_carry = Signal()
        w_valid, w_pending = Signal(name="w_valid"), Signal(name="w_pending")
        w_index, w_alt = Signal(IB, name="w_index"), Signal(BB, name="w_alt")
        wq_en = Signal(TABLES * WAYS)
        wq_data = Signal(E.size)
        # Duplicated lookup address registers, so that no single register fans out to all
        # the block RAMs of a table, across the die. Yosys merges registers with the same
        # input and reset value (bit by bit), so the copies differ in their reset value:
        # all zeros for ways 0 and 1, all ones for ways 2 and 3, i.e. two registers per
        # address bit and table, each feeding two memories. A reset value lives for one
        # cycle, and the sweep after a reset makes every lookup miss anyway.
        lk_addr = {(t, w): Signal(BB, name=f"lk_addr_t{t}_w{w}",
                                  init=0 if w < WAYS // 2 else (1 << BB) - 1)
                   for t in range(TABLES) for w in range(WAYS)}
        lk_data, ctl_data = {}, {}
        for t in range(TABLES):
            for w in range(WAYS):
                # ``no_rw_check``: what the lookup port reads at the edge that writes the
                # same word does not matter (the lookup path takes the written word from
                # ``wq_data`` instead, see ``lk_coll``), so Yosys adds no transparency
                # logic after the block RAM. The attribute acts when Yosys merges the
                # register after the asynchronous lookup read port into the block RAM.
                mem = Memory(shape=E.size, depth=geo.buckets, init=[],
                             attrs={"no_rw_check": 1})
                m.submodules[f"mem_t{t}_w{w}"] = mem
                wr = mem.write_port()
                lk = mem.read_port(domain="comb")    # registered just after: a BRAM read
                ct = mem.read_port()
                m.d.comb += [
                    lk.addr.eq(lk_addr[t, w]),
                    ct.addr.eq(ctl_addr[t]),
                    wr.addr.eq(ctl_addr[t]),
                    wr.data.eq(wq_data),            # empty (not valid) during a sweep
                    wr.en.eq(sweeping | wq_en[t * WAYS + w]),
                ]
                lk_data[t, w] = lk.data
                ctl_data[t, w] = data.View(E, ct.data)

        # ---- lookup path ---------------------------------------------------------------
        outstanding = Signal(range(self.fifo_depth + 1))
        m.submodules.result_fifo = fifo = SyncFIFOBuffered(
            width=result_layout(geo, V).size, depth=self.fifo_depth)
        took = self.i.valid & self.i.ready
        gave = self.o.valid & self.o.ready
        m.d.comb += self.i.ready.eq(outstanding < self.fifo_depth)
        m.d.sync += outstanding.eq(outstanding + took - gave)
        m.d.comb += [self.o.valid.eq(fifo.r_rdy), self.o.payload.eq(fifo.r_data),
                     fifo.r_en.eq(self.o.ready)]

        lk_key = self.i.payload.as_value()
        hv, h = siphash_pipeline(m, "lk_hash", took, hash_key, lk_key)
        p = Pipeline(m, "lk", valid=took)
        p.inject("key", lk_key, 0)
        p.inject("hash", h, H)
        # Stage H: the bucket addresses go to the address registers of the memories.
        for t in range(TABLES):
            for w in range(WAYS):
                m.d.sync += lk_addr[t, w].eq(bucket_bits(p.get("hash", H), t))
        # Stage H+1: the memories read their words at the edge that ends this stage; the
        # lookup sees the table as it is after that edge. A word written at that same
        # edge (``wq_data``, at most one per cycle outside the sweep) is read as undefined
        # by the block RAM: ``coll{t}{w}`` marks it, and the lookup takes the written word
        # (``wr_*``) instead of the memory's, so it sees the new word as before.
        for t in range(TABLES):
            for w in range(WAYS):
                p.define(f"mem{t}{w}", lk_data[t, w], H + 1)   # merged into the block RAM
                p.define(f"coll{t}{w}", (sweeping | wq_en[t * WAYS + w])
                         & (ctl_addr[t] == lk_addr[t, w]),
                         H + 1)
        p.define("wr_word", wq_data, H + 1)
        # Stage H+2: the memory words, registered, with their keys compared in part (one
        # LUT level after the block RAM: 2-bit equalities); the stash and the carry
        # register as they are after that same edge (one consistent snapshot), and the
        # written word, compared in part too (8-bit equalities).
        key2 = p.get("key", H + 2)
        for t in range(TABLES):
            for w in range(WAYS):
                word = data.View(E, p.get(f"mem{t}{w}", H + 2))
                p.define(f"keq{t}{w}", _eq_parts(word.key.as_value(), key2, 2), H + 2)
                p.define(f"live{t}{w}", word.valid & ~word.pending, H + 2)
                p.define(f"slot_val{t}{w}", Cat(word.value, word.index), H + 2)
        wr_word = data.View(E, p.get("wr_word", H + 2))
        p.define("wr_keq", _eq_parts(wr_word.key.as_value(), key2, 8), H + 2)
        p.define("wr_live", wr_word.valid & ~wr_word.pending, H + 2)
        p.define("wr_val", Cat(wr_word.value, wr_word.index), H + 2)
        regs = [(stash_valid[s], stash_key[s], stash_value[s], stash_index[s]) for s in range(S)]
        regs.append((carry_valid & ~carry_pending, carry_key, carry_value, carry_index))
        for s, (valid, key, value, index) in enumerate(regs):
            p.define(f"reg_keq{s}", Cat(_eq_parts(key, key2, 8), valid), H + 2)
            p.define(f"reg_val{s}", Cat(value, index), H + 2)
        p.define("miss", sweeping, H + 2)
        # Stage H+3: the compares completed: a slot word whose read collided with a write
        # is replaced by the written word.
        for t in range(TABLES):
            for w in range(WAYS):
                p.define(f"slot_hit{t}{w}", p.get(f"keq{t}{w}", H + 3).all()
                         & p.get(f"live{t}{w}", H + 3) & ~p.get(f"coll{t}{w}", H + 3), H + 3)
        p.define("wr_hit", p.get("wr_keq", H + 3).all() & p.get("wr_live", H + 3)
                 & Cat(*[p.get(f"coll{t}{w}", H + 3) for t in range(TABLES)
                         for w in range(WAYS)]).any(), H + 3)
        for s in range(S + 1):
            p.define(f"reg_hit{s}", p.get(f"reg_keq{s}", H + 3).all(), H + 3)
        # Stage H+4: select the hit (at most one slot or register holds the key).
        hits = [p.get(f"slot_hit{t}{w}", H + 4) for t in range(TABLES) for w in range(WAYS)]
        vals = [p.get(f"slot_val{t}{w}", H + 4) for t in range(TABLES) for w in range(WAYS)]
        hits += [p.get(f"reg_hit{s}", H + 4) for s in range(S + 1)] + [p.get("wr_hit", H + 4)]
        vals += [p.get(f"reg_val{s}", H + 4) for s in range(S + 1)] + [p.get("wr_val", H + 4)]
        hit = Const(0, 1)
        sel = Const(0, V + IB)
        for hb, val in zip(hits, vals):
            hit = hit | hb
            sel = sel | Mux(hb, val, 0)
        miss = p.get("miss", H + 4)
        p.define("result", struct_value(result_layout(geo, V), {
            "hit": hit & ~miss, "value": Mux(miss, 0, sel[:V]), "index": Mux(miss, 0, sel[V:])}), H + 4)
        m.d.comb += [fifo.w_en.eq(p.valid(H + 5)), fifo.w_data.eq(p.get("result", H + 5))]
        assert H + 5 == self.pipe_latency

        # ---- control path --------------------------------------------------------------
        C = command_layout(geo, V)
        R = response_layout(geo, V)
        cmd = Signal(C)
        resp = Signal(R)
        resp_valid = Signal()
        m.d.comb += [self.resp.valid.eq(resp_valid), self.resp.payload.eq(resp)]

        ctl_start = Signal()
        # One command at a time: the control path's hash is iterative (same latency as the
        # lookup pipeline, a tenth of its size).
        cv, ch = siphash_iterative(m, "ctl_hash", ctl_start, hash_key, cmd.key.as_value())
        b = [Signal(BB, name=f"b{t}") for t in range(TABLES)]

        rd = {(t, w): Signal(E, name=f"rd_t{t}_w{w}") for t in range(TABLES) for w in range(WAYS)}

        # Flow indices: a LIFO of freed ones, then fresh ones.
        count = Signal(range(geo.slots + 1))
        m.d.comb += self.count.eq(count)
        sp = Signal(range(geo.slots + 1))
        fresh = Signal(range(geo.slots + 1))
        stack = Memory(shape=IB, depth=geo.slots, init=[])
        m.submodules.free_stack = stack
        push = stack.write_port()
        top = stack.read_port()
        m.d.comb += [push.addr.eq(sp), top.addr.eq(sp - 1)]
        # The next flow index, registered: sp and fresh change only at a commit or a
        # release, and the next use is many cycles later (a new command's DECIDE).
        index_new = Signal(IB)
        m.d.sync += index_new.eq(Mux(sp != 0, top.data, fresh))
        # count == slots, count == 0 (registered)
        full = Signal(name="full")
        empty = Signal(init=1, name="empty")
        m.d.sync += [full.eq(count == geo.slots), empty.eq(count == 0)]
        commit = Signal()
        release = Signal()
        release_index = Signal(IB)
        # Acted on one cycle later, from registers (the state after a commit or a release
        # is RESPOND, and the next command needs count, sp and fresh cycles later).
        commit_q = Signal(name="commit_q")
        release_q = Signal(name="release_q")
        release_index_q = Signal(IB, name="release_index_q")
        m.d.sync += [commit_q.eq(commit), release_q.eq(release),
                     release_index_q.eq(release_index)]
        m.d.comb += [push.en.eq(release_q), push.data.eq(release_index_q)]
        with m.If(commit_q):
            m.d.sync += count.eq(count + 1)
            with m.If(sp != 0):
                m.d.sync += sp.eq(sp - 1)
            with m.Else():
                m.d.sync += fresh.eq(fresh + 1)
        with m.If(release_q):
            m.d.sync += [count.eq(count - 1), sp.eq(sp + 1)]

        rng = Signal(32, init=RNG_SEED)
        # The next draw, registered: ``rng`` changes at most once per move (4 cycles).
        rng_next = Signal(32, init=xorshift32(RNG_SEED))
        m.d.sync += rng_next.eq(_hw_xorshift32(rng))
        steps = Signal(range(M + 1))
        # steps == M, steps == 1 (registered)
        steps_max = Signal(name="steps_max")
        steps_one = Signal(name="steps_one")
        m.d.sync += [steps_max.eq(steps == M), steps_one.eq(steps == 1)]
        path = Memory(shape=2, depth=M, init=[])
        m.submodules.path = path
        path_w = path.write_port()
        path_r = path.read_port()           # synchronous: ``last`` is set cycles before use
        last = Signal(range(M))              # steps - 1, kept as a register
        m.d.comb += [path_w.addr.eq(steps), path_r.addr.eq(last)]

        new_t = Signal(name="new_t")
        new_b = Signal(BB, name="new_b")
        new_w = Signal(2, name="new_w")
        new_alt = Signal(BB, name="new_alt")

        # Find results (registered in CMP, used in DECIDE).
        f_slot = Signal(TABLES * WAYS)
        f_stash = Signal(S)
        used = [Signal(range(WAYS + 1), name=f"used{t}") for t in range(TABLES)]
        free = [Signal(WAYS, name=f"free{t}") for t in range(TABLES)]

        def slot_number(t, bk, w):
            return Cat(Const(w, 2) if isinstance(w, int) else w, bk[:geo.bucket_bits],
                       Const(t, 1) if isinstance(t, int) else t)

        def word(valid, pending, key, value, index, alt):
            return struct_value(E, {"valid": valid, "pending": pending, "key": key,
                                    "value": value, "index": index, "alt": alt})

        # The response's wide fields are written by one AND-OR per field (below the FSM):
        # each writer adds its condition (mutually exclusive: one-hot state bits and
        # registered flags) and value here. The status is set in the states.
        resp_writes = {"key": [], "value": [], "index": [], "slot": []}

        def respond_when(cond, **fields):
            for name, value in fields.items():
                resp_writes[name].append((cond, value))

        phase = Signal(2)                    # what to do with the data of RD/DATA
        PH_FIND, PH_WALK, PH_UNDO, PH_READ = range(4)
        read_t, read_w = Signal(name="read_t"), Signal(2, name="read_w")
        sweep_reply = Signal()

        # The control read data, registered every cycle with nothing in between (no enable:
        # a wide enable net is slow); ``pick`` is one of the 8 words (the victim of a walk
        # step, the entry an undo step takes back, or the slot a READ reads).
        bkt_sel = Signal()
        m.d.sync += [rd[k].eq(ctl_data[k]) for k in rd]
        # Beside them, registered in the same cycle: the command's key compared in part
        # with every word (2-bit equalities, one LUT level after the block RAM) and with
        # the stash (8-bit equalities), for CMP; and the free ways of bucket ``bkt_sel``
        # (the lowest one and whether there is one), for WALK.
        rd_keq = {k: Signal(FLOW_KEY.size // 2, name=f"rd_keq_t{k[0]}_w{k[1]}") for k in rd}
        stash_keq = [Signal(-(-FLOW_KEY.size // 8), name=f"stash_keq{s}") for s in range(S)]
        m.d.sync += [rd_keq[k].eq(_eq_parts(ctl_data[k].key.as_value(), cmd.key.as_value(), 2))
                     for k in rd]
        m.d.sync += [stash_keq[s].eq(_eq_parts(stash_key[s], cmd.key.as_value(), 8))
                     for s in range(S)]
        any_free, w_free = Signal(name="any_free"), Signal(2, name="w_free")
        c_any_free, c_w_free = lowest_set([~Mux(bkt_sel, ctl_data[1, w].valid, ctl_data[0, w].valid)
                                           for w in range(WAYS)])
        m.d.sync += [any_free.eq(c_any_free), w_free.eq(c_w_free)]
        w_evict = rng_next[:2]
        # ``pick`` is also the slot a READ reads (way read_w of table read_t). Its select
        # is a register, loaded in DATA: what it is made of (phase, the walk's draw
        # rng_next, the undo's path_r.data, bkt_sel, read_t/read_w) is set before RD and
        # does not change before the state that uses ``pick`` (WALK, UNDO or READ).
        pick_sel = Signal(3, name="pick_sel")
        m.d.sync += pick_sel.eq(Mux(phase == PH_READ, Cat(read_w, read_t),
                                    Cat(Mux(phase == PH_UNDO, path_r.data, w_evict), bkt_sel)))
        pick = data.View(E, Signal(E.size, name="pick"))
        m.d.comb += pick.as_value().eq(
            Cat(*[rd[0, w] for w in range(WAYS)], *[rd[1, w] for w in range(WAYS)])
            .word_select(pick_sel, E.size))
        # A READ's valid bit (``pick.valid`` in READ), registered from the block RAMs'
        # outputs in DATA: it gates every data bit of the response, so it should be a
        # register, not the end of the 8-to-1 ``pick`` multiplexer.
        read_valid = Signal(name="read_valid")
        m.d.sync += read_valid.eq(Cat(*[ctl_data[t, w].valid for t in range(TABLES)
                                        for w in range(WAYS)]).bit_select(Cat(read_w, read_t), 1))

        # The write register and the next carried entry, every cycle (they are used only
        # when written, resp. loaded).
        m.d.sync += [
            wq_en.eq(Mux(we, 1 << Cat(we_w, we_t), 0)),
            wq_data.eq(word(w_valid, w_pending, Mux(src_carry, carry_key, cmd.key.as_value()),
                            Mux(src_carry, carry_value, cmd.value), w_index, w_alt)),
            cn_key.eq(Mux(src_carry, pick.key.as_value(), cmd.key.as_value())),
            cn_value.eq(Mux(src_carry, pick.value, cmd.value)),
            cn_index.eq(Mux(src_carry, pick.index, index_new)),
            cn_pending.eq(Mux(src_carry, pick.pending, 1)),
        ]

        # The control FSM, one-hot: one register per state (Amaranth's FSM is
        # binary coded and Yosys does not re-encode it; a state decode then
        # takes LUTs in front of every register the state controls).
        st = {name: Signal(name=f"st_{name.lower()}", init=(name == "SWEEP"))
              for name in STATES}

        # The command's op and slot, decoded when it is taken (with ``cmd``).
        op_insert, op_delete, op_update = Signal(), Signal(), Signal()
        op_read, op_key = Signal(), Signal()
        op_setkey, op_clear = Signal(), Signal()
        slot_bad, slot_stash = Signal(), Signal()
        stash_sel = Signal(S)
        stash_read = Signal(S)              # a READ of a full stash entry (one-hot)

        slot_t = cmd.slot[geo.bucket_bits + 2]       # the table of a READ's slot

        def goto(here, there):
            return [st[here].eq(0), st[there].eq(1)]

        with m.If(st["SWEEP"]):
            with m.If(ctl_addr[0] == geo.buckets - 1):
                m.d.sync += sweeping.eq(0)
                with m.If(sweep_reply):
                    m.d.sync += [sweep_reply.eq(0), resp_valid.eq(1)]
                    m.d.sync += goto("SWEEP", "RESPOND")
                with m.Else():
                    m.d.sync += goto("SWEEP", "IDLE")

        with m.If(st["IDLE"]):
            with m.If(self.cmd.valid):
                new_cmd = self.cmd.payload
                m.d.sync += [cmd.eq(new_cmd),
                             op_insert.eq(new_cmd.op == Op.INSERT),
                             op_delete.eq(new_cmd.op == Op.DELETE),
                             op_update.eq(new_cmd.op == Op.UPDATE),
                             op_read.eq(new_cmd.op == Op.READ),
                             op_setkey.eq(new_cmd.op == Op.SET_KEY),
                             op_clear.eq(new_cmd.op == Op.CLEAR),
                             op_key.eq((new_cmd.op == Op.INSERT) | (new_cmd.op == Op.DELETE)
                                       | (new_cmd.op == Op.UPDATE)),
                             slot_bad.eq(new_cmd.slot >= geo.slots),
                             slot_stash.eq((new_cmd.slot >= geo.entries)
                                           & (new_cmd.slot < geo.slots)),
                             stash_sel.eq(Cat(*[new_cmd.slot == geo.entries + k
                                                for k in range(S)])),
                             stash_read.eq(Cat(*[(new_cmd.op == Op.READ) & stash_valid[k]
                                                 & (new_cmd.slot == geo.entries + k)
                                                 for k in range(S)]))]
                m.d.sync += goto("IDLE", "DISPATCH")

        with m.If(st["DISPATCH"]):
            m.d.sync += [resp.op.eq(cmd.op), resp.status.eq(Status.OK), src_carry.eq(0)]
            # key, value, index, slot: the command's, a stash entry's or 0 (one write).
            respond_when(st["DISPATCH"],
                         key=Mux(op_key, cmd.key.as_value(),
                                 one_hot_select(stash_read, stash_key)),
                         value=Mux(op_insert, cmd.value, one_hot_select(stash_read, stash_value)),
                         index=one_hot_select(stash_read, stash_index),
                         slot=Mux(op_read, cmd.slot, 0))
            with m.If(op_key):
                m.d.comb += ctl_start.eq(1)
                m.d.sync += goto("DISPATCH", "HASH")
            with m.Elif(op_read):
                with m.If(slot_bad):
                    m.d.sync += [resp.status.eq(Status.BAD_INDEX), resp_valid.eq(1)]
                    m.d.sync += goto("DISPATCH", "RESPOND")
                with m.Elif(slot_stash):
                    with m.If(~stash_read.any()):
                        m.d.sync += resp.status.eq(Status.NOT_FOUND)
                    m.d.sync += resp_valid.eq(1)
                    m.d.sync += goto("DISPATCH", "RESPOND")
                with m.Else():
                    m.d.sync += [read_t.eq(slot_t), read_w.eq(cmd.slot[:2]),
                                 phase.eq(PH_READ)]
                    m.d.sync += goto("DISPATCH", "RD")
            with m.Elif(op_setkey):
                with m.If(empty):
                    m.d.sync += hash_key.eq(cmd.hash_key)
                with m.Else():
                    m.d.sync += resp.status.eq(Status.NOT_EMPTY)
                m.d.sync += resp_valid.eq(1)
                m.d.sync += goto("DISPATCH", "RESPOND")
            with m.Elif(op_clear):
                m.d.sync += [s.eq(0) for s in stash_valid]
                m.d.sync += [carry_valid.eq(0), count.eq(0), sp.eq(0), fresh.eq(0),
                             rng.eq(RNG_SEED), sweep_reply.eq(1), sweeping.eq(1)]
                m.d.sync += goto("DISPATCH", "SWEEP")
            with m.Else():
                m.d.sync += [resp.status.eq(Status.BAD_OP), resp_valid.eq(1)]
                m.d.sync += goto("DISPATCH", "RESPOND")

        with m.If(st["HASH"]):
            with m.If(cv):
                for t in range(TABLES):
                    m.d.sync += b[t].eq(bucket_bits(ch, t))
                m.d.sync += phase.eq(PH_FIND)
                m.d.sync += goto("HASH", "RD")

        with m.If(st["RD"]):                   # the control ports read ctl_addr
            m.d.sync += goto("RD", "DATA")

        with m.If(st["DATA"]):
            with m.Switch(phase):
                with m.Case(PH_FIND):
                    m.d.sync += goto("DATA", "CMP")
                with m.Case(PH_WALK):
                    m.d.sync += goto("DATA", "WALK")
                with m.Case(PH_UNDO):
                    m.d.sync += goto("DATA", "UNDO")
                with m.Case(PH_READ):
                    m.d.sync += goto("DATA", "READ")

        with m.If(st["READ"]):
            sel = pick                          # way read_w of table read_t
            with m.If(read_valid):              # sel.valid
                m.d.sync += resp.status.eq(Status.OK)
            with m.Else():
                m.d.sync += resp.status.eq(Status.NOT_FOUND)
            m.d.sync += resp_valid.eq(1)
            m.d.sync += goto("READ", "RESPOND")
            # An empty slot answers key, value and index 0 (as DISPATCH set them): the
            # word's valid bit gates the data, not the registers' enable.
            respond_when(st["READ"], key=Mux(read_valid, sel.key.as_value(), 0),
                         value=Mux(read_valid, sel.value, 0), index=Mux(read_valid, sel.index, 0))

        with m.If(st["CMP"]):
            m.d.sync += f_slot.eq(Cat(*[rd[t, w].valid & rd_keq[t, w].all()
                                        for t in range(TABLES) for w in range(WAYS)]))
            m.d.sync += f_stash.eq(Cat(*[stash_valid[s] & stash_keq[s].all()
                                         for s in range(S)]))
            for t in range(TABLES):
                m.d.sync += free[t].eq(Cat(*[~rd[t, w].valid for w in range(WAYS)]))
                total = Const(0, 3)
                for w in range(WAYS):
                    total = total + rd[t, w].valid
                m.d.sync += used[t].eq(total)
            m.d.sync += goto("CMP", "SELECT")

        # The lowest free stash register, registered (for HOMELESS: the stash does not
        # change in the WALK before it).
        free_s, s_free = Signal(name="free_s"), Signal(range(max(2, S)), name="s_free")
        c_free_s, c_s_free = lowest_set([~v for v in stash_valid])
        m.d.sync += [free_s.eq(c_free_s), s_free.eq(c_s_free)]

        # Registered results of SELECT, used by DECIDE.
        any_slot, any_stash = Signal(name="any_slot"), Signal(name="any_stash")
        which, which_s = Signal(3, name="which"), Signal(range(max(2, S)), name="which_s")
        found = Signal(E)
        found_index = Signal(IB)
        found_value = Signal(V)
        found_slot = Signal(geo.slot_bits)
        ft, fw = which[2], which[:2]
        d_found = Signal(name="d_found")
        d_room = Signal(name="d_room")
        # DECIDE's write and response conditions, registered in SELECT (``full`` does not
        # change in between): an INSERT, DELETE or UPDATE that found its key; an INSERT
        # that did not, with room in a bucket.
        dc_found = Signal(name="dc_found")
        dc_room = Signal(name="dc_room")
        room_slot = Signal(geo.slot_bits, name="room_slot")     # where the room is
        room_alt = Signal(BB, name="room_alt")                  # and the other bucket
        d_tsel = Signal(name="d_tsel")
        d_wsel = Signal(2, name="d_wsel")

        with m.If(st["SELECT"]):
            c_any_slot, c_which = lowest_set([f_slot[k] for k in range(TABLES * WAYS)])
            c_any_stash, c_which_s = lowest_set([f_stash[s] for s in range(S)])
            # At most one slot matches: select it with an AND-OR (shallower than a mux).
            c_found_raw = Const(0, E.size)
            for t in range(TABLES):
                for w in range(WAYS):
                    c_found_raw = c_found_raw | Mux(f_slot[t * WAYS + w], rd[t, w].as_value(), 0)
            c_found = data.View(E, c_found_raw)
            m.d.sync += [any_slot.eq(c_any_slot), which.eq(c_which),
                         any_stash.eq(c_any_stash), which_s.eq(c_which_s),
                         found.eq(c_found)]
            # DECIDE's choices, registered: found, room in a bucket, and where.
            _, w0 = lowest_set([free[0][w] for w in range(WAYS)])
            _, w1 = lowest_set([free[1][w] for w in range(WAYS)])
            c_tsel = used[1] < used[0]
            c_d_found = c_any_slot | c_any_stash
            c_d_room = (used[0] < WAYS) | (used[1] < WAYS)
            m.d.sync += [room_slot.eq(slot_number(c_tsel, Mux(c_tsel, b[1], b[0]),
                                                  Mux(c_tsel, w1, w0))),
                         room_alt.eq(Mux(c_tsel, b[0], b[1]))]
            m.d.sync += [dc_found.eq(op_key & c_d_found),
                         dc_room.eq(op_insert & ~c_d_found & ~full & c_d_room)]
            m.d.sync += [d_found.eq(c_any_slot | c_any_stash),
                         d_room.eq((used[0] < WAYS) | (used[1] < WAYS)),
                         d_tsel.eq(c_tsel), d_wsel.eq(Mux(c_tsel, w1, w0))]
            with m.If(c_any_slot):
                m.d.sync += [found_index.eq(c_found.index), found_value.eq(c_found.value),
                             found_slot.eq(slot_number(c_which[2], Mux(c_which[2], b[1], b[0]),
                                                       c_which[:2]))]
            with m.Else():
                with m.Switch(c_which_s):
                    for s in range(S):
                        with m.Case(s):
                            m.d.sync += [found_index.eq(stash_index[s]),
                                         found_value.eq(stash_value[s]),
                                         found_slot.eq(geo.entries + s)]
            m.d.sync += goto("SELECT", "DECIDE")

        with m.If(st["DECIDE"]):
            with m.If(op_insert):
                with m.If(d_found):
                    m.d.sync += resp.status.eq(Status.DUPLICATE)
                    m.d.sync += resp_valid.eq(1)
                    m.d.sync += goto("DECIDE", "RESPOND")
                with m.Elif(full):
                    m.d.sync += [resp.status.eq(Status.FULL), resp_valid.eq(1)]
                    m.d.sync += goto("DECIDE", "RESPOND")
                with m.Elif(d_room):
                    m.d.comb += commit.eq(1)
                    m.d.sync += resp.status.eq(Status.OK)
                    m.d.sync += resp_valid.eq(1)
                    m.d.sync += goto("DECIDE", "RESPOND")
                with m.Else():
                    # The walk starts with the new entry (cn_key, cn_value, cn_index
                    # and cn_pending take the command's: src_carry is still low).
                    t_sel = rng_next[0]
                    m.d.sync += [rng.eq(rng_next), cn_load.eq(1), cn_valid.eq(1),
                                 cn_t.eq(t_sel),
                                 cn_b.eq(Mux(t_sel, b[1], b[0])),
                                 cn_alt.eq(Mux(t_sel, b[0], b[1])),
                                 steps.eq(0), last.eq(M - 1), phase.eq(PH_WALK),
                                 bkt_sel.eq(t_sel), src_carry.eq(1)]
                    m.d.sync += goto("DECIDE", "RD")        # ctl_addr still holds both buckets
            with m.Elif(op_delete | op_update):
                with m.If(d_found):
                    m.d.sync += resp.status.eq(Status.OK)
                    with m.If(~any_slot):
                        with m.Switch(which_s):
                            for s in range(S):
                                with m.Case(s):
                                    with m.If(op_update):
                                        m.d.sync += stash_value[s].eq(cmd.value)
                                    with m.Else():
                                        m.d.sync += stash_valid[s].eq(0)
                    with m.If(op_delete):
                        m.d.comb += [release.eq(1), release_index.eq(found_index)]
                with m.Else():
                    m.d.sync += resp.status.eq(Status.NOT_FOUND)
                m.d.sync += resp_valid.eq(1)
                m.d.sync += goto("DECIDE", "RESPOND")

        with m.If(st["WALK"]):
            # any_free, w_free: the bucket of table carry_t; pick: its way w_evict (the
            # victim)
            with m.If(any_free):
                # The carried entry lands; if it is not the new one, the new one is
                # still pending somewhere: FINALIZE makes it visible.
                m.d.sync += [cn_load.eq(1), cn_valid.eq(0)]
                with m.If(carry_pending):
                    m.d.comb += commit.eq(1)
                    m.d.sync += resp.status.eq(Status.OK)
                    m.d.sync += resp_valid.eq(1)
                    m.d.sync += goto("WALK", "RESPOND")
                with m.Else():
                    m.d.sync += goto("WALK", "FINALIZE")
            with m.Elif(~steps_max):
                m.d.comb += [path_w.en.eq(1), path_w.data.eq(w_evict)]
                with m.If(carry_pending):
                    m.d.sync += [new_t.eq(carry_t), new_b.eq(carry_b), new_w.eq(w_evict),
                                 new_alt.eq(carry_alt)]
                # cn_key, cn_value, cn_index, cn_pending: the victim's (src_carry)
                m.d.sync += [rng.eq(rng_next), steps.eq(steps + 1), last.eq(steps), cn_load.eq(1),
                             cn_valid.eq(1),
                             cn_t.eq(~carry_t), cn_b.eq(pick.alt), cn_alt.eq(carry_b)]
                m.d.sync += goto("WALK", "SETUP")
            with m.Else():
                m.d.sync += goto("WALK", "HOMELESS")

        with m.If(st["HOMELESS"]):
            with m.If(free_s):
                with m.Switch(s_free):
                    for s in range(S):
                        with m.Case(s):
                            m.d.sync += [stash_valid[s].eq(1), stash_key[s].eq(carry_key),
                                         stash_value[s].eq(carry_value),
                                         stash_index[s].eq(carry_index)]
                # One cycle in both the stash and the carry register: same entry.
                m.d.sync += [cn_load.eq(1), cn_valid.eq(0)]
                with m.If(carry_pending):
                    m.d.comb += commit.eq(1)
                    m.d.sync += resp.status.eq(Status.OK)
                    m.d.sync += resp_valid.eq(1)
                    m.d.sync += goto("HOMELESS", "RESPOND")
                with m.Else():
                    m.d.sync += goto("HOMELESS", "FINALIZE")
            with m.Else():
                # Undo the walk: step k moved into (1 - carry_t, carry_alt, path[k]).
                m.d.sync += phase.eq(PH_UNDO)
                m.d.sync += goto("HOMELESS", "SETUP")

        with m.If(st["UNDO"]):
            # pick: way path[steps - 1] of table t_u, the entry taken back (cn_key,
            # cn_value, cn_index, cn_pending: src_carry)
            t_u = ~carry_t
            w_u = path_r.data
            m.d.sync += [cn_load.eq(1), cn_valid.eq(~steps_one),
                         cn_t.eq(t_u), cn_b.eq(carry_alt), cn_alt.eq(pick.alt),
                         steps.eq(steps - 1), last.eq(last - 1)]
            with m.If(steps_one):
                m.d.sync += [resp.status.eq(Status.FULL), resp_valid.eq(1)]
                m.d.sync += goto("UNDO", "RESPOND")
            with m.Else():
                m.d.sync += goto("UNDO", "SETUP")

        with m.If(st["SETUP"]):
            # The next bucket to read, from registers: a walk goes to the carried
            # entry's bucket, an undo to the slot the carried entry was taken from.
            m.d.sync += bkt_sel.eq(Mux(phase == PH_WALK, cn_t, ~cn_t))
            m.d.sync += goto("SETUP", "RD")

        with m.If(st["FINALIZE"]):
            m.d.sync += src_carry.eq(0)          # FINALIZE_WRITE writes the command's entry
            m.d.sync += goto("FINALIZE", "FINALIZE_WRITE")

        with m.If(st["FINALIZE_WRITE"]):
            m.d.comb += commit.eq(1)
            m.d.sync += resp.status.eq(Status.OK)
            m.d.sync += resp_valid.eq(1)
            m.d.sync += goto("FINALIZE_WRITE", "RESPOND")

        with m.If(st["RESPOND"]):
            with m.If(self.resp.ready):
                m.d.sync += resp_valid.eq(0)
                m.d.sync += goto("RESPOND", "IDLE")

        # The memory write of the next edge (we, we_t, we_w, w_*), one AND-OR per field
        # over the writers' mutually exclusive conditions: (condition, table, way,
        # valid, pending, index, alt).
        decide_found = st["DECIDE"] & dc_found
        decide_room = st["DECIDE"] & dc_room
        walk_write = st["WALK"] & (any_free | ~steps_max)
        writes = [
            (decide_room, d_tsel, d_wsel, 1, 0, index_new, room_alt),
            # DELETE writes an empty word; UPDATE the command's key and value (the
            # key is found.key) with the entry's index and alt.
            (decide_found & op_delete & any_slot, ft, fw, 0, 0, 0, 0),
            (decide_found & op_update & any_slot, ft, fw, 1, 0, found.index, found.alt),
            (walk_write, carry_t, Mux(any_free, w_free, w_evict), 1,
             ~any_free & carry_pending, carry_index, carry_alt),
            (st["UNDO"], ~carry_t, path_r.data, 1, carry_pending, carry_index, carry_b),
            (st["FINALIZE_WRITE"], new_t, new_w, 1, 0, index_new, new_alt),
        ]
        write_sel = Cat(*[w[0] for w in writes])
        m.d.comb += [
            we.eq(write_sel.any()),
            we_t.eq(one_hot_select(write_sel, [w[1] for w in writes])),
            we_w.eq(one_hot_select(write_sel, [w[2] for w in writes])),
            w_valid.eq(one_hot_select(write_sel, [Const(w[3], 1) if isinstance(w[3], int)
                                                  else w[3] for w in writes])),
            w_pending.eq(one_hot_select(write_sel, [Const(w[4], 1) if isinstance(w[4], int)
                                                    else w[4] for w in writes])),
            w_index.eq(one_hot_select(write_sel, [Const(w[5], IB) if isinstance(w[5], int)
                                                  else w[5] for w in writes])),
            w_alt.eq(one_hot_select(write_sel, [Const(w[6], BB) if isinstance(w[6], int)
                                                else w[6] for w in writes])),
        ]

        # The control port addresses, one AND-OR per table over their writers' mutually
        # exclusive conditions (the sweep, a READ of a table slot, CLEAR, the hash, a
        # walk or undo step, FINALIZE).
        for t in range(TABLES):
            addr_writes = [
                (st["SWEEP"], (ctl_addr[t] + 1)[:BB]),
                (st["DISPATCH"] & op_read & ~slot_bad & ~slot_stash & (slot_t == t),
                 cmd.slot[2:2 + BB]),
                (st["DISPATCH"] & op_clear, Const(0, BB)),
                (st["HASH"] & cv, bucket_bits(ch, t)),
                (st["SETUP"] & (phase == PH_WALK) & (cn_t == t), cn_b),
                (st["SETUP"] & (phase == PH_UNDO) & (cn_t != t), cn_alt),
                (st["FINALIZE"] & (new_t == t), new_b),
            ]
            addr_sel = Cat(*[cond for cond, _ in addr_writes])
            with m.If(addr_sel.any()):
                m.d.sync += ctl_addr[t].eq(one_hot_select(addr_sel, [v for _, v in addr_writes]))

        # The response's other writers (see respond_when).
        respond_when(decide_found, index=found_index, slot=found_slot,
                     value=Mux(op_update, cmd.value, found_value))
        respond_when(decide_room, index=index_new,
                     slot=room_slot)
        respond_when(st["WALK"] & any_free & carry_pending, index=carry_index,
                     slot=slot_number(carry_t, carry_b, w_free))
        respond_when(st["HOMELESS"] & free_s & carry_pending, index=carry_index,
                     slot=geo.entries + s_free)
        respond_when(st["FINALIZE_WRITE"], index=index_new,
                     slot=slot_number(new_t, new_b, new_w))
        for name, writes in resp_writes.items():
            field = getattr(resp, name)
            with m.If(Cat(*[cond for cond, _ in writes]).any()):
                m.d.sync += field.eq(one_hot_select(Cat(*[cond for cond, _ in writes]),
                                                    [value for _, value in writes]))

        # Outside the states, so that this is a plain assignment (Icarus does not run
        # an ``always @*`` block before one of its inputs changes).
        m.d.comb += self.cmd.ready.eq(st["IDLE"])

        # ---- per-flow state memory -----------------------------------------------------
        if self.state_width:
            state = Memory(shape=self.state_width, depth=geo.slots, init=[])
            m.submodules.flow_state = state
            sw = state.write_port()
            sr = state.read_port()
            m.d.comb += [sr.addr.eq(self.state_raddr), self.state_rdata.eq(sr.data),
                         sw.addr.eq(self.state_waddr), sw.data.eq(self.state_wdata),
                         sw.en.eq(self.state_we)]
        return m
