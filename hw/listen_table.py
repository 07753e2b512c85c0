"""The listen table: which local (address, port) pairs the NIC answers SYNs for.

``ListenTable(entries=16)`` holds ``entries`` listeners written by the host. A lookup
compares a segment's destination address and port with every entry at once; the entry
with the lowest index that matches wins (an entry with address 0 matches any local
address, so the host puts specific addresses before wildcards).

Latency: ``LATENCY`` = 2 cycles from ``lookup_*`` to ``hit``/``index``/``entry``
(compare, then pick); one lookup per cycle, never stalls. A write takes effect for
lookups presented from the next cycle on; a lookup that races a write of the entry it
hits may see the old match with the new contents (the host writes ``valid = 0`` first
when it repurposes an entry).

Ports
  write          In(stream of LISTEN_WRITE)   ``{index, entry}``; always ready
  lookup_ip      In(32)                       destination IPv4 address of the segment
  lookup_port    In(16)                       destination TCP port
  hit            Out(1)                       an entry matched (2 cycles later)
  index          Out(range(entries))          the matching entry
  entry          Out(LISTEN_ENTRY)            its contents
"""

from amaranth.hdl import Cat, Const, Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from hw.stream import one_hot_select

__all__ = ["LISTEN_ENTRY", "listen_write_layout", "ListenTable"]

#: One listener, as the host writes it. ``window`` is the receive window advertised in
#: the SYN-ACK (unscaled); ``wscale`` the shift we offer when the peer scales too.
LISTEN_ENTRY = data.StructLayout({
    "valid": 1,
    "offload": 1,                     # 1: the NIC answers SYNs; 0: they go to the host
    "ip": 32,                         # local address; 0 matches any
    "port": 16,
    "mss": 16,
    "wscale_ok": 1, "wscale": 4,
    "sack_ok": 1,
    "ts_ok": 1,
    "window": 16,
})


def listen_write_layout(entries):
    return data.StructLayout({"index": range(entries), "entry": LISTEN_ENTRY})


class ListenTable(wiring.Component):
    LATENCY = 2

    def __init__(self, entries=16):
        self.entries = entries
        super().__init__({
            "write": In(stream.Signature(listen_write_layout(entries))),
            "lookup_ip": In(32),
            "lookup_port": In(16),
            "hit": Out(1),
            "index": Out(range(entries)),
            "entry": Out(LISTEN_ENTRY),
        })

    def elaborate(self, platform):
        m = Module()
        table = [Signal(LISTEN_ENTRY, name=f"listener_{k}") for k in range(self.entries)]
        m.d.comb += self.write.ready.eq(1)
        with m.If(self.write.valid):
            with m.Switch(self.write.payload.index):
                for k in range(self.entries):
                    with m.Case(k):
                        m.d.sync += table[k].eq(self.write.payload.entry)

        # Cycle 1: one match bit per entry.
        match = Signal(self.entries)
        m.d.sync += match.eq(Cat(*[
            e.valid & (e.port == self.lookup_port) & ((e.ip == 0) | (e.ip == self.lookup_ip))
            for e in table]))

        # Cycle 2: the lowest matching entry, selected one-hot with an AND-OR tree. Each
        # bit of the one-hot is its match bit and no lower one (a LUT tree per bit), not
        # match & -match, whose carry chain runs through all entries.
        lowest = Cat(*[match[k] & ~match[:k].any() if k else match[0]
                       for k in range(self.entries)])
        picked = LISTEN_ENTRY(one_hot_select(lowest, [e.as_value() for e in table]))
        index = one_hot_select(lowest, [Const(k, range(self.entries)) for k in range(self.entries)])
        m.d.sync += [self.hit.eq(match.any() & picked.valid), self.index.eq(index),
                     self.entry.eq(picked)]
        return m

