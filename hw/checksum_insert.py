"""TX checksum completion for host frames: make the IPv4 and TCP checksums right.

``ChecksumInserter`` runs every frame through the RX parser (``hw.parser.Parser``) while
the frame waits in a ``PatchBuffer`` (``hw.patch_buffer``); the parser's sums and
offsets give the right checksums (RFC 1071 sums, RFC 1624 to take the old checksum out
of the sum), written as the frame leaves.
"""

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from hw.headers import IPV4, TCP, MAX_FRAME_BYTES
from hw.metadata import FrameClass
from hw.ones_complement import ones_add
from hw.parser import Parser
from hw.patch_buffer import PATCH, PatchBuffer
from hw.stream import packet_signature, beat_bytes, struct_value

__all__ = ["ChecksumInserter"]


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

    Latency: parser latency + 4 cycles after the frame's last beat (store and forward:
    the patch register, then the ``PatchBuffer``'s 3 cycles).
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

        # The patch is computed from the parser's record and registered (a one-entry
        # stream register), so that the adders do not reach the patch FIFO's LUT RAM.
        patch = struct_value(PATCH, {
            "ip": {"enable": ip_ok, "offset": meta.l3_offset + IPV4.checksum.byte_offset,
                   "value": ~ones_add(meta.ip_sum, ~meta.ip.checksum)},
            "tcp": {"enable": tcp_ok, "offset": meta.l4_offset + TCP.checksum.byte_offset,
                    "value": ~ones_add(meta.tcp_sum, ~meta.tcp.checksum)},
        })
        held = Signal(PATCH)
        held_valid = Signal()
        m.d.comb += [
            parser.meta.ready.eq(~held_valid | buffer.patch.ready),
            buffer.patch.valid.eq(held_valid),
            buffer.patch.payload.eq(held),
        ]
        with m.If(parser.meta.ready):
            m.d.sync += [held_valid.eq(parser.meta.valid), held.eq(patch)]
        return m
