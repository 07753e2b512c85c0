"""Per-packet metadata layouts that travel on their own streams next to packet streams.

``PARSER_META`` is what ``hw.parser.Parser`` emits for every frame, in frame order.
Field meanings are documented in ``docs/packet_pipeline.md`` (generated tables come
from this declaration). The header sub-structures use the field names of
``hw.headers`` so that a reader meets one vocabulary everywhere.
"""

import enum

from amaranth.lib import data

__all__ = ["FrameClass", "PARSER_META", "PARSER_ERRORS", "ERROR_FLAGS"]


class FrameClass(enum.IntEnum):
    """Where a frame belongs. Only ``TCP`` frames are candidates for the offload path."""
    TCP = 0             # IPv4, protocol 6, not a fragment
    ARP = 1
    IPV6 = 2
    UDP = 3             # IPv4, protocol 17, not a fragment
    IPV4_OTHER = 4      # IPv4 with any other protocol (ICMP, ...)
    FRAGMENT = 5        # IPv4 fragment (MF set or fragment offset non-zero), any protocol
    OTHER = 6           # any other EtherType, or a frame too short to have one


#: Error flags. A frame with any flag set is still delivered whole; the dispatcher decides.
ERROR_FLAGS = {
    "truncated": "the frame ends before the end of a header, or before the IPv4 total length",
    "bad_ip_version": "EtherType IPv4 but the version field is not 4",
    "bad_ihl": "IPv4 IHL below 5, or the IPv4 header is longer than the total length",
    "bad_data_offset": "TCP data offset below 5, or the TCP header is longer than the segment",
    "length_mismatch": "the frame carries more bytes than the IPv4 total length and minimum-frame padding explain",
    "bad_options": "a malformed TCP option list (length byte 0/1, an option crossing the header end, "
                   "a known option with a wrong length)",
    "bad_ip_checksum": "the IPv4 header checksum does not verify",
    "bad_tcp_checksum": "the TCP checksum (pseudo-header included) does not verify",
    "oversize": "the frame is longer than the parser's max_frame_bytes",
}

PARSER_ERRORS = data.StructLayout({name: 1 for name in ERROR_FLAGS})

PARSER_META = data.StructLayout({
    "frame_class": 3,                 # FrameClass
    "errors": PARSER_ERRORS,
    "frame_length": 16,               # bytes in the frame (saturates at 65535)
    "eth": data.StructLayout({
        "dst": 48, "src": 48,
        "ethertype": 16,              # after the VLAN tag when there is one
        "vlan_valid": 1, "vlan_pcp": 3, "vlan_vid": 12,
    }),
    "l3_offset": 5,                   # 14, or 18 with a VLAN tag
    "ip": data.StructLayout({
        "ihl": 4, "dscp": 6, "ecn": 2, "total_length": 16, "identification": 16,
        "df": 1, "mf": 1, "frag_offset": 13, "ttl": 8, "protocol": 8, "checksum": 16,
        "src": 32, "dst": 32,
    }),
    "l4_offset": 7,                   # l3_offset + 4 * ihl
    "tcp": data.StructLayout({
        "sport": 16, "dport": 16, "seq": 32, "ack": 32, "data_offset": 4, "flags": 8,
        "window": 16, "checksum": 16, "urgent": 16,
    }),
    "opt": data.StructLayout({
        "mss_valid": 1, "mss": 16,
        "wscale_valid": 1, "wscale": 8,
        "sack_perm": 1,
        "ts_valid": 1, "tsval": 32, "tsecr": 32,
        "ts_offset": 8,               # frame byte offset of TSval (TSecr follows it)
        "sack_blocks": 3,             # 0..4 SACK blocks
        "sack_offset": 8,             # frame byte offset of the first block's left edge
        "unknown": 1,                 # at least one option of an unknown kind was skipped
    }),
    "payload_offset": 8,              # frame byte offset of the TCP payload
    "payload_length": 16,             # TCP payload bytes (from the IPv4 total length)
    "ip_sum": 16,                     # one's-complement sum of the IPv4 header words, checksum included
    "tcp_sum": 16,                    # one's-complement sum of the pseudo-header and the segment, checksum included
})


# --- TX side ---------------------------------------------------------------------------

#: One frame to build, as ``hw.builder.TxBuilder`` takes it on its ``header`` stream.
#: The builder fills in everything else (EtherType, IP version/IHL/protocol/total length,
#: TCP data offset, both checksums, the option layout Linux uses).
TX_HEADER = data.StructLayout({
    "eth": data.StructLayout({"dst": 48, "src": 48}),
    "ip": data.StructLayout({
        "src": 32, "dst": 32, "ttl": 8, "identification": 16, "df": 1, "dscp": 6, "ecn": 2,
    }),
    "tcp": data.StructLayout({
        "sport": 16, "dport": 16, "seq": 32, "ack": 32, "flags": 8, "window": 16,
    }),
    "opt": data.StructLayout({
        "mss_valid": 1, "mss": 16,
        "wscale_valid": 1, "wscale": 8,
        "sack_perm": 1,
        "ts_valid": 1, "tsval": 32, "tsecr": 32,
    }),
    "payload_length": 16,             # TCP payload bytes, taken from the payload stream
})

__all__ += ["TX_HEADER"]


# --- Host side: events ----------------------------------------------------------------

class EventKind(enum.IntEnum):
    """What an event on an engine's ``event`` stream reports."""
    ESTABLISHED = 1     # a connection completed its handshake on the NIC (passive or active open)
    FAILED = 2          # an active open failed (``status`` says why: FailStatus)
    CLOSE_STATUS = 3    # the answer to a CLOSE command (``status``: CloseStatus)
    CLOSED = 4          # the NIC finished a close it took over (``status``: CloseReason)
    SPLICE_STATUS = 5   # the answer to a SPLICE command (``status``: SpliceStatus)
    SPLICE_DONE = 6     # a splice ended (``status``: SpliceEnd; counts per direction)


class FailStatus(enum.IntEnum):
    """Why an active open failed (``status`` of a FAILED event)."""
    RESET = 1           # the peer answered with an acceptable RST
    TIMEOUT = 2         # no acceptable SYN-ACK after the last retransmission
    BUSY = 3            # every connect slot was in use: the host keeps the connection


class CloseStatus(enum.IntEnum):
    """The answer to a CLOSE command (``status`` of a CLOSE_STATUS event). Anything but OK
    leaves the connection with the host, which closes it in software."""
    OK = 0              # the NIC owns the close from now on
    TABLE_FULL = 1      # the connection table had no room for the flow
    ALREADY_CLOSING = 2  # the NIC is already closing this 4-tuple
    NO_SLOT = 3         # every teardown slot is in use
    NO_BUFFER = 4       # the command holds data and every data buffer is in use
    BAD_LENGTH = 5      # more data than one buffer holds, or SND.NXT outside the held data
    TABLE_ERROR = 6     # the table refused the insert or update for another reason


class CloseReason(enum.IntEnum):
    """How a close the NIC took over ended (``status`` of a CLOSED event)."""
    NORMAL = 1          # both FINs acknowledged (TIME_WAIT expired, or LAST_ACK acknowledged)
    RESET = 2           # the peer sent an acceptable RST
    TIMEOUT = 3         # FIN retransmissions exhausted (RST sent), or FIN_WAIT_2 timed out
    DATA = 4            # the peer sent new data after the close: RST sent, as Linux does
    NEW_SYN = 5         # an acceptable SYN ended TIME_WAIT; the SYN went to the host


class SpliceStatus(enum.IntEnum):
    """The answer to a SPLICE command (``status`` of a SPLICE_STATUS event). Anything but
    OK leaves both connections with the host, which keeps proxying in software."""
    OK = 0              # the NIC relays both connections from now on
    TABLE_FULL = 1      # the connection table had no room for one of the two flows
    ALREADY = 2         # a flow is already spliced or closing on the NIC
    NO_SLOT = 3         # every splice slot is in use
    TS_MISMATCH = 4     # one connection uses timestamps and the other does not
    SAME_FLOW = 5       # both sides name the same 4-tuple
    TABLE_ERROR = 6     # the table refused an insert or update for another reason


class SpliceEnd(enum.IntEnum):
    """How a splice ended (``status`` of a SPLICE_DONE event)."""
    NORMAL = 1          # both FINs acknowledged, then the linger time passed
    RESET = 2           # an exact RST (its sequence number is what the receiver acknowledged)
    IDLE = 3            # no segment for the idle timeout


class FlowKind(enum.IntEnum):
    """What the connection table's value says about a flow."""
    HOST = 1            # established through the NIC; the host owns it
    CLOSING = 2         # the teardown engine owns it (``slot``: its teardown slot)
    SPLICED = 3         # the splice engine relays it (``slot``: 2 * splice slot + side)


#: The connection table's value: the flow's kind, and the engine slot that holds its state.
FLOW_VALUE = data.StructLayout({"kind": 4, "slot": 12})


#: One event for the host. Fields an event kind does not use are 0.
#: ``peer_wscale`` / ``local_wscale`` are valid when ``wscale_ok``; ``ts_recent`` (the
#: peer's last TSval) and ``ts_echo`` (the TSval of ours it echoed) when ``ts_ok``.
EVENT = data.StructLayout({
    "kind": 4,                        # EventKind
    "status": 4,                      # FailStatus (FAILED events)
    "active": 1,                      # 1: an active open (CONNECT); 0: a passive one
    "ingress": 8,                     # the port the segment came in on
    "listener": 8,                    # passive: listen-table entry; active: connect slot
    "eth": data.StructLayout({"peer": 48, "local": 48}),
    "peer_ip": 32, "local_ip": 32, "peer_port": 16, "local_port": 16,
    "iss": 32,                        # our initial sequence number
    "irs": 32,                        # the peer's initial sequence number
    "mss": 16,                        # the peer's MSS (from the cookie's table)
    "wscale_ok": 1, "peer_wscale": 4, "local_wscale": 4,
    "sack_ok": 1,
    "ts_ok": 1, "ts_recent": 32, "ts_echo": 32,
    "window": 16,                     # the window field of the peer's segment (unscaled)
    "payload_length": 16,             # bytes the segment carried (the frame goes to the host)
    # CLOSED events: what the NIC did for the flow while it owned the close.
    "retransmits": 4,                 # FIN retransmissions
    "segments_in": 16,                # segments of the flow the NIC handled (saturates)
    "segments_out": 16,               # segments the NIC sent for the flow (saturates)
    # SPLICE_STATUS and SPLICE_DONE events: the host's tag of the splice; for SPLICE_DONE,
    # the segments and payload bytes relayed from side a's peer (to b) and from b's (to a).
    # The 4-tuple fields above then name side a's connection.
    "tag": 16,
    "packets_a": 32, "bytes_a": 48, "packets_b": 32, "bytes_b": 48,
})

#: One received frame's record as the flow engines (teardown, splice) take it: the
#: parser's record, the ingress port, and the connection table's lookup result.
FLOW_RECORD = data.StructLayout({
    "meta": PARSER_META,
    "ingress": 8,
    "hit": 1,
    "value": FLOW_VALUE,
})

__all__ += ["EventKind", "FailStatus", "CloseStatus", "CloseReason", "SpliceStatus", "SpliceEnd",
            "FlowKind", "FLOW_VALUE", "EVENT", "FLOW_RECORD"]
