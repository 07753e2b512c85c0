"""Reference model of ``hw.dma.DmaEngine``: what it must emit for a sequence of requests.

Written from the engine's docstring: which requests are bad, how a transfer is cut into
PCIe requests (at most ``limit`` bytes, never across 4 KB, from the start address: the
rule of ``sim.pcie.tlps_for_read``/``tlps_for_write``), the beats a read is answered with
(data, keep, last, error; a failed PCIe read's data zero) and the TLPs of a sequence of
writes.
"""

from dataclasses import dataclass

__all__ = ["PAGE", "is_bad", "split", "read_beats", "write_tlps", "apply_writes", "Beat"]

PAGE = 4096


def is_bad(addr, length, width, max_length=16384):
    """A request the engine refuses: misaligned address, length 0 or > max_length."""
    return addr % (width // 8) != 0 or length == 0 or length > max_length


def split(addr, length, limit):
    """(addr, length) pieces of at most ``limit`` bytes, none across a 4 KB boundary."""
    pieces, end = [], addr + length
    while addr < end:
        n = min(limit, end - addr, PAGE - addr % PAGE)
        pieces.append((addr, n))
        addr += n
    return pieces


@dataclass(frozen=True)
class Beat:
    """One ``rd_data`` beat: ``data`` holds the kept bytes only."""
    data: bytes
    keep: int
    last: bool
    error: bool


def read_beats(addr, length, width, read, mrrs=512, max_length=16384):
    """The ``rd_data`` beats answering a read of ``length`` bytes at ``addr``.

    ``read(addr, n)`` gives the bytes of one PCIe read, or None when that read fails
    (UR, timeout): its data is then zero and the request ends with ``error``; or
    ``(bytes, True)`` when it fails after some data (the bytes that never came as zeros).
    """
    step = width // 8
    if is_bad(addr, length, width, max_length):
        return [Beat(b"", 0, True, True)]
    data, failed = bytearray(), False
    for piece_addr, n in split(addr, length, mrrs):
        got = read(piece_addr, n)
        if got is None:
            failed, got = True, bytes(n)
        elif isinstance(got, tuple):
            got, partial = got
            failed |= partial
        assert len(got) == n
        data += got
    beats = []
    for pos in range(0, length, step):
        chunk = bytes(data[pos:pos + step])
        last = pos + step >= length
        beats.append(Beat(chunk, (1 << len(chunk)) - 1, last, failed and last))
    return beats


def write_tlps(addr, length, width, mps=256, max_length=16384):
    """The (addr, length) of the posted writes of one write request ([] if bad)."""
    if is_bad(addr, length, width, max_length):
        return []
    return split(addr, length, mps)


def apply_writes(memory, writes, width, mps=256, max_length=16384):
    """Expected TLPs, as (addr, data), of ``writes`` = [(addr, data)] in acceptance order,
    and the writes applied to ``memory`` (a dict addr -> byte, updated in place)."""
    tlps = []
    for addr, data in writes:
        for piece_addr, n in write_tlps(addr, len(data), width, mps, max_length):
            chunk = data[piece_addr - addr:piece_addr - addr + n]
            tlps.append((piece_addr, bytes(chunk)))
            for k, byte in enumerate(chunk):
                memory[piece_addr + k] = byte
    return tlps
