"""The driver's lowest layer: the NIC's registers and rings, as the host sees them.

``NicDevice(bus, agents, width)`` owns a ``sim.pcie_host.PcieHost`` (the host side of
the simulated PCIe link, with its ``sim.pcie.PcieLink`` timing) and the host memory it
serves; it

* reads and writes BAR 0 registers by name (``hw.registers``): ``await read(name)``,
  ``write(name, value)`` (posted, as a CPU store to a device is);
* brings the NIC up (``await bring_up()``): checks ID and version, reads the
  capabilities, allocates the four rings and the TX/RX buffers in host memory (each a
  registered region: the NIC cannot touch anything else), programs the ring registers,
  and posts every RX buffer;
* posts entries: ``post_tx(frame)``, ``post_command(op, tag, body, addr)``; reposts RX
  buffers (``repost_rx(index)``); each ends with one doorbell write;
* finds new events by polling host memory (``poll_events()``: the entries whose phase
  bit is the current pass's, written back to the NIC as the consumer index);
* runs the simulation: ``await run(cycles)``, ``await run_until(predicate)`` clock the
  PCIe host and the caller's agents (the wire's sources and sinks) together.

Everything above it (the socket API, the TCP stack) is in ``host_driver.driver``. The
same code runs on the Amaranth simulator and under cocotb (``sim.bus`` adapters).
"""

from dataclasses import dataclass

from hw.host_formats import (COMMAND_ENTRY, INDEX_BITS, RING_BASE_ALIGN,
                             RING_ENTRY_BYTES, RX_DESCRIPTOR, TX_DESCRIPTOR, Ring, TxFlag,
                             entry_bytes, event_from_bytes, phase_of_pass)
from hw.registers import NIC_ID, NIC_VERSION, register, ring_register
from sim.bus import run_cycles
from sim.bus import run_until as _run_until
from sim.pcie import HostMemory, PcieLink
from sim.pcie_host import PcieHost

__all__ = ["NicDevice", "DeviceError", "BUFFER_BYTES"]

#: Bytes per TX/RX buffer: a maximum-size frame, rounded up to a 64-byte multiple.
BUFFER_BYTES = 2048
_INDEX_MASK = (1 << INDEX_BITS) - 1


class DeviceError(RuntimeError):
    """The NIC is not what the driver expects (wrong ID, version), or a ring stopped."""


@dataclass
class _Ring:
    ring: Ring
    log2: int
    base: int
    host_index: int = 0            # producer (TX/RX/COMMAND) or consumer (EVENT)

    @property
    def size(self):
        return 1 << self.log2

    def slot_addr(self, index):
        return self.base + (index % self.size) * RING_ENTRY_BYTES[self.ring]


class NicDevice:
    def __init__(self, bus, agents=(), width=64, clock_mhz=156.25, link=True, memory_base=1 << 32,
                 ring_log2=None):
        self.bus = bus
        self.width = width
        self.memory = HostMemory()
        self.link = PcieLink(clock_mhz=clock_mhz) if link else None
        self.host = PcieHost(bus, self.memory, self.link, width=width, mmio="mmio",
                             mmio_rdata="mmio_rdata", irq="irq")
        self.agents = [self.host, *agents]
        self.ring_log2 = dict(ring_log2 or {Ring.TX: 6, Ring.RX: 6, Ring.COMMAND: 5,
                                            Ring.EVENT: 8})
        self._next_addr = memory_base
        self.rings = {}
        self.capabilities = {}
        self.tx_free = []              # TX indices whose buffers may be reused
        self.counts = {"mmio_reads": 0, "mmio_writes": 0, "tx_posted": 0, "rx_posted": 0,
                       "commands": 0, "events": 0}

    # ------------------------------------------------------------------ simulation

    async def run(self, cycles):
        await run_cycles(self.bus, self.agents, cycles)

    async def run_until(self, predicate, max_cycles=1_000_000):
        return await _run_until(self.bus, self.agents, predicate, max_cycles)

    # ------------------------------------------------------------------ registers

    async def read(self, name, k=0):
        self.counts["mmio_reads"] += 1
        return await self.host.mmio_read(register(name).offset + 4 * k, agents=self.agents[1:])

    def write(self, name, value, k=0):
        self.counts["mmio_writes"] += 1
        self.host.mmio_write(register(name).offset + 4 * k, value & 0xFFFFFFFF)

    def _write_ring(self, ring, name, value):
        self.counts["mmio_writes"] += 1
        self.host.mmio_write(ring_register(ring, name).offset, value & 0xFFFFFFFF)

    async def diagnostics(self):
        """What the NIC says of its host side: ring indices and status, host and DMA
        counters (for error messages and debugging)."""
        from hw.dma import DmaCounter
        from hw.host_formats import HostCounter
        out = {}
        for ring in Ring:
            out[ring.name] = {"host": self.rings[ring].host_index if ring in self.rings else None,
                              "nic": await self.read(f"{ring.name}_NIC_INDEX"),
                              "status": await self.read(f"{ring.name}_STATUS")}
        for counter in HostCounter:
            out[counter.name] = await self.read("HOST_COUNTERS", counter)
        for counter in DmaCounter:
            out[f"DMA_{counter.name}"] = await self.read("DMA_COUNTERS", counter)
        for name in ("FLOWS", "CUT_FRAMES", "BAD_ACCESSES"):
            out[name] = await self.read(name)
        from hw.handshake import Reason
        out["decisions"] = {reason.name: value for reason in Reason
                            if (value := await self.read("HANDSHAKE_COUNTERS", reason))}
        out["faults"] = list(self.host.faults)
        return out

    # ------------------------------------------------------------------ memory

    def allocate(self, size, name, align=RING_BASE_ALIGN):
        """A new region of host memory the NIC may use (aligned, registered)."""
        addr = -(-self._next_addr // align) * align
        self.memory.register(addr, size, name)
        self._next_addr = addr + size
        return addr

    # ------------------------------------------------------------------ bring-up

    async def bring_up(self):
        """Check the NIC, set up the rings and buffers; returns the capabilities."""
        nic_id, version = await self.read("ID"), await self.read("VERSION")
        if nic_id != NIC_ID:
            raise DeviceError(f"BAR 0 ID reads {nic_id:#010x}, not {NIC_ID:#010x}: not an "
                              f"AccelTCP NIC")
        if version >> 16 != NIC_VERSION >> 16:
            raise DeviceError(f"register map version {version >> 16}.{version & 0xFFFF}; this "
                              f"driver speaks {NIC_VERSION >> 16}.x")
        for name in ("CAP_WIDTH", "CAP_TABLE_ENTRIES", "CAP_LISTENERS", "CAP_TEARDOWN_SLOTS",
                     "CAP_TEARDOWN_BUFFERS", "CAP_SPLICE_SLOTS"):
            self.capabilities[name[4:].lower()] = await self.read(name)
        if self.capabilities["width"] != self.width:
            raise DeviceError(f"the NIC's datapath is {self.capabilities['width']} bits, "
                              f"the driver was told {self.width}")
        for ring, log2 in self.ring_log2.items():
            size = (1 << log2) * RING_ENTRY_BYTES[ring]
            base = self.allocate(size, f"{ring.name} ring")
            self.rings[ring] = _Ring(ring, log2, base)
            self._write_ring(ring, "SIZE_LOG2", 0)          # off: its index back to 0
            self._write_ring(ring, "BASE_LO", base)
            self._write_ring(ring, "BASE_HI", base >> 32)
            self._write_ring(ring, "HOST_INDEX", 0)
            self._write_ring(ring, "SIZE_LOG2", log2)
        self.tx_buffers = self.allocate(self.rings[Ring.TX].size * BUFFER_BYTES, "TX buffers")
        self.rx_buffers = self.allocate(self.rings[Ring.RX].size * BUFFER_BYTES, "RX buffers")
        self.command_data = self.allocate(self.rings[Ring.COMMAND].size * BUFFER_BYTES,
                                          "command data")
        self.tx_free = list(range(self.rings[Ring.TX].size))
        for _ in range(self.rings[Ring.RX].size):
            self._post_rx(self.rings[Ring.RX].host_index)
        self._doorbell(Ring.RX)
        # The registers are in place once a read comes back (reads follow writes).
        for ring in Ring:
            status = await self.read(f"{ring.name}_STATUS")
            if status:
                raise DeviceError(f"{ring.name} ring status {status:#x} after set-up")
        return dict(self.capabilities)

    # ------------------------------------------------------------------ rings

    def _doorbell(self, ring):
        self._write_ring(ring, "HOST_INDEX", self.rings[ring].host_index)

    def _put(self, ring, raw):
        r = self.rings[ring]
        index = r.host_index
        self.memory.write(r.slot_addr(index), raw)
        r.host_index = (index + 1) & _INDEX_MASK
        return index

    def tx_room(self):
        return len(self.tx_free)

    def post_tx(self, frame, completion=True, doorbell=True):
        """Copy ``frame`` into a free TX buffer and post it; returns its TX index, or None
        when every TX buffer is in use (wait for TX_DONE events)."""
        if not self.tx_free:
            return None
        if not 14 <= len(frame) <= BUFFER_BYTES:
            raise ValueError(f"a frame of {len(frame)} bytes cannot be sent")
        index = self.rings[Ring.TX].host_index
        slot = index % self.rings[Ring.TX].size
        self.tx_free.remove(slot)
        addr = self.tx_buffers + slot * BUFFER_BYTES
        self.memory.write(addr, frame)
        self._put(Ring.TX, entry_bytes(TX_DESCRIPTOR, addr=addr, length=len(frame),
                                       flags=TxFlag.COMPLETION if completion else 0))
        self.counts["tx_posted"] += 1
        if doorbell:
            self._doorbell(Ring.TX)
        return index

    def tx_done(self, index):
        """A TX_DONE event gave back TX index ``index``'s buffer."""
        self.tx_free.append(index % self.rings[Ring.TX].size)

    def _post_rx(self, index):
        slot = index % self.rings[Ring.RX].size
        self._put(Ring.RX, entry_bytes(RX_DESCRIPTOR, addr=self.rx_buffers + slot * BUFFER_BYTES,
                                       length=BUFFER_BYTES))
        self.counts["rx_posted"] += 1

    def rx_frame(self, index, length):
        """The frame an RX event announced (RX index ``index``, ``length`` bytes)."""
        slot = index % self.rings[Ring.RX].size
        return self.memory.read(self.rx_buffers + slot * BUFFER_BYTES, length) if length else b""

    def doorbell(self, ring):
        """Tell the NIC of the entries posted with ``doorbell=False`` (one MMIO write)."""
        self._doorbell(ring)

    def repost_rx(self, index, doorbell=True):
        """Give RX index ``index``'s buffer back to the NIC (as the next RX entry)."""
        self._post_rx(self.rings[Ring.RX].host_index)
        if doorbell:
            self._doorbell(Ring.RX)

    def post_command(self, op, tag=0, body=None, data=b""):
        """Post one command (``hw.host_formats.CommandOp``); ``data``: a CLOSE's held data.
        Returns the command's ring index."""
        r = self.rings[Ring.COMMAND]
        addr = 0
        if data:
            addr = self.command_data + (r.host_index % r.size) * BUFFER_BYTES
            self.memory.write(addr, data)
        index = self._put(Ring.COMMAND, entry_bytes(COMMAND_ENTRY, op=op, tag=tag, addr=addr,
                                                    body=body or {}))
        self.counts["commands"] += 1
        self._doorbell(Ring.COMMAND)
        return index

    def poll_events(self):
        """The new events (dicts of ``EVENT_ENTRY``), oldest first; tells the NIC."""
        r = self.rings[Ring.EVENT]
        found = []
        while True:
            raw = self.memory.read(r.slot_addr(r.host_index), RING_ENTRY_BYTES[Ring.EVENT])
            entry = event_from_bytes(raw)
            if entry["phase"] != phase_of_pass(r.host_index, r.log2):
                break
            found.append(entry)
            r.host_index = (r.host_index + 1) & _INDEX_MASK
        if found:
            self.counts["events"] += len(found)
            self._doorbell(Ring.EVENT)
        return found
