"""Fetches the entries of one host -> NIC ring (TX, RX or COMMAND) by DMA.

``RingFetcher(width, entry_bytes, outstanding=4, block_bytes=64)`` watches the ring's
registers (``base``, ``size_log2``, the host's producer index ``host_index``); while the
host has posted entries it has not fetched, it asks the DMA engine for them, up to
``outstanding`` reads in flight, and hands each entry on ``entry`` with its index and an
``error`` bit (the read failed: the entry's data is not to be trusted). Its consumer
index ``nic_index`` counts the entries handed on: the host may reuse a slot once the
index has passed it.

One read fetches every posted entry up to the end of the entry's *block*: the aligned
``max(block_bytes, entry_bytes, W/8)`` bytes of the ring that hold it (64 B, a cache
line: four 16-byte descriptors; a smaller ring is one block). The read starts at the
beat that holds the first entry and ends with the beat that holds the last, so at W=512
it is the aligned 64-byte beat and at W=64 exactly the entries' bytes; the ring's
4 KB-aligned base keeps every read inside the ring. Entries the host posts after a read
went out are fetched by the next one (their block may be read again).

The ring stops, with a ``status`` bit (``hw.registers.RingStatus``), while its
configuration is bad (``size_log2`` above ``MAX_RING_LOG2``, or a base that is not
4 KB-aligned) or the host's index is more than the ring's size ahead of ``nic_index``
(the host posted more entries than the ring holds): it fetches nothing until the host
fixes it. ``size_log2`` = 0 turns the ring off; once nothing is in flight its indices
return to 0, ready for the host to set the ring up again.

Throughput: one entry per cycle on ``entry``, fetched at up to ``outstanding`` x (entries
per block) per DMA read latency (16 descriptors); at least ``max(1, entry_bytes /
(W/8))`` cycles per entry for the data. Latency: the DMA read's, plus 2 cycles.

Ports:
  base (64), size_log2 (32: the register), host_index (16): the ring's registers
  nic_index (16), status (2): out, to the registers
  dma_req: Out(stream of hw.dma.DMA_READ), dma_data: In(stream of hw.dma read data)
  entry: Out(stream of {index: 16, error: 1, data: entry_bytes * 8})
"""

from amaranth.hdl import Array, Cat, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from hw.dma import DMA_READ, dma_read_data_layout
from hw.host_formats import INDEX_BITS, MAX_RING_LOG2, RING_BASE_ALIGN
from hw.registers import RingStatus
from hw.stream import struct_value

__all__ = ["RingFetcher", "fetched_entry_layout", "ring_config"]


def ring_config(m, base, size_log2):
    """A ring's configuration registers decoded, registered (they change rarely):
    ``(bad_config, off, mask, size)`` as ``hw.registers.RingStatus`` and the ring's
    docs define them. Shared by the fetcher and ``hw.event_ring``."""
    bad_config, off = Signal(), Signal()
    mask, size = Signal(INDEX_BITS), Signal(INDEX_BITS + 1)
    m.d.sync += [
        bad_config.eq((size_log2 > MAX_RING_LOG2)
                      | (base[:RING_BASE_ALIGN.bit_length() - 1] != 0)),
        off.eq(size_log2 == 0),
        mask.eq((1 << size_log2[:4]) - 1),
        size.eq(1 << size_log2[:4]),
    ]
    return bad_config, off, mask, size


def fetched_entry_layout(entry_bytes):
    return data.StructLayout({"index": INDEX_BITS, "error": 1, "data": 8 * entry_bytes})


class RingFetcher(wiring.Component):
    def __init__(self, width, entry_bytes, outstanding=4, block_bytes=64):
        assert entry_bytes & (entry_bytes - 1) == 0 and entry_bytes <= RING_BASE_ALIGN
        assert block_bytes & (block_bytes - 1) == 0 and block_bytes <= RING_BASE_ALIGN
        self.width = width
        self.entry_bytes = entry_bytes
        self.outstanding = outstanding
        self.block_bytes = max(block_bytes, entry_bytes, width // 8)
        super().__init__({
            "base": In(64), "size_log2": In(32), "host_index": In(INDEX_BITS),
            "nic_index": Out(INDEX_BITS), "status": Out(2),
            "dma_req": Out(stream.Signature(DMA_READ)),
            "dma_data": In(stream.Signature(dma_read_data_layout(width))),
            "entry": Out(stream.Signature(fetched_entry_layout(entry_bytes))),
        })

    def elaborate(self, platform):
        m = Module()
        entry_bytes, block_bytes = self.entry_bytes, self.block_bytes
        beat_bytes = self.width // 8
        per_block = block_bytes // entry_bytes          # entries in a block
        block_beats = block_bytes // beat_bytes
        # Entries per beat (1 when an entry is a beat or more).
        per_beat = max(1, beat_bytes // entry_bytes)
        # Beats per entry (1 when an entry is a beat or less).
        entry_beats = max(1, entry_bytes // beat_bytes)

        bad_config, off, mask, size = ring_config(m, self.base, self.size_log2)
        # Not registered: a request in the cycle the host's index jumps would fetch an
        # entry the host never posted.
        overflow = Signal()
        m.d.comb += overflow.eq(~off & ((self.host_index - self.nic_index)[:INDEX_BITS] > size))
        m.d.comb += self.status.eq(Cat(bad_config, overflow))

        # ---- requests: one read per block's posted entries, while fewer than
        # `outstanding` reads are in flight (asked for, and their entries not all handed
        # on: the output FIFO holds them all).
        next_index = Signal(INDEX_BITS)         # the next entry to ask for
        in_flight = Signal(range(self.outstanding + 1))
        running = ~off & ~bad_config & ~overflow
        posted = Signal(INDEX_BITS)
        m.d.comb += posted.eq(self.host_index - next_index)
        # The block's entries, as an index mask: a ring smaller than a block is one block.
        block_mask = Signal(range(per_block))
        m.d.sync += block_mask.eq(Mux(size < per_block, mask, per_block - 1))
        left_in_block = Signal(range(per_block + 1))
        m.d.comb += left_in_block.eq(block_mask + 1 - (next_index & block_mask))
        count = Signal(range(per_block + 1))
        m.d.comb += count.eq(Mux(posted < left_in_block, posted, left_in_block))
        first_addr = Signal(64)
        m.d.comb += first_addr.eq(self.base + ((next_index & mask) * entry_bytes))
        read_start = first_addr & ~(beat_bytes - 1)
        # Beats from the first entry's beat to the last's.
        first_beat = ((next_index & mask) % per_beat) if per_beat > 1 else 0
        beats = Signal(range(block_beats + 1))
        m.d.comb += beats.eq((first_beat + count + per_beat - 1) // per_beat * entry_beats
                             if per_beat > 1 else count * entry_beats)
        m.d.comb += [
            self.dma_req.valid.eq(running & (posted != 0) & (in_flight < self.outstanding)),
            self.dma_req.payload.addr.eq(read_start),
            # A ring smaller than a beat is read alone, not the beat around it.
            self.dma_req.payload.length.eq(
                Mux(size < per_beat, size * entry_bytes, beats * beat_bytes)
                if per_beat > 1 else beats * beat_bytes),
        ]
        asked = self.dma_req.valid & self.dma_req.ready
        # Each read's first entry, its place in the first beat, its count and beats wait
        # for its data.
        read_info = data.StructLayout({"index": INDEX_BITS, "pick": range(per_beat),
                                       "count": range(per_block + 1),
                                       "beats": range(block_beats + 1)})
        m.submodules.pending = pending = SyncFIFOBuffered(width=read_info.size,
                                                          depth=self.outstanding)
        m.d.comb += [
            pending.w_en.eq(asked),
            pending.w_data.eq(struct_value(read_info, {
                "index": next_index, "pick": first_beat, "count": count, "beats": beats})),
        ]
        with m.If(asked):
            m.d.sync += next_index.eq(next_index + count)

        # ---- data: a read's beats into one block (beat k in slot k).
        slots = [Signal(self.width, name=f"slot_{k}") for k in range(block_beats)]
        beat_count = Signal(range(block_beats + 1))
        failed = Signal()
        block_info = data.StructLayout({"info": read_info, "error": 1,
                                        "data": 8 * block_bytes})
        m.submodules.out = out = SyncFIFOBuffered(width=block_info.size,
                                                  depth=self.outstanding)
        beat = self.dma_data.payload
        read = read_info(pending.r_data)
        m.d.comb += self.dma_data.ready.eq(out.w_rdy)
        took = self.dma_data.valid & self.dma_data.ready
        for k, slot in enumerate(slots):
            with m.If(took & (beat_count == k)):
                m.d.sync += slot.eq(beat.data)
        whole = Cat(*[Mux(beat_count == k, beat.data, slot) for k, slot in enumerate(slots)])
        error = failed | beat.error
        with m.If(took):
            m.d.sync += [failed.eq(error), beat_count.eq(beat_count + 1)]
            with m.If(beat.last):
                m.d.sync += [failed.eq(0), beat_count.eq(0)]
        m.d.comb += [
            out.w_en.eq(took & beat.last),
            out.w_data.eq(struct_value(block_info, {
                "info": read,
                # A read that ends early (an error beat) or late is an error too.
                "error": error | (beat_count != read.beats - 1),
                "data": whole})),
            pending.r_en.eq(took & beat.last),
        ]

        # ---- hand entries on, one per cycle; the consumer index counts them.
        head = block_info(out.r_data)
        handed_in_block = Signal(range(per_block))
        at = head.info.pick + handed_in_block
        entries = [head.data[8 * entry_bytes * k:8 * entry_bytes * (k + 1)]
                   for k in range(per_block)]
        m.d.comb += [
            self.entry.valid.eq(out.r_rdy),
            self.entry.payload.eq(struct_value(fetched_entry_layout(entry_bytes), {
                "index": head.info.index + handed_in_block, "error": head.error,
                "data": Array(entries)[at] if per_block > 1 else entries[0]})),
        ]
        handed = self.entry.valid & self.entry.ready
        block_done = handed & (handed_in_block == head.info.count - 1)
        m.d.comb += out.r_en.eq(block_done)
        with m.If(handed):
            m.d.sync += [self.nic_index.eq(self.nic_index + 1),
                         handed_in_block.eq(Mux(block_done, 0, handed_in_block + 1))]
        m.d.sync += in_flight.eq(in_flight + asked - block_done)
        # Off and idle: both indices back to 0 for the next set-up.
        with m.If(off & (in_flight == 0)):
            m.d.sync += [next_index.eq(0), self.nic_index.eq(0)]
        return m
