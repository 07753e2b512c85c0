"""Delivers the frames meant for the host into the RX buffers it posted, by DMA.

``RxDeliver(width, max_frame_bytes)`` takes the host's frames (``frame``, with one
``hw.handshake.VERDICT`` per frame on ``meta``) and the RX buffer descriptors
(``hw.host_formats.RX_DESCRIPTOR``) a ``RingFetcher`` hands on. Each frame is stored
whole (its length is known at its end), then written by DMA into the next buffer, and
an RX event (``ring_index`` = the buffer's index, ``length``, ``reason``) follows on
``done``. The DMA engine writes requests in the order it takes them, so the host never
sees an event before its frame.

A frame's verdict must come no later than its first beat (as ``hw.rx_dispatch`` sends
it). The frame side never stalls for the host: a frame that starts while the store has no
room for a maximum-size frame (no buffers posted, or the host is slow) is dropped whole
and counted in ``dropped``. Every buffer comes back in exactly one RX event
(``RxStatus``): OK; TOO_LONG (the frame is longer than the buffer: the frame is dropped,
the buffer returned empty); BAD_BUFFER (the descriptor could not be read or is not
aligned to the datapath width: returned unused; the frame waits for the next buffer).

Store: two maximum-size frames. Throughput: one beat per cycle in and out. Latency: the
frame's length in beats plus 3 cycles to the DMA request.

Ports:
  frame: In(packet stream), meta: In(stream of VERDICT): the host's frames
  buf: In(stream of hw.ring_fetch.fetched_entry_layout(16)): RX descriptors
  dma_req: Out(stream of hw.dma.DMA_WRITE), dma_data: Out(packet stream)
  done: Out(stream of hw.host_formats.EVENT_ENTRY): RX events
  delivered, dropped, too_long: Out(32): counters
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO, SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from hw.dma import DMA_WRITE
from hw.handshake import VERDICT
from hw.headers import MAX_FRAME_BYTES
from hw.host_formats import (EVENT_ENTRY, RING_ENTRY_BYTES, RX_DESCRIPTOR, HostEventKind,
                             Ring, RxStatus)
from hw.ring_fetch import fetched_entry_layout
from hw.stream import packet_signature, struct_value

__all__ = ["RxDeliver"]

#: A stored frame: its length and why it came to the host.
_STORED = data.StructLayout({"length": 16, "reason": 4})


class RxDeliver(wiring.Component):
    def __init__(self, width, max_frame_bytes=MAX_FRAME_BYTES):
        self.width = width
        self.max_frame_bytes = max_frame_bytes
        super().__init__({
            "frame": In(packet_signature(width)),
            "meta": In(stream.Signature(VERDICT)),
            "buf": In(stream.Signature(fetched_entry_layout(RING_ENTRY_BYTES[Ring.RX]))),
            "dma_req": Out(stream.Signature(DMA_WRITE)),
            "dma_data": Out(packet_signature(width)),
            "done": Out(stream.Signature(EVENT_ENTRY)),
            "delivered": Out(32), "dropped": Out(32), "too_long": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        beat_bytes = self.width // 8
        # A frame may be cut at max_frame_bytes plus a beat by the dispatcher: room for it.
        max_beats = -(-self.max_frame_bytes // beat_bytes) + 1
        depth = 1 << (2 * max_beats - 1).bit_length()

        # ---- in: store a frame whole, or drop it whole.
        m.submodules.store = store = SyncFIFOBuffered(width=self.width + beat_bytes + 1,
                                                      depth=depth)
        m.submodules.stored = stored = SyncFIFOBuffered(width=_STORED.size, depth=8)
        level = Signal(range(depth + 1))             # beats in the store
        in_frame = Signal()                          # between a frame's first and last beat
        keeping = Signal()                           # ... and it is being stored
        length = Signal(16)
        beat = self.frame.payload
        first = ~in_frame
        # Decided at the first beat (the frame's verdict must be there too).
        room = (level <= depth - max_beats) & stored.w_rdy
        keep_this = Mux(first, room, keeping)
        # The frame side is always ready (a frame is stored or dropped), so that no ready
        # depends on the other stream's valid: the dispatcher offers a frame's verdict
        # only with its first beat, when `frame` is ready. A verdict that comes early
        # waits in a FIFO (readable the cycle after it is written: not a buffered one); one
        # that comes with its first beat is used at once.
        m.submodules.verdicts = verdicts = SyncFIFO(width=VERDICT.size, depth=4)
        bypass = first & self.frame.valid & ~verdicts.r_rdy
        verdict = VERDICT(Mux(verdicts.r_rdy, verdicts.r_data, self.meta.payload.as_value()))
        m.d.comb += [
            verdicts.w_en.eq(self.meta.valid & ~bypass),
            verdicts.w_data.eq(self.meta.payload),
            # Not `| bypass`: the dispatcher's host_meta.valid depends on frame.ready and
            # its host.valid on meta.ready. When bypassing, the FIFO is empty: w_rdy is 1.
            self.meta.ready.eq(verdicts.w_rdy),
            self.frame.ready.eq(1),
            verdicts.r_en.eq(self.frame.valid & first),
        ]
        took = self.frame.valid & self.frame.ready
        beat_length = Signal(range(beat_bytes + 1))
        m.d.comb += beat_length.eq(sum(beat.keep[k] for k in range(beat_bytes)))
        reason = Signal(4)
        with m.If(took):
            m.d.sync += in_frame.eq(~beat.last)
            with m.If(first):
                m.d.sync += [keeping.eq(room), reason.eq(verdict.reason),
                             length.eq(beat_length)]
            with m.Else():
                m.d.sync += length.eq(length + beat_length)
            with m.If(~keep_this & beat.last):
                m.d.sync += self.dropped.eq(self.dropped + 1)
        m.d.comb += [
            store.w_en.eq(took & keep_this),
            store.w_data.eq(Cat(beat.data, beat.keep, beat.last)),
            stored.w_en.eq(took & keep_this & beat.last),
            stored.w_data.eq(struct_value(_STORED, {
                "length": Mux(first, beat_length, length + beat_length),
                "reason": Mux(first, verdict.reason, reason)})),
        ]

        # ---- out: the next stored frame into the next buffer.
        info = _STORED(stored.r_data)
        desc = RX_DESCRIPTOR(self.buf.payload.data)
        index = Signal(16)
        addr = Signal(64)
        status = Signal(2)
        out_beat = store.r_data
        m.d.comb += [
            self.dma_req.payload.addr.eq(addr),
            self.dma_req.payload.length.eq(info.length),
            self.dma_data.payload.data.eq(out_beat[:self.width]),
            self.dma_data.payload.keep.eq(out_beat[self.width:self.width + beat_bytes]),
            self.dma_data.payload.last.eq(out_beat[-1]),
            self.done.payload.eq(struct_value(EVENT_ENTRY, {
                "event": {"kind": HostEventKind.RX, "status": status},
                "ring_index": index,
                "length": Mux(status == RxStatus.OK, info.length, 0),
                "reason": Mux(status == RxStatus.OK, info.reason, 0)})),
        ]
        read = Signal()
        m.d.comb += store.r_en.eq(read)
        m.d.sync += level.eq(level + store.w_en - read)
        bad_buffer = (self.buf.payload.error
                      | (desc.addr[:beat_bytes.bit_length() - 1] != 0))
        with m.FSM():
            with m.State("WAIT"):
                with m.If(stored.r_rdy & self.buf.valid):
                    m.d.comb += self.buf.ready.eq(1)
                    m.d.sync += [index.eq(self.buf.payload.index), addr.eq(desc.addr)]
                    with m.If(bad_buffer):
                        m.d.sync += status.eq(RxStatus.BAD_BUFFER)
                        m.next = "EVENT"
                    with m.Elif(info.length > desc.length):
                        m.d.sync += [status.eq(RxStatus.TOO_LONG),
                                     self.too_long.eq(self.too_long + 1)]
                        m.next = "DISCARD"
                    with m.Else():
                        m.d.sync += status.eq(RxStatus.OK)
                        m.next = "REQUEST"
            with m.State("REQUEST"):
                m.d.comb += self.dma_req.valid.eq(1)
                with m.If(self.dma_req.ready):
                    m.next = "WRITE"
            with m.State("WRITE"):
                m.d.comb += [self.dma_data.valid.eq(store.r_rdy),
                             read.eq(store.r_rdy & self.dma_data.ready)]
                with m.If(read & out_beat[-1]):
                    m.d.sync += self.delivered.eq(self.delivered + 1)
                    m.next = "EVENT"
            with m.State("DISCARD"):
                m.d.comb += read.eq(store.r_rdy)
                with m.If(read & out_beat[-1]):
                    m.next = "EVENT"
            with m.State("EVENT"):
                m.d.comb += self.done.valid.eq(1)
                with m.If(self.done.ready):
                    # A returned-unused buffer leaves the frame for the next one.
                    m.d.comb += stored.r_en.eq(status != RxStatus.BAD_BUFFER)
                    m.next = "WAIT"
        return m
