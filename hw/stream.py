"""The packet stream: one declaration of the beat layout, for the RTL and for Python.

A packet is a sequence of beats ``{data: W, keep: W//8, last: 1}`` with AXI-Stream
meaning: byte ``i`` of a beat is ``data[8*i:8*i+8]``, byte 0 of the frame is byte 0 of
its first beat, ``keep`` marks the valid bytes (all ones except on the last beat, where
it is a contiguous run from byte 0) and ``last`` marks the final beat of a frame.

Amaranth flattens the payload of a stream port into a single ``<name>__payload``
vector; ``pack_beat``/``unpack_beat`` convert between that integer and Python values
using the field offsets of this same layout.
"""

from amaranth.hdl import Array, Cat, Const, Mux, Signal, Value
from amaranth.lib import data, stream

__all__ = ["SUPPORTED_WIDTHS", "packet_layout", "packet_signature",
           "beat_bytes", "frame_to_beats", "beats_to_frame", "pack_beat", "unpack_beat",
           "pack_struct", "unpack_struct", "struct_value", "lowest_set", "one_hot_select",
           "round_robin_grant"]

#: Datapath widths in bits. 64 is 10G at 156.25 MHz, 512 the 100G class at 250 MHz.
SUPPORTED_WIDTHS = (64, 128, 256, 512)


def packet_layout(width):
    if width not in SUPPORTED_WIDTHS:
        raise ValueError(f"datapath width must be one of {SUPPORTED_WIDTHS}, not {width}")
    return data.StructLayout({"data": width, "keep": width // 8, "last": 1})


def packet_signature(width):
    return stream.Signature(packet_layout(width))


def beat_bytes(width):
    return width // 8


def _offsets(layout):
    return {name: (field.offset, field.width) for name, field in layout}


def pack_struct(layout, **values):
    """Pack Python ints into the flat integer Amaranth uses for ``layout``."""
    out = 0
    for name, field in layout:
        value = values.get(name, 0)
        if isinstance(field.shape, data.Layout):
            value = pack_struct(field.shape, **value) if isinstance(value, dict) else int(value)
        out |= (int(value) & ((1 << field.width) - 1)) << field.offset
    return out


def struct_value(layout, values):
    """An Amaranth value with the bits of ``layout`` built from a dict of field values
    (nested dicts for nested layouts; missing fields are zero), as one expression.

    Assigning a struct field by field from several places makes Yosys emit one
    ``always @*`` per field, and Icarus never evaluates those whose inputs never change
    (they stay X); one expression becomes one assignment.
    """
    unknown = set(values) - {name for name, _ in layout}
    if unknown:
        raise KeyError(f"no field(s) {sorted(unknown)} in the layout")
    parts = []
    for name, field in sorted(layout, key=lambda item: item[1].offset):
        value = values.get(name, 0)
        if isinstance(value, dict):
            value = struct_value(field.shape, value)
        value = Value.cast(value)
        if len(value) < field.width:
            value = Cat(value, Const(0, field.width - len(value)))
        parts.append(value[:field.width])
    return Cat(*parts)


def unpack_struct(layout, value):
    """Unpack the flat integer of ``layout`` into a dict (nested layouts become dicts)."""
    out = {}
    for name, field in layout:
        raw = (value >> field.offset) & ((1 << field.width) - 1)
        if isinstance(field.shape, data.StructLayout):
            raw = unpack_struct(field.shape, raw)
        out[name] = raw
    return out


def pack_beat(width, data_bytes, last):
    """One beat as the flat payload integer; ``data_bytes`` holds 1..W/8 bytes."""
    nbytes = len(data_bytes)
    assert 0 < nbytes <= width // 8
    return pack_struct(packet_layout(width),
                       data=int.from_bytes(data_bytes, "little"),
                       keep=(1 << nbytes) - 1, last=int(last))


def unpack_beat(width, payload):
    """(bytes kept, last) from a flat payload integer."""
    beat = unpack_struct(packet_layout(width), payload)
    keep, raw = beat["keep"], beat["data"].to_bytes(width // 8, "little")
    return bytes(raw[i] for i in range(width // 8) if keep >> i & 1), bool(beat["last"])


def frame_to_beats(frame, width):
    """Split a frame into flat beat payloads."""
    frame = bytes(frame)
    step = width // 8
    assert len(frame) > 0, "a frame has at least one byte"
    chunks = [frame[i:i + step] for i in range(0, len(frame), step)]
    return [pack_beat(width, chunk, i == len(chunks) - 1) for i, chunk in enumerate(chunks)]


def beats_to_frame(payloads, width):
    """Join flat beat payloads (the last one has ``last`` set) into a frame."""
    return b"".join(unpack_beat(width, p)[0] for p in payloads)


def lowest_set(bits):
    """``(any, index)`` of the lowest set bit of a list of 1-bit values, as expressions
    (no combinational process: see ``struct_value`` for why that matters to Icarus)."""
    index = Const(0, max(1, (len(bits) - 1).bit_length()))
    for k in reversed(range(len(bits))):
        index = Mux(bits[k], k, index)
    found = Const(0, 1)
    for b in bits:
        found = found | b
    return found, index


def one_hot_select(one_hot, values):
    """The value whose bit is set in ``one_hot`` (at most one bit set), as an AND-OR tree:
    two LUT levels for 16 choices, where an encoded index and a multiplexer take more."""
    width = max(len(Value.cast(v)) for v in values)
    result = Const(0, width)
    for k, value in enumerate(values):
        result = result | Mux(one_hot[k], value, 0)
    return result


def round_robin_grant(m, valids, last_served):
    """The first index after ``last_served`` (a Signal), in round-robin order, whose valid
    is set (``last_served`` itself last; any index when none is set), as a new Signal."""
    n = len(valids)
    grant = Signal(range(n))
    candidates = Array(valids)
    for offset in reversed(range(1, n + 1)):
        k = Signal(range(n), name=f"candidate_{offset}")
        m.d.comb += k.eq(Mux(last_served + offset >= n, last_served + offset - n,
                             last_served + offset))
        with m.If(candidates[k]):
            m.d.comb += grant.eq(k)
    return grant
