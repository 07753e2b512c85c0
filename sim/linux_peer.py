"""The real Linux TCP stack as a peer: a network namespace with a TAP device in it.

``LinuxPeer()`` is a context manager (DESIGN.md section 7). On entry it creates a network
namespace, a TAP device, moves the device into the namespace and gives it the Linux
side's address (``linux_ip``, 192.0.2.1/24 by default, a documentation address); our side
is ``our_ip`` (192.0.2.2) with MAC ``our_mac``. On exit (also after an error) it closes
the TAP device (which deletes it) and deletes the namespace. Nothing is routed out of
the namespace: its only interfaces are ``lo`` and the TAP device.

* ``read_frame(timeout)`` -> the next Ethernet frame Linux sent that is not handled
  here (ARP requests for ``our_ip`` are answered automatically), or None on timeout.
* ``write_frame(frame)``: one Ethernet frame to Linux (zero-padded to 60 bytes).
* ``start(target, *args)``: a thread that runs ``target`` inside the namespace (sockets
  it creates belong there); ``call(target, *args)`` runs it and returns its result.
* ``linux_mac``: the TAP device's MAC (what Linux sends from).
* ``linux_counters()``: the namespace's TCP counters (``TcpExt.PAWSEstab``, ...).

``unavailable()`` says why this machine cannot run it (None when it can): root, the
``ip`` tool and ``/dev/net/tun`` are needed. Only one thread may read frames.
"""

import contextlib
import ctypes
import fcntl
import itertools
import os
import select
import shutil
import struct
import subprocess
import threading

__all__ = ["LinuxPeer", "unavailable", "LINUX_IP", "OUR_IP", "OUR_MAC"]

LINUX_IP = "192.0.2.1"
OUR_IP = "192.0.2.2"
OUR_MAC = 0x02_00_00_00_00_02       # locally administered

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_CLONE_NEWNET = 0x40000000
_ETH_P_ARP = 0x0806
_names = itertools.count()


def unavailable():
    """Why a LinuxPeer cannot be created here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and TAP devices)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    if shutil.which("ip") is None:
        return "no 'ip' tool (iproute2)"
    return None


def _ip(*args, namespace=None):
    command = ["ip"] + (["-n", namespace] if namespace else []) + list(args)
    subprocess.run(command, check=True, capture_output=True, text=True)


def _setns(path):
    """Move the calling thread into the network namespace at ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
    finally:
        os.close(fd)


class LinuxPeer(contextlib.AbstractContextManager):
    def __init__(self, linux_ip=LINUX_IP, our_ip=OUR_IP, our_mac=OUR_MAC, prefix=24, mtu=1500):
        self.linux_ip, self.our_ip, self.our_mac = linux_ip, our_ip, our_mac
        self.prefix, self.mtu = prefix, mtu
        unique = f"{os.getpid()}-{next(_names)}"
        self.namespace = f"acceltcp-{unique}"
        self.device = f"atap{unique}"[:15]
        self.fd = None
        self.linux_mac = None
        self.arp_replies = 0

    # ------------------------------------------------------------------ setup / teardown
    def __enter__(self):
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        _ip("netns", "add", self.namespace)
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            fcntl.ioctl(self.fd, _TUNSETIFF,
                        struct.pack("16sH", self.device.encode(), _IFF_TAP | _IFF_NO_PI))
            _ip("link", "set", self.device, "netns", self.namespace)
            ns = self.namespace
            _ip("link", "set", "lo", "up", namespace=ns)
            # No IPv6 on the device: no router solicitations or MLD reports to skip.
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                            f"net.ipv6.conf.{self.device}.disable_ipv6=1"],
                           capture_output=True)
            _ip("link", "set", self.device, "mtu", str(self.mtu), namespace=ns)
            _ip("addr", "add", f"{self.linux_ip}/{self.prefix}", "dev", self.device, namespace=ns)
            _ip("link", "set", self.device, "up", namespace=ns)
            self.linux_mac = self._device_mac()
        except BaseException:
            self._teardown()
            raise
        return self

    def _device_mac(self):
        out = subprocess.run(["ip", "-n", self.namespace, "-o", "link", "show", self.device],
                             check=True, capture_output=True, text=True).stdout
        text = out.split("link/ether ")[1].split()[0]
        return int(text.replace(":", ""), 16)

    def __exit__(self, *exc):
        self._teardown()
        return False

    def _teardown(self):
        if self.fd is not None:
            os.close(self.fd)           # a non-persistent TAP device disappears with its fd
            self.fd = None
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)

    # ------------------------------------------------------------------ inside the namespace
    def start(self, target, *args):
        """A started daemon thread running ``target(*args)`` inside the namespace. Its
        result or exception is in ``thread.result`` / ``thread.error`` after ``join``."""
        path = f"/run/netns/{self.namespace}"

        def run():
            try:
                _setns(path)
                thread.result = target(*args)
            except BaseException as error:      # reported to the caller through .error
                thread.error = error

        thread = threading.Thread(target=run, daemon=True, name=f"in {self.namespace}")
        thread.result = thread.error = None
        thread.start()
        return thread

    def call(self, target, *args):
        thread = self.start(target, *args)
        thread.join()
        if thread.error is not None:
            raise thread.error
        return thread.result

    def linux_counters(self):
        """The namespace's TCP/IP counters (``/proc/net/snmp`` and ``/proc/net/netstat``
        as read inside it), e.g. ``TcpExt.PAWSEstab``, ``Tcp.RetransSegs``."""
        out = {}
        for table in ("snmp", "netstat"):
            text = subprocess.run(["ip", "netns", "exec", self.namespace, "cat",
                                   f"/proc/net/{table}"], check=True, capture_output=True,
                                  text=True).stdout.splitlines()
            for names, values in zip(text[::2], text[1::2]):
                prefix, names = names.split(":", 1)
                for name, value in zip(names.split(), values.split(":", 1)[1].split()):
                    out[f"{prefix}.{name}"] = int(value)
        return out

    # ------------------------------------------------------------------ frames
    def write_frame(self, frame):
        if len(frame) < 60:
            frame = bytes(frame) + bytes(60 - len(frame))
        os.write(self.fd, frame)

    def read_frame(self, timeout=0.0):
        """The next frame for the caller, or None after ``timeout`` seconds."""
        while True:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                return None
            try:
                frame = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            if not self._answer_arp(frame):
                return frame

    def _answer_arp(self, frame):
        """Answer an ARP request for our address. True when the frame was ARP."""
        if len(frame) < 42 or struct.unpack_from("!H", frame, 12)[0] != _ETH_P_ARP:
            return False
        (_htype, _ptype, _hlen, _plen, op, sha, spa, _tha,
         tpa) = struct.unpack_from("!HHBBH6s4s6s4s", frame, 14)
        if op == 1 and tpa == bytes(map(int, self.our_ip.split("."))):
            mine = self.our_mac.to_bytes(6, "big")
            reply = (sha + mine + struct.pack("!H", _ETH_P_ARP)
                     + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, mine, tpa, sha, spa))
            self.write_frame(reply)
            self.arp_replies += 1
        return True
