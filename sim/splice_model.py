"""Reference model of hw.splice_rewrite.SpliceRewriter, written from its docstring.

``rewrite_frame(frame, desc)`` returns the frame the rewriter must send for ``frame``
and its ``REWRITE`` descriptor ``desc`` (the nested dict that
``hw.stream.unpack_struct(REWRITE, value)`` gives): the fixed fields replaced, seq/ack,
window, timestamps and SACK edges adjusted, the two checksums updated by RFC 1624
eqn. 3 (never recomputed). Only the first 94 bytes can change; a shorter frame is
treated as if padded with zero bytes to 94, rewritten, and cut back to its length.

``desc_for(meta, ...)`` makes a descriptor whose option positions come from a
``sim.reference.parse_frame`` record (what the splice engine does), ``random_desc(rng)``
a random one (positions anywhere, in or out of range).
"""

from hw.headers import ETHERNET, IPV4, TCP, ETH_LEN, IPV4_MIN_LEN, TCP_MIN_LEN, TCP_MAX_LEN
from sim.reference import checksum_update

__all__ = ["L3", "L4", "OPT", "HEADER_BYTES", "rewrite_frame", "ts_range", "sack_range",
           "desc_for", "random_desc", "zero_desc", "merge_desc"]

L3 = ETH_LEN                        # 14: IPv4 header
L4 = L3 + IPV4_MIN_LEN              # 34: TCP header
OPT = L4 + TCP_MIN_LEN              # 54: TCP options
HEADER_BYTES = L4 + TCP_MAX_LEN     # 94: the bytes that may change

M32 = 0xFFFFFFFF


def ts_range(desc):
    """(first, end) frame bytes of the timestamp rewrite, or None when out of range."""
    off = desc["ts_offset"]
    return (off, off + 8) if OPT <= off <= HEADER_BYTES - 8 else None


def sack_range(desc):
    """(first, end) frame bytes of the SACK rewrite, or None when out of range."""
    off, blocks = desc["sack_offset"], desc["sack_blocks"]
    if 1 <= blocks <= 4 and off >= OPT and off + 8 * blocks <= HEADER_BYTES:
        return off, off + 8 * blocks
    return None


def _get32(buf, at):
    return int.from_bytes(buf[at:at + 4], "big")


def _put32(buf, at, value):
    buf[at:at + 4] = (value & M32).to_bytes(4, "big")


def _words(buf, first, end, skip):
    """Big-endian 16-bit words of ``buf[first:end]``, without the word at ``skip``."""
    return [int.from_bytes(buf[k:k + 2], "big") for k in range(first, end, 2) if k != skip]


def rewrite_frame(frame, desc):
    """The rewritten frame (see the module docstring of hw.splice_rewrite)."""
    frame = bytes(frame)
    n = len(frame)
    old = frame[:HEADER_BYTES] + bytes(max(0, HEADER_BYTES - n))  # missing bytes: zero
    new = bytearray(old)
    d = desc

    ETHERNET.dst.put(new, d["eth"]["dst"])
    ETHERNET.src.put(new, d["eth"]["src"])
    ttl = d["ip"]["ttl"] or max(0, IPV4.ttl.get(old, L3) - 1)
    IPV4.ttl.put(new, ttl, L3)
    IPV4.src.put(new, d["ip"]["src"], L3)
    IPV4.dst.put(new, d["ip"]["dst"], L3)
    TCP.sport.put(new, d["tcp"]["sport"], L4)
    TCP.dport.put(new, d["tcp"]["dport"], L4)
    TCP.seq.put(new, (TCP.seq.get(old, L4) + d["seq_delta"]) & M32, L4)
    TCP.ack.put(new, (TCP.ack.get(old, L4) + d["ack_delta"]) & M32, L4)
    window = (TCP.window.get(old, L4) << d["window_left"]) >> d["window_right"]
    TCP.window.put(new, min(0xFFFF, window), L4)

    ts = ts_range(d)
    if ts is not None:
        at = ts[0]
        _put32(new, at, _get32(old, at) + d["tsval_delta"])
        _put32(new, at + 4, _get32(old, at + 4) + d["tsecr_delta"])
    sack = sack_range(d)
    if sack is not None:               # after the timestamps: SACK bytes win an overlap
        for at in range(sack[0], sack[1], 4):
            _put32(new, at, _get32(old, at) + d["ack_delta"])

    ip_ck = L3 + IPV4.checksum.byte_offset
    IPV4.checksum.put(new, checksum_update(IPV4.checksum.get(old, L3),
                                           _words(old, L3, L4, ip_ck),
                                           _words(new, L3, L4, ip_ck)), L3)
    tcp_ck = L4 + TCP.checksum.byte_offset
    addr = L3 + IPV4.src.byte_offset          # 26: the pseudo-header's addresses
    old_words = _words(old, addr, L4, None) + _words(old, L4, HEADER_BYTES, tcp_ck)
    new_words = _words(new, addr, L4, None) + _words(new, L4, HEADER_BYTES, tcp_ck)
    TCP.checksum.put(new, checksum_update(TCP.checksum.get(old, L4), old_words, new_words), L4)
    return bytes(new[:n]) + frame[HEADER_BYTES:]


# --- Descriptors ----------------------------------------------------------------------------

def zero_desc():
    return {"eth": {"dst": 0, "src": 0}, "ip": {"src": 0, "dst": 0, "ttl": 0},
            "tcp": {"sport": 0, "dport": 0}, "seq_delta": 0, "ack_delta": 0,
            "tsval_delta": 0, "tsecr_delta": 0, "window_left": 0, "window_right": 0,
            "ts_offset": 0, "sack_offset": 0, "sack_blocks": 0}


def merge_desc(base, values):
    """``base`` with ``values`` (nested dicts allowed, partial) written over it."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in values.items():
        if k not in out:
            raise KeyError(f"no field {k!r} in REWRITE")
        if isinstance(v, dict):
            unknown = set(v) - set(out[k])
            if unknown:
                raise KeyError(f"no field(s) {sorted(unknown)} in REWRITE.{k}")
            out[k].update(v)
        else:
            out[k] = v
    return out


def random_desc(rng, positions=True):
    """A random descriptor. With ``positions`` the option positions are random too
    (often in range, sometimes out of it or overlapping); without, they are zero."""
    d = {"eth": {"dst": rng.getrandbits(48), "src": rng.getrandbits(48)},
         "ip": {"src": rng.getrandbits(32), "dst": rng.getrandbits(32),
                "ttl": rng.choice([0, 0, 1, 255, rng.getrandbits(8)])},
         "tcp": {"sport": rng.getrandbits(16), "dport": rng.getrandbits(16)},
         "seq_delta": rng.getrandbits(32), "ack_delta": rng.getrandbits(32),
         "tsval_delta": rng.getrandbits(32), "tsecr_delta": rng.getrandbits(32),
         "window_left": rng.choice([0, 0, rng.getrandbits(4)]),
         "window_right": rng.choice([0, 0, rng.getrandbits(4)]),
         "ts_offset": 0, "sack_offset": 0, "sack_blocks": 0}
    if positions:
        d["ts_offset"] = rng.choice([0, rng.randrange(OPT, 87), rng.randrange(OPT, 87),
                                     rng.getrandbits(8), rng.choice([53, 54, 86, 87, 255])])
        d["sack_blocks"] = rng.choice([0, 1, 2, 3, 4, rng.getrandbits(3)])
        d["sack_offset"] = rng.choice([rng.randrange(OPT, 95 - 8 * max(1, min(4, d["sack_blocks"]))),
                                       rng.getrandbits(8), rng.choice([0, 53, 54, 55, 62, 63])])
    return d


def desc_for(meta, rng=None, **values):
    """A descriptor for the frame whose ``parse_frame`` record is ``meta``: the option
    positions as the splice engine takes them from the parser (timestamps only when
    present), the other fields random with ``rng`` (zero without), ``values`` last."""
    d = random_desc(rng, positions=False) if rng is not None else zero_desc()
    opt = meta["opt"]
    d["ts_offset"] = opt["ts_offset"] if opt["ts_valid"] else 0
    d["sack_offset"], d["sack_blocks"] = opt["sack_offset"], opt["sack_blocks"]
    return merge_desc(d, values)
