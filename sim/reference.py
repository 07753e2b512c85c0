"""Python reference models of the packet pipeline.

``parse_frame`` is the bit-exact model of ``hw.parser.Parser``: it returns the same
metadata (as the nested dict that ``hw.stream.unpack_struct(PARSER_META, value)``
gives). It is written plainly, byte by byte, from the single header declaration in
``hw.headers``; the testbenches check it against scapy on well-formed frames and the
RTL against it on every frame.

``ones_sum`` / ``fold`` are the RFC 1071 one's-complement helpers, ``checksum_update``
the RFC 1624 incremental update.
"""

from hw.headers import (ETHERNET, VLAN, IPV4, TCP, EtherType, IpProto, TcpOption,
                        TCP_OPTIONS, ETH_LEN, VLAN_LEN, MIN_FRAME_BYTES, MAX_FRAME_BYTES)
from hw.metadata import FrameClass, ERROR_FLAGS, PARSER_META

__all__ = ["ones_sum", "fold", "checksum_update", "parse_frame", "empty_meta"]


def fold(value):
    while value >> 16:
        value = (value & 0xFFFF) + (value >> 16)
    return value


def ones_sum(buf):
    """One's-complement sum (folded to 16 bits) of ``buf`` as big-endian words; an odd
    last byte is padded with a zero low byte."""
    buf = bytes(buf)
    if len(buf) % 2:
        buf += b"\0"
    return fold(sum(int.from_bytes(buf[i:i + 2], "big") for i in range(0, len(buf), 2)))


def checksum_update(checksum, old_words, new_words):
    """RFC 1624 eqn. 3, ``HC' = ~(~HC + ~m + m')``: the checksum after the 16-bit words
    ``old_words`` of the covered data were replaced by ``new_words``."""
    total = (~checksum & 0xFFFF) + sum(~w & 0xFFFF for w in old_words) + sum(new_words)
    return ~fold(total) & 0xFFFF


def empty_meta():
    def zero(layout):
        return {name: (zero(f.shape) if hasattr(f.shape, "members") else 0) for name, f in layout}
    return zero(PARSER_META)


def _parse_options(opts):
    """Parse a TCP option area the way the RTL does. Returns (fields, malformed)."""
    out = {"mss_valid": 0, "mss": 0, "wscale_valid": 0, "wscale": 0, "sack_perm": 0,
           "ts_valid": 0, "tsval": 0, "tsecr": 0, "ts_offset": 0, "sack_blocks": 0, "sack_offset": 0,
           "unknown": 0}
    malformed = False
    i, end = 0, len(opts)
    while i < end:
        kind = opts[i]
        if kind == TcpOption.EOL:
            break
        if kind == TcpOption.NOP:
            i += 1
            continue
        if i + 1 >= end:
            malformed = True
            break
        length = opts[i + 1]
        if length < 2 or i + length > end:
            malformed = True
            break
        decl = TCP_OPTIONS.get(kind)
        if decl is None:
            out["unknown"] = 1
        elif length not in decl.length:
            malformed = True            # flagged, skipped by its length, value not used
        else:
            value = opts[i + 2:i + length]
            # A later occurrence of the same option replaces an earlier one, as in Linux.
            if kind == TcpOption.MSS:
                out.update(mss_valid=1, mss=decl.header.mss.get(value))
            elif kind == TcpOption.WSCALE:
                out.update(wscale_valid=1, wscale=decl.header.shift.get(value))
            elif kind == TcpOption.SACK_PERM:
                out.update(sack_perm=1)
            elif kind == TcpOption.TIMESTAMP:
                out.update(ts_valid=1, tsval=decl.header.tsval.get(value),
                           tsecr=decl.header.tsecr.get(value), ts_offset=i + 2)
            elif kind == TcpOption.SACK:
                out.update(sack_blocks=(length - 2) // 8, sack_offset=i + 2)
        i += length
    return out, malformed


def parse_frame(frame, max_frame_bytes=MAX_FRAME_BYTES):
    """Metadata for one frame, exactly as the RTL parser produces it."""
    frame = bytes(frame)
    meta = empty_meta()
    err = meta["errors"]
    length = len(frame)
    meta["frame_length"] = min(length, 0xFFFF)
    err["oversize"] = int(length > max_frame_bytes)
    meta["frame_class"] = FrameClass.OTHER
    if length < ETH_LEN:
        err["truncated"] = 1
        # Fields of the bytes that are present are still reported (missing bytes read as 0).
    buf = frame + bytes(max(0, 200 - length))      # missing bytes read as zero
    eth = meta["eth"]
    eth["dst"], eth["src"] = ETHERNET.dst.get(buf), ETHERNET.src.get(buf)
    ethertype = ETHERNET.ethertype.get(buf)
    l3 = ETH_LEN
    if ethertype == EtherType.VLAN:
        eth["vlan_valid"] = 1
        eth["vlan_pcp"], eth["vlan_vid"] = VLAN.pcp.get(buf, ETH_LEN), VLAN.vid.get(buf, ETH_LEN)
        ethertype = VLAN.ethertype.get(buf, ETH_LEN)
        l3 = ETH_LEN + VLAN_LEN
        if length < l3:
            err["truncated"] = 1
    eth["ethertype"] = ethertype
    meta["l3_offset"] = l3
    if length < ETH_LEN:
        meta["frame_class"] = FrameClass.OTHER
        return meta
    if ethertype == EtherType.ARP:
        meta["frame_class"] = FrameClass.ARP
    elif ethertype == EtherType.IPV6:
        meta["frame_class"] = FrameClass.IPV6
    if ethertype != EtherType.IPV4:
        return meta

    # --- IPv4 ---
    ip = meta["ip"]
    ihl = IPV4.ihl.get(buf, l3)
    for name in ("ihl", "dscp", "ecn", "total_length", "identification", "df", "mf",
                 "frag_offset", "ttl", "protocol", "checksum", "src", "dst"):
        ip[name] = getattr(IPV4, name).get(buf, l3)
    total = ip["total_length"]
    # An IHL below 5 is flagged; the TCP header is then looked for 20 bytes in.
    ihl_eff = max(ihl, 5)
    l4 = l3 + 4 * ihl_eff
    meta["l4_offset"] = l4
    if IPV4.version.get(buf, l3) != 4:
        err["bad_ip_version"] = 1
    if ihl < 5 or 4 * ihl > total:
        err["bad_ihl"] = 1
    if length < l3 + IPV4.size or length < l3 + 4 * ihl or length < l3 + total:
        err["truncated"] = 1
    if length > max(MIN_FRAME_BYTES, l3 + total):
        err["length_mismatch"] = 1
    meta["ip_sum"] = ones_sum(buf[l3:l3 + 4 * ihl])
    if meta["ip_sum"] != 0xFFFF:
        err["bad_ip_checksum"] = 1
    fragment = ip["mf"] or ip["frag_offset"]
    if fragment:
        meta["frame_class"] = FrameClass.FRAGMENT
    elif ip["protocol"] == IpProto.TCP:
        meta["frame_class"] = FrameClass.TCP
    elif ip["protocol"] == IpProto.UDP:
        meta["frame_class"] = FrameClass.UDP
    else:
        meta["frame_class"] = FrameClass.IPV4_OTHER
    if meta["frame_class"] != FrameClass.TCP:
        return meta

    # --- TCP ---
    tcp = meta["tcp"]
    for name in ("sport", "dport", "seq", "ack", "data_offset", "flags", "window",
                 "checksum", "urgent"):
        tcp[name] = getattr(TCP, name).get(buf, l4)
    seg_len = (total - 4 * ihl_eff) & 0xFFFF
    doff = tcp["data_offset"]
    if doff < 5 or 4 * doff > total - 4 * ihl_eff:
        err["bad_data_offset"] = 1
    meta["payload_offset"] = l4 + 4 * doff
    meta["payload_length"] = max(0, total - 4 * ihl_eff - 4 * doff)
    pseudo = (IPV4.src.get(buf, l3) >> 16) + (IPV4.src.get(buf, l3) & 0xFFFF) \
        + (IPV4.dst.get(buf, l3) >> 16) + (IPV4.dst.get(buf, l3) & 0xFFFF) \
        + ip["protocol"] + seg_len
    end = min(l3 + total, length)
    segment = frame[l4:end] if end > l4 else b""
    meta["tcp_sum"] = fold(ones_sum(segment) + pseudo)
    if meta["tcp_sum"] != 0xFFFF:
        err["bad_tcp_checksum"] = 1
    opt_len = max(0, 4 * doff - TCP.size)
    opts, malformed = _parse_options(buf[l4 + TCP.size:l4 + TCP.size + opt_len])
    if opts["sack_blocks"]:
        opts["sack_offset"] += l4 + TCP.size
    if opts["ts_valid"]:
        opts["ts_offset"] += l4 + TCP.size
    meta["opt"].update(opts)
    if malformed and not err["bad_data_offset"]:
        err["bad_options"] = 1
    return meta


assert set(ERROR_FLAGS) == {n for n, _ in PARSER_META["errors"].shape}
