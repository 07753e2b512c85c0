"""Checksum insertion on the TX path: make the IPv4 and TCP checksums of a frame right.

Two components live here:

``PatchBuffer``
    A store-and-forward frame buffer that overwrites up to two 16-bit fields (the IPv4
    and the TCP checksum) of each frame as the frame leaves. The values arrive on a
    separate ``patch`` stream, one per frame, in frame order, at any time up to the end
    of the frame; a frame leaves only once its patch is there. ``TxBuilder`` and
    ``ChecksumInserter`` both use it.

``ChecksumInserter``
    Completes frames coming from the host: the RX parser (``hw.parser.Parser``) walks
    the frame and sums its headers while the frame waits in a ``PatchBuffer``; the
    parser's metadata then gives the offsets and the sums, from which the right
    checksums follow (RFC 1071 one's-complement arithmetic, RFC 1624 to take the old
    checksum out of the sum).

The one's-complement helpers (``ones_add``, ``fold``, ``word_sum``) are shared with the
builder.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from hw.headers import IPV4, TCP, MAX_FRAME_BYTES
from hw.metadata import FrameClass
from hw.stream import packet_layout, packet_signature, beat_bytes

__all__ = ["ones_add", "fold", "word_sum", "PATCH", "PatchBuffer", "ChecksumInserter"]


# --- One's-complement arithmetic (RFC 1071) ------------------------------------------------

def ones_add(a, b):
    """One's-complement sum of two 16-bit values (end-around carry)."""
    total = a + b                       # 17 bits
    return (total[:16] + total[16])[:16]


def fold(value):
    """Fold a wide sum of 16-bit words into a 16-bit one's-complement sum."""
    while len(value) > 17:
        value = value[:16] + value[16:]
    if len(value) == 17:                # at most 0x1FFFE here, so this cannot carry again
        value = (value[:16] + value[16])[:16]
    return value


def tree_sum(values):
    """Sum a list of values with a balanced adder tree (0 for an empty list)."""
    values = list(values)
    if not values:
        return Const(0, 1)
    while len(values) > 1:
        pairs = [values[i] + values[i + 1] for i in range(0, len(values) - 1, 2)]
        values = pairs + values[len(values) - len(values) % 2:]
    return values[0]


def beat_words(beat_data):
    """The 16-bit big-endian words of a beat: byte 2j is the high byte of word j."""
    return [Cat(beat_data[16 * j + 8:16 * j + 16], beat_data[16 * j:16 * j + 8])
            for j in range(len(beat_data) // 16)]


def word_sum(beat_data, lane_enable):
    """Plain (unfolded) sum of the beat's 16-bit words whose bit in ``lane_enable`` is set."""
    return tree_sum(Mux(lane_enable[j], word, 0) for j, word in enumerate(beat_words(beat_data)))


# --- The patching store-and-forward buffer ------------------------------------------------

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

    Latency: 2 cycles from the later of (last beat in, patch in) to the first beat out.
    Throughput: 1 beat per cycle, frames back to back.
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
        patch = Signal(PATCH)
        m.d.comb += [head.eq(frames.r_data), patch.eq(patches.r_data)]

        # Complete frames in the FIFO: a frame that does not fit never becomes complete.
        complete = Signal(range(self.depth + 1))
        last_in = self.i.valid & self.i.ready & self.i.payload.last
        last_out = self.o.valid & self.o.ready & head.last
        m.d.sync += complete.eq(complete + last_in - last_out)

        in_frame = Signal()        # the head frame has started to leave
        bypass = Signal()          # ... and leaves unpatched
        beat = Signal(16)          # beat index in the frame that is leaving
        owed = Signal(range(self.depth + 1))   # patches of bypassed frames still to drop

        patch_ready = patches.r_rdy & (owed == 0)
        too_long = (complete == 0) & ~frames.w_rdy
        may_start = patch_ready | too_long
        unpatched_now = Mux(in_frame, bypass, ~patch_ready)
        m.d.comb += [
            self.o.valid.eq(frames.r_rdy & (in_frame | may_start)),
            frames.r_en.eq(self.o.ready & (in_frame | may_start)),
        ]

        # Overwrite the two fields in the beat that carries them.
        out = Signal(packet_layout(self.width))
        m.d.comb += out.eq(head)
        for field in (patch.ip, patch.tcp):
            hit = ~unpatched_now & field.enable & (beat == field.offset[lane_bits:])
            for lane in range(0, nbytes, 2):
                with m.If(hit & (field.offset[:lane_bits] == lane)):
                    m.d.comb += [
                        out.data[8 * lane:8 * lane + 8].eq(field.value[8:16]),
                        out.data[8 * lane + 8:8 * lane + 16].eq(field.value[0:8]),
                    ]
        m.d.comb += self.o.payload.eq(out)

        drop_owed = (owed != 0) & patches.r_rdy
        finished_bypass = last_out & unpatched_now
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += [beat.eq(Mux(head.last, 0, beat + 1)), in_frame.eq(~head.last)]
            with m.If(~in_frame):
                m.d.sync += bypass.eq(~patch_ready)
        m.d.comb += patches.r_en.eq(drop_owed | (last_out & ~unpatched_now))
        m.d.sync += owed.eq(owed + finished_bypass - drop_owed)
        with m.If(finished_bypass):
            m.d.sync += self.unpatched.eq(self.unpatched + 1)
        return m


# --- The inserter ------------------------------------------------------------------------------

class ChecksumInserter(wiring.Component):
    """Writes the right IPv4 and TCP checksums into host frames, whatever they held.

    - IPv4 frames (an optional 802.1Q tag, IHL 5..15) get their header checksum written
      when the whole IPv4 header is in the frame, unless the parser flags them
      bad_ip_version, bad_ihl or oversize.
    - IPv4 TCP non-fragments (``FrameClass.TCP``) also get their TCP checksum
      (pseudo-header included), unless flagged truncated, bad_ihl, bad_data_offset,
      length_mismatch or oversize.
    - Everything else (ARP, IPv6, malformed or too long frames) passes unchanged.

    The frame waits in a ``PatchBuffer`` of one maximum frame plus slack while the
    parser sums it; the new checksum is ``~(sum + ~old)`` where ``sum`` is the parser's
    one's-complement sum with the old checksum included.

    Latency: parser latency + 2 cycles after the frame's last beat (store and forward).
    Throughput: 1 beat per cycle for back-to-back frames of any size.

    Ports: ``i`` and ``o`` packet streams (``hw.stream``); ``unpatched`` counts frames
    longer than the buffer, which pass unchanged.
    """

    #: Extra buffer beats on top of one maximum frame: covers the parser's metadata
    #: latency so that the input never waits while a full-size frame is being summed.
    SLACK_BEATS = 32

    def __init__(self, width=64, max_frame_bytes=MAX_FRAME_BYTES):
        self.width = width
        self.max_frame_bytes = max_frame_bytes
        self.depth = -(-max_frame_bytes // beat_bytes(width)) + self.SLACK_BEATS
        super().__init__({
            "i": In(packet_signature(width)),
            "o": Out(packet_signature(width)),
            "unpatched": Out(32),
        })

    def elaborate(self, platform):
        # Imported here so that the builder, which shares PatchBuffer, does not need the parser.
        from hw.parser import Parser

        m = Module()
        m.submodules.parser = parser = Parser(width=self.width, max_frame_bytes=self.max_frame_bytes)
        m.submodules.buffer = buffer = PatchBuffer(self.width, depth=self.depth)
        wiring.connect(m, wiring.flipped(self.i), parser.i)
        wiring.connect(m, parser.o, buffer.i)
        wiring.connect(m, buffer.o, wiring.flipped(self.o))
        m.d.comb += self.unpatched.eq(buffer.unpatched)

        meta = parser.meta.payload
        err = meta.errors
        is_ipv4 = meta.frame_class.matches(
            FrameClass.TCP, FrameClass.UDP, FrameClass.IPV4_OTHER, FrameClass.FRAGMENT)
        header_inside = meta.frame_length >= meta.l4_offset     # the whole IPv4 header is there
        ip_ok = is_ipv4 & header_inside & ~(err.bad_ip_version | err.bad_ihl | err.oversize)
        tcp_ok = (ip_ok & (meta.frame_class == FrameClass.TCP)
                  & ~(err.truncated | err.bad_data_offset | err.length_mismatch))

        patch = Signal(PATCH)
        m.d.comb += [
            patch.ip.enable.eq(ip_ok),
            patch.ip.offset.eq(meta.l3_offset + IPV4.checksum.byte_offset),
            patch.ip.value.eq(~ones_add(meta.ip_sum, ~meta.ip.checksum)),
            patch.tcp.enable.eq(tcp_ok),
            patch.tcp.offset.eq(meta.l4_offset + TCP.checksum.byte_offset),
            patch.tcp.value.eq(~ones_add(meta.tcp_sum, ~meta.tcp.checksum)),
            buffer.patch.payload.eq(patch),
            buffer.patch.valid.eq(parser.meta.valid),
            parser.meta.ready.eq(buffer.patch.ready),
        ]
        return m
