"""The connection-splicing phase of ``acceltcp demo``: an L7 proxy hands its two
connections to the NIC.

A client (peer A) has sent a request to the proxy, the proxy has forwarded it to a back
end (peer B) on a second connection and both are acknowledged. The host sends one SPLICE
command; then the rest of the exchange never touches the host: the client's last request
bytes, the back end's response in MSS-sized segments, the client's ACKs (some with SACK
blocks), and the FINs of both sides, all relayed and rewritten by the NIC. Every relayed
frame is checked with scapy against the splice arithmetic; the job returns what the
report shows.
"""

from hw.metadata import EventKind, SpliceEnd, SpliceStatus
from hw.splice import SpCounter
from tb.test_splice import M32, SpliceBench, check_relayed, expected_relay

__all__ = ["demo_splice", "RESPONSE_BYTES", "TIMERS"]

#: The back end's response, relayed to the client.
RESPONSE_BYTES = 8 * 1448

#: Timer settings of the demo (the splice ends LINGER ticks after both FINs are
#: acknowledged); short, so that the demo stays short.
TIMERS = {"tick_period": 16, "linger": 8, "idle_timeout": 4000}


async def demo_splice(bus, width, seed=11):
    bench = SpliceBench(bus, width, stall=0.0, seed=seed, entries=4096)
    for name, value in TIMERS.items():
        bus.set(name, value)
    await bench.setup()
    rng = bench.rng
    a, b = bench.peers()
    start = bus.cycle
    bench.splice_cmd(a, b, tag=42)
    await bench.until(lambda: len(bench.events()) == 1)
    status = bench.events()[0]
    sent, wants = [], []

    def send(src, dst, **kw):
        frame = src.segment(**kw)
        sent.append(frame)
        wants.append(expected_relay(frame, src, dst))
        if "seq" not in kw:
            dst.rcv_nxt = (dst.rcv_nxt + len(kw.get("payload", b"")) + ("F" in kw.get("flags", "")))
            dst.rcv_nxt &= M32

    send(a, b, payload=b"Accept: */*\r\n\r\n", flags="PA")
    send(b, a, flags="A")
    left = RESPONSE_BYTES
    k = 0
    while left:
        size = min(1448, left)
        send(b, a, payload=rng.randbytes(size), flags="PA" if size == left else "A")
        left -= size
        k += 1
        if k % 4 == 0:         # the client acknowledges; every other ACK has a SACK block
            sack = ([(a.rcv_nxt + 1448) & M32, (a.rcv_nxt + 2896) & M32] if k % 8 == 0 else ())
            send(a, b, sack=sack)
    send(a, b, flags="FA")
    send(b, a, flags="FA")
    send(a, b, flags="A")
    bench.send(sent)
    await bench.until(lambda: len(bench.events()) == 2, max_cycles=200000)
    checked = 0
    for frame, want in zip(bench.mac_tx.frames, wants):
        check_relayed(frame, want)
        checked += 1
    done = bench.events()[1]
    await bench.settle()
    counters = {c.name.lower(): bench.counter(c) for c in SpCounter if bench.counter(c)}
    return {
        "status": SpliceStatus(status["status"]).name,
        "ended": SpliceEnd(done["status"]).name if done["kind"] == EventKind.SPLICE_DONE else "?",
        "frames_sent": len(sent),
        "frames_relayed": len(bench.mac_tx.frames),
        "frames_checked": checked,
        "client": f"{a.ip}:{a.port}", "server": f"{b.ip}:{b.port}",
        "client_wscale": a.wscale, "server_wscale": b.wscale,
        "proxy_wscale": (a.proxy_wscale, b.proxy_wscale),
        "packets_a": done["packets_a"], "bytes_a": done["bytes_a"],
        "packets_b": done["packets_b"], "bytes_b": done["bytes_b"],
        "host_frames": len(bench.host_rx.frames),
        "host_bytes": sum(len(f) for f in bench.host_rx.frames),
        "cycles": bus.cycle - start,
        "spliced_after": bench.bus.get("spliced"),
        "counters": counters,
    }
