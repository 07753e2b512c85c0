"""RX dispatch: holds received frames until their verdict, then delivers or drops them.

``RxDispatch(width, max_frame_bytes=1518, depth=None)`` buffers the frames coming out of
the parser in a FIFO of ``depth`` beats and takes one ``DISPATCH`` per frame, in order.
A frame whose verdict says ``to_host`` goes out on ``host`` (and its ``VERDICT`` on
``host_meta``, one record per delivered frame); one that says ``to_splice`` goes out on
``splice`` (to the splice rewriter); any other frame is read out of the buffer and
dropped.

Frames longer than ``max_frame_bytes`` are cut: the beat that reaches the limit is
stored with ``last`` set and the rest of the frame is discarded, so that one oversized
frame can never fill the buffer and wait for a verdict that needs its end (the parser
flags such a frame ``oversize``; the host sees that flag's reason on ``host_meta``).
``cut_frames`` counts them.

Latency: 1 cycle through the buffer when the verdict is already there (the buffer's
output register). Throughput: one beat per cycle in and out, no bubble between frames
(the verdict of a frame is taken in the cycle its first beat leaves).

Ports
  i          In(packet stream)            frames from the parser
  verdict    In(stream of DISPATCH)       one per frame, in order
  host       Out(packet stream)           frames for the host
  host_meta  Out(stream of VERDICT)       the verdict of each frame on ``host``
  splice     Out(packet stream)           frames for the splice rewriter
  cut_frames Out(32)
"""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from hw.handshake import VERDICT
from hw.headers import MAX_FRAME_BYTES
from hw.stream import packet_layout, packet_signature

__all__ = ["RxDispatch", "DISPATCH"]

#: Where a frame goes: the host (``verdict.to_host``), the splice rewriter, or nowhere.
DISPATCH = data.StructLayout({"verdict": VERDICT, "to_splice": 1})


class RxDispatch(wiring.Component):
    def __init__(self, width=64, max_frame_bytes=MAX_FRAME_BYTES, depth=None):
        self.width = width
        self.max_beats = -(-max_frame_bytes // (width // 8))
        # One maximum frame, plus the beats that arrive while a verdict is computed
        # (about 80 cycles from a frame's last beat), rounded up to a power of two.
        self.depth = depth or 1 << (self.max_beats + 96).bit_length()
        assert self.depth > self.max_beats + 2, "the buffer must hold one maximum frame"
        super().__init__({
            "i": In(packet_signature(width)),
            "verdict": In(stream.Signature(DISPATCH)),
            "host": Out(packet_signature(width)),
            "host_meta": Out(stream.Signature(VERDICT)),
            "splice": Out(packet_signature(width)),
            "cut_frames": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        layout = packet_layout(self.width)
        m.submodules.buffer = buffer = SyncFIFOBuffered(width=layout.size, depth=self.depth)

        # ---- input: store beats, cut frames at max_beats
        beats = Signal(range(self.max_beats + 1))
        cutting = Signal()
        beat = self.i.payload
        at_limit = beats == self.max_beats - 1
        m.d.comb += self.i.ready.eq(buffer.w_rdy | cutting)
        m.d.comb += [buffer.w_en.eq(self.i.valid & ~cutting),
                     buffer.w_data.eq(beat.as_value()),
                     buffer.w_data[-1].eq(beat.last | at_limit)]
        with m.If(self.i.valid & self.i.ready):
            with m.If(beat.last):
                m.d.sync += [beats.eq(0), cutting.eq(0)]
            with m.Elif(~cutting):
                m.d.sync += beats.eq(beats + 1)
                with m.If(at_limit):
                    m.d.sync += [cutting.eq(1), self.cut_frames.eq(self.cut_frames + 1)]

        # ---- output: one verdict per frame, taken with its first beat
        in_frame = Signal()               # the first beat has left; its destination is held
        held_to_host, held_to_splice = Signal(), Signal()
        verdict = self.verdict.payload
        to_host = Mux(in_frame, held_to_host, verdict.verdict.to_host)
        to_splice = Mux(in_frame, held_to_splice, verdict.to_splice & ~verdict.verdict.to_host)
        have_verdict = in_frame | self.verdict.valid
        out = layout(buffer.r_data)
        first = ~in_frame
        # The first beat of a delivered frame also needs room for its host_meta record.
        can_go = Mux(to_host, self.host.ready & (in_frame | self.host_meta.ready),
                     Mux(to_splice, self.splice.ready, 1))
        move = have_verdict & buffer.r_rdy & can_go
        m.d.comb += [
            buffer.r_en.eq(move),
            self.host.valid.eq(have_verdict & buffer.r_rdy & to_host
                               & (in_frame | self.host_meta.ready)),
            self.host.payload.eq(buffer.r_data),
            self.host_meta.valid.eq(first & self.verdict.valid & buffer.r_rdy
                                    & verdict.verdict.to_host & self.host.ready),
            self.host_meta.payload.eq(verdict.verdict),
            self.splice.valid.eq(have_verdict & buffer.r_rdy & to_splice),
            self.splice.payload.eq(buffer.r_data),
            self.verdict.ready.eq(first & buffer.r_rdy & can_go),
        ]
        with m.If(move):
            with m.If(out.last):
                m.d.sync += in_frame.eq(0)
            with m.Elif(first):
                m.d.sync += [in_frame.eq(1), held_to_host.eq(verdict.verdict.to_host),
                             held_to_splice.eq(to_splice)]
        return m
