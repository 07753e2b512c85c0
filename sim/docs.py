"""Generate the tables in docs/ from the single declarations in ``hw/``.

Pages in ``docs/`` carry blocks like::

    <!-- generated: headers -->
    ...table...
    <!-- end generated -->

``python -m sim.docs`` rewrites every such block from the declarations;
``python -m sim.docs --check`` fails when a page is out of date (the test suite runs it).
"""

import argparse
import inspect
import re
import sys
from pathlib import Path

from amaranth.lib import data

from hw.dma import (DMA_READ, DMA_WRITE, PCIE_READ, DmaCounter, dma_read_data_layout,
                    pcie_completion_layout, pcie_write_layout)
from hw.headers import HEADERS, TCP_OPTIONS
from hw.metadata import (ERROR_FLAGS, EVENT, PARSER_META, TX_HEADER, CloseReason, CloseStatus,
                         EventKind, FrameClass, SpliceEnd, SpliceStatus)
from hw.host_formats import (COMMAND_ENTRY, EVENT_ENTRY, RING_ENTRY_BYTES, RX_DESCRIPTOR,
                             TX_DESCRIPTOR, CommandOp, CommandStatus, HostCounter,
                             HostEventKind, Ring, RxStatus, TxFlag, TxStatus)
from hw.registers import REGISTERS, RING_REGISTERS, Access, RingStatus
from hw.splice import SPLICE_COMMAND, SPLICE_SIDE, SpCounter
from hw.splice_rewrite import REWRITE
from hw.teardown import CLOSE_COMMAND, TdCounter, TdState

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def headers_table():
    rows = []
    for header in HEADERS:
        rows.append(f"\n**{header.name}** ({header.size} bytes fixed). {header.doc}\n")
        rows.append("| field | byte offset | bit offset | width (bits) |")
        rows.append("|---|---:|---:|---:|")
        for f in header:
            rows.append(f"| `{f.name}` | {f.byte_offset} | {f.bit_offset} | {f.width} |")
    rows.append("\n**TCP options** (offsets count from the byte after kind and length)\n")
    rows.append("| kind | name | total length | value fields |")
    rows.append("|---:|---|---|---|")
    for decl in TCP_OPTIONS.values():
        fields = ", ".join(f"`{f.name}` ({f.width} bits at byte {f.byte_offset})" for f in decl.header) or "none"
        rows.append(f"| {int(decl.kind)} | {decl.kind.name} | {'/'.join(map(str, decl.length))} | {fields} |")
    return "\n".join(rows).lstrip("\n") + "\n"


def layout_table(layout, prefix="", base=0):
    """One row per leaf field, with its offset from the start of the outermost layout."""
    rows = []
    for name, field in layout:
        if isinstance(field.shape, data.StructLayout):
            rows += layout_table(field.shape, f"{prefix}{name}.", base + field.offset)
        else:
            rows.append(f"| `{prefix}{name}` | {base + field.offset} | {field.width} |")
    return rows


def layout_doc(layout):
    head = ["| field | bit offset in the payload | width |", "|---|---:|---:|"]
    return "\n".join(head + layout_table(layout)) + f"\n\nTotal: {layout.size} bits.\n"


def classes_table():
    rows = ["| value | class | meaning |", "|---:|---|---|"]
    for c in FrameClass:
        comment = {
            "TCP": "IPv4, protocol 6, not a fragment: the offload path",
            "ARP": "EtherType 0x0806", "IPV6": "EtherType 0x86DD",
            "UDP": "IPv4, protocol 17, not a fragment",
            "IPV4_OTHER": "IPv4 with another protocol (ICMP, ...)",
            "FRAGMENT": "IPv4 with MF set or a non-zero fragment offset",
            "OTHER": "any other EtherType, or a frame shorter than 14 bytes",
        }[c.name]
        rows.append(f"| {c.value} | `{c.name}` | {comment} |")
    return "\n".join(rows) + "\n"


def errors_table():
    rows = ["| flag | set when |", "|---|---|"]
    rows += [f"| `{name}` | {text} |" for name, text in ERROR_FLAGS.items()]
    return "\n".join(rows) + "\n"


def enum_table(cls):
    """value | name | meaning, the meaning taken from the comment on each member's line."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        found = re.match(r"\s*(\w+)\s*=\s*[^#]+#\s*(.*)", line)
        if found:
            comments[found.group(1)] = found.group(2).strip()
    rows = ["| value | name | meaning |", "|---:|---|---|"]
    rows += [f"| {m.value} | `{m.name}` | {comments.get(m.name, '')} |" for m in cls]
    return "\n".join(rows) + "\n"


def registers_table():
    params = "width, entries, listeners, teardown_slots, teardown_buffers, splice_slots"
    rows = ["| offset | register | access | reset / value | meaning |", "|---:|---|---|---|---|"]
    for reg in REGISTERS:
        where = f"0x{reg.offset:03X}" + (f" .. 0x{reg.end - 4:03X}" if reg.count > 1 else "")
        name = reg.name + (f"[{reg.count}]" if reg.count > 1 else "")
        if reg.access is Access.CONST:
            fixed = "build time"
        elif reg.access is Access.RW:
            fixed = f"{reg.init}"
        else:
            fixed = "-"
        rows.append(f"| {where} | `{name}` | {reg.access.value} | {fixed} | {reg.doc} |")
    return "\n".join(rows) + f"\n\n(`const` values come from the NIC's parameters: {params}.)\n"


def rings_table():
    direction = {Ring.EVENT: "NIC -> host"}
    rows = ["| ring | registers at | direction | entry bytes | entry layout |",
            "|---|---|---|---:|---|"]
    layouts = {Ring.TX: "TX_DESCRIPTOR", Ring.RX: "RX_DESCRIPTOR", Ring.COMMAND: "COMMAND_ENTRY",
               Ring.EVENT: "EVENT_ENTRY"}
    for ring in Ring:
        rows.append(f"| {ring.name} | 0x{0x400 + 0x20 * ring:03X} | "
                    f"{direction.get(ring, 'host -> NIC')} | {RING_ENTRY_BYTES[ring]} | "
                    f"`{layouts[ring]}` |")
    rows += ["", "Each ring's registers, at its base offset plus:", "",
             "| offset | register | access | meaning |", "|---:|---|---|---|"]
    rows += [f"| +0x{offset:02X} | `<RING>_{name}` | {access.value} | {doc} |"
             for name, offset, access, doc in RING_REGISTERS]
    return "\n".join(rows) + "\n"


def command_bodies():
    """COMMAND_ENTRY, then the body of each op (the union's members)."""
    out = [layout_doc(COMMAND_ENTRY),
           "\nThe members of `body` (their offsets count from bit 96 of the entry):\n"]
    members = {"listen": "LISTEN", "key": "SET_KEY", "connect": "CONNECT", "close": "CLOSE",
               "splice": "SPLICE", "table": "TABLE"}
    for name, field in COMMAND_ENTRY["body"].shape:
        if isinstance(field.shape, data.StructLayout):
            out.append(f"\n`body.{name}` ({members[name]}):\n\n" + layout_doc(field.shape))
        else:
            out.append(f"\n`body.{name}` ({members[name]}): {field.width} bits at offset 96.\n")
    return "".join(out)


GENERATORS = {
    "registers": registers_table,
    "rings": rings_table,
    "ring_status": lambda: enum_table(RingStatus),
    "tx_descriptor": lambda: layout_doc(TX_DESCRIPTOR),
    "tx_flags": lambda: enum_table(TxFlag),
    "rx_descriptor": lambda: layout_doc(RX_DESCRIPTOR),
    "command_entry": command_bodies,
    "command_ops": lambda: enum_table(CommandOp),
    "command_status": lambda: enum_table(CommandStatus),
    "event_entry": lambda: layout_doc(EVENT_ENTRY),
    "host_event_kinds": lambda: enum_table(HostEventKind),
    "tx_status": lambda: enum_table(TxStatus),
    "rx_status": lambda: enum_table(RxStatus),
    "host_counters": lambda: enum_table(HostCounter),
    "close_command": lambda: layout_doc(CLOSE_COMMAND),
    "event": lambda: layout_doc(EVENT),
    "event_kinds": lambda: enum_table(EventKind),
    "close_status": lambda: enum_table(CloseStatus),
    "close_reason": lambda: enum_table(CloseReason),
    "td_counters": lambda: enum_table(TdCounter),
    "td_states": lambda: enum_table(TdState),
    "splice_command": lambda: layout_doc(SPLICE_COMMAND),
    "splice_side": lambda: layout_doc(SPLICE_SIDE),
    "rewrite": lambda: layout_doc(REWRITE),
    "splice_status": lambda: enum_table(SpliceStatus),
    "splice_end": lambda: enum_table(SpliceEnd),
    "sp_counters": lambda: enum_table(SpCounter),
    "headers": headers_table,
    "dma_read": lambda: layout_doc(DMA_READ),
    "dma_write": lambda: layout_doc(DMA_WRITE),
    "dma_read_data": lambda: layout_doc(dma_read_data_layout(64)),
    "pcie_read": lambda: layout_doc(PCIE_READ),
    "pcie_completion": lambda: layout_doc(pcie_completion_layout(64)),
    "pcie_write": lambda: layout_doc(pcie_write_layout(64)),
    "dma_counters": lambda: enum_table(DmaCounter),
    "parser_meta": lambda: layout_doc(PARSER_META),
    "tx_header": lambda: layout_doc(TX_HEADER),
    "frame_classes": classes_table,
    "parser_errors": errors_table,
}


def render(text):
    def replace(match):
        name = match.group(2)
        if name not in GENERATORS:
            raise KeyError(f"unknown generated block {name!r}")
        return match.group(1) + GENERATORS[name]() + match.group(4)
    return BLOCK.sub(replace, text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a page is out of date")
    args = parser.parse_args(argv)
    stale = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        new = render(text)
        if new != text:
            stale.append(page.name)
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run `python -m sim.docs`", file=sys.stderr)
        return 1
    if not args.check:
        print(f"updated: {', '.join(stale) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
