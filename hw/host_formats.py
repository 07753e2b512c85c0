"""What the NIC and the host driver exchange through host memory, declared once.

Four rings live in host memory, each a power-of-two number of fixed-size entries at a
4 KB-aligned base (Corundum style):

=========  ==============  =====  =========================================================
ring       direction       entry  what an entry is
=========  ==============  =====  =========================================================
TX         host -> NIC      16 B  ``TX_DESCRIPTOR``: a frame in host memory to send
RX         host -> NIC      16 B  ``RX_DESCRIPTOR``: an empty buffer for a received frame
COMMAND    host -> NIC     128 B  ``COMMAND_ENTRY``: LISTEN, SET_KEY, CONNECT, CLOSE, SPLICE...
EVENT      NIC -> host     128 B  ``EVENT_ENTRY``: what the engines report, RX and TX
                                  completions, command completions
=========  ==============  =====  =========================================================

For a host -> NIC ring the host writes entries, then the ring's producer index (a
doorbell register); the NIC fetches entries by DMA and advances its consumer index. For
the event ring the NIC writes entries by DMA and the host polls memory: an entry is new
when its ``phase`` bit equals the pass's phase (1 on the first pass over the ring, 0 on
the second, and so on), so the driver never reads a NIC register to find events; it
writes its consumer index back so that the NIC knows which entries it may reuse.

Indices are 16-bit and free-running (``index mod entries`` is the slot); a ring holds
at most 2^15 entries. Entries are little-endian bit fields: bit ``k`` of a layout is bit
``k % 8`` of byte ``k // 8`` of the entry (``entry_bytes``/``entry_from_bytes`` convert).
``hw.registers`` has the ring registers; docs/host_interface.md is generated from here.
"""

import enum

from amaranth.lib import data

from hw.conn_table import FLOW_KEY
from hw.handshake import CONNECT_REQUEST
from hw.listen_table import LISTEN_ENTRY
from hw.metadata import EVENT
from hw.splice import SPLICE_COMMAND
from hw.stream import pack_struct, unpack_struct
from hw.teardown import CLOSE_COMMAND

__all__ = ["Ring", "RING_ENTRY_BYTES", "RING_BASE_ALIGN", "INDEX_BITS", "MAX_RING_LOG2",
           "TxFlag", "TX_DESCRIPTOR", "RX_DESCRIPTOR",
           "CommandOp", "CommandStatus", "COMMAND_BODY", "COMMAND_ENTRY",
           "HostEventKind", "TxStatus", "RxStatus", "EVENT_ENTRY", "EVENT_HEAD_BYTES",
           "HostCounter", "entry_bytes", "entry_from_bytes", "event_from_bytes",
           "phase_of_pass"]


class Ring(enum.IntEnum):
    """The rings, in the order of their registers (``hw.registers``)."""
    TX = 0
    RX = 1
    COMMAND = 2
    EVENT = 3


#: Bytes per entry of each ring.
RING_ENTRY_BYTES = {Ring.TX: 16, Ring.RX: 16, Ring.COMMAND: 128, Ring.EVENT: 128}
#: A ring's base address must be a multiple of this (a page: no entry crosses 4 KB).
RING_BASE_ALIGN = 4096
#: Ring indices (producer, consumer) are this wide and free-running.
INDEX_BITS = 16
#: The largest ring: 2 ** MAX_RING_LOG2 entries (a ring's size register holds log2).
MAX_RING_LOG2 = 15


# --------------------------------------------------------------------------- TX and RX


class TxFlag(enum.IntFlag):
    """``flags`` of a TX descriptor."""
    COMPLETION = 1      # write a TX_DONE event when the frame has been read


#: A frame to send: ``length`` bytes at ``addr`` (a multiple of the datapath width in
#: bytes: 8 at W=64, 64 at W=512), 14 .. the NIC's maximum frame size. The NIC completes
#: its IPv4 and TCP checksums (``hw.checksum_insert``).
TX_DESCRIPTOR = data.StructLayout({
    "addr": 64,
    "length": 16,
    "flags": 16,                      # TxFlag
    "reserved": 32,
})

#: An empty buffer of ``length`` bytes at ``addr`` (aligned as a TX frame) for one
#: received frame. A frame longer than its buffer is dropped (counted; the buffer is
#: used for the next frame), so buffers of the NIC's maximum frame size never drop.
RX_DESCRIPTOR = data.StructLayout({
    "addr": 64,
    "length": 16,
    "reserved": 48,
})


# --------------------------------------------------------------------------- commands


class CommandOp(enum.IntEnum):
    """``op`` of a command entry; every command completes with an event (see each)."""
    NOP = 0             # COMMAND_DONE (OK): a ring check
    LISTEN = 1          # listen-table entry ``listen.index`` := ``listen.entry``; COMMAND_DONE
    SET_KEY = 2         # the cookie key becomes ``key`` (the previous one is still accepted); COMMAND_DONE
    CONNECT = 3         # active open of ``connect``; ESTABLISHED or FAILED
    CLOSE = 4           # teardown offload of ``close``, its held data at ``addr``; CLOSE_STATUS
    SPLICE = 5          # splice ``splice``; SPLICE_STATUS
    TABLE = 6           # connection-table command ``table``; COMMAND_DONE with the response


class CommandStatus(enum.IntEnum):
    """``status`` of a COMMAND_DONE event. A TABLE command that ran is OK; the table's own
    answer is in the event's ``table.status`` (``hw.conn_table.Status``)."""
    OK = 0
    UNKNOWN_OP = 1      # ``op`` is not a CommandOp
    DMA_ERROR = 2       # the entry, or a CLOSE's held data, could not be read
    BAD_LENGTH = 3      # a CLOSE's held data is longer than a held-data buffer, or its
                        # address is not aligned to the datapath width


#: A connection-table command from the host (``hw.conn_table.Op``: SET_KEY, the table's
#: hash key, once at bring-up; DELETE a flow the host closed in software; READ a slot to
#: list flows, ...).
TABLE_COMMAND = data.StructLayout({"op": 3, "key": FLOW_KEY, "value": 16, "slot": 16,
                                   "hash_key": 128})

#: The body of a command: one of these, by ``op``.
COMMAND_BODY = data.UnionLayout({
    "listen": data.StructLayout({"index": 8, "entry": LISTEN_ENTRY}),
    "key": 128,
    "connect": CONNECT_REQUEST,
    "close": CLOSE_COMMAND,
    "splice": SPLICE_COMMAND,
    "table": TABLE_COMMAND,
})

#: One command: 128 bytes.
COMMAND_ENTRY = data.StructLayout({
    "op": 8,                          # CommandOp
    "reserved": 8,
    "tag": 16,                        # the host's; echoed in the COMMAND_DONE event
    "addr": 64,                       # CLOSE: its held data (``close.data_length`` bytes)
    "body": COMMAND_BODY,
    "pad": 1024 - 96 - COMMAND_BODY.size,
})


# --------------------------------------------------------------------------- events


class HostEventKind(enum.IntEnum):
    """Event kinds of the host interface, after the engines' (``hw.metadata.EventKind``)."""
    RX = 8              # an RX buffer is back: a received frame is in it (``status``: RxStatus)
    TX_DONE = 9         # a TX descriptor's frame has been read (``status``: TxStatus)
    COMMAND_DONE = 10   # a command completed (``status``: CommandStatus)


class TxStatus(enum.IntEnum):
    """``status`` of a TX_DONE event."""
    OK = 0
    BAD_DESCRIPTOR = 1  # length out of range or address misaligned: nothing sent
    DMA_ERROR = 2       # the frame could not be read: nothing sent


class RxStatus(enum.IntEnum):
    """``status`` of an RX event. Every RX buffer comes back in exactly one RX event."""
    OK = 0              # the frame is in the buffer (``length`` bytes, ``reason``)
    TOO_LONG = 1        # the next frame was longer than the buffer: frame dropped, buffer unused
    BAD_BUFFER = 2      # the descriptor could not be read, or its address is misaligned:
                        # buffer unused (the frame waits for the next buffer)


#: The first bytes of an event entry, its *head*: all that RX, TX_DONE and most
#: COMMAND_DONE events carry, and the ``phase``.
EVENT_HEAD_BYTES = 16

#: One event: 128 bytes. The host-interface fields and ``phase`` come first, in the
#: head; then ``event``, the engines' record (its ``kind`` says which, an EventKind or a
#: HostEventKind; fields a kind does not use are 0), and a TABLE command's response.
#:
#: How the NIC writes an entry (``hw.event_ring``): an event whose bytes from
#: ``EVENT_HEAD_BYTES`` on are all zero is written as its head alone, with ``short`` = 1
#: (one small DMA write: RX, TX_DONE, COMMAND_DONE without a table response); the rest
#: of the slot keeps what an earlier pass left there and is to be read as zero
#: (``event_from_bytes``). Any other event is written whole with the slot's old phase,
#: then its head again with the new one: posted writes land in order, so the host never
#: sees the new phase before the rest of the entry.
_EVENT_FIELDS = {
    "ring_index": 16,                 # RX: the buffer's RX index; TX_DONE: the TX index;
                                      # COMMAND_DONE: the command's index
    "length": 16,                     # RX: the frame's bytes in the buffer
    "reason": 8,                      # RX: why the frame came to the host (hw.handshake.Reason)
    "command_tag": 16,                # COMMAND_DONE: the command's ``tag``
    "short": 1,                       # only the head was written (the rest reads as 0)
    "phase": 1,                       # the pass's phase (``phase_of_pass``): a new entry
    "event": EVENT,
    "table": data.StructLayout({      # COMMAND_DONE of TABLE: the table's response
        "status": 3,                  # hw.conn_table.Status
        "index": 16, "slot": 16, "key": FLOW_KEY, "value": 16}),
}
EVENT_ENTRY = data.StructLayout({
    **_EVENT_FIELDS,
    "pad": 1024 - data.StructLayout(_EVENT_FIELDS).size,
})
# The head holds every host-interface field and the event's kind and status.
assert EVENT_ENTRY["event"].offset + 8 <= 8 * EVENT_HEAD_BYTES

assert COMMAND_ENTRY.size == 8 * RING_ENTRY_BYTES[Ring.COMMAND]
assert EVENT_ENTRY.size == 8 * RING_ENTRY_BYTES[Ring.EVENT]
assert TX_DESCRIPTOR.size == 8 * RING_ENTRY_BYTES[Ring.TX]
assert RX_DESCRIPTOR.size == 8 * RING_ENTRY_BYTES[Ring.RX]


class HostCounter(enum.IntEnum):
    """The host interface's counters (register ``HOST_COUNTERS``, one each)."""
    TX_FRAMES = 0       # frames read from the TX ring and sent
    TX_BAD = 1          # TX descriptors refused, or whose frame could not be read
    RX_DELIVERED = 2    # frames written into RX buffers
    RX_DROPPED = 3      # frames dropped: no room while waiting for RX buffers
    RX_TOO_LONG = 4     # frames dropped: longer than their RX buffer
    EVENTS = 5          # events written into the event ring
    COMMANDS = 6        # command entries executed


def entry_bytes(layout, **fields):
    """The bytes of one ring entry of ``layout`` with ``fields`` (nested dicts; the rest 0)."""
    return pack_struct(layout, **fields).to_bytes(layout.size // 8, "little")


def entry_from_bytes(layout, raw):
    """The fields (nested dicts) of one ring entry of ``layout`` read from host memory."""
    return unpack_struct(layout, int.from_bytes(raw[:layout.size // 8], "little"))


def event_from_bytes(raw):
    """The fields of one event entry read from host memory: a ``short`` entry's bytes
    after its head are read as zero (the NIC did not write them)."""
    raw = bytes(raw[:RING_ENTRY_BYTES[Ring.EVENT]])
    short = EVENT_ENTRY["short"].offset
    if (raw[short // 8] >> (short % 8)) & 1:
        raw = raw[:EVENT_HEAD_BYTES] + bytes(len(raw) - EVENT_HEAD_BYTES)
    return entry_from_bytes(EVENT_ENTRY, raw)


def phase_of_pass(index, ring_log2):
    """The ``phase`` the NIC writes into the entry of free-running index ``index``."""
    return 1 - ((index >> ring_log2) & 1)
