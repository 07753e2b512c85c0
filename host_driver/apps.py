"""Servers written on the driver's socket API, and the host-work figures of a transaction.

* ``echo_session(sock)``: sends back what it receives until the peer closes, then closes.
* ``kv_session(sock, store)``: a line protocol: ``SET key value`` -> ``OK``,
  ``GET key`` -> ``VALUE value`` or ``NOT_FOUND``, ``QUIT`` -> ``BYE`` and the server
  closes first; anything else -> ``ERROR ...``. It closes too when the peer closes.
* ``serve(driver, port, session, count)``: listen, then accept ``count`` connections one
  after the other and run ``session`` on each.

A server handles one connection at a time: the driver is driven by the coroutine that
awaits it (each await clocks the simulation), so there is no scheduler to interleave two.
"""

__all__ = ["echo_session", "kv_session", "serve", "host_work", "format_host_work"]


async def echo_session(sock, close_offload=True):
    """Echo until end of stream; then close (teardown offload when ``close_offload``).
    Returns who closed ("nic" or "host")."""
    while True:
        data = await sock.recv()
        if not data:
            break
        sock.send(data)
    return await sock.close(offload=close_offload)


async def kv_session(sock, store, close_offload=True):
    """The key-value protocol on ``sock`` with the dict ``store``; returns who closed."""
    while True:
        line = await sock.recv_line()
        if not line:
            break                                   # the peer closed: we close too
        words = line.decode(errors="replace").split()
        if len(words) == 3 and words[0] == "SET":
            store[words[1]] = words[2]
            sock.send(b"OK\n")
        elif len(words) == 2 and words[0] == "GET":
            value = store.get(words[1])
            sock.send(b"NOT_FOUND\n" if value is None else f"VALUE {value}\n".encode())
        elif words == ["QUIT"]:
            sock.send(b"BYE\n")
            break                                   # the server closes first
        else:
            sock.send(f"ERROR bad request {line.strip()[:40]!r}\n".encode())
    return await sock.close(offload=close_offload)


async def serve(driver, port, session, count=1, offload=True, **session_args):
    """Listen on ``port`` and run ``session(sock, **session_args)`` on ``count``
    connections, one after the other. Returns the sockets."""
    await driver.listen(port, offload=offload)
    socks = []
    for _ in range(count):
        sock = await driver.accept(port)
        await session(sock, **session_args)
        socks.append(sock)
    return socks


def host_work(before, after, transactions=1):
    """Per-transaction host work between two ``Driver.stats()`` snapshots."""
    return {name: (after[name] - before[name]) / transactions for name in after}


def format_host_work(rows):
    """A table of ``{label: host_work(...)}``: events, DMA bytes, MMIO, host packets (RX
    and TX), commands, and the simulated cycles of the transaction."""
    names = ["events", "dma_bytes", "mmio", "host_packets", "host_rx", "host_tx", "commands",
             "cycles"]
    width = max(len(label) for label in rows) + 2
    lines = [f"{'per transaction':<{width}}" + "".join(f"{n:>13}" for n in names)]
    for label, work in rows.items():
        lines.append(f"{label:<{width}}" + "".join(f"{work[n]:>13.1f}" for n in names))
    return "\n".join(lines)
