"""The NIC's register map (BAR 0), declared once for the RTL, the host driver and the docs.

Every register is 32 bits wide at a byte offset that is a multiple of 4. A register is

* ``CONST``: read-only, its value fixed when the NIC is built (identification, version,
  capabilities: ``value(params)`` of the NIC's parameters);
* ``RW``: written and read back by the host; the NIC uses its value (configuration);
* ``RO``: read-only, driven by the NIC (status, statistics counters).

An entry with ``count`` > 1 is an array: ``count`` registers at ``offset + 4 * k``
(for example the per-reason counters of an engine, which the RTL has as one flat vector).

Reads of an offset that holds no register return ``UNMAPPED`` (all ones, as a PCIe read
of an unsupported address does); writes to it or to a read-only register change
nothing; both count in ``BAD_ACCESSES``. ``hw.mmio_regs.MmioRegisters`` implements this
map; ``python -m sim.docs`` renders it into docs/host_interface.md.
"""

import enum
from dataclasses import dataclass

from hw.dma import DmaCounter
from hw.handshake import Reason
from hw.host_formats import HostCounter, Ring
from hw.splice import SpCounter
from hw.teardown import TdCounter

__all__ = ["Access", "Register", "REGISTERS", "UNMAPPED", "NIC_ID", "NIC_VERSION",
           "RING_REGISTERS", "RingStatus", "register", "register_offset", "ring_register"]

#: "ATCP" in ASCII: the value of the ID register.
NIC_ID = 0x41544350
#: Register map version: major in bits 16..31, minor in bits 0..15.
NIC_VERSION = 0x00010000
#: What a read of an offset with no register returns.
UNMAPPED = 0xFFFFFFFF


class Access(enum.Enum):
    CONST = "const"     # read-only, fixed at build time
    RW = "rw"           # host-written configuration
    RO = "ro"           # read-only, driven by the NIC


@dataclass(frozen=True)
class Register:
    name: str
    offset: int
    access: Access
    doc: str
    count: int = 1                  # registers in the array
    init: int = 0                   # RW: value after reset
    value: object = None            # CONST: function of the NIC parameters (a dict)

    @property
    def end(self):
        return self.offset + 4 * self.count


def _regs(*entries):
    seen = {}
    for reg in entries:
        assert reg.offset % 4 == 0, reg
        for other in seen.values():
            assert reg.end <= other.offset or other.end <= reg.offset, (reg.name, other.name)
        assert reg.name not in seen, reg.name
        seen[reg.name] = reg
    return tuple(entries)


class RingStatus(enum.IntFlag):
    """Bits of a ring's ``<RING>_STATUS`` register. A ring with either bit set is stopped:
    the NIC neither fetches nor writes its entries until the host fixes what is wrong."""
    BAD_CONFIG = 1      # SIZE_LOG2 above MAX_RING_LOG2, or BASE not 4 KB-aligned
    OVERFLOW = 2        # the host's index is more than the ring's size ahead of the NIC's


#: Per ring, at ``0x400 + 0x20 * ring``: what each register does. The host writes the
#: producer index of a host -> NIC ring (a doorbell) and the consumer index of the event
#: ring; the NIC shows the other one.
RING_REGISTERS = (
    ("BASE_LO", 0x00, Access.RW, "ring base address, bits 0..31 (4 KB-aligned)"),
    ("BASE_HI", 0x04, Access.RW, "ring base address, bits 32..63"),
    ("SIZE_LOG2", 0x08, Access.RW, "log2 of the ring's entries, 1..15; 0 turns the ring off "
                                   "(the NIC's index returns to 0 once idle)"),
    ("HOST_INDEX", 0x0C, Access.RW, "the host's index (free-running, 16 bits): producer of "
                                    "TX/RX/COMMAND (doorbell), consumer of EVENT"),
    ("NIC_INDEX", 0x10, Access.RO, "the NIC's index: consumer of TX/RX/COMMAND, producer of EVENT"),
    ("STATUS", 0x14, Access.RO, "hw.registers.RingStatus bits"),
)


def _ring_registers():
    regs = []
    for ring in Ring:
        for name, offset, access, doc in RING_REGISTERS:
            regs.append(Register(f"{ring.name}_{name}", 0x400 + 0x20 * ring + offset, access,
                                 f"{ring.name} ring: {doc}"))
    return regs


def ring_register(ring, name):
    """The declaration of register ``name`` (``"BASE_LO"``...) of ``ring`` (a Ring)."""
    return register(f"{Ring(ring).name}_{name}")


REGISTERS = _regs(
    # ---- identification and capabilities
    Register("ID", 0x000, Access.CONST, "0x41544350 (\"ATCP\")", value=lambda p: NIC_ID),
    Register("VERSION", 0x004, Access.CONST, "register map version: major in bits 16..31, minor in bits 0..15",
             value=lambda p: NIC_VERSION),
    Register("CAP_WIDTH", 0x008, Access.CONST, "datapath width in bits (64 .. 512)",
             value=lambda p: p["width"]),
    Register("CAP_TABLE_ENTRIES", 0x00C, Access.CONST, "connection table entries (stash excluded)",
             value=lambda p: p["entries"]),
    Register("CAP_LISTENERS", 0x010, Access.CONST, "listen-table entries",
             value=lambda p: p["listeners"]),
    Register("CAP_TEARDOWN_SLOTS", 0x014, Access.CONST, "closing flows the NIC can hold",
             value=lambda p: p["teardown_slots"]),
    Register("CAP_TEARDOWN_BUFFERS", 0x018, Access.CONST,
             "held-data buffers (CLOSEs with data in flight)",
             value=lambda p: p["teardown_buffers"]),
    Register("SCRATCH", 0x01C, Access.RW, "free for the driver (bring-up checks)"),
    Register("BAD_ACCESSES", 0x020, Access.RO,
             "reads of unmapped offsets and writes to unmapped or read-only ones"),
    # ---- configuration of the engines (the NIC's inputs of the same names)
    Register("COOKIE_PERIOD", 0x040, Access.RW, "cycles per tick of the SYN-cookie counter (0 stops it)"),
    Register("TS_PERIOD", 0x044, Access.RW, "cycles per tick of the timestamp clock (0 stops it)"),
    Register("RST_BAD_COOKIE", 0x048, Access.RW, "bit 0: answer a bad cookie ACK with RST"),
    Register("SYN_RTO", 0x04C, Access.RW, "active open: first SYN retransmission timeout (cycles)"),
    Register("SYN_RETRIES", 0x050, Access.RW, "active open: SYN retransmissions (bits 0..3)"),
    Register("TICK_PERIOD", 0x054, Access.RW, "cycles per tick of the teardown timer clock (0 stops it)"),
    Register("FIN_RTO", 0x058, Access.RW, "teardown: first FIN retransmission timeout (ticks)"),
    Register("FIN2_TIMEOUT", 0x05C, Access.RW, "teardown: FIN_WAIT_2 limit (ticks)"),
    Register("TIME_WAIT", 0x060, Access.RW, "teardown: TIME_WAIT, 2*MSL (ticks)"),
    Register("FIN_RETRIES", 0x064, Access.RW, "teardown: FIN retransmissions (bits 0..3)"),
    # ---- status and statistics
    Register("FLOWS", 0x080, Access.RO, "entries in the connection table"),
    Register("CLOSING", 0x084, Access.RO, "teardown slots in use"),
    Register("INSERT_FAILURES", 0x088, Access.RO, "NIC inserts of established flows the table refused"),
    Register("CUT_FRAMES", 0x08C, Access.RO, "received frames cut at the maximum frame size"),
    Register("TS_CLOCK", 0x090, Access.RO, "the timestamp clock"),
    Register("TIMER_NOW", 0x094, Access.RO, "the teardown timer clock (ticks)"),
    Register("HANDSHAKE_COUNTERS", 0x100, Access.RO,
             "frames per handshake-engine decision, one register per hw.handshake.Reason",
             count=len(Reason)),
    Register("TEARDOWN_COUNTERS", 0x200, Access.RO,
             "one register per hw.teardown.TdCounter", count=len(TdCounter)),
    # ---- splicing
    Register("CAP_SPLICE_SLOTS", 0x028, Access.CONST, "splices the NIC can hold",
             value=lambda p: p["splice_slots"]),
    Register("IDLE_TIMEOUT", 0x068, Access.RW, "splice: ticks without a relayed segment before it ends"),
    Register("LINGER", 0x06C, Access.RW, "splice: ticks after both FINs are acknowledged"),
    Register("SPLICED", 0x098, Access.RO, "splice slots in use"),
    Register("SPLICE_COUNTERS", 0x300, Access.RO,
             "one register per hw.splice.SpCounter", count=len(SpCounter)),
    *_ring_registers(),
    # ---- the event ring's interrupt (one vector) and its moderation
    Register("IRQ_ENABLE", 0x480, Access.RW, "bit 0: raise the event ring's interrupt"),
    Register("IRQ_COUNT", 0x484, Access.RW,
             "interrupt once this many events are unannounced (0 or 1: every event)"),
    Register("IRQ_TIME", 0x488, Access.RW,
             "... or once the oldest unannounced event is this many cycles old (0: at once)"),
    # ---- DMA and the host interface's statistics
    Register("DMA_TIMEOUT", 0x48C, Access.RW,
             "DMA read completion timeout (cycles; 0: never)", init=1 << 20),
    Register("HOST_COUNTERS", 0x4C0, Access.RO,
             "one register per hw.host_formats.HostCounter", count=len(HostCounter)),
    Register("DMA_COUNTERS", 0x4E0, Access.RO,
             "one register per hw.dma.DmaCounter", count=len(DmaCounter)),
)


def register(name):
    """The declaration of register ``name``."""
    for reg in REGISTERS:
        if reg.name == name:
            return reg
    raise KeyError(f"no register {name!r}")


def register_offset(name, index=0):
    """Byte offset of register ``name`` (element ``index`` of an array)."""
    reg = register(name)
    if not 0 <= index < reg.count:
        raise IndexError(f"{name} has {reg.count} elements, not {index + 1}")
    return reg.offset + 4 * index
