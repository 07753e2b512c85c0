"""Fetches the entries of one host -> NIC ring (TX, RX or COMMAND) by DMA.

``RingFetcher(width, entry_bytes, outstanding=4)`` watches the ring's registers
(``base``, ``size_log2``, the host's producer index ``host_index``); while the host has
posted entries it has not fetched, it asks the DMA engine for them, one read per entry,
up to ``outstanding`` reads in flight, and hands each entry on ``entry`` with its index
and an ``error`` bit (the read failed: the entry's data is not to be trusted). Its
consumer index ``nic_index`` counts the entries handed on: the host may reuse a slot once
the index has passed it.

An entry narrower than a beat (16 B at W=512) is read as the aligned beat that holds it
and picked out of it, as a NIC reads a whole cache line; the ring's 4 KB-aligned base
keeps every read inside the ring.

The ring stops, with a ``status`` bit (``hw.registers.RingStatus``), while its
configuration is bad (``size_log2`` above ``MAX_RING_LOG2``, or a base that is not
4 KB-aligned) or the host's index is more than the ring's size ahead of ``nic_index``
(the host posted more entries than the ring holds): it fetches nothing until the host
fixes it. ``size_log2`` = 0 turns the ring off; once nothing is in flight its indices
return to 0, ready for the host to set the ring up again.

Throughput: one entry per ``max(1, entry_bytes / (W/8))`` cycles when the DMA engine
keeps up; ``outstanding`` reads cover the read latency (each read waits for its data).
Latency: the DMA read's, plus 2 cycles.

Ports:
  base (64), size_log2 (32: the register), host_index (16): the ring's registers
  nic_index (16), status (2): out, to the registers
  dma_req: Out(stream of hw.dma.DMA_READ), dma_data: In(stream of hw.dma read data)
  entry: Out(stream of {index: 16, error: 1, data: entry_bytes * 8})
"""

from amaranth.hdl import Array, Cat, Module, Signal
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
    def __init__(self, width, entry_bytes, outstanding=4):
        assert entry_bytes & (entry_bytes - 1) == 0 and entry_bytes <= RING_BASE_ALIGN
        self.width = width
        self.entry_bytes = entry_bytes
        self.outstanding = outstanding
        super().__init__({
            "base": In(64), "size_log2": In(32), "host_index": In(INDEX_BITS),
            "nic_index": Out(INDEX_BITS), "status": Out(2),
            "dma_req": Out(stream.Signature(DMA_READ)),
            "dma_data": In(stream.Signature(dma_read_data_layout(width))),
            "entry": Out(stream.Signature(fetched_entry_layout(entry_bytes))),
        })

    def elaborate(self, platform):
        m = Module()
        beat_bytes = self.width // 8
        read_bytes = max(self.entry_bytes, beat_bytes)
        beats = read_bytes // beat_bytes
        # Where in the beat the entry starts, when entries are narrower than a beat.
        picks = beat_bytes // self.entry_bytes if self.entry_bytes < beat_bytes else 1

        bad_config, off, mask, size = ring_config(m, self.base, self.size_log2)
        # Not registered: a request in the cycle the host's index jumps would fetch an
        # entry the host never posted.
        overflow = Signal()
        m.d.comb += overflow.eq(~off & ((self.host_index - self.nic_index)[:INDEX_BITS] > size))
        m.d.comb += self.status.eq(Cat(bad_config, overflow))

        # ---- requests: one read per entry, while fewer than `outstanding` are in flight
        # (in flight: asked for and not yet handed on; the output FIFO holds them all).
        next_index = Signal(INDEX_BITS)         # the next entry to ask for
        in_flight = Signal(range(self.outstanding + 1))
        running = ~off & ~bad_config & ~overflow
        posted = next_index != self.host_index
        entry_addr = self.base + ((next_index & mask) * self.entry_bytes)
        m.d.comb += [
            self.dma_req.valid.eq(running & posted & (in_flight < self.outstanding)),
            self.dma_req.payload.addr.eq(entry_addr & ~(beat_bytes - 1)),
            self.dma_req.payload.length.eq(read_bytes),
        ]
        asked = self.dma_req.valid & self.dma_req.ready
        # Each read's entry index and its place in the beat wait for its data.
        m.submodules.pending = pending = SyncFIFOBuffered(
            width=INDEX_BITS + max(1, (picks - 1).bit_length()), depth=self.outstanding)
        m.d.comb += [
            pending.w_en.eq(asked),
            pending.w_data.eq(Cat(next_index, (entry_addr // self.entry_bytes) % picks
                                  if picks > 1 else 0)),
        ]
        with m.If(asked):
            m.d.sync += next_index.eq(next_index + 1)

        # ---- data: shift the beats of a read into one entry.
        shift = Signal(8 * read_bytes)
        beat_count = Signal(range(beats + 1))
        failed = Signal()
        m.submodules.out = out = SyncFIFOBuffered(
            width=fetched_entry_layout(self.entry_bytes).size, depth=self.outstanding)
        beat = self.dma_data.payload
        m.d.comb += self.dma_data.ready.eq(out.w_rdy)
        took = self.dma_data.valid & self.dma_data.ready
        if beats > 1:
            whole = Cat(shift[self.width:], beat.data)
        else:
            whole = beat.data
        if picks > 1:
            choices = Array(whole[8 * self.entry_bytes * k:8 * self.entry_bytes * (k + 1)]
                            for k in range(picks))
            picked = choices[pending.r_data[INDEX_BITS:]]
        else:
            picked = whole[:8 * self.entry_bytes]
        error = failed | beat.error
        with m.If(took):
            m.d.sync += [shift.eq(whole), failed.eq(error), beat_count.eq(beat_count + 1)]
            with m.If(beat.last):
                m.d.sync += [failed.eq(0), beat_count.eq(0)]
        m.d.comb += [
            out.w_en.eq(took & beat.last),
            out.w_data.eq(struct_value(fetched_entry_layout(self.entry_bytes), {
                "index": pending.r_data[:INDEX_BITS],
                # A read that ends early (an error beat) or late is an error too.
                "error": error | (beat_count != beats - 1),
                "data": picked})),
            pending.r_en.eq(took & beat.last),
        ]

        # ---- hand entries on; the consumer index counts them.
        m.d.comb += [
            self.entry.valid.eq(out.r_rdy),
            self.entry.payload.eq(out.r_data),
            out.r_en.eq(self.entry.ready),
        ]
        handed = self.entry.valid & self.entry.ready
        with m.If(handed):
            m.d.sync += self.nic_index.eq(self.nic_index + 1)
        m.d.sync += in_flight.eq(in_flight + asked - handed)
        # Off and idle: both indices back to 0 for the next set-up.
        with m.If(off & (in_flight == 0)):
            m.d.sync += [next_index.eq(0), self.nic_index.eq(0)]
        return m
