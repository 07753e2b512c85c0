"""The registry of synthesizable blocks: name -> how to build one.

Used by ``acceltcp synth``, ``acceltcp bench`` and the synthesis test, so that a new
block is listed in exactly one place. Classes are named by import path so that a
listing never imports (or breaks on) a block the command does not use.
"""

import importlib
from dataclasses import dataclass, field

__all__ = ["Block", "BLOCKS", "get_block"]


@dataclass(frozen=True)
class Block:
    path: str                      # "module:Class"
    params: dict = field(default_factory=dict)   # defaults for synthesis (W=64, 10G)
    description: str = ""

    def __iter__(self):
        """``cls, params, description = BLOCKS[name]`` also works."""
        return iter((self.component_class(), self.params, self.description))

    def component_class(self):
        module, name = self.path.split(":")
        return getattr(importlib.import_module(module), name)


BLOCKS = {
    "parser": Block("hw.parser:Parser", {"width": 64},
                    "RX header parser: Ethernet/VLAN, IPv4, TCP, options, checksums"),
    "builder": Block("hw.builder:TxBuilder", {"width": 64},
                     "TX frame builder: header descriptor + payload -> checksummed frame"),
    "checksum_insert": Block("hw.checksum_insert:ChecksumInserter", {"width": 64},
                             "TX checksum completion for host frames (IPv4 header, TCP)"),
    "siphash": Block("hw.siphash:SipHash", {"message_bits": 104},
                     "SipHash-2-4 of a 13-byte message, one per cycle (keyed hash)"),
    "conn_table": Block("hw.conn_table:ConnTable",
                        {"entries": 4096, "value_width": 32, "stash": 4, "max_moves": 256,
                         "state_width": 64},
                        "connection table: keyed 2x4-way cuckoo hash, one lookup per cycle"),
    "handshake": Block("hw.handshake:HandshakeEngine", {"listeners": 16},
                       "handshake engine: SYN cookies (SipHash-2-4), listen table, passive open"),
    "teardown": Block("hw.teardown:TeardownEngine", {"width": 64, "slots": 1024, "buffers": 16},
                      "teardown engine: FIN/RST/TIME_WAIT of closing flows, timers, held data"),
    "splice": Block("hw.splice:SpliceEngine", {"slots": 512},
                    "splice engine: SPLICE commands, per-flow rewrite parameters, FIN/RST/idle "
                    "tracking (bench: the whole NIC)"),
    "dma": Block("hw.dma:DmaEngine", {"width": 64},
                 "DMA engine: client reads/writes of host memory as PCIe reads (tags, "
                 "reorder buffer, timeout) and posted writes"),
    "splice_rewrite": Block("hw.splice_rewrite:SpliceRewriter", {"width": 64},
                            "splice rewriter: MACs, IPs, ports, seq/ack, TS, SACK, window, checksums"),
    "host_interface": Block("hw.host_interface:HostInterface", {"width": 64},
                            "host interface: registers, rings (RingFetcher, EventRing, TxFetch, "
                            "RxDeliver, CommandDecoder), DMA engine, interrupt"),
}


def get_block(name):
    try:
        return BLOCKS[name]
    except KeyError:
        raise KeyError(f"unknown block {name!r}; known blocks: {', '.join(sorted(BLOCKS))}") from None
