"""Store-and-forward frame buffer that overwrites two 16-bit fields of each frame.

``PatchBuffer`` holds frames while their checksums are computed elsewhere and writes
them into the frame as it leaves; ``TxBuilder`` and ``ChecksumInserter`` both use it.
"""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from hw.stream import packet_layout, packet_signature, beat_bytes

__all__ = ["PATCH", "PatchBuffer"]


def _patch_field():
    return data.StructLayout({"enable": 1, "offset": 8, "value": 16})


#: One frame's patches: write ``value`` (big-endian) at frame byte ``offset`` when enabled.
#: Offsets must be even so that a field never straddles two beats.
PATCH = data.StructLayout({"ip": _patch_field(), "tcp": _patch_field()})


class PatchBuffer(wiring.Component):
    """Store-and-forward frame buffer that patches two 16-bit fields on the way out.

    Frames enter on ``i`` and wait in a FIFO of ``depth`` beats; the frame at the head
    leaves on ``o`` once its ``patch`` has arrived, with the patched bytes overwritten.
    A frame longer than the FIFO cannot wait for its patch: when the FIFO is full and
    holds no complete frame, the head frame leaves unpatched and the patch that later
    arrives for it is thrown away (``unpatched`` counts such frames). A frame that fits
    is always patched, so the outcome does not depend on timing.

    Latency: 3 cycles from the later of (last beat in, patch in) to the first beat out.
    Throughput: 1 beat per cycle, frames back to back (as long as each frame's patch
    arrives before the previous frame has left).

    Ports: ``i`` and ``o`` packet streams (``hw.stream``), ``patch`` (In, stream of
    ``PATCH``, one per frame in frame order), ``unpatched`` (Out, 32-bit counter).
    """

    def __init__(self, width=64, depth=256, patch_depth=16):
        self.width = width
        self.depth = depth
        self.patch_depth = patch_depth
        super().__init__({
            "i": In(packet_signature(width)),
            "patch": In(stream.Signature(PATCH)),
            "o": Out(packet_signature(width)),
            "unpatched": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        nbytes = beat_bytes(self.width)
        lane_bits = nbytes.bit_length() - 1      # log2(bytes per beat)

        m.submodules.frames = frames = SyncFIFOBuffered(width=packet_layout(self.width).size,
                                                        depth=self.depth)
        m.submodules.patches = patches = SyncFIFOBuffered(width=PATCH.size, depth=self.patch_depth)
        m.d.comb += [
            frames.w_data.eq(self.i.payload), frames.w_en.eq(self.i.valid),
            self.i.ready.eq(frames.w_rdy),
            patches.w_data.eq(self.patch.payload), patches.w_en.eq(self.patch.valid),
            self.patch.ready.eq(patches.w_rdy),
        ]

        head = Signal(packet_layout(self.width))
        m.d.comb += head.eq(frames.r_data)

        # Complete frames in the FIFO: a frame that does not fit never becomes complete.
        complete = Signal(range(self.depth + 1))
        last_in = self.i.valid & self.i.ready & self.i.payload.last
        last_out = self.o.valid & self.o.ready & head.last
        m.d.sync += complete.eq(complete + last_in - last_out)

        in_frame = Signal()        # the head frame has started to leave
        bypass = Signal()          # ... and leaves unpatched
        beat = Signal(16)          # beat index in the frame that is leaving
        owed = Signal(range(self.depth + 1))   # patches of bypassed frames still to drop

        # The head frame's patch waits in a register ("cur"), the next one in "nxt", so
        # that the output handshake and the patch FIFO's read depend on flip-flops only.
        # Patches of bypassed frames are dropped on the way; none is taken while a
        # bypassed frame is leaving (its own patch may still be on its way).
        cur, nxt = Signal(PATCH), Signal(PATCH)
        cur_valid, nxt_valid = Signal(), Signal()
        pop = patches.r_rdy & ~nxt_valid & ~(in_frame & bypass)
        keep = pop & (owed == 0)
        m.d.comb += patches.r_en.eq(pop)
        release = Signal()         # the patched head frame leaves its last beat
        with m.If(~cur_valid | release):
            m.d.sync += [cur.eq(Mux(nxt_valid, nxt, patches.r_data)), cur_valid.eq(nxt_valid | keep),
                         nxt_valid.eq(0)]
        with m.Elif(keep):
            m.d.sync += [nxt.eq(patches.r_data), nxt_valid.eq(1)]

        # The FIFO is full without a complete frame (registered: nothing can enter or
        # leave while this holds, so it still holds in the next cycle).
        too_long = Signal()
        may_start = cur_valid | too_long
        m.d.comb += [
            self.o.valid.eq(frames.r_rdy & (in_frame | may_start)),
            frames.r_en.eq(self.o.ready & (in_frame | may_start)),
        ]
        m.d.sync += too_long.eq((complete == 0) & ~frames.w_rdy & ~in_frame & ~frames.r_en)
        unpatched_now = Mux(in_frame, bypass, ~cur_valid)

        # Overwrite the two fields in the beat that carries them.
        out = Signal(packet_layout(self.width))
        m.d.comb += out.eq(head)
        for field in (cur.ip, cur.tcp):
            hit = ~unpatched_now & field.enable & (beat == field.offset[lane_bits:])
            for lane in range(0, nbytes, 2):
                with m.If(hit & (field.offset[:lane_bits] == lane)):
                    m.d.comb += [
                        out.data[8 * lane:8 * lane + 8].eq(field.value[8:16]),
                        out.data[8 * lane + 8:8 * lane + 16].eq(field.value[0:8]),
                    ]
        m.d.comb += self.o.payload.eq(out)

        finished_bypass = last_out & unpatched_now
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += [beat.eq(Mux(head.last, 0, beat + 1)), in_frame.eq(~head.last)]
            with m.If(~in_frame):
                m.d.sync += bypass.eq(~cur_valid)
        m.d.comb += release.eq(last_out & ~unpatched_now)
        m.d.sync += owed.eq(owed + finished_bypass - (pop & (owed != 0)))
        with m.If(finished_bypass):
            m.d.sync += self.unpatched.eq(self.unpatched + 1)
        return m
