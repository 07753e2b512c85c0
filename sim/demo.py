"""The main job: the NIC's packet pipeline serving a realistic traffic mix.

``acceltcp demo`` (``make demo``):

1. builds a traffic mix with scapy (``sim.traffic``): TCP handshakes with real
   stacks' option layouts, data segments of 0..1460 bytes, ACK/FIN/RST, frames that
   must pass to the host (ARP, IPv6, UDP, ICMP, fragments) and corrupted frames;
2. **RX**: runs every frame through the parser (``hw.parser.Parser``) back to back,
   checks each metadata record against the reference model and counts frames per
   class and errors caught;
3. **TX replies**: for every good TCP segment the parser reported, describes the
   segment a TCP endpoint answers with (SYN-ACK with options that answer the
   peer's, ACK of data and FIN, with timestamp echo) and has the TX builder
   (``hw.builder.TxBuilder``) build it; scapy checks every frame and checksum;
4. **TX host frames**: sends host-built frames with blank checksums through the
   checksum inserter (``hw.checksum_insert.ChecksumInserter``); scapy checks them;
5. **connection setup offload** through the whole NIC (``hw.datapath.Datapath``): scapy
   clients with different stacks' options open connections (SYN-ACKs with keyed
   cookies, checked by scapy; established events; data to the host; flows in the
   connection table), then a SYN flood at line rate and forged final ACKs;
6. prints a report: frames per class, errors caught, beats per cycle, the connections
   and the flood's counters, simulated cycles per second.

Each stage is one job (``sim.jobs``) on the chosen simulator: the built-in Amaranth
simulator by default, ``--sim verilator`` for speed.
"""

import random
import sys
import time
from collections import Counter

from hw.headers import TcpFlags
from hw.metadata import ERROR_FLAGS, PARSER_META, TX_HEADER, FrameClass
from hw.stream import beats_to_frame, frame_to_beats, pack_struct, unpack_struct
from sim.bus import StreamSink, StreamSource, run_until
from sim.reference import parse_frame
from sim.traffic import traffic_mix

__all__ = ["main", "rx_job", "tx_build_job", "tx_complete_job", "reply_header"]

DEFAULT_FRAMES = 200
NIC_MSS, NIC_WSCALE = 1460, 7


#: The setup-offload phase: clients that complete handshakes, SYNs in the flood, forged ACKs.
SETUP_CLIENTS, SETUP_FLOOD, SETUP_FORGED = 8, 200, 200
#: How each scenario of the teardown phase (tb.demo_teardown.SCENARIOS) must end.
EXPECTED_CLOSE_REASONS = ["NORMAL", "NORMAL", "NORMAL", "RESET", "TIMEOUT", "DATA", "NORMAL",
                          "NORMAL"]


def _progress(label, total, unit):
    def show(done, cycle):
        print(f"  {label}: {done}/{total} {unit}, {cycle} cycles", flush=True)
    return show


async def _run_stream_job(bus, sources, sinks, count_sink, expected, label, unit):
    """Clock until ``count_sink`` has ``expected`` items, printing progress."""
    show = _progress(label, expected, unit)
    step = max(1, expected // 5)
    shown = [0]

    def done():
        n = count_sink()
        if n >= shown[0] + step and n < expected:
            shown[0] = n - n % step
            show(shown[0], bus.cycle)
        return n >= expected

    agents = list(sources) + list(sinks)
    return await run_until(bus, agents, done, max_cycles=100_000_000)


async def rx_job(bus, width, frames):
    """Parser: frames (hex) in back to back; returns the metadata records and timing."""
    raw = [bytes.fromhex(f) for f in frames]
    src = StreamSource(bus, "i")
    out = StreamSink(bus, "o")
    meta = StreamSink(bus, "meta")
    for frame in raw:
        src.send(frame_to_beats(frame, width))
    cycles = await _run_stream_job(bus, [src], [out, meta], lambda: len(meta.received),
                                   len(raw), "RX", "frames")
    return {"records": meta.received, "out_frames_ok": beats_to_frame(out.received, width) == b"".join(raw),
            "beats": src.sent, "first_cycle": src.sent_cycles[0], "last_cycle": src.sent_cycles[-1],
            "cycles": cycles}


class _Frames:
    """Cuts the beats a sink received into frames (hex), as they arrive."""

    def __init__(self, sink, width):
        self.sink, self.width = sink, width
        self.frames, self._beats = [], []

    def count(self):
        while self.sink.received:
            beat = self.sink.received.pop(0)
            self._beats.append(beat)
            if beat >> (self.width + self.width // 8) & 1:          # `last`
                self.frames.append(beats_to_frame(self._beats, self.width).hex())
                self._beats.clear()
        return len(self.frames)

    def result(self, cycles):
        stamps = self.sink.received_cycles
        return {"frames": self.frames, "beats": len(stamps), "first_cycle": stamps[0],
                "last_cycle": stamps[-1], "cycles": cycles}


async def tx_build_job(bus, width, headers, payloads):
    """TX builder: header records (ints) and payloads (hex) in; frames (hex) out."""
    hdr = StreamSource(bus, "header")
    pay = StreamSource(bus, "payload")
    out = _Frames(StreamSink(bus, "o"), width)
    hdr.send(headers)
    for p in payloads:
        if p:
            pay.send(frame_to_beats(bytes.fromhex(p), width))
    cycles = await _run_stream_job(bus, [hdr, pay], [out.sink], out.count, len(headers),
                                   "TX builder", "frames")
    return out.result(cycles)


async def tx_complete_job(bus, width, frames):
    """Checksum inserter: host frames (hex) in, completed frames (hex) out."""
    src = StreamSource(bus, "i")
    out = _Frames(StreamSink(bus, "o"), width)
    for f in frames:
        src.send(frame_to_beats(bytes.fromhex(f), width))
    cycles = await _run_stream_job(bus, [src], [out.sink], out.count, len(frames),
                                   "TX checksum insert", "frames")
    return out.result(cycles)


def reply_header(meta, payload_len=0):
    """The TX_HEADER of the segment a TCP endpoint sends in answer to ``meta``, or None."""
    tcp, ip, opt, eth = meta["tcp"], meta["ip"], meta["opt"], meta["eth"]
    flags = tcp["flags"]
    if flags & TcpFlags.RST:
        return None
    seg_len = meta["payload_length"] + bool(flags & TcpFlags.SYN) + bool(flags & TcpFlags.FIN)
    if flags & TcpFlags.SYN and flags & TcpFlags.ACK:
        return None                      # a SYN-ACK is answered by the client's stack, not here
    reply = {
        "eth": {"dst": eth["src"], "src": eth["dst"]},
        "ip": {"src": ip["dst"], "dst": ip["src"], "ttl": 64, "identification": 0, "df": 1},
        "tcp": {"sport": tcp["dport"], "dport": tcp["sport"], "window": 65535,
                "ack": (tcp["seq"] + seg_len) & 0xFFFFFFFF},
        "opt": {},
        "payload_length": payload_len,
    }
    if flags & TcpFlags.SYN:
        reply["tcp"]["flags"] = TcpFlags.SYN | TcpFlags.ACK
        reply["tcp"]["seq"] = random.Random(tcp["seq"]).getrandbits(32)
        reply["opt"] = {"mss_valid": 1, "mss": min(NIC_MSS, opt["mss"] or 536),
                        "sack_perm": opt["sack_perm"],
                        "wscale_valid": opt["wscale_valid"], "wscale": NIC_WSCALE if opt["wscale_valid"] else 0}
    elif seg_len == 0:
        return None                      # a pure ACK is not answered
    else:
        reply["tcp"]["flags"] = TcpFlags.ACK
        reply["tcp"]["seq"] = tcp["ack"]
    if opt["ts_valid"]:
        reply["opt"].update(ts_valid=1, tsval=0x10000 + meta["frame_length"], tsecr=opt["tsval"])
    return reply


def _check_reply(frame, header):
    """scapy's view of a built frame agrees with its header and checksums."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    pkt = Ether(frame)
    if IP not in pkt or TCP not in pkt:
        return False
    ip, tcp = pkt[IP], pkt[TCP]
    want_ip, want_tcp = ip.chksum, tcp.chksum
    del ip.chksum, tcp.chksum
    again = Ether(bytes(pkt))
    return (again[IP].chksum == want_ip and again[TCP].chksum == want_tcp
            and tcp.seq == header["tcp"]["seq"] and tcp.ack == header["tcp"]["ack"]
            and int(tcp.flags) == header["tcp"]["flags"])


def _checksums_ok(frame):
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    pkt = Ether(frame)
    if IP not in pkt:
        return True
    layers = [IP] + [L for L in (TCP,) if L in pkt and not (pkt[IP].flags.MF or pkt[IP].frag)]
    fields = {L: pkt[L].chksum for L in layers}
    for L in layers:
        del pkt[L].chksum
    again = Ether(bytes(pkt))
    return all(again[L].chksum == fields[L] for L in layers)


def _host_frames(mix):
    """Good IPv4 frames as a host would hand them over: checksums left blank."""
    from hw.headers import IPV4, TCP as TCP_HDR
    out = []
    for label, frame in mix:
        meta = parse_frame(frame)
        if any(meta["errors"].values()) or not meta["ip"]["ihl"]:
            continue
        b = bytearray(frame)
        IPV4.checksum.put(b, 0, meta["l3_offset"])
        if meta["frame_class"] == FrameClass.TCP:
            TCP_HDR.checksum.put(b, 0, meta["l4_offset"])
        out.append(bytes(b))
    return out


def _rate(result):
    return result["beats"] / max(1, result["last_cycle"] - result["first_cycle"] + 1)


def main(args):
    from sim.jobs import run_job
    from hw.parser import Parser
    from hw.builder import TxBuilder
    from hw.checksum_insert import ChecksumInserter

    width = getattr(args, "width", None) or 64
    sim = args.sim
    count = args.frames or DEFAULT_FRAMES
    seed = args.seed if args.seed is not None else 1
    waves = args.waves
    started = time.perf_counter()
    print(f"AccelTCP NIC model: packet pipeline demo (W={width}, simulator: {sim})")
    print(f"Building {count} frames with scapy (seed {seed}) ...", flush=True)
    mix = traffic_mix(count, seed=seed)
    frames = [f for _, f in mix]
    total_bytes = sum(len(f) for f in frames)

    # ---- RX
    print(f"RX: {count} frames, {total_bytes} bytes through the parser ...", flush=True)
    rx = run_job(Parser, {"width": width}, rx_job, sim=sim,
                 job_args={"width": width, "frames": [f.hex() for f in frames]}, waves=waves)
    records = [unpack_struct(PARSER_META, r) for r in rx.value["records"]]
    agree = sum(rec == parse_frame(f) for rec, f in zip(records, frames))
    classes = Counter(FrameClass(r["frame_class"]).name for r in records)
    class_bytes = Counter()
    for r in records:
        class_bytes[FrameClass(r["frame_class"]).name] += r["frame_length"]
    errors = Counter(name for r in records for name, bit in r["errors"].items() if bit)
    flagged = sum(any(r["errors"].values()) for r in records)
    offload = sum(r["frame_class"] == FrameClass.TCP and not any(r["errors"].values()) for r in records)

    # ---- TX replies
    replies = []
    for r in records:
        if r["frame_class"] == FrameClass.TCP and not any(r["errors"].values()):
            h = reply_header(r)
            if h is not None:
                replies.append(h)
    print(f"TX: {len(replies)} reply segments through the builder ...", flush=True)
    tx = None
    if replies:
        tx = run_job(TxBuilder, {"width": width}, tx_build_job, sim=sim,
                     job_args={"width": width, "headers": [pack_struct(TX_HEADER, **h) for h in replies],
                               "payloads": ["" for _ in replies]})
        built = [bytes.fromhex(f) for f in tx.value["frames"]]
        replies_ok = sum(_check_reply(f, h) for f, h in zip(built, replies))
        reply_kinds = Counter("SYN-ACK" if h["tcp"]["flags"] & TcpFlags.SYN else "ACK" for h in replies)

    # ---- TX host frames
    host = _host_frames(mix)
    print(f"TX: {len(host)} host frames with blank checksums through the checksum inserter ...", flush=True)
    ins = run_job(ChecksumInserter, {"width": width}, tx_complete_job, sim=sim,
                  job_args={"width": width, "frames": [f.hex() for f in host]})
    completed = [bytes.fromhex(f) for f in ins.value["frames"]]
    completed_ok = sum(_checksums_ok(f) for f in completed)

    # ---- connection setup offload through the whole NIC
    from hw.datapath import Datapath
    from tb.test_nic import demo_setup
    print(f"NIC: {SETUP_CLIENTS} clients open connections through the setup offload, "
          f"then a {SETUP_FLOOD}-SYN flood and {SETUP_FORGED} forged ACKs ...", flush=True)
    nic = run_job(Datapath, {"width": width, "entries": 4096}, demo_setup, sim=sim,
                  job_args={"width": width, "clients": SETUP_CLIENTS, "flood": SETUP_FLOOD,
                            "forged": SETUP_FORGED})
    setup = nic.value
    from tb.demo_teardown import SCENARIOS, TIMERS, demo_teardown
    print(f"NIC: {len(SCENARIOS)} connections closed by the teardown offload ...", flush=True)
    closing = run_job(Datapath, {"width": width, "entries": 4096}, demo_teardown, sim=sim,
                      job_args={"width": width})
    teardown = closing.value
    from tb.demo_splice import RESPONSE_BYTES, demo_splice
    print(f"NIC: a proxy splices a client and a back end; a {RESPONSE_BYTES}-byte response "
          "relayed ...", flush=True)
    splicing = run_job(Datapath, {"width": width, "entries": 4096}, demo_splice, sim=sim,
                       job_args={"width": width})
    splice = splicing.value
    from host_driver.apps import format_host_work
    from tb.test_driver import host_work_job
    host_work = serving = None
    if not getattr(args, "no_host", False):
        print("NIC + host driver: echo and key-value servers on the driver's socket API, "
              "scapy clients, through the PCIe link model, with and without the offloads "
              "(the whole NIC: the slowest phase) ...", flush=True)
        host_work, serving = host_work_job(sim=sim, transactions=1)

    # ---- report
    line = "-" * 64
    print()
    print(line)
    print(f" AccelTCP NIC model - packet pipeline report (W={width}, {sim})")
    print(line)
    print(f" Traffic: {count} frames, {total_bytes} bytes (seed {seed})")
    print()
    print(" RX parser")
    print(f"   {'class':<12}{'frames':>8}{'bytes':>10}")
    for name in [c.name for c in FrameClass]:
        if classes[name]:
            print(f"   {name:<12}{classes[name]:>8}{class_bytes[name]:>10}")
    print(f"   offload candidates (TCP, no error): {offload}")
    print(f"   frames flagged with errors: {flagged}")
    for name in ERROR_FLAGS:
        if errors[name]:
            print(f"     {name:<20}{errors[name]:>6}")
    print(f"   records matching the reference model: {agree}/{count}"
          f"{'' if agree == count else '  <-- MISMATCH'}")
    print(f"   frames passed through unchanged: {'yes' if rx.value['out_frames_ok'] else 'NO'}")
    print(f"   beats per cycle (input, back to back): {_rate(rx.value):.3f}")
    print()
    if tx is not None:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(reply_kinds.items()))
        print(f" TX builder: {len(replies)} replies ({kinds})")
        print(f"   frames and checksums verified by scapy: {replies_ok}/{len(replies)}")
        print(f"   beats per cycle (output): {_rate(tx.value):.3f}")
        print()
    print(f" TX checksum inserter: {len(host)} host frames")
    print(f"   checksums verified by scapy: {completed_ok}/{len(completed)}")
    print(f"   beats per cycle (output): {_rate(ins.value):.3f}")
    print()
    print(f" NIC setup offload (hw/nic.py): {len(setup['connections'])} of {SETUP_CLIENTS} "
          f"clients established in {setup['handshake_cycles']} cycles")
    for c in setup["connections"]:
        scale = (f"wscale {c['wscale'][0]}/{c['wscale'][1]}" if c["wscale"]
                 else "no wscale")                       # the client's / ours
        print(f"   {c['client']:>21} -> :{c['server_port']:<5} {c['layout']:<14} mss {c['mss']:<5}"
              f" {scale:<12} sack {'yes' if c['sack'] else 'no ':<4} ts {'yes' if c['ts'] else 'no '}"
              f"  data {c['data_bytes']} B")
    print("   (listeners: :80 timestamps, SACK, window scale 7; :443 timestamps, window scale 9,"
          " no SACK;\n    :6379 no timestamps, hence MSS only: without timestamps a cookie"
          " keeps no other option)")
    print(f"   flows in the connection table: {setup['flows']}; frames to the host: "
          f"{setup['host_frames']}")
    print(f"   SYN flood: {setup['flood_syns']} SYNs back to back -> {setup['flood_synacks']} "
          f"SYN-ACKs in {setup['flood_cycles']} cycles; flows after it: "
          f"{setup['flows_after_flood']} (no state per SYN)")
    print(f"   forged final ACKs: {setup['forged']}, accepted: {setup['forged_accepted']}")
    print("   counters: " + ", ".join(f"{k} {v}" for k, v in setup["counters"].items()))
    print()
    print(f" NIC teardown offload (hw/teardown.py): {len(teardown['rows'])} closes handed over "
          f"by the host, done in {teardown['cycles']} cycles")
    print(f"   timers (cycles): FIN RTO {TIMERS['fin_rto']} doubling, {TIMERS['fin_retries']} "
          f"retransmissions; TIME_WAIT {TIMERS['time_wait']}")
    print(f"   {'scenario':<17}{'held':>5}  {'CLOSE':<20}{'ended':<9}{'retx':>5}{'in':>4}"
          f"{'out':>4}  NIC sent")
    for row in teardown["rows"]:
        print(f"   {row['scenario']:<17}{row['held_bytes']:>5}  {'/'.join(row['status']):<20}"
              f"{row['reason']:<9}{row['retransmits']:>5}{row['segments_in']:>4}"
              f"{row['segments_out']:>4}  {' '.join(row['sent'])}")
    print(f"   closing flows left: {teardown['closing_after']}; table flows left: "
          f"{teardown['flows_after']}")
    print("   counters: " + ", ".join(f"{k} {v}" for k, v in teardown["counters"].items()))
    print()
    print(f" NIC splicing (hw/splice.py, hw/splice_rewrite.py): SPLICE {splice['status']}, "
          f"ended {splice['ended']} after {splice['cycles']} cycles")
    print(f"   client {splice['client']} (wscale {splice['client_wscale']}) <-> proxy <-> "
          f"server {splice['server']} (wscale {splice['server_wscale']}); proxy wscale "
          f"{splice['proxy_wscale'][0]}/{splice['proxy_wscale'][1]}; timestamps both sides")
    print(f"   relayed: client -> server {splice['packets_a']} segments, {splice['bytes_a']} B;"
          f" server -> client {splice['packets_b']} segments, {splice['bytes_b']} B")
    print(f"   frames relayed {splice['frames_relayed']}/{splice['frames_sent']}, rewrites "
          f"verified by scapy {splice['frames_checked']}; host frames {splice['host_frames']}, "
          f"host DMA bytes {splice['host_bytes']}")
    print("   counters: " + ", ".join(f"{k} {v}" for k, v in splice["counters"].items()))
    print()
    if host_work is not None:
        print(" NIC + host driver (hw/nic.py, host_driver/): host work per transaction, "
              "averaged")
        print("   " + format_host_work(host_work).replace("\n", "\n   "))
        print("   (events, DMA bytes and MMIO accesses the host sees; host packets: frames "
              "through its RX and TX rings)")
        print()
    jobs = [rx, ins, nic, closing, splicing] + ([tx] if tx is not None else [])
    jobs += [serving] if serving is not None else []
    cycles = sum(j.cycles for j in jobs)
    seconds = sum(j.seconds for j in jobs)
    print(f" Simulation: {cycles} cycles in {seconds:.1f} s of simulation "
          f"({cycles / max(seconds, 1e-9):,.0f} cycles/s on {sim}); "
          f"{time.perf_counter() - started:.1f} s in all")
    if waves:
        print(f" Waveforms of the RX stage: {rx.waves or waves}")
    print(line)
    ok = (agree == count and rx.value["out_frames_ok"] and completed_ok == len(completed) == len(host)
          and (tx is None or replies_ok == len(replies) == len(tx.value["frames"]))
          and len(setup["connections"]) == SETUP_CLIENTS == setup["flows_after_flood"]
          and setup["flood_synacks"] == setup["flood_syns"] and setup["forged_accepted"] == 0
          and [r["reason"] for r in teardown["rows"]] == EXPECTED_CLOSE_REASONS
          and teardown["closing_after"] == 0 and teardown["flows_after"] == 0
          and splice["status"] == "OK" and splice["ended"] == "NORMAL"
          and splice["frames_checked"] == splice["frames_sent"] == splice["frames_relayed"]
          and splice["host_bytes"] == 0 and splice["spliced_after"] == 0)
    if not ok:
        print(" RESULT: MISMATCHES FOUND (see above)", file=sys.stderr)
        return 1
    return 0
