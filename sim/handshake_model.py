"""Golden model of ``hw.handshake.HandshakeEngine``: the same decisions, field for field.

``HandshakeModel.process(meta, ingress=0, flow_hit=0)`` takes the parser metadata of one
frame (a dict as ``sim.reference.parse_frame`` returns it) and returns
``(verdict, reply, event)``: the ``VERDICT`` dict, the ``TX_HEADER`` dict of the SYN-ACK
or RST the NIC sends (or None) and the ``EVENT`` dict (or None), with every field the
RTL sets. The cookie is ``hw.syn_cookie`` (bit-exact); ``keys`` holds the key state and
the coarse counter, ``ts_clock`` the timestamp clock, as the RTL's inputs would.
"""

import collections

from hw.handshake import REPLY_TTL, Reason
from hw.headers import TcpFlags
from hw.metadata import EventKind, FrameClass
from hw.syn_cookie import (DEFAULT_MSS, MAX_WSCALE, MSS_TABLE, TS_OPTION_BITS, TS_SACK,
                           WSCALE_NONE, CookieKeys, mss_index)

__all__ = ["HandshakeModel", "listener"]

#: Reasons decided before the listener and cookie logic (not overridden for recent flows).
PASSED = {Reason.NOT_TCP, Reason.PARSE_ERROR, Reason.VLAN, Reason.FLOW, Reason.NO_LISTENER,
          Reason.NOT_OFFLOADED}

MASK32 = 0xFFFFFFFF


def listener(port, ip=0, offload=True, mss=1460, wscale=7, wscale_ok=True, sack_ok=True,
             ts_ok=True, window=65535):
    """A ``LISTEN_ENTRY`` dict (valid)."""
    return {"valid": 1, "offload": int(offload), "ip": ip, "port": port, "mss": mss,
            "wscale_ok": int(wscale_ok), "wscale": wscale, "sack_ok": int(sack_ok),
            "ts_ok": int(ts_ok), "window": window}


class HandshakeModel:
    """``recent``: the engine's memory of the last connections it established (their
    later segments go to the host); the model keeps the last ``recent`` of them and, not
    knowing the clock, assumes that they arrive within ``RECENT_CYCLES``."""

    def __init__(self, listeners=16, recent=16):
        self.recent = collections.deque(maxlen=recent)
        self.listeners = [None] * listeners
        self.keys = CookieKeys()
        self.ts_clock = 0
        self.rst_bad_cookie = False
        self.counters = {reason: 0 for reason in Reason}

    def write_listener(self, index, entry):
        self.listeners[index] = entry if entry and entry.get("valid") else None

    def lookup(self, ip, port):
        for index, entry in enumerate(self.listeners):
            if entry and entry["port"] == port and entry["ip"] in (0, ip):
                return index, entry
        return None, None

    def process(self, meta, ingress=0, flow_hit=0):
        verdict, reply, event = self._decide(meta, ingress, flow_hit)
        tcp, ip = meta["tcp"], meta["ip"]
        identity = (ingress, ip["src"], ip["dst"], tcp["sport"], tcp["dport"])
        if (identity in self.recent and verdict["reason"] not in PASSED
                and meta["frame_class"] == FrameClass.TCP):
            verdict, reply, event = {"to_host": 1, "reason": Reason.FLOW}, None, None
        if event is not None:
            self.recent.append(identity)
        self.counters[verdict["reason"]] += 1
        return verdict, reply, event

    def _decide(self, meta, ingress, flow_hit):
        tcp, ip, opt = meta["tcp"], meta["ip"], meta["opt"]
        flags = tcp["flags"]
        syn, ack, rst, fin = (bool(flags & f) for f in (TcpFlags.SYN, TcpFlags.ACK, TcpFlags.RST,
                                                         TcpFlags.FIN))

        def host(reason):
            return {"to_host": 1, "reason": reason}, None, None

        def drop(reason, reply=None):
            return {"to_host": 0, "reason": reason}, reply, None

        if meta["frame_class"] != FrameClass.TCP:
            return host(Reason.NOT_TCP)
        if any(meta["errors"].values()):
            return host(Reason.PARSE_ERROR)
        if meta["eth"]["vlan_valid"]:
            return host(Reason.VLAN)
        if flow_hit:
            return host(Reason.FLOW)
        index, entry = self.lookup(ip["dst"], tcp["dport"])
        if entry is None:
            if syn and not ack and not rst:
                ack_no = (tcp["seq"] + 1 + meta["payload_length"] + fin) & MASK32
                return drop(Reason.CLOSED_PORT,
                            self._reply(meta, seq=0, ack=ack_no, flags=TcpFlags.RST | TcpFlags.ACK))
            return host(Reason.NO_LISTENER)
        if not entry["offload"] or not self.keys.key_set:
            return host(Reason.NOT_OFFLOADED)
        connection = {"ingress": ingress, "peer_ip": ip["src"], "local_ip": ip["dst"],
                      "peer_port": tcp["sport"], "local_port": tcp["dport"]}
        if syn and not ack and not rst and not fin:
            ts_ok = bool(opt["ts_valid"] and entry["ts_ok"])
            wscale_ok = opt["wscale_valid"] and entry["wscale_ok"]
            options = ((min(opt["wscale"], MAX_WSCALE) if wscale_ok else WSCALE_NONE)
                       | (TS_SACK if opt["sack_perm"] and entry["sack_ok"] else 0))
            options = options if ts_ok else 0
            index_mss = mss_index(opt["mss"] if opt["mss_valid"] else DEFAULT_MSS)
            cookie = self.keys.make(mss_index=index_mss, peer_isn=tcp["seq"], ts_ok=ts_ok,
                                    ts_options=options, **connection)
            tsval = (self.ts_clock & ~((1 << TS_OPTION_BITS) - 1) & MASK32) | options
            reply = self._reply(meta, seq=cookie, ack=(tcp["seq"] + 1) & MASK32,
                                flags=TcpFlags.SYN | TcpFlags.ACK, window=entry["window"])
            reply["opt"] = {"mss_valid": 1, "mss": entry["mss"],
                            "wscale_valid": int(ts_ok and options & 0xF != WSCALE_NONE),
                            "wscale": entry["wscale"],
                            "sack_perm": int(ts_ok and bool(options & TS_SACK)),
                            "ts_valid": int(ts_ok), "tsval": tsval, "tsecr": opt["tsval"]}
            return drop(Reason.SYN_COOKIE, reply)
        if ack and not syn and not rst:
            iss = (tcp["ack"] - 1) & MASK32
            ts_ok = bool(opt["ts_valid"])
            options = opt["tsecr"] & ((1 << TS_OPTION_BITS) - 1) if ts_ok else 0
            index_mss = self.keys.check(iss, peer_isn=(tcp["seq"] - 1) & MASK32, ts_ok=ts_ok,
                                        ts_options=options, **connection)
            if index_mss is None:
                reply = (self._reply(meta, seq=tcp["ack"], ack=0, flags=TcpFlags.RST)
                         if self.rst_bad_cookie else None)
                return drop(Reason.COOKIE_BAD, reply)
            wscale_ok = ts_ok and (options & 0xF) != WSCALE_NONE
            event = {"kind": EventKind.ESTABLISHED, "ingress": ingress, "listener": index,
                     "eth": {"peer": meta["eth"]["src"], "local": meta["eth"]["dst"]},
                     "peer_ip": ip["src"], "local_ip": ip["dst"],
                     "peer_port": tcp["sport"], "local_port": tcp["dport"],
                     "iss": iss, "irs": (tcp["seq"] - 1) & MASK32, "mss": MSS_TABLE[index_mss],
                     "wscale_ok": int(wscale_ok),
                     "peer_wscale": options & 0xF if wscale_ok else 0,
                     "local_wscale": entry["wscale"] if wscale_ok else 0,
                     "sack_ok": int(ts_ok and bool(options & TS_SACK)), "ts_ok": int(ts_ok),
                     "ts_recent": opt["tsval"] if ts_ok else 0,
                     "ts_echo": opt["tsecr"] if ts_ok else 0,
                     "window": tcp["window"], "payload_length": meta["payload_length"]}
            to_host = int(meta["payload_length"] != 0 or fin)
            return {"to_host": to_host, "reason": Reason.COOKIE_OK}, None, event
        if syn and ack and not rst:
            return drop(Reason.LISTEN_SYNACK,
                        self._reply(meta, seq=tcp["ack"], ack=0, flags=TcpFlags.RST))
        return drop(Reason.LISTEN_DISCARD)

    @staticmethod
    def _reply(meta, *, seq, ack, flags, window=0):
        tcp, ip = meta["tcp"], meta["ip"]
        return {"eth": {"dst": meta["eth"]["src"], "src": meta["eth"]["dst"]},
                "ip": {"src": ip["dst"], "dst": ip["src"], "ttl": REPLY_TTL,
                       "identification": 0, "df": 1, "dscp": 0, "ecn": 0},
                "tcp": {"sport": tcp["dport"], "dport": tcp["sport"], "seq": seq, "ack": ack,
                        "flags": int(flags), "window": window},
                "opt": {"mss_valid": 0, "mss": 0, "wscale_valid": 0, "wscale": 0,
                        "sack_perm": 0, "ts_valid": 0, "tsval": 0, "tsecr": 0},
                "payload_length": 0}
