"""Host side of the simulated PCIe link: host memory, TLP accounting and a timed link model.

Three layers, each usable on its own:

* ``HostMemory``: a sparse byte-addressable memory in which only the regions the driver
  registered may be touched; anything else raises ``HostMemoryError``.
* Pure functions: ``tlps_for_write`` / ``tlps_for_read`` cut a transfer into TLPs by the
  spec's rules (MPS, MRRS, RCB, 4 KB boundaries), ``wire_bytes`` counts what they cost
  on the wire, ``effective_bandwidth`` is the analytic model of Neugebauer et al.,
  "Understanding PCIe performance for end host networking", SIGCOMM 2018, section 3.
* ``PcieLink``: an event model of one full-duplex link. The device (NIC) posts DMA
  writes and tagged DMA reads, the host does MMIO reads and writes; every TLP is
  serialized on its direction's wire at the usable bandwidth and the completions
  come back at the times the bandwidth and latency figures say. Drive it with
  ``tick()`` (one NIC clock cycle) or ``advance(ns)`` / ``run_until(t_ns)``; each returns
  the DMA read completions that reached the device by then.

Directions are named from the device: ``"up"`` is device -> host (DMA writes, read
requests, MMIO read completions), ``"down"`` is host -> device (DMA read completions,
MMIO writes, MMIO read requests). Times are in nanoseconds (floats). Every default
constant cites its source; docs/pcie_model.md has the equations, a bandwidth table and
the list of simplifications.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

__all__ = [
    "PcieConfig", "Tlp", "Completion", "HostMemory", "HostMemoryError", "Region",
    "PcieLink", "DirectionCounters", "RegisterFile",
    "tlps_for_write", "tlps_for_read", "completions_for_read", "wire_bytes", "tlp_wire_bytes",
    "raw_bandwidth_gbps", "usable_bandwidth_gbps", "effective_bandwidth",
]

# --------------------------------------------------------------------------------------
# Constants of the spec and of the paper's model
# --------------------------------------------------------------------------------------

#: Transfer rate per lane in GT/s, by generation (PCIe Base Spec; the same table is in
#: pcie-bench model/pcie.py, the model released with Neugebauer et al.).
GT_PER_S = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0}
#: Line code: 8b/10b for Gen1/2, 128b/130b from Gen3 on (PCIe Base Spec r3.0 sec. 4.2.2).
ENCODING = {1: 8 / 10, 2: 8 / 10, 3: 128 / 130, 4: 128 / 130, 5: 128 / 130}

#: Legal Max_Payload_Size / Max_Read_Request_Size values (Device Control register
#: encodings, PCIe Base Spec r3.0 sec. 7.8.4) and Read Completion Boundaries (64 or 128 B
#: for a root complex, sec. 2.3.1.1; pcie-bench also allows 256/512).
SIZES_128_TO_4096 = (128, 256, 512, 1024, 2048, 4096)
RCB_SIZES = (64, 128, 256, 512)

#: No request may cross a 4 KB address boundary (PCIe Base Spec r3.0 sec. 2.2.7).
PAGE = 4096
#: Payloads travel in double words; byte enables mask the unused bytes (sec. 2.2.5).
DW = 4

#: The ACK and flow-control DLLP intervals the paper's model uses for Gen3, in bytes of
#: TLP traffic per DLLP, by lanes and MPS. They are the PCIe Base Spec's Ack
#: transmission latency limits and recommended UpdateFC intervals (rev 5.0 tables 3-7..3-9
#: and 2-46..2-48), as tabulated in pcie-bench model/pcie.py (Ack_Limits, FC_Guide),
#: where the two tables hold the same numbers for Gen3.
GEN3_DLLP_INTERVAL = {
    1: {128: 333, 256: 512, 512: 655, 1024: 1167, 2048: 2191, 4096: 4239},
    2: {128: 224, 256: 313, 512: 385, 1024: 641, 2048: 1153, 4096: 2177},
    4: {128: 169, 256: 214, 512: 250, 1024: 378, 2048: 634, 4096: 1146},
    8: {128: 163, 256: 203, 512: 182, 1024: 246, 2048: 374, 4096: 630},
    16: {128: 144, 256: 168, 512: 182, 1024: 246, 2048: 374, 4096: 630},
}


@dataclass(frozen=True)
class PcieConfig:
    """Link parameters. Defaults: PCIe Gen3 x8 as modelled by Neugebauer et al. 2018."""

    #: PCIe generation and lane count: Gen3 x8, the link the paper models and measures
    #: (NFP-6000 and NetFPGA-SUME are Gen3 x8 devices; pcie-bench pcie_bw.py defaults).
    generation: int = 3
    lanes: int = 8
    #: Max Payload Size 256 B and Max Read Request Size 512 B: the defaults of the paper's
    #: model (pcie-bench pcie_bw.py --mps 256 --mrrs 512).
    mps: int = 256
    mrrs: int = 512
    #: Read Completion Boundary of the root complex: 64 B (PCIe Base Spec r3.0 sec.
    #: 2.3.1.1 allows 64 or 128 for a root complex; pcie-bench pcie_bw.py --rcb 64).
    rcb: int = 64
    #: Completions cut at every RCB instead of at MPS: seen on older chipsets (pcie-bench
    #: model/mem_bw.py, read()); off by default as in the paper's model.
    rcb_chunks: bool = False
    #: Address width of DMA requests: 64 -> 4DW headers, as the paper's model assumes
    #: ("With 64bit addressing, MWr_Hdr is 24B"; pcie-bench --addr 64). Use 32 for
    #: host memory below 4 GB (3DW headers, PCIe Base Spec r3.0 sec. 2.2.4.1).
    dma_addr_bits: int = 64
    #: MMIO requests target BAR 0, a 32-bit BAR below 4 GB, so they use 3DW headers
    #: (sec. 2.2.4.1: addresses below 4 GB must use the 32-bit format).
    mmio_addr_bits: int = 32
    #: TLP header: 4 B common DW + 8 B (32-bit address) or 12 B (64-bit address) for
    #: MWr/MRd, + 8 B for a completion (PCIe Base Spec r3.0 sec. 2.2.1, 2.2.7, 2.2.9;
    #: pcie-bench model/pcie.py TLP_Hdr, TLP_MWr_64_Hdr, TLP_CplD_Hdr).
    hdr_3dw: int = 12
    hdr_4dw: int = 16
    cpl_hdr: int = 12
    #: Optional ECRC digest, 4 B (sec. 2.7.1); off as in the paper's model (--ecrc 0).
    ecrc: bool = False
    #: Framing + data link layer bytes per TLP: 2 B framing, 2 B sequence number, 4 B
    #: LCRC = 8 B (paper: "2B framing, 6B DLL header"; pcie-bench DLLP_Hdr = 8). For Gen3
    #: the same 8 B are the 4 B STP token (which carries the sequence number) + 4 B LCRC
    #: (PCIe Base Spec r3.0 sec. 4.2.2.3.1).
    tlp_framing: int = 8
    #: ACK and UpdateFC DLLPs: 8 B each on the wire (6 B DLLP + 2 B framing; PCIe Base
    #: Spec r3.0 sec. 3.4; pcie-bench Ack_Size/FC_Size), one of each per
    #: ``dllp_interval`` bytes (None: GEN3_DLLP_INTERVAL[lanes][mps]).
    dllp_bytes: int = 8
    dllp_interval: int | None = None
    #: SKP ordered sets, 4 B every 1538 B, as the paper's model deducts them for every
    #: generation (pcie-bench SKIP_Length / SKIP_Interval).
    skip_bytes: int = 4
    skip_interval: int = 1538
    #: Latency of a 64 B DMA read, request issued to data received: median 547 ns on the
    #: Xeon E5 host with the NFP-6000, Neugebauer et al. 2018, latency measurements (the
    #: Xeon E3 host: 1213 ns). Reads of other sizes add their serialization.
    dma_read_latency_ns: float = 547.0
    dma_read_latency_ref_bytes: int = 64
    #: Posted DMA write: visible in host memory this long after its last byte left the
    #: wire. DERIVED, not published: half the non-serialization part of the read round
    #: trip (one crossing of the link and root complex); see docs/pcie_model.md.
    dma_write_latency_ns: float | None = None
    #: MMIO read (host load from BAR 0, 4 B, device answering at once), issue to data.
    #: DERIVED, not published: the same round trip as the DMA read (the path crosses the
    #: same link and root complex); see docs/pcie_model.md.
    mmio_read_latency_ns: float | None = None
    #: MMIO write (posted), issue to arrival at the device. DERIVED: half the round trip.
    mmio_write_latency_ns: float | None = None
    #: Outstanding non-posted requests (tags) of the device: 32, the default 5-bit Tag
    #: field (PCIe Base Spec r3.0 sec. 2.2.6.2; 256 with Extended Tag Field Enable).
    max_tags: int = 32

    def __post_init__(self):
        if self.generation not in GT_PER_S:
            raise ValueError(f"unknown PCIe generation {self.generation}")
        if self.lanes not in (1, 2, 4, 8, 12, 16, 32):
            raise ValueError(f"illegal lane count x{self.lanes}")
        if self.mps not in SIZES_128_TO_4096:
            raise ValueError(f"MPS must be one of {SIZES_128_TO_4096}, not {self.mps}")
        if self.mrrs not in SIZES_128_TO_4096:
            raise ValueError(f"MRRS must be one of {SIZES_128_TO_4096}, not {self.mrrs}")
        if self.rcb not in RCB_SIZES:
            raise ValueError(f"RCB must be one of {RCB_SIZES}, not {self.rcb}")
        if self.dma_addr_bits not in (32, 64) or self.mmio_addr_bits not in (32, 64):
            raise ValueError("address widths are 32 or 64 bits")
        if not 1 <= self.max_tags <= 256:
            raise ValueError("max_tags must be 1..256 (8-bit Tag field)")
        if self.dllp_interval is None and (self.generation != 3
                                           or self.lanes not in GEN3_DLLP_INTERVAL):
            raise ValueError("no DLLP interval table for this link: pass dllp_interval")
        if self.dma_read_latency_ns <= 0:
            raise ValueError("dma_read_latency_ns must be positive")

    # Derived figures ------------------------------------------------------------------

    @property
    def dllp_every(self) -> int:
        if self.dllp_interval is not None:
            return self.dllp_interval
        return GEN3_DLLP_INTERVAL[self.lanes][self.mps]

    def dma_hdr(self) -> int:
        return self.hdr_4dw if self.dma_addr_bits == 64 else self.hdr_3dw

    def mmio_hdr(self) -> int:
        return self.hdr_4dw if self.mmio_addr_bits == 64 else self.hdr_3dw

    def overhead(self, kind: str, space: str = "dma") -> int:
        """Wire bytes of a TLP besides its payload: framing + DLL + header (+ ECRC)."""
        if kind in ("CplD", "Cpl"):
            hdr = self.cpl_hdr
        elif kind in ("MWr", "MRd"):
            hdr = self.dma_hdr() if space == "dma" else self.mmio_hdr()
        else:
            raise ValueError(f"unknown TLP kind {kind!r}")
        return self.tlp_framing + hdr + (4 if self.ecrc else 0)


def raw_bandwidth_gbps(cfg: PcieConfig) -> float:
    """Line rate after encoding: GT/s x encoding x lanes (Gen3 x8: 63.02 Gb/s)."""
    return GT_PER_S[cfg.generation] * ENCODING[cfg.generation] * cfg.lanes


def usable_bandwidth_gbps(cfg: PcieConfig) -> float:
    """Bandwidth left for TLPs after ACK, UpdateFC DLLPs and SKP ordered sets.

    The paper's model (pcie-bench model/pcie.py TLP_bw):
    raw x (1 - ack/interval - fc/interval - skip/skip_interval); Gen3 x8 MPS 256: 57.88 Gb/s.
    """
    dllp = 2 * cfg.dllp_bytes / cfg.dllp_every
    skip = cfg.skip_bytes / cfg.skip_interval
    return raw_bandwidth_gbps(cfg) * (1.0 - dllp - skip)


# --------------------------------------------------------------------------------------
# TLP splitting and accounting (pure functions)
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tlp:
    """One TLP: kind (MWr, MRd, CplD), target address, byte count (payload or requested)."""

    kind: str
    addr: int
    length: int
    space: str = "dma"          # "dma" (host memory) or "mmio" (BAR 0)

    def payload_bytes(self) -> int:
        """Bytes of data carried (0 for a read request or a completion without data)."""
        return 0 if self.kind in ("MRd", "Cpl") else self.length

    def payload_dw_bytes(self) -> int:
        """Data bytes on the wire: whole double words from the DW holding the first byte."""
        if self.kind in ("MRd", "Cpl"):
            return 0
        first = self.addr & ~(DW - 1)
        last = self.addr + self.length
        return (last - first + DW - 1) // DW * DW


def _check_transfer(addr: int, nbytes: int, cfg: PcieConfig, space: str = "dma"):
    if not isinstance(nbytes, int) or isinstance(nbytes, bool):
        raise TypeError(f"length must be an int, not {type(nbytes).__name__}")
    if nbytes <= 0:
        raise ValueError(f"length must be positive, not {nbytes}")
    if not isinstance(addr, int) or isinstance(addr, bool) or addr < 0:
        raise ValueError(f"address must be a non-negative int, not {addr!r}")
    bits = cfg.dma_addr_bits if space == "dma" else cfg.mmio_addr_bits
    if addr + nbytes > 1 << bits:
        raise ValueError(f"{addr:#x}+{nbytes} does not fit {bits}-bit addressing")


def _split(addr: int, nbytes: int, limit: int):
    """(addr, length) pieces of at most ``limit`` bytes that never cross a 4 KB boundary."""
    pieces = []
    end = addr + nbytes
    while addr < end:
        n = min(limit, end - addr, PAGE - addr % PAGE)
        pieces.append((addr, n))
        addr += n
    return pieces


def tlps_for_write(nbytes: int, addr: int, cfg: PcieConfig | None = None) -> list[Tlp]:
    """Memory write TLPs for a DMA write: at most MPS bytes each, none across 4 KB."""
    cfg = cfg or PcieConfig()
    _check_transfer(addr, nbytes, cfg)
    return [Tlp("MWr", a, n) for a, n in _split(addr, nbytes, cfg.mps)]


def tlps_for_read(nbytes: int, addr: int, cfg: PcieConfig | None = None) -> list[Tlp]:
    """Memory read requests for a DMA read: at most MRRS bytes each, none across 4 KB."""
    cfg = cfg or PcieConfig()
    _check_transfer(addr, nbytes, cfg)
    return [Tlp("MRd", a, n) for a, n in _split(addr, nbytes, cfg.mrrs)]


def completions_for_read(request: Tlp, cfg: PcieConfig | None = None) -> list[Tlp]:
    """The completions with data the host returns for one read request.

    PCIe Base Spec r3.0 sec. 2.3.1.1: a request may be answered by several completions;
    each but the last must end on a naturally aligned RCB boundary, and none may carry
    more than MPS. The model's completer sends the largest completion those rules allow
    (or exactly up to the next RCB boundary with ``rcb_chunks``), in address order.
    """
    cfg = cfg or PcieConfig()
    out = []
    addr, end = request.addr, request.addr + request.length
    while addr < end:
        if end - addr <= cfg.mps and not cfg.rcb_chunks:
            n = end - addr
        else:
            limit = cfg.rcb if cfg.rcb_chunks else cfg.mps
            stop = (addr + limit) // cfg.rcb * cfg.rcb      # last RCB boundary in reach
            n = min(stop - addr, end - addr)
        out.append(Tlp("CplD", addr, n, request.space))
        addr += n
    return out


def tlp_wire_bytes(tlp: Tlp, cfg: PcieConfig | None = None) -> int:
    """Bytes one TLP occupies on the link: framing + DLL + header (+ECRC) + DW payload."""
    cfg = cfg or PcieConfig()
    return cfg.overhead(tlp.kind, tlp.space) + tlp.payload_dw_bytes()


def wire_bytes(tlps, cfg: PcieConfig | None = None) -> int:
    """Total link bytes of a TLP or a list of TLPs."""
    if isinstance(tlps, Tlp):
        return tlp_wire_bytes(tlps, cfg)
    return sum(tlp_wire_bytes(t, cfg) for t in tlps)


def effective_bandwidth(transfer_size: int, direction: str,
                        cfg: PcieConfig | None = None) -> float:
    """Payload Gb/s of back-to-back transfers of ``transfer_size`` bytes (the paper's model).

    Neugebauer et al. 2018 sec. 3 (eq. 1-3), as implemented in pcie-bench model/mem_bw.py:

    * ``"write"`` (device writes host memory, e.g. NIC RX):
      B_up = ceil(sz / MPS) x MWr_Hdr + sz,  BW = usable x sz / B_up.
    * ``"read"`` (device reads host memory, e.g. NIC TX): requests load the up direction,
      completions the down direction; the busier one limits:
      B_up = ceil(sz / MRRS) x MRd_Hdr,  B_down = ceil(sz / MPS) x CplD_Hdr + sz,
      BW = usable x sz / max(B_up, B_down).

    Transfers are assumed aligned (no extra TLPs from 4 KB or RCB boundaries) and payloads
    are counted byte-exact, as in the paper.
    """
    cfg = cfg or PcieConfig()
    if not isinstance(transfer_size, int) or transfer_size <= 0:
        raise ValueError(f"transfer_size must be a positive int, not {transfer_size!r}")
    usable = usable_bandwidth_gbps(cfg)
    sz = transfer_size
    if direction == "write":
        return usable * sz / (math.ceil(sz / cfg.mps) * cfg.overhead("MWr") + sz)
    if direction == "read":
        per_cpl = cfg.rcb if cfg.rcb_chunks else cfg.mps
        up = math.ceil(sz / cfg.mrrs) * cfg.overhead("MRd")
        down = math.ceil(sz / per_cpl) * cfg.overhead("CplD") + sz
        return usable * sz / max(up, down)
    raise ValueError(f"direction must be 'write' or 'read', not {direction!r}")


# --------------------------------------------------------------------------------------
# Host memory
# --------------------------------------------------------------------------------------

class HostMemoryError(Exception):
    """An access outside every registered region (or across a region's end)."""

    def __init__(self, addr: int, nbytes: int, op: str):
        super().__init__(f"host memory {op} of {nbytes} B at {addr:#x} is outside "
                         f"every registered region")
        self.addr, self.nbytes, self.op = addr, nbytes, op


@dataclass
class Region:
    base: int
    size: int
    name: str = ""

    @property
    def end(self) -> int:
        return self.base + self.size


class HostMemory:
    """Sparse byte-addressable host memory; only registered regions may be accessed.

    Storage is allocated in 4 KB pages on first write; unwritten bytes read as zero.
    """

    _PAGE = 4096

    def __init__(self):
        self._regions: list[Region] = []
        self._pages: dict[int, bytearray] = {}

    def register(self, base: int, size: int, name: str = "") -> Region:
        """Register [base, base+size) (e.g. a ring or buffer the driver allocated)."""
        if base < 0 or size <= 0:
            raise ValueError(f"bad region {base:#x}+{size}")
        for r in self._regions:
            if base < r.end and r.base < base + size:
                raise ValueError(f"region {base:#x}+{size} overlaps {r.name or hex(r.base)}")
        region = Region(base, size, name)
        self._regions.append(region)
        return region

    def unregister(self, base: int) -> None:
        """Forget the region starting at ``base`` (its contents are dropped)."""
        for r in self._regions:
            if r.base == base:
                self._regions.remove(r)
                for page in range(r.base // self._PAGE, (r.end - 1) // self._PAGE + 1):
                    if not any(o.base // self._PAGE <= page <= (o.end - 1) // self._PAGE
                               for o in self._regions):
                        self._pages.pop(page, None)
                return
        raise ValueError(f"no region starts at {base:#x}")

    @property
    def regions(self) -> tuple[Region, ...]:
        return tuple(self._regions)

    def region_of(self, addr: int, nbytes: int = 1) -> Region | None:
        for r in self._regions:
            if r.base <= addr and addr + nbytes <= r.end:
                return r
        return None

    def _check(self, addr: int, nbytes: int, op: str) -> None:
        if nbytes <= 0:
            raise ValueError(f"length must be positive, not {nbytes}")
        if self.region_of(addr, nbytes) is None:
            raise HostMemoryError(addr, nbytes, op)

    def read(self, addr: int, nbytes: int) -> bytes:
        self._check(addr, nbytes, "read")
        out = bytearray()
        while nbytes:
            page, off = divmod(addr, self._PAGE)
            n = min(nbytes, self._PAGE - off)
            data = self._pages.get(page)
            out += data[off:off + n] if data is not None else bytes(n)
            addr, nbytes = addr + n, nbytes - n
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        data = bytes(data)
        self._check(addr, len(data), "write")
        pos = 0
        while pos < len(data):
            page, off = divmod(addr + pos, self._PAGE)
            n = min(len(data) - pos, self._PAGE - off)
            buf = self._pages.setdefault(page, bytearray(self._PAGE))
            buf[off:off + n] = data[pos:pos + n]
            pos += n


# --------------------------------------------------------------------------------------
# The timed link
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Completion:
    """Data returned to the device for a DMA read, one completion TLP's worth.

    ``offset`` is the position of ``data`` within the request; ``last`` marks the final
    completion of the whole request. ``status`` is "SC" (successful) or "UR" (unsupported
    request: the address was outside host memory's registered regions; no data).
    """

    tag: object
    addr: int
    offset: int
    data: bytes
    last: bool
    time_ns: float
    status: str = "SC"


@dataclass
class DirectionCounters:
    tlps: int = 0
    payload_bytes: int = 0
    wire_bytes: int = 0
    mwr: int = 0
    mrd: int = 0
    cpld: int = 0
    cpl: int = 0


class RegisterFile:
    """A stand-in MMIO target: 32/64-bit registers in a dict, reading 0 when unset."""

    def __init__(self):
        self.regs: dict[int, bytes] = {}

    def read(self, addr: int, size: int) -> bytes:
        return self.regs.get(addr, bytes(size))[:size].ljust(size, b"\0")

    def write(self, addr: int, data: bytes) -> None:
        self.regs[addr] = bytes(data)


@dataclass
class _Read:
    """One DMA read request of the device, as the caller tagged it."""

    tag: object
    addr: int
    nbytes: int
    pending_mrds: int
    last_ready: float = 0.0
    failed: bool = False


@dataclass
class _Wire:
    """One direction of the link: a FIFO of ready TLPs and one serializer."""

    name: str
    queue: deque = field(default_factory=deque)
    busy: bool = False
    last_sent_ns: float = 0.0           # when the wire last finished a TLP
    busy_ns: float = 0.0                # total serialization time so far
    counters: DirectionCounters = field(default_factory=DirectionCounters)


class PcieLink:
    """Event model of one PCIe link between the host and the device.

    Device side: ``post_write(addr, data)`` (posted DMA write into ``memory``),
    ``request_read(addr, nbytes, tag)`` (DMA read; completions come back from ``tick`` /
    ``advance`` / ``run_until``). Host side: ``mmio_write(addr, data)`` and
    ``mmio_read(addr, size)`` against ``mmio_target`` (an object with ``read(addr, size)``
    and ``write(addr, data)``; a RegisterFile by default).

    Timing: each direction sends its TLPs one at a time in the order they became ready,
    each taking ``wire bytes x 8 / usable Gb/s`` ns. A read request reaching the host is
    answered ``host_turnaround_ns`` after it left the device's wire (the rest of the
    measured read latency, plus ``host_latency(addr, nbytes)`` if given), and its
    completions are delivered to the device as soon as they have been serialized.
    """

    def __init__(self, config: PcieConfig | None = None, clock_mhz: float = 250.0,
                 memory: HostMemory | None = None, mmio_target=None, host_latency=None):
        if clock_mhz <= 0:
            raise ValueError("clock_mhz must be positive")
        self.cfg = cfg = config or PcieConfig()
        self.clock_mhz = clock_mhz
        self.period_ns = 1000.0 / clock_mhz
        self.memory = memory if memory is not None else HostMemory()
        self.mmio_target = mmio_target if mmio_target is not None else RegisterFile()
        self.host_latency = host_latency
        self.bytes_per_ns = usable_bandwidth_gbps(cfg) / 8.0

        # Latency split (docs/pcie_model.md, "Latency"): the measured read latency of a
        # dma_read_latency_ref_bytes read minus the serialization of its request and
        # completion is the time spent outside the wires (flight + root complex + memory).
        ref = Tlp("MRd", 0, cfg.dma_read_latency_ref_bytes)
        ref_wire = sum(self.serialization_ns(t) for t in [ref] + completions_for_read(ref, cfg))
        self.host_turnaround_ns = cfg.dma_read_latency_ns - ref_wire
        if self.host_turnaround_ns < 0:
            raise ValueError("dma_read_latency_ns is shorter than the serialization of "
                             "its reference read")
        self.dma_write_latency_ns = (cfg.dma_write_latency_ns
                                     if cfg.dma_write_latency_ns is not None
                                     else self.host_turnaround_ns / 2)
        mmio_rd = (cfg.mmio_read_latency_ns if cfg.mmio_read_latency_ns is not None
                   else cfg.dma_read_latency_ns)
        mrd = Tlp("MRd", 0, 4, "mmio")
        cpl = Tlp("CplD", 0, 4, "mmio")
        self._mmio_flight_ns = (mmio_rd - self.serialization_ns(mrd)
                                - self.serialization_ns(cpl)) / 2
        if self._mmio_flight_ns < 0:
            raise ValueError("mmio_read_latency_ns is shorter than its serialization")
        mmio_wr = (cfg.mmio_write_latency_ns if cfg.mmio_write_latency_ns is not None
                   else mmio_rd / 2)
        self._mmio_write_flight_ns = mmio_wr - self.serialization_ns(Tlp("MWr", 0, 4, "mmio"))
        if self._mmio_write_flight_ns < 0:
            raise ValueError("mmio_write_latency_ns is shorter than its serialization")

        self.now = 0.0
        self._events: list = []            # heap of (time, seq, action, args)
        self._seq = 0
        self.wires = {"up": _Wire("up"), "down": _Wire("down")}
        self._free_tags = deque(range(cfg.max_tags))
        self._waiting_mrds: deque = deque()  # (read, Tlp) waiting for a free tag
        self._reads: dict = {}             # caller tag -> _Read
        self._delivered: list[Completion] = []
        self._mmio_results: dict[int, bytes | None] = {}
        self._mmio_next = 0
        # Counters beyond the per-direction ones.
        self.dma_writes = 0
        self.dma_reads = 0
        self.mmio_writes = 0
        self.mmio_reads = 0
        self.write_errors = 0
        self.read_errors = 0
        self.errors: list[HostMemoryError] = []
        self.tag_stalls = 0                # read requests that had to wait for a tag

    # ---------------------------------------------------------------- timing helpers

    def serialization_ns(self, tlp: Tlp) -> float:
        """Time one TLP occupies its direction of the link."""
        return tlp_wire_bytes(tlp, self.cfg) / self.bytes_per_ns

    @property
    def counters(self) -> dict[str, DirectionCounters]:
        return {name: w.counters for name, w in self.wires.items()}

    @property
    def free_tags(self) -> int:
        return len(self._free_tags)

    @property
    def outstanding_reads(self) -> int:
        return len(self._reads)

    def idle(self) -> bool:
        """Nothing left in flight or queued."""
        return not self._events and not self._waiting_mrds

    # ---------------------------------------------------------------- event plumbing

    def _at(self, time: float, action, *args) -> None:
        heapq.heappush(self._events, (time, self._seq, action, args))
        self._seq += 1

    def _ready(self, direction: str, tlp: Tlp, on_done, time: float) -> None:
        """``tlp`` may start on ``direction`` from ``time``; ``on_done(t)`` when sent."""
        self._at(time, self._enqueue, direction, tlp, on_done)

    def _enqueue(self, t: float, direction: str, tlp: Tlp, on_done) -> None:
        wire = self.wires[direction]
        wire.queue.append((tlp, on_done))
        self._kick(t, wire)

    def _kick(self, t: float, wire: _Wire) -> None:
        if wire.busy or not wire.queue:
            return
        tlp, on_done = wire.queue.popleft()
        wire.busy = True
        c = wire.counters
        c.tlps += 1
        c.payload_bytes += tlp.payload_bytes()
        c.wire_bytes += tlp_wire_bytes(tlp, self.cfg)
        setattr(c, tlp.kind.lower(), getattr(c, tlp.kind.lower()) + 1)
        duration = self.serialization_ns(tlp)
        wire.busy_ns += duration
        self._at(t + duration, self._sent, wire, on_done)

    def _sent(self, t: float, wire: _Wire, on_done) -> None:
        wire.busy = False
        wire.last_sent_ns = t
        on_done(t)
        self._kick(t, wire)

    def run_until(self, t_ns: float) -> list[Completion]:
        """Process every event up to and including ``t_ns``; return the completions
        delivered to the device since the last call."""
        if t_ns < self.now:
            raise ValueError(f"time goes forward: {t_ns} < {self.now}")
        while self._events and self._events[0][0] <= t_ns:
            time, _, action, args = heapq.heappop(self._events)
            self.now = time
            action(time, *args)
        self.now = t_ns
        out, self._delivered = self._delivered, []
        return out

    def advance(self, ns: float) -> list[Completion]:
        if ns < 0:
            raise ValueError("advance() takes a non-negative duration")
        return self.run_until(self.now + ns)

    def tick(self) -> list[Completion]:
        """One device clock cycle (1000 / clock_mhz ns)."""
        return self.run_until(self.now + self.period_ns)

    def drain(self) -> list[Completion]:
        """Run until nothing is left in flight."""
        out = []
        while self._events:
            out += self.run_until(self._events[0][0])
        return out

    # ---------------------------------------------------------------- device: DMA

    def post_write(self, addr: int, data: bytes) -> None:
        """A posted DMA write into host memory, sent as MPS-sized MWr TLPs from now."""
        data = bytes(data)
        tlps = tlps_for_write(len(data), addr, self.cfg)
        self.dma_writes += 1
        for tlp in tlps:
            chunk = data[tlp.addr - addr:tlp.addr - addr + tlp.length]
            self._ready("up", tlp, lambda t, a=tlp.addr, d=chunk: self._at(
                t + self.dma_write_latency_ns, self._write_host, a, d), self.now)

    def _write_host(self, t: float, addr: int, data: bytes) -> None:
        try:
            self.memory.write(addr, data)
        except HostMemoryError as err:
            self.write_errors += 1
            self.errors.append(err)

    def request_read(self, addr: int, nbytes: int, tag) -> None:
        """A DMA read of ``nbytes`` from ``addr``; completions carry ``tag``.

        The request is cut into MRRS-sized read requests, each of which needs one of the
        link's ``max_tags`` PCIe tags; requests wait (in order) while none is free.
        ``tag`` is the caller's name for the whole read and must not be outstanding.
        """
        if tag in self._reads:
            raise ValueError(f"tag {tag!r} is still outstanding")
        mrds = tlps_for_read(nbytes, addr, self.cfg)
        read = _Read(tag, addr, nbytes, len(mrds), self.now)
        self._reads[tag] = read
        self.dma_reads += 1
        stalled = False
        for mrd in mrds:
            if self._free_tags and not self._waiting_mrds:
                self._issue(read, mrd, self._free_tags.popleft(), self.now)
            else:
                self._waiting_mrds.append((read, mrd))
                stalled = True
        self.tag_stalls += stalled

    def _issue(self, read: _Read, mrd: Tlp, pcie_tag: int, t: float) -> None:
        self._ready("up", mrd, lambda t_sent: self._mrd_sent(t_sent, read, mrd, pcie_tag), t)

    def _mrd_sent(self, t: float, read: _Read, mrd: Tlp, pcie_tag: int) -> None:
        extra = self.host_latency(mrd.addr, mrd.length) if self.host_latency else 0.0
        # Completions of one request come back in address order: a later part never
        # overtakes an earlier one (simplification, see docs/pcie_model.md).
        ready = max(t + self.host_turnaround_ns + extra, read.last_ready)
        read.last_ready = ready
        self._at(ready, self._host_answers, read, mrd, pcie_tag)

    def _host_answers(self, t: float, read: _Read, mrd: Tlp, pcie_tag: int) -> None:
        try:
            data = self.memory.read(mrd.addr, mrd.length)
        except HostMemoryError as err:
            # Unsupported Request: one completion without data (PCIe Base Spec r3.0
            # sec. 2.2.9, 2.3.2); the request ends there.
            self.read_errors += 1
            self.errors.append(err)
            cpl = Tlp("Cpl", mrd.addr, 0)
            self._ready("down", cpl, lambda t_sent: self._deliver(
                t_sent, read, mrd, cpl, b"", pcie_tag, "UR"), t)
            return
        cpls = completions_for_read(mrd, self.cfg)
        for cpl in cpls:
            chunk = data[cpl.addr - mrd.addr:cpl.addr - mrd.addr + cpl.length]
            final = cpl is cpls[-1]
            self._ready("down", cpl, lambda t_sent, c=cpl, d=chunk, f=final: self._deliver(
                t_sent, read, mrd, c, d, pcie_tag if f else None, "SC"), t)

    def _deliver(self, t: float, read: _Read, mrd: Tlp, cpl: Tlp, data: bytes,
                 pcie_tag, status: str) -> None:
        """A completion has reached the device. ``pcie_tag`` is set on the final
        completion of one read request, whose tag is then free again."""
        done = pcie_tag is not None
        if not read.failed:
            if status == "UR":
                read.failed = True            # an errored read ends with its UR
                last = True
            else:
                last = done and read.pending_mrds == 1
            self._delivered.append(Completion(read.tag, cpl.addr, cpl.addr - read.addr,
                                              data, last, t, status))
            if last:
                del self._reads[read.tag]
                # Parts of an errored read still waiting for a tag are dropped.
                self._waiting_mrds = deque(w for w in self._waiting_mrds if w[0] is not read)
        if done:
            read.pending_mrds -= 1
            self._free_tags.append(pcie_tag)
            while self._free_tags and self._waiting_mrds:
                r, m = self._waiting_mrds.popleft()
                self._issue(r, m, self._free_tags.popleft(), t)

    # ---------------------------------------------------------------- host: MMIO

    @staticmethod
    def _check_mmio(addr: int, size: int) -> None:
        if size not in (4, 8):
            raise ValueError(f"MMIO accesses are 4 or 8 bytes, not {size}")
        if addr < 0 or addr % size:
            raise ValueError(f"MMIO address {addr:#x} is not {size}-byte aligned")

    def mmio_write(self, addr: int, data: bytes) -> None:
        """A posted host store to BAR 0; reaches ``mmio_target.write`` after the latency."""
        data = bytes(data)
        self._check_mmio(addr, len(data))
        self.mmio_writes += 1
        tlp = Tlp("MWr", addr, len(data), "mmio")
        self._ready("down", tlp, lambda t: self._at(
            t + self._mmio_write_flight_ns, lambda t2: self.mmio_target.write(addr, data)),
            self.now)

    def mmio_read(self, addr: int, size: int = 4) -> int:
        """A host load from BAR 0; returns a token for ``mmio_result``."""
        self._check_mmio(addr, size)
        self.mmio_reads += 1
        token = self._mmio_next
        self._mmio_next += 1
        self._mmio_results[token] = None
        mrd = Tlp("MRd", addr, size, "mmio")

        def at_device(t):
            data = bytes(self.mmio_target.read(addr, size))
            cpl = Tlp("CplD", addr, size, "mmio")
            self._ready("up", cpl, lambda t2: self._at(
                t2 + self._mmio_flight_ns, self._mmio_done, token, data), t)

        self._ready("down", mrd, lambda t: self._at(t + self._mmio_flight_ns,
                                                     lambda t2: at_device(t2)), self.now)
        return token

    def _mmio_done(self, t: float, token: int, data: bytes) -> None:
        self._mmio_results[token] = (t, data)

    def mmio_result(self, token: int):
        """``(time_ns, data)`` once the MMIO read has returned, else None."""
        return self._mmio_results[token]
