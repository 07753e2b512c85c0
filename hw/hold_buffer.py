"""Data buffers for segments the NIC may have to send more than once (held data).

``HoldBuffer(width, buffers, max_bytes)`` is a pool of ``buffers`` buffers of up to
``max_bytes`` bytes each, in one block RAM (buffer ``b``, beat ``k`` at address
``b * stride + k``, ``stride`` a power of two >= ceil(max_bytes / (W/8))).

* Allocation: ``alloc`` offers a free buffer (``hw.free_list.FreeList``).
* Writing: ``wr_en`` with ``wr_buffer``, ``wr_beat``, ``wr_data`` (W bits) writes one beat.
* Jobs, in order, on ``job`` (a FIFO of ``job_depth`` entries): ``release = 0``: send
  the first ``length`` bytes of ``buffer`` on ``o`` as one packet (ceil(length / (W/8))
  beats, ``keep`` marking the valid bytes, ``last`` on the final beat; nothing when
  ``length`` is 0); ``release = 1``: give the buffer back to the pool. A release queued
  behind reads of the same buffer takes effect after they are sent, so a buffer is never
  reused while a segment that carries it is still to be read.

Latency: job -> first beat 3 cycles. Throughput: one beat per cycle while ``o`` is read.

Ports
  alloc     Out(stream of range(buffers))
  wr_en, wr_buffer, wr_beat, wr_data     In
  job       In(stream of HOLD_JOB)
  o         Out(packet stream)
  free      Out(range(buffers + 1))      buffers in the pool
  job_level Out(range(job_depth + 1))    jobs queued
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from hw.free_list import FreeList
from hw.stream import beat_bytes, packet_layout, packet_signature

__all__ = ["HoldBuffer", "hold_job_layout"]


def hold_job_layout(buffers):
    return data.StructLayout({"buffer": range(buffers), "length": 16, "release": 1})


class HoldBuffer(wiring.Component):
    def __init__(self, width=64, buffers=16, max_bytes=1452, job_depth=16):
        self.width, self.buffers, self.max_bytes = width, buffers, max_bytes
        self.job_depth = job_depth
        beats = -(-max_bytes // beat_bytes(width))
        self.stride = 1 << max(0, (beats - 1).bit_length())
        self.job_layout = hold_job_layout(buffers)
        super().__init__({
            "alloc": Out(stream.Signature(range(buffers))),
            "wr_en": In(1), "wr_buffer": In(range(buffers)),
            "wr_beat": In(range(self.stride)), "wr_data": In(width),
            "job": In(stream.Signature(self.job_layout)),
            "o": Out(packet_signature(width)),
            "free": Out(range(buffers + 1)),
            "job_level": Out(range(job_depth + 1)),
        })

    def elaborate(self, platform):
        m = Module()
        w, nb = self.width, beat_bytes(self.width)
        stride_bits = (self.stride - 1).bit_length()
        m.submodules.pool = pool = FreeList(self.buffers)
        wiring.connect(m, pool.alloc, wiring.flipped(self.alloc))
        m.d.comb += self.free.eq(pool.free)

        m.submodules.mem = mem = Memory(shape=w, depth=self.buffers * self.stride, init=[])
        wr = mem.write_port()
        rd = mem.read_port()

        def address(buffer, beat):
            return Cat(beat[:stride_bits], buffer) if stride_bits else buffer
        m.d.comb += [wr.en.eq(self.wr_en), wr.addr.eq(address(self.wr_buffer, self.wr_beat)),
                     wr.data.eq(self.wr_data)]

        m.submodules.jobs = jobs = SyncFIFOBuffered(width=self.job_layout.size,
                                                    depth=self.job_depth)
        m.d.comb += [jobs.w_en.eq(self.job.valid), jobs.w_data.eq(self.job.payload),
                     self.job.ready.eq(jobs.w_rdy), self.job_level.eq(jobs.level)]
        job = data.View(self.job_layout, jobs.r_data)

        # The reader: one job at a time; a beat is read only when the output FIFO has room
        # for it and the beats already read.
        m.submodules.out = out = SyncFIFOBuffered(width=packet_layout(w).size, depth=4)
        busy = Signal()
        buffer = Signal(range(self.buffers))
        beat = Signal(range(self.stride))
        left = Signal(16)                 # bytes not read yet
        pending = Signal()                # a read was issued in the last cycle
        p_last, p_bytes = Signal(), Signal(range(nb + 1))
        room = Signal()
        m.d.comb += room.eq(out.level + pending < out.depth - 1)
        m.d.comb += [self.o.valid.eq(out.r_rdy), self.o.payload.eq(out.r_data),
                     out.r_en.eq(self.o.ready)]
        m.d.comb += [pool.release.valid.eq(0), pool.release.payload.eq(job.buffer)]
        m.d.comb += rd.addr.eq(address(buffer, beat))
        m.d.sync += pending.eq(0)
        with m.If(~busy):
            with m.If(jobs.r_rdy):
                m.d.comb += jobs.r_en.eq(1)
                with m.If(job.release):
                    m.d.comb += pool.release.valid.eq(1)
                with m.Elif(job.length != 0):
                    m.d.sync += [busy.eq(1), buffer.eq(job.buffer), beat.eq(0),
                                 left.eq(job.length)]
        with m.Elif(room):
            last = Signal()
            m.d.comb += last.eq(left <= nb)
            m.d.sync += [pending.eq(1), p_last.eq(last), p_bytes.eq(Mux(last, left, nb)),
                         beat.eq(beat + 1), left.eq(left - nb)]
            with m.If(last):
                m.d.sync += busy.eq(0)
        keep = Signal(nb)
        m.d.comb += keep.eq(Const((1 << nb) - 1, nb) >> (nb - p_bytes)[:nb.bit_length()].as_unsigned())
        m.d.comb += [out.w_en.eq(pending), out.w_data.eq(Cat(rd.data, keep, p_last))]
        return m
