"""Reads the frames the host posts on the TX ring and sends them, whole, to the wire side.

``TxFetch(width, max_frame_bytes)`` takes TX descriptors (``hw.host_formats.TX_DESCRIPTOR``)
as a ``RingFetcher`` hands them on, reads each frame from host memory by DMA, several
frames in flight, and passes it on ``o`` once all of it has arrived (store and forward:
a frame whose read fails never starts on the wire). Frames leave in descriptor order.

A descriptor whose length is below 14 or above ``max_frame_bytes``, or whose address is
not a multiple of the datapath width in bytes, is not read: BAD_DESCRIPTOR. A read that
fails drops its frame: DMA_ERROR. Each descriptor then gets a TX_DONE event on ``done``
(in order) if it asked for one (``TxFlag.COMPLETION``) or failed.

Buffer: ``buffer_frames`` maximum-size frames (2 at W <= 128, 8 above: what covers the
DMA read latency at the link's rate); a read is issued only when the buffer has room
for all of its frame, so the DMA engine's data never waits on ``o``. Throughput: one beat per
cycle on ``o``, as long as the reads in flight (up to 8) cover the DMA read latency.
Latency: the DMA read of the whole frame, plus 2 cycles.

Ports:
  desc: In(stream of hw.ring_fetch.fetched_entry_layout(16))
  dma_req: Out(stream of hw.dma.DMA_READ), dma_data: In(DMA read data)
  o: Out(packet stream): the frames
  done: Out(stream of hw.host_formats.EVENT_ENTRY): TX_DONE events
  frames, bad: Out(32): frames sent; descriptors refused or frames dropped
"""

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from hw.dma import DMA_READ, dma_read_data_layout
from hw.headers import MAX_FRAME_BYTES
from hw.host_formats import (EVENT_ENTRY, RING_ENTRY_BYTES, TX_DESCRIPTOR, HostEventKind,
                             Ring, TxFlag, TxStatus)
from hw.ring_fetch import fetched_entry_layout
from hw.stream import packet_signature, struct_value

__all__ = ["TxFetch", "MIN_TX_FRAME"]

#: The shortest frame the host may send: an Ethernet header.
MIN_TX_FRAME = 14

#: A descriptor on its way: its ring index, whether it wants a TX_DONE, and its status
#: so far (BAD_DESCRIPTOR: not read).
_PENDING = data.StructLayout({"index": 16, "report": 1, "bad": 1})
_FINISHED = data.StructLayout({"index": 16, "report": 1, "status": 2})


class TxFetch(wiring.Component):
    def __init__(self, width, max_frame_bytes=MAX_FRAME_BYTES, in_flight=8, buffer_frames=None):
        self.width = width
        self.max_frame_bytes = max_frame_bytes
        self.in_flight = in_flight
        # Enough frames in flight to cover the DMA read latency at the link's rate: a
        # 10G datapath needs two, a 100G one (W=512, limited by PCIe Gen3 x8) eight.
        self.buffer_frames = buffer_frames or (2 if width <= 128 else 8)
        super().__init__({
            "desc": In(stream.Signature(fetched_entry_layout(RING_ENTRY_BYTES[Ring.TX]))),
            "dma_req": Out(stream.Signature(DMA_READ)),
            "dma_data": In(stream.Signature(dma_read_data_layout(width))),
            "o": Out(packet_signature(width)),
            "done": Out(stream.Signature(EVENT_ENTRY)),
            "frames": Out(32), "bad": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        beat_bytes = self.width // 8
        max_beats = -(-self.max_frame_bytes // beat_bytes)
        depth = 1 << (self.buffer_frames * max_beats - 1).bit_length()

        # ---- descriptors: check, reserve room, read.
        desc = TX_DESCRIPTOR(self.desc.payload.data)
        length = desc.length
        beats = Signal(range(max_beats + 1))
        m.d.comb += beats.eq((length + beat_bytes - 1) // beat_bytes)
        bad = (self.desc.payload.error | (length < MIN_TX_FRAME)
               | (length > self.max_frame_bytes)
               | (desc.addr[:beat_bytes.bit_length() - 1] != 0))
        reserved = Signal(range(depth + 1))
        released = Signal(range(2))
        m.submodules.pending = pending = SyncFIFOBuffered(width=_PENDING.size,
                                                          depth=self.in_flight)
        room = reserved + beats <= depth
        m.d.comb += [
            self.dma_req.payload.addr.eq(desc.addr),
            self.dma_req.payload.length.eq(length),
            self.dma_req.valid.eq(self.desc.valid & ~bad & room & pending.w_rdy),
            self.desc.ready.eq(pending.w_rdy & (bad | (room & self.dma_req.ready))),
            pending.w_en.eq(self.desc.valid & self.desc.ready),
            pending.w_data.eq(struct_value(_PENDING, {
                "index": self.desc.payload.index,
                "report": (desc.flags & TxFlag.COMPLETION) != 0, "bad": bad})),
        ]
        asked = self.dma_req.valid & self.dma_req.ready
        m.d.sync += reserved.eq(reserved + Mux(asked, beats, 0) - released)

        # ---- data: into the buffer; a frame's last beat finishes its descriptor.
        m.submodules.buffer = buffer = SyncFIFOBuffered(
            width=self.width + beat_bytes + 1, depth=depth)
        m.submodules.finished = finished = SyncFIFOBuffered(width=_FINISHED.size,
                                                            depth=self.in_flight)
        head = _PENDING(pending.r_data)
        beat = self.dma_data.payload
        head_bad = pending.r_rdy & head.bad
        m.d.comb += [
            # A refused descriptor is finished at once, in its turn.
            self.dma_data.ready.eq(pending.r_rdy & ~head.bad & finished.w_rdy),
            buffer.w_en.eq(self.dma_data.valid & self.dma_data.ready),
            buffer.w_data.eq(Cat(beat.data, beat.keep, beat.last)),
        ]
        failed = Signal()                      # an error beat so far in this frame
        took = self.dma_data.valid & self.dma_data.ready
        frame_end = took & beat.last
        with m.If(took):
            m.d.sync += failed.eq(Mux(beat.last, 0, failed | beat.error))
        status = Signal(2)
        with m.If(head_bad):
            m.d.comb += status.eq(TxStatus.BAD_DESCRIPTOR)
        with m.Elif(failed | beat.error):
            m.d.comb += status.eq(TxStatus.DMA_ERROR)
        with m.Else():
            m.d.comb += status.eq(TxStatus.OK)
        m.d.comb += [
            finished.w_en.eq((head_bad & finished.w_rdy) | frame_end),
            finished.w_data.eq(struct_value(_FINISHED, {
                "index": head.index, "report": head.report, "status": status})),
            pending.r_en.eq((head_bad & finished.w_rdy) | frame_end),
        ]

        # ---- out: a finished frame goes on whole (or is dropped), then its event.
        info = _FINISHED(finished.r_data)
        ok = info.status == TxStatus.OK
        wants_event = info.report | ~ok
        out_beat = buffer.r_data
        m.d.comb += [
            self.o.payload.data.eq(out_beat[:self.width]),
            self.o.payload.keep.eq(out_beat[self.width:self.width + beat_bytes]),
            self.o.payload.last.eq(out_beat[-1]),
            self.done.payload.eq(struct_value(EVENT_ENTRY, {
                "event": {"kind": HostEventKind.TX_DONE, "status": info.status},
                "ring_index": info.index})),
        ]
        with m.FSM():
            with m.State("FRAME"):
                streaming = finished.r_rdy & (info.status != TxStatus.BAD_DESCRIPTOR)
                m.d.comb += self.o.valid.eq(streaming & ok & buffer.r_rdy)
                read = streaming & buffer.r_rdy & (~ok | self.o.ready)
                m.d.comb += [buffer.r_en.eq(read), released.eq(read)]
                with m.If(read & out_beat[-1]):
                    with m.If(ok):
                        m.d.sync += self.frames.eq(self.frames + 1)
                    with m.If(wants_event):
                        m.next = "EVENT"
                    with m.Else():
                        m.d.comb += finished.r_en.eq(1)
                with m.If(finished.r_rdy & (info.status == TxStatus.BAD_DESCRIPTOR)):
                    m.next = "EVENT"
            with m.State("EVENT"):
                m.d.comb += self.done.valid.eq(1)
                with m.If(self.done.ready):
                    m.d.comb += finished.r_en.eq(1)
                    with m.If(~ok):
                        m.d.sync += self.bad.eq(self.bad + 1)
                    m.next = "FRAME"
        return m

