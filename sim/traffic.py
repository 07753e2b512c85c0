"""Realistic and hostile traffic, built with scapy, for the demo, the benches and the tests.

``traffic_mix(n, seed)`` returns ``n`` labelled frames: TCP handshakes with the option
layouts real stacks send (Linux, Windows, macOS, bare, MSS only, unknown options),
data segments of 0..1460 bytes, ACK/FIN/RST, VLAN-tagged frames and IPv4 options;
traffic that must pass to the host (ARP, IPv6, UDP, ICMP, fragments); and corrupted
frames (bad checksums, truncations, bad IHL or data offset, malformed options, runts,
garbage, oversized). Every frame carries a label saying what it is meant to be, so a
report can show what the parser made of each kind.

Addresses are documentation addresses (RFC 5737): 192.0.2.0/24 and 198.51.100.0/24.
"""

import random

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from hw.headers import ETHERNET, IPV4, TCP as TCP_HDR, ETH_LEN

__all__ = ["SYN_OPTION_LAYOUTS", "traffic_mix", "tcp_frame", "GOOD_LABELS", "pad"]

CLIENT_NET = "192.0.2."
SERVER_NET = "198.51.100."
NIC_MAC = "02:00:00:00:00:01"
HOST_MAC = "02:00:00:00:00:02"

#: TCP option lists that real stacks put in their SYNs (scapy spelling).
SYN_OPTION_LAYOUTS = {
    "linux": [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (0x1234, 0)), ("NOP", None), ("WScale", 10)],
    "windows": [("MSS", 1460), ("NOP", None), ("WScale", 8), ("NOP", None), ("NOP", None), ("SAckOK", b"")],
    "macos": [("MSS", 1460), ("NOP", None), ("WScale", 6), ("NOP", None), ("NOP", None),
              ("Timestamp", (0x55AA, 0)), ("SAckOK", b""), ("EOL", None)],
    "none": [],
    "mss_only": [("MSS", 536)],
    "unknown_kinds": [("MSS", 1300), (30, b"\x01\x02"), ("NOP", None), (254, b"\xf9\x89abcd"),
                      ("WScale", 2)],
}

#: Labels of frames that are well formed (the parser must report no error).
GOOD_LABELS = {"syn", "synack", "ack", "data", "fin", "rst", "vlan_data", "ip_options",
               "arp", "ipv6", "udp", "icmp", "fragment"}


def pad(frame):
    """Pad to the Ethernet minimum (60 bytes without FCS), as a MAC does."""
    frame = bytes(frame)
    return frame + bytes(max(0, 60 - len(frame)))


def _addrs(rng):
    return (CLIENT_NET + str(rng.randrange(1, 255)), SERVER_NET + str(rng.randrange(1, 255)),
            rng.randrange(1024, 65536), rng.choice([80, 443, 6379, 8080]))


def tcp_frame(rng, flags, payload=b"", options=None, vlan=None, ip_options=None, reverse=False):
    src, dst, sport, dport = _addrs(rng)
    if reverse:
        src, dst, sport, dport = dst, src, dport, sport
    eth = Ether(src="02:00:00:00:00:%02x" % rng.randrange(2, 255), dst=NIC_MAC)
    l2 = eth / Dot1Q(vlan=vlan, prio=rng.randrange(8)) if vlan is not None else eth
    ip = IP(src=src, dst=dst, ttl=rng.choice([64, 128, 255]), id=rng.randrange(65536),
            flags="DF", options=ip_options or [])
    tcp = TCP(sport=sport, dport=dport, flags=flags, seq=rng.getrandbits(32),
              ack=rng.getrandbits(32) if "A" in flags else 0,
              window=rng.randrange(65536), options=options or [])
    return pad(l2 / ip / tcp / Raw(payload) if payload else l2 / ip / tcp)


def _payload(rng, n):
    return rng.randbytes(n)


def _corrupt(rng, frame, kind):
    """Return a corrupted copy of a good TCP frame (no VLAN, no IP options)."""
    b = bytearray(frame)
    l3 = ETH_LEN
    ihl = IPV4.ihl.get(b, l3)
    l4 = l3 + 4 * ihl
    if kind == "bad_ip_checksum":
        IPV4.checksum.put(b, IPV4.checksum.get(b, l3) ^ 0x0100, l3)
    elif kind == "bad_tcp_checksum":
        b[rng.randrange(l4, l3 + IPV4.total_length.get(b, l3))] ^= 0x40
    elif kind == "truncated":
        b = b[:rng.randrange(1, l3 + IPV4.total_length.get(b, l3))]
    elif kind == "bad_ihl":
        IPV4.ihl.put(b, rng.choice([0, 1, 3, 4]), l3)
    elif kind == "bad_data_offset":
        TCP_HDR.data_offset.put(b, rng.choice([0, 2, 4]), l4)
    elif kind == "malformed_options":
        # An option whose length runs past the end of the TCP header.
        doff = TCP_HDR.data_offset.get(b, l4)
        if doff > 5:
            b[l4 + 20] = 2
            b[l4 + 21] = 4 * doff - 20 + 2
    elif kind == "runt":
        b = b[:rng.randrange(1, 14)]
    elif kind == "garbage":
        b = bytearray(rng.randbytes(rng.randrange(1, 200)))
        if rng.random() < 0.5:       # keep an IPv4 EtherType so the IP path sees garbage
            ETHERNET.ethertype.put(b, 0x0800) if len(b) >= 14 else None
    elif kind == "oversize":
        b = bytearray(tcp_frame(rng, "PA", _payload(rng, rng.randrange(1465, 2000))))
    elif kind == "length_mismatch":
        b += rng.randbytes(rng.randrange(1, 40))
    return bytes(b)


CORRUPTIONS = ["bad_ip_checksum", "bad_tcp_checksum", "truncated", "bad_ihl", "bad_data_offset",
               "malformed_options", "runt", "garbage", "oversize", "length_mismatch"]


def traffic_mix(n, seed=1, bad_fraction=0.15):
    """``n`` (label, frame) pairs; about ``bad_fraction`` of them corrupted."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < bad_fraction:
            kind = rng.choice(CORRUPTIONS)
            base = tcp_frame(rng, "PA", _payload(rng, rng.randrange(0, 200)),
                             options=[("Timestamp", (rng.getrandbits(32), rng.getrandbits(32)))]
                             if rng.random() < 0.7 else None)
            out.append((kind, _corrupt(rng, base, kind)))
            continue
        r = rng.random()
        if r < 0.15:
            layout = rng.choice(list(SYN_OPTION_LAYOUTS))
            out.append(("syn", tcp_frame(rng, "S", options=SYN_OPTION_LAYOUTS[layout])))
        elif r < 0.20:
            out.append(("synack", tcp_frame(rng, "SA", reverse=True,
                                            options=SYN_OPTION_LAYOUTS["linux"])))
        elif r < 0.35:
            out.append(("ack", tcp_frame(rng, "A", options=[("NOP", None), ("NOP", None),
                                                            ("Timestamp", (rng.getrandbits(32), rng.getrandbits(32)))])))
        elif r < 0.60:
            size = rng.choice([rng.randrange(1, 64), rng.randrange(64, 1460), 1460, 1448])
            opts = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))] if rng.random() < 0.5 else []
            if rng.random() < 0.2:
                opts = opts + [("NOP", None), ("NOP", None),
                               ("SAck", tuple(rng.getrandbits(32) for _ in range(2 * rng.randrange(1, 3))))]
            size = min(size, 1460 - (len(TCP(options=opts)) - 20))   # MSS minus the options, as stacks do
            out.append(("data", tcp_frame(rng, "PA", _payload(rng, size), options=opts,
                                          reverse=rng.random() < 0.5)))
        elif r < 0.65:
            out.append(("fin", tcp_frame(rng, "FA", _payload(rng, rng.randrange(0, 100)))))
        elif r < 0.68:
            out.append(("rst", tcp_frame(rng, "R")))
        elif r < 0.72:
            out.append(("vlan_data", tcp_frame(rng, "PA", _payload(rng, rng.randrange(0, 600)),
                                               vlan=rng.randrange(1, 4095))))
        elif r < 0.75:
            out.append(("ip_options", tcp_frame(rng, "PA", _payload(rng, rng.randrange(0, 300)),
                                                ip_options=[b"\x94\x04\x00\x00"] * rng.randrange(1, 5))))
        elif r < 0.82:
            out.append(("arp", pad(Ether(dst="ff:ff:ff:ff:ff:ff", src=HOST_MAC) /
                                   ARP(psrc=CLIENT_NET + "7", pdst=SERVER_NET + "1"))))
        elif r < 0.87:
            out.append(("ipv6", pad(Ether(dst=NIC_MAC, src=HOST_MAC) / IPv6(src="2001:db8::1", dst="2001:db8::2") /
                                    TCP(flags="S"))))
        elif r < 0.93:
            out.append(("udp", pad(Ether(dst=NIC_MAC, src=HOST_MAC) / IP(src=CLIENT_NET + "3", dst=SERVER_NET + "4") /
                                   UDP(sport=5353, dport=53) / Raw(_payload(rng, rng.randrange(0, 500))))))
        elif r < 0.96:
            out.append(("icmp", pad(Ether(dst=NIC_MAC, src=HOST_MAC) / IP(src=CLIENT_NET + "3", dst=SERVER_NET + "4") /
                                    ICMP() / Raw(b"ping" * 8))))
        else:
            frag = IP(src=CLIENT_NET + "9", dst=SERVER_NET + "9", flags="MF", frag=0) / \
                TCP(flags="PA") / Raw(_payload(rng, 200))
            out.append(("fragment", pad(Ether(dst=NIC_MAC, src=HOST_MAC) / frag)))
    return out
