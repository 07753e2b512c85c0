"""The listen table: which local (address, port) pairs the NIC answers SYNs for.

``ListenTable(entries=16)`` holds ``entries`` listeners written by the host. A lookup
compares a segment's destination address and port with every entry at once; the entry
with the lowest index that matches wins (an entry with address 0 matches any local
address, so the host puts specific addresses before wildcards).

Latency: ``LATENCY`` = 3 cycles from ``lookup_*`` to ``hit``/``index``/``entry``
(compare; the lowest match's index; read its contents); one lookup per cycle, never
stalls. A write takes effect for lookups presented from the next cycle on. The contents
are read two cycles after the compare: a lookup that races a write of the entry it hits
may see the old match with the new contents, but never a cleared entry (``valid`` is
checked again when the contents are read). The host writes ``valid = 0`` first when it
repurposes an entry. Without a match, ``index`` and ``entry`` are 0.

Each entry is kept twice: its key (``valid``, ``ip``, ``port``) in registers, compared
with every lookup at once, and the whole entry in a small LUT RAM, read at the
registered index of the lowest match. (Selecting 100-odd bits from 16 entries with an
AND-OR tree driven by the match bits, in the cycle of the match, was the engine's
critical path: its routing spans the die.)

Ports
  write          In(stream of LISTEN_WRITE)   ``{index, entry}``; always ready
  lookup_ip      In(32)                       destination IPv4 address of the segment
  lookup_port    In(16)                       destination TCP port
  hit            Out(1)                       an entry matched (3 cycles later)
  index          Out(range(entries))          the matching entry
  entry          Out(LISTEN_ENTRY)            its contents
"""

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from hw.stream import lowest_set, struct_value

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


#: What a lookup compares, per entry, kept in registers.
_KEY = data.StructLayout({"valid": 1, "wildcard": 1, "ip": 32, "port": 16})


def listen_write_layout(entries):
    return data.StructLayout({"index": range(entries), "entry": LISTEN_ENTRY})


class ListenTable(wiring.Component):
    LATENCY = 3

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
        n = self.entries
        write = self.write.payload
        m.d.comb += self.write.ready.eq(1)

        # The keys, in registers; `wildcard` is ip == 0, worked out when the entry is
        # written rather than in every lookup.
        keys = [Signal(_KEY, name=f"listener_{k}") for k in range(n)]
        with m.If(self.write.valid):
            with m.Switch(write.index):
                for k in range(n):
                    with m.Case(k):
                        m.d.sync += keys[k].eq(struct_value(_KEY, {
                            "valid": write.entry.valid, "wildcard": write.entry.ip == 0,
                            "ip": write.entry.ip, "port": write.entry.port}))
        # The whole entries, in LUT RAM (written in the same cycle as the keys).
        m.submodules.contents = contents = Memory(shape=LISTEN_ENTRY, depth=n, init=[])
        content_write = contents.write_port()
        content_read = contents.read_port(domain="comb")
        m.d.comb += [content_write.en.eq(self.write.valid),
                     content_write.addr.eq(write.index),
                     content_write.data.eq(write.entry)]

        # Cycle 1: one match bit per entry.
        match = Signal(n)
        m.d.sync += match.eq(Cat(*[
            key.valid & (key.port == self.lookup_port)
            & (key.wildcard | (key.ip == self.lookup_ip))
            for key in keys]))

        # Cycle 2: the index of the lowest matching entry.
        found, index = Signal(), Signal(range(n))
        m.d.sync += Cat(found, index).eq(Cat(*lowest_set(list(match))))

        # Cycle 3: its contents. (`valid` is checked again: the host may have cleared it
        # since the compare.)
        m.d.comb += content_read.addr.eq(index)
        picked = content_read.data
        m.d.sync += [self.hit.eq(found & picked.valid), self.index.eq(index),
                     self.entry.eq(Mux(found, picked.as_value(), 0))]
        return m
