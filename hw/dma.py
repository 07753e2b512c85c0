"""DMA engine: clients' reads and writes of host memory as PCIe memory reads and writes.

The NIC's host side (rings, commands, events) reads and writes host memory through this
engine; the link side is a Corundum-style split interface (read requests, completion
beats, posted-write TLPs as packets), served in simulation by ``sim.pcie_host.PcieHost``.

Clients (``R = read_clients``, ``C = write_clients``; ``B = W/8`` bytes per beat):

* A read (``rd_req[i]``, ``DMA_READ {addr, length}``) is answered on ``rd_data[i]`` by
  exactly ``ceil(length/B)`` beats (``DMA_READ_DATA``): the bytes packed from byte 0 of
  the first beat, ``keep`` as in ``hw.stream``, ``last`` on the final beat, ``error`` on
  the final beat when the request failed (an error completion, UR/CA, a completion
  timeout, or a short completion). The data of a failed PCIe read is zero from its first
  beat that had not arrived when it failed (a UR brings no data: all zero); the other
  PCIe reads of the request keep their data.
* A write (``wr_req[j]``, ``DMA_WRITE {addr, length}``) takes exactly ``ceil(length/B)``
  beats from ``wr_data[j]`` (the beats are counted: ``last`` and ``keep`` of
  ``wr_data`` are not checked) and sends them as posted writes on ``pcie_wr``.
* Addresses must be multiples of B. A request with a misaligned address, length 0 or
  length > ``max_length`` is a **bad request** (counted): a read is answered with one
  beat ``{keep: 0, last: 1, error: 1}`` in its turn and nothing goes on the link; a
  write drops its ``ceil(length/B)`` data beats (none for length 0).

Reads. Clients are served round-robin, one request at a time; the request is cut into
PCIe reads (``PCIE_READ``) of at most ``mrrs`` bytes that never cross a 4 KB boundary
(the rule of ``sim.pcie.tlps_for_read``: pieces of min(mrrs, left, bytes to the next
4 KB boundary) from the start address), one per cycle, each with a tag (at most
``tags - 1`` in use: one is kept free so that the check is a register). Tags are handed
out in ring order and recycled in the same order, so the reorder buffer (``Memory`` of
``tags x mrrs`` bytes, one ``mrrs`` slot per tag) is drained in the order the requests
were accepted: a client sees its answers in order, and **all clients share that order**
(head of line: a request whose completions are late, or a client that does not take its
data, holds back the answers of every later request, of any client). Completions may
arrive in any order between tags and interleave at any beat; each beat is written to its
tag's slot at once (``pcie_cpl`` is always ready) and a beat leaves as soon as it and
every beat before it are there (cut-through), one beat per cycle.

Completion timeout: a scanner visits one tag per cycle; a tag outstanding for
``cpl_timeout`` cycles or more (``0``: never) is ended with an error (found within
``tags + 2`` cycles of its deadline; counted). **Quarantine rule:** a tag that timed out is
not handed out again until ``cpl_timeout`` more cycles have passed since it timed out,
so a completion up to ``2 x cpl_timeout`` after the request is dropped, not taken for a
later request's data; tags behind it in the ring wait meanwhile. A completion beat for a
tag that is not outstanding (never issued, finished, timed out, tag >= ``tags``, or an
offset past the request) is dropped and counted (``UNEXPECTED_COMPLETIONS`` counts beats).

Writes. One request at a time, round-robin between clients, whole, in acceptance order;
cut at ``mps`` and 4 KB (``sim.pcie.tlps_for_write``); each client beat is one TLP beat
(``PCIE_WRITE``: addr and length of the TLP on every beat, ``last`` on its final beat).
``wr_data`` passes to ``pcie_wr`` through logic only (no register): valid, payload and
ready are combinational between the two.

Latency (cycles, host answering at once): ``rd_req`` taken at cycle 0 -> ``pcie_rd``
valid at 3 (an intake register, then the request register); a completion beat at cycle
c -> on ``rd_data`` at c + 3 (written at c, seen at c + 1, read at c + 2); first data
beat 7 cycles after the request with a host answering in the next cycle. ``wr_req``
taken at 0 -> its first beat may go at 2. Throughput: one read-data beat and one write beat per cycle, also for one-beat
requests (a PCIe read issues per cycle, the next request is loaded as the last piece
of the current one goes). ``docs/dma.md`` has the measured figures.

Ports
  rd_req[i]     In(stream of DMA_READ)                 i < read_clients
  rd_data[i]    Out(stream of DMA_READ_DATA(W))
  wr_req[j]     In(stream of DMA_WRITE)                j < write_clients
  wr_data[j]    In(hw.stream.packet_signature(W))
  pcie_rd       Out(stream of PCIE_READ)
  pcie_cpl      In(stream of PCIE_COMPLETION(W))       always ready
  pcie_wr       Out(stream of PCIE_WRITE(W))
  cpl_timeout   In(32)                                 cycles; 0 = never
  counters      Out(32 * len(DmaCounter))              DmaCounter order
"""

import enum

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from hw.stream import one_hot_select, packet_signature, round_robin_grant, struct_value

__all__ = ["DmaEngine", "DmaCounter", "DMA_READ", "DMA_WRITE", "PCIE_READ",
           "DMA_READ_DATA", "PCIE_COMPLETION", "PCIE_WRITE",
           "dma_read_data_layout", "pcie_completion_layout", "pcie_write_layout", "PAGE"]

#: No PCIe request crosses a 4 KB boundary.
PAGE = 4096

DMA_READ = data.StructLayout({"addr": 64, "length": 16})
DMA_WRITE = data.StructLayout({"addr": 64, "length": 16})
PCIE_READ = data.StructLayout({"tag": 8, "addr": 64, "length": 13})


def dma_read_data_layout(width):
    return data.StructLayout({"data": width, "keep": width // 8, "last": 1, "error": 1})


def pcie_completion_layout(width):
    return data.StructLayout({"tag": 8, "offset": 12, "data": width, "last": 1, "error": 1})


def pcie_write_layout(width):
    return data.StructLayout({"addr": 64, "length": 13, "data": width, "keep": width // 8,
                              "last": 1})


#: The names the interface is specified with.
DMA_READ_DATA = dma_read_data_layout
PCIE_COMPLETION = pcie_completion_layout
PCIE_WRITE = pcie_write_layout


class DmaCounter(enum.IntEnum):
    """The engine's counters (one 32-bit field each in ``counters``)."""
    READ_REQUESTS = 0           # reads accepted (bad ones not included)
    WRITE_REQUESTS = 1          # writes accepted (bad ones not included)
    BAD_REQUESTS = 2            # bad reads and writes
    COMPLETION_TIMEOUTS = 3     # PCIe reads ended by the completion timeout
    UNEXPECTED_COMPLETIONS = 4  # completion beats dropped


def _log2(n):
    return n.bit_length() - 1


def _is_pow2(n):
    return n > 0 and n & (n - 1) == 0


class DmaEngine(wiring.Component):
    def __init__(self, width=64, tags=16, mrrs=512, mps=256, read_clients=2, write_clients=2,
                 max_length=16384):
        beat = width // 8
        if tags < 2:
            raise ValueError("at least two tags (one is always kept free)")
        if width not in (64, 128, 256, 512):
            raise ValueError(f"width must be 64, 128, 256 or 512, not {width}")
        if not _is_pow2(tags) or tags > 256:
            raise ValueError("tags must be a power of two, at most 256")
        for name, size in (("mrrs", mrrs), ("mps", mps)):
            if not _is_pow2(size) or not beat <= size <= PAGE:
                raise ValueError(f"{name} must be a power of two in {beat}..{PAGE}")
        if not 1 <= max_length <= 0xFFFF:
            raise ValueError("max_length must be 1..65535 (16-bit length)")
        if read_clients < 1 or write_clients < 1:
            raise ValueError("at least one read and one write client")
        self.width, self.tags, self.mrrs, self.mps = width, tags, mrrs, mps
        self.read_clients, self.write_clients, self.max_length = (read_clients, write_clients,
                                                                   max_length)
        super().__init__({
            "rd_req": In(stream.Signature(DMA_READ)).array(read_clients),
            "rd_data": Out(stream.Signature(dma_read_data_layout(width))).array(read_clients),
            "wr_req": In(stream.Signature(DMA_WRITE)).array(write_clients),
            "wr_data": In(packet_signature(width)).array(write_clients),
            "pcie_rd": Out(stream.Signature(PCIE_READ)),
            "pcie_cpl": In(stream.Signature(pcie_completion_layout(width))),
            "pcie_wr": Out(stream.Signature(pcie_write_layout(width))),
            "cpl_timeout": In(32),
            "counters": Out(32 * len(DmaCounter)),
        })

    # ------------------------------------------------------------------ helpers

    def _bad(self, request):
        """A request the engine refuses: misaligned address, length 0 or too long."""
        low = _log2(self.width // 8)
        return (request.addr[:low] != 0) | (request.length == 0) | \
            (request.length > self.max_length)

    @staticmethod
    def _next_piece(left, to_page, limit):
        """(bytes, last) of the next PCIe request: min(limit, left, to_page), and whether
        it is the request's last; compares in parallel, then one multiplexer."""
        last = (left <= limit) & (left <= to_page)
        return Mux(last, left, Mux(to_page < limit, to_page, limit)), last

    def _intake(self, m, ports, name, load):
        """Round-robin between ``ports`` into a register (``load``: the register empties
        this cycle); returns (valid, addr, length, client, bad, bad_taken)."""
        valid, bad = Signal(name=f"{name}_valid"), Signal(name=f"{name}_bad")
        addr, length = Signal(64, name=f"{name}_addr"), Signal(16, name=f"{name}_length")
        client = Signal(range(len(ports)), name=f"{name}_client")
        rr_last = Signal(range(len(ports)), name=f"{name}_rr_last")
        grant = round_robin_grant(m, [p.valid for p in ports], rr_last)
        request = Array(p.payload for p in ports)[grant]
        taking = Signal(name=f"{name}_taking")
        m.d.comb += taking.eq(Cat(p.valid for p in ports).any() & (~valid | load))
        for k, port in enumerate(ports):
            m.d.comb += port.ready.eq(taking & (grant == k))
        with m.If(load):
            m.d.sync += valid.eq(0)
        with m.If(taking):
            m.d.sync += [valid.eq(1), addr.eq(request.addr), length.eq(request.length),
                         client.eq(grant), bad.eq(self._bad(request)), rr_last.eq(grant)]
        return valid, addr, length, client, bad

    def _tail_keep(self, nbytes):
        """``keep`` of a final beat holding ``nbytes % B`` bytes (all ones for 0)."""
        beat = self.width // 8
        tail = nbytes[:_log2(beat)]
        return Mux(tail == 0, Const((1 << beat) - 1, beat),
                   ((Const(1, beat + 1) << tail) - 1)[:beat])

    # ------------------------------------------------------------------ design

    def elaborate(self, platform):
        m = Module()
        counters = {c: Signal(32, name=f"count_{c.name.lower()}") for c in DmaCounter}
        m.d.comb += self.counters.eq(Cat(*(counters[c] for c in DmaCounter)))
        # Events are registered first, then added: no adder behind the control logic.
        events = {c: Signal(2, name=f"event_{c.name.lower()}") for c in DmaCounter}
        for c in DmaCounter:
            m.d.sync += counters[c].eq(counters[c] + events[c])
        now = Signal(32)
        m.d.sync += now.eq(now + 1)
        bad_read = self._read_path(m, now, events)
        bad_write = self._write_path(m, events)
        m.d.sync += events[DmaCounter.BAD_REQUESTS].eq(bad_read + bad_write)
        return m

    def _read_path(self, m, now, events):
        width, tags, beat = self.width, self.tags, self.width // 8
        slot_beats = self.mrrs // beat                      # reorder buffer beats per tag
        tag_bits, slot_bits, beat_bits = _log2(tags), _log2(slot_beats), _log2(beat)
        m.submodules.reorder = reorder = Memory(shape=width, depth=tags * slot_beats, init=[])
        write = reorder.write_port()
        read = reorder.read_port()

        # Per-tag state, in registers (every one is read at an arbitrary tag).
        def per_tag(name, shape):
            return Array(Signal(shape, name=f"{name}_{k}") for k in range(tags))
        outstanding = per_tag("outstanding", 1)   # issued, waiting for completions
        done = per_tag("done", 1)                 # all data in, failed or timed out
        failed = per_tag("failed", 1)
        filled = per_tag("filled", range(slot_beats + 1))   # beats arrived (in order)
        last_beat = per_tag("last_beat", range(slot_beats))  # index of the read's last beat
        client = per_tag("client", range(self.read_clients))
        ends_request = per_tag("ends_request", 1)
        refused = per_tag("refused", 1)                     # a bad request's entry
        tail = per_tag("tail", range(beat))                 # bytes in the final beat (0: all)
        stamp = per_tag("stamp", 32)                        # issued / timed out at
        quarantined = per_tag("quarantined", 1)

        # Tag ring: [free, out) drained but held (quarantine), [out, alloc) in use.
        alloc, out, free = (Signal(tag_bits + 1, name=n) for n in ("alloc", "out", "free"))
        # A tag may be handed out when two were free a cycle ago (a register, not a
        # compare, in front of the issue logic): at most tags - 1 in use at once.
        in_use = Signal(tag_bits + 1)
        m.d.comb += in_use.eq(alloc - free)
        room = Signal()
        m.d.sync += room.eq(in_use <= tags - 2)

        # 1. Take a client request (round-robin) into the intake register, then into
        #    `cur`, where the next PCIe read's length is always ready in `cur_piece`.
        cur_valid, cur_bad, cur_last = Signal(), Signal(), Signal()
        cur_addr, cur_left = Signal(64), Signal(16)
        cur_to_page, cur_piece = Signal(13), Signal(13)
        cur_client = Signal(range(self.read_clients))
        step = cur_valid & room & (cur_bad | ~self.pcie_rd.valid | self.pcie_rd.ready)
        load = Signal()
        in_valid, in_addr, in_length, in_client, in_bad = self._intake(
            m, self.rd_req, "rd_in", load)
        m.d.comb += load.eq(in_valid & (~cur_valid | (step & cur_last)))
        m.d.sync += events[DmaCounter.READ_REQUESTS].eq(load & ~in_bad)
        bad_read = load & in_bad

        # 2. Issue PCIe reads, one per cycle, each on the next tag of the ring.
        with m.If(self.pcie_rd.ready):
            m.d.sync += self.pcie_rd.valid.eq(0)
        with m.If(step):
            tag = alloc[:tag_bits]
            m.d.sync += [
                alloc.eq(alloc + 1),
                outstanding[tag].eq(~cur_bad), done[tag].eq(cur_bad), failed[tag].eq(cur_bad),
                filled[tag].eq(0),
                last_beat[tag].eq(Mux(cur_bad, 0, (cur_piece - 1) >> beat_bits)),
                client[tag].eq(cur_client), ends_request[tag].eq(cur_last),
                refused[tag].eq(cur_bad), tail[tag].eq(cur_piece[:beat_bits]),
                stamp[tag].eq(now), quarantined[tag].eq(0),
            ]
            with m.If(~cur_bad):
                m.d.sync += [self.pcie_rd.valid.eq(1), self.pcie_rd.payload.tag.eq(tag),
                             self.pcie_rd.payload.addr.eq(cur_addr),
                             self.pcie_rd.payload.length.eq(cur_piece)]
            left = cur_left - cur_piece
            to_page = Mux(cur_to_page == cur_piece, PAGE, cur_to_page - cur_piece)
            piece, last = self._next_piece(left, to_page, self.mrrs)
            m.d.sync += [cur_addr.eq(cur_addr + cur_piece), cur_left.eq(left),
                         cur_to_page.eq(to_page), cur_piece.eq(piece), cur_last.eq(last)]
            with m.If(cur_last):
                m.d.sync += cur_valid.eq(0)
        with m.If(load):
            to_page = PAGE - in_addr[:12]
            piece, last = self._next_piece(in_length, to_page, self.mrrs)
            m.d.sync += [cur_valid.eq(1), cur_addr.eq(in_addr), cur_left.eq(in_length),
                         cur_client.eq(in_client), cur_bad.eq(in_bad),
                         cur_to_page.eq(to_page), cur_piece.eq(piece),
                         cur_last.eq(last | in_bad)]

        # 3. Completions: into the tag's slot, at once.
        cpl = self.pcie_cpl.payload
        m.d.comb += self.pcie_cpl.ready.eq(1)
        ctag = cpl.tag[:tag_bits]
        cbeat = cpl.offset >> beat_bits                     # beat within the PCIe read
        in_range = cbeat <= last_beat[ctag]
        tag_ok = (cpl.tag < tags) if tags < 256 else Const(1)
        expected = Signal()
        m.d.comb += expected.eq(self.pcie_cpl.valid & tag_ok & outstanding[ctag]
                                & (cpl.error | in_range))
        ending = expected & (cpl.last | cpl.error)
        m.d.comb += [write.addr.eq(Cat(cbeat[:slot_bits], ctag)),
                     write.data.eq(cpl.data), write.en.eq(expected & ~cpl.error)]
        with m.If(expected & ~cpl.error):
            m.d.sync += filled[ctag].eq(cbeat + 1)
        with m.If(ending):
            short = cbeat != last_beat[ctag]
            m.d.sync += [outstanding[ctag].eq(0), done[ctag].eq(1),
                         failed[ctag].eq(cpl.error | short)]
        m.d.sync += events[DmaCounter.UNEXPECTED_COMPLETIONS].eq(self.pcie_cpl.valid & ~expected)

        # 4. Completion timeout: one tag per cycle, in three steps (the tag's age, the
        #    comparison, then the timeout if the tag is still outstanding: it cannot be
        #    re-issued in between).
        scan, scan_1, scanned = Signal(tag_bits), Signal(tag_bits), Signal(tag_bits)
        age, was_outstanding, overdue = Signal(32), Signal(), Signal()
        m.d.sync += [scan.eq(scan + 1), scan_1.eq(scan), scanned.eq(scan_1),
                     age.eq(now - stamp[scan]), was_outstanding.eq(outstanding[scan]),
                     overdue.eq((self.cpl_timeout != 0) & was_outstanding
                                & (age >= self.cpl_timeout))]
        # A completion that ends the tag in the very cycle it times out comes too late:
        # the timeout's assignments below win (its data beat is still written).
        expired = Signal()
        m.d.comb += expired.eq(overdue & outstanding[scanned])
        m.d.sync += events[DmaCounter.COMPLETION_TIMEOUTS].eq(expired)
        with m.If(expired):
            m.d.sync += [outstanding[scanned].eq(0), done[scanned].eq(1),
                         failed[scanned].eq(1), quarantined[scanned].eq(1),
                         stamp[scanned].eq(now)]

        # 5. Release drained tags, unless quarantined (the age of the oldest tag is
        #    compared in two steps: a quarantined tag goes two cycles late).
        oldest = free[:tag_bits]
        oldest_age, oldest_1 = Signal(32), Signal(tag_bits)
        aged, aged_tag = Signal(), Signal(tag_bits)
        m.d.sync += [oldest_age.eq(now - stamp[oldest]), oldest_1.eq(oldest),
                     aged.eq(oldest_age >= self.cpl_timeout), aged_tag.eq(oldest_1)]
        with m.If((free != out) & (~quarantined[oldest] | (aged & (aged_tag == oldest)))):
            m.d.sync += free.eq(free + 1)

        # 6. Drain the ring in order: stage A picks a beat, stage B (the memory's read
        #    register and its side-band registers) offers it to the client.
        head = out[:tag_bits]
        head_one_hot = Signal(tags, init=1)            # the head tag, one-hot: fast selects
        index = Signal(range(slot_beats))              # beat within the head tag

        def at_head(values):
            return one_hot_select(head_one_hot, list(values))
        b_valid, b_zero, b_last, b_error = Signal(), Signal(), Signal(), Signal()
        b_client = Signal(range(self.read_clients))
        b_keep = Signal(beat)
        sticky_error = Signal()                         # an earlier piece failed
        b_ready = Array(p.ready for p in self.rd_data)[b_client]
        # Whether the beat after this cycle's (same tag, next beat, or the next tag's
        # first) is there, and whether it ends its tag, are registered a cycle ahead,
        # from the per-tag state of this cycle: that state only grows while a tag is in
        # use, so a flag is at worst a cycle late, never wrong. `advance` is then a
        # register and a ready, not a select, a compare and a ready.
        next_one_hot = head_one_hot.rotate_left(1)
        head_filled = Signal(range(slot_beats + 1))
        head_last = Signal(range(slot_beats))
        m.d.comb += [head_filled.eq(at_head(filled)), head_last.eq(at_head(last_beat))]
        head_done = at_head(done)
        next_filled = one_hot_select(next_one_hot, list(filled))
        next_done = one_hot_select(next_one_hot, list(done))
        next_last = one_hot_select(next_one_hot, list(last_beat))
        live, next_live = out != alloc, (out + 1)[:tag_bits + 1] != alloc
        ready_now, final_now = Signal(), Signal()       # for (head, index)
        advance = Signal()
        m.d.comb += advance.eq(ready_now & (~b_valid | b_ready))
        with m.If(advance & final_now):
            m.d.sync += [ready_now.eq(next_live & (next_done | (next_filled != 0))),
                         final_now.eq(next_last == 0)]
        with m.Elif(advance):
            m.d.sync += [ready_now.eq(live & (head_done | (index + 1 < head_filled))),
                         final_now.eq(index + 1 == head_last)]
        with m.Else():
            m.d.sync += [ready_now.eq(live & (head_done | (index < head_filled))),
                         final_now.eq(index == head_last)]
        final = final_now
        head_ends, head_failed = at_head(ends_request), at_head(failed)
        request_end = final & head_ends
        m.d.comb += [read.addr.eq(Cat(index[:slot_bits], head)),
                     read.en.eq(advance)]
        with m.If(b_ready):
            m.d.sync += b_valid.eq(0)
        with m.If(advance):
            m.d.sync += [
                b_valid.eq(1), b_client.eq(at_head(client)), b_zero.eq(index >= head_filled),
                b_last.eq(request_end),
                b_error.eq(request_end & (sticky_error | head_failed)),
                b_keep.eq(Mux(at_head(refused), 0,
                              Mux(request_end, self._tail_keep(at_head(tail)),
                                  (1 << beat) - 1))),
                index.eq(Mux(final, 0, index + 1)),
            ]
            with m.If(final):
                m.d.sync += [out.eq(out + 1), head_one_hot.eq(head_one_hot.rotate_left(1)),
                             sticky_error.eq(~head_ends & (sticky_error | head_failed))]
        layout = dma_read_data_layout(width)
        payload = struct_value(layout, {"data": Mux(b_zero, 0, read.data), "keep": b_keep,
                                        "last": b_last, "error": b_error})
        for k, port in enumerate(self.rd_data):
            m.d.comb += [port.valid.eq(b_valid & (b_client == k)), port.payload.eq(payload)]
        return bad_read

    def _write_path(self, m, events):
        beat = self.width // 8
        active, bad, last_tlp = Signal(), Signal(), Signal()
        addr, left = Signal(64), Signal(16)
        to_page, piece = Signal(13), Signal(13)       # piece: bytes of the current TLP
        tlp_left = Signal(13)                          # bytes of the TLP still to send
        owner = Signal(range(self.write_clients))
        tlp_last = tlp_left <= beat
        request_last = tlp_last & last_tlp
        source = Array(self.wr_data)[owner]
        moves = Signal()
        m.d.comb += moves.eq(active & source.valid & (bad | self.pcie_wr.ready))
        finishing = moves & Mux(bad, left <= beat, request_last)

        m.d.comb += self.pcie_wr.valid.eq(active & ~bad & source.valid)
        m.d.comb += self.pcie_wr.payload.eq(struct_value(pcie_write_layout(self.width), {
            "addr": addr, "length": piece, "data": source.payload.data,
            "keep": Mux(request_last, self._tail_keep(piece), (1 << beat) - 1),
            "last": tlp_last}))
        for k, port in enumerate(self.wr_data):
            m.d.comb += port.ready.eq(active & (owner == k) & (bad | self.pcie_wr.ready))

        with m.If(moves):
            with m.If(bad):
                m.d.sync += left.eq(left - beat)
            with m.Elif(tlp_last):
                next_left = left - piece
                next_to_page = Mux(to_page == piece, PAGE, to_page - piece)
                next_piece, last = self._next_piece(next_left, next_to_page, self.mps)
                m.d.sync += [addr.eq(addr + piece), left.eq(next_left),
                             to_page.eq(next_to_page), piece.eq(next_piece),
                             tlp_left.eq(next_piece), last_tlp.eq(last)]
            with m.Else():
                m.d.sync += tlp_left.eq(tlp_left - beat)
            with m.If(finishing):
                m.d.sync += active.eq(0)

        load = Signal()
        in_valid, in_addr, in_length, in_client, in_bad = self._intake(
            m, self.wr_req, "wr_in", load)
        m.d.comb += load.eq(in_valid & (~active | finishing))
        with m.If(load):
            first_to_page = PAGE - in_addr[:12]
            first_piece, last = self._next_piece(in_length, first_to_page, self.mps)
            m.d.sync += [active.eq(in_length != 0), bad.eq(in_bad), addr.eq(in_addr),
                         left.eq(in_length), owner.eq(in_client), to_page.eq(first_to_page),
                         piece.eq(first_piece), tlp_left.eq(first_piece), last_tlp.eq(last)]
        m.d.sync += [events[DmaCounter.WRITE_REQUESTS].eq(load & ~in_bad)]
        return load & in_bad
