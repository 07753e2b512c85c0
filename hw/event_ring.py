"""Writes events into the event ring in host memory, with a phase bit and an interrupt.

``EventRing(width)`` takes ``EVENT_ENTRY`` records on ``event`` and writes each, by DMA,
into the next slot of the ring (``base``, ``size_log2``); it sets the entry's ``phase``
bit (``hw.host_formats.phase_of_pass``) so that the host finds new entries by polling
memory. ``nic_index`` (the producer index) counts the entries handed to the DMA engine;
the DMA engine writes them in that order, each after the ones before, so an event never
overtakes the data it announces (the RX path writes a frame before its event).

Short and full entries (``hw.host_formats.EVENT_HEAD_BYTES``): an event whose bytes after
the head are all zero (RX, TX_DONE, most COMMAND_DONE) is written as its 16-byte head
alone, with ``short`` set: 16 bytes of DMA instead of 128. Any other event is written
whole with the slot's previous phase, then its head with the new phase, so the phase
never lands before the rest of the entry.

The ring is full when ``nic_index`` is the ring's size ahead of the host's consumer
index ``host_index``: events then wait (back-pressure on ``event``: the host must keep
consuming). Bad configuration and an impossible ``host_index`` (ahead of
``nic_index``) stop the ring, as in ``hw.ring_fetch``, with the same ``status`` bits.

Interrupt moderation: each written event is *unannounced* until an interrupt goes out
on ``irq`` (one vector: 0). With ``irq_enable``, an interrupt goes out as soon as
``irq_count`` events are unannounced, or the oldest unannounced one has waited
``irq_time`` cycles. The driver may instead poll, with ``irq_enable`` = 0.

Throughput (``B = W/8``), when the DMA engine takes a beat per cycle: a short event
every ``1 + ceil(16/B)`` cycles (3 at W=64, 2 from W=128); a full one every
``1 + 128/B + ceil(16/B)`` cycles (19 at W=64, 4 at W=512). Latency: 1 cycle from
``event`` to the DMA request.

Ports:
  base (64), size_log2 (32), host_index (16): the ring's registers
  nic_index (16), status (2): out, to the registers
  event: In(stream of hw.host_formats.EVENT_ENTRY; its ``short`` and ``phase`` are ignored)
  dma_req: Out(stream of hw.dma.DMA_WRITE), dma_data: Out(packet stream, W)
  irq_enable (1), irq_count (32), irq_time (32): in; irq: Out(stream of 8: the vector)
  written: Out(32), events written since reset
"""

from amaranth.hdl import Array, Cat, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from hw.dma import DMA_WRITE
from hw.host_formats import EVENT_ENTRY, EVENT_HEAD_BYTES, INDEX_BITS, RING_ENTRY_BYTES, Ring
from hw.ring_fetch import ring_config
from hw.stream import packet_signature

__all__ = ["EventRing"]

ENTRY_BYTES = RING_ENTRY_BYTES[Ring.EVENT]


class EventRing(wiring.Component):
    def __init__(self, width):
        self.width = width
        super().__init__({
            "base": In(64), "size_log2": In(32), "host_index": In(INDEX_BITS),
            "nic_index": Out(INDEX_BITS), "status": Out(2),
            "event": In(stream.Signature(EVENT_ENTRY)),
            "dma_req": Out(stream.Signature(DMA_WRITE)),
            "dma_data": Out(packet_signature(width)),
            "irq_enable": In(1), "irq_count": In(32), "irq_time": In(32),
            "irq": Out(stream.Signature(8)),
            "written": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        beat_bytes = self.width // 8
        full_beats = ENTRY_BYTES // beat_bytes
        head_beats = -(-EVENT_HEAD_BYTES // beat_bytes)

        # ---- configuration and space, registered.
        bad_config, off, mask, size = ring_config(m, self.base, self.size_log2)
        used = Signal(INDEX_BITS)
        m.d.comb += used.eq(self.nic_index - self.host_index)
        overflow = ~off & (used > size)
        m.d.comb += self.status.eq(Cat(bad_config, overflow))
        # The size and the used count settle a cycle after a change of the registers.
        room = ~off & ~bad_config & ~overflow & (used < size)

        # ---- one event at a time: (the whole entry, if it is full), then its head.
        entry = Signal(EVENT_ENTRY)
        sending = Signal()                   # an event is being written
        whole_first = Signal()               # its whole entry has not been written yet
        beat = Signal(range(full_beats))
        requested = Signal()                 # the current write's request is out
        phase = Signal()
        m.d.comb += phase.eq(~(self.nic_index >> self.size_log2[:4])[0])
        m.d.comb += self.event.ready.eq(~sending & room)
        with m.If(self.event.valid & self.event.ready):
            m.d.sync += [entry.eq(self.event.payload), sending.eq(1), whole_first.eq(1),
                         requested.eq(0), beat.eq(0)]
        # From a register: a short entry is one whose bytes after the head are zero.
        full = Signal()
        m.d.comb += full.eq(entry.as_value()[8 * EVENT_HEAD_BYTES:].any())
        writing_whole = whole_first & full
        image = Signal(EVENT_ENTRY)
        m.d.comb += [image.eq(entry), image.short.eq(~full),
                     image.phase.eq(Mux(writing_whole, ~phase, phase))]
        beats = Mux(writing_whole, full_beats, head_beats)
        m.d.comb += [
            self.dma_req.valid.eq(sending & ~requested),
            self.dma_req.payload.addr.eq(self.base + ((self.nic_index & mask) * ENTRY_BYTES)),
            self.dma_req.payload.length.eq(Mux(writing_whole, ENTRY_BYTES, EVENT_HEAD_BYTES)),
        ]
        with m.If(self.dma_req.valid & self.dma_req.ready):
            m.d.sync += requested.eq(1)
        # The beats follow the request (or go with it: the DMA engine takes them in order).
        last_beat = beat == beats - 1
        image_bits = image.as_value()
        m.d.comb += [
            self.dma_data.valid.eq(sending),
            self.dma_data.payload.data.eq(
                Array(image_bits[k * self.width:(k + 1) * self.width]
                      for k in range(full_beats))[beat]),
            self.dma_data.payload.keep.eq(Mux(
                writing_whole | ~last_beat, (1 << beat_bytes) - 1,
                (1 << (EVENT_HEAD_BYTES - (head_beats - 1) * beat_bytes)) - 1)),
            self.dma_data.payload.last.eq(last_beat),
        ]
        done = Signal()
        with m.If(self.dma_data.valid & self.dma_data.ready):
            m.d.sync += beat.eq(beat + 1)
            with m.If(last_beat):
                m.d.sync += [beat.eq(0), requested.eq(0), whole_first.eq(0)]
                with m.If(~writing_whole):
                    m.d.comb += done.eq(1)
                    m.d.sync += [sending.eq(0), self.nic_index.eq(self.nic_index + 1),
                                 self.written.eq(self.written + 1)]
        with m.If(off & ~sending):
            m.d.sync += self.nic_index.eq(0)

        # ---- interrupt moderation.
        unannounced = Signal(32)
        age = Signal(32)
        due = (unannounced != 0) & ((unannounced >= self.irq_count) | (age >= self.irq_time))
        m.d.comb += [self.irq.valid.eq(self.irq_enable & due), self.irq.payload.eq(0)]
        with m.If(self.irq.valid & self.irq.ready):
            m.d.sync += [unannounced.eq(done), age.eq(0)]
        with m.Else():
            with m.If(done):
                m.d.sync += unannounced.eq(unannounced + 1)
            with m.If(unannounced != 0):
                m.d.sync += age.eq(age + 1)
        return m
