"""BLAKE3 of zeros without buffers of zeros, and the chunk table of a copied stream.

The copy's hasher feeds zeros for the holes it never reads, so the whole-file
digest equals ``b3sum``. The same stream, cut at every 4 MiB of the file, gives
the chunk table of archive format 3 (``ChunkTable``): a digest per chunk,
``HOLE`` where only zeros went in.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import blake3

from guestsafe.engine.copier.extents import CHUNK, MiB


def hash_threads(shared: bool) -> int:
    """BLAKE3's ``max_threads`` for one hasher: all cores alone, its share beside another.

    The copy hashes each byte twice, the whole file and its chunk, on two threads
    at once, which already keeps two cores busy; BLAKE3's own pool on top of
    them only contends. On two cores, for the 8 GiB disk with 1 GiB of data of
    the benchmark, AUTO + AUTO took 2.25 s of CPU and 1.35 to 1.41 s for the read
    pass of a shared copy, one thread each 1.73 s and 1.13 to 1.20 s (issue 13).
    """
    if not shared:
        return int(blake3.blake3.AUTO)
    return max(1, (os.cpu_count() or 1) // 2)


# The chunk of a version's chunk table (FORMAT.md, "Chunk tables"): reflinks share
# whole chunks, and 4 MiB keeps a 2 TiB disk's table at 512 Ki entries.
TABLE_CHUNK = 4 * MiB
# The entry of a chunk that reads as zeros (a hole); no BLAKE3 digest is all zeros.
HOLE = bytes(32)


@dataclass(frozen=True)
class ChunkTable:
    """BLAKE3 of every ``chunk_size`` piece of a file, in order; ``HOLE`` for zeros.

    32 bytes a chunk (16 MiB for a 2 TiB disk): kept in RAM while the copy runs.
    """

    size: int
    chunk_size: int
    entries: bytes

    def __len__(self) -> int:
        return len(self.entries) // 32

    def entry(self, index: int) -> bytes:
        return self.entries[index * 32 : (index + 1) * 32]


@dataclass(frozen=True)
class KnownFile:
    """A previous version's chunk table and the whole-file BLAKE3 of the same bytes.

    A file of the same size whose every chunk entry comes out equal holds the same
    bytes (BLAKE3 resists collisions; ``HOLE`` means zeros either way), so its
    whole-file digest is this one. A shared copy of an unchanged disk then skips
    the whole-file hash, which for a sparse disk is mostly hashing its holes as
    zeros: 1.7 s of CPU for the 7 GiB of holes of the benchmark's 8 GiB disk.
    """

    table: ChunkTable
    blake3: str

    def same_shape(self, size: int, chunk_size: int) -> bool:
        return self.table.size == size and self.table.chunk_size == chunk_size


# Private and never written, so every page is the kernel's shared zero page and
# costs no RSS. (A shared anonymous map would allocate real shmem pages on read.)
_ZEROS = mmap.mmap(-1, CHUNK, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)


def _hash_zeros(hasher: blake3.blake3, count: int) -> None:
    """Feed ``count`` zero bytes without allocating a hole-sized buffer."""
    view = memoryview(_ZEROS)
    while count > 0:
        step = min(count, CHUNK)
        hasher.update(view[:step])
        count -= step


_zero_digests: dict[int, bytes] = {}


def zero_digest(length: int) -> bytes:
    """BLAKE3 of ``length`` zero bytes (cached: a table has at most two lengths)."""
    digest = _zero_digests.get(length)
    if digest is None:
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        _hash_zeros(hasher, length)
        digest = _zero_digests[length] = hasher.digest()
    return digest


class _ChunkHasher:
    """Cuts the hasher's stream (data, and zeros for holes) into table chunks.

    A chunk the stream only ever fed zeros to is not hashed at all: it is a hole.
    Zeros at the head of a chunk wait until data arrives, then are hashed first.
    """

    def __init__(self, size: int, chunk_size: int = TABLE_CHUNK, threads: int = 1) -> None:
        self.size = size
        self.threads = threads  # BLAKE3's max_threads for each chunk
        self.chunk_size = chunk_size
        self.entries = bytearray()
        self.filled = 0  # bytes of the current chunk fed so far
        self.hasher: blake3.blake3 | None = None  # None: only zeros in this chunk so far

    def zeros(self, count: int) -> None:
        while count > 0:
            step = min(count, self.chunk_size - self.filled)
            if self.hasher is not None:
                _hash_zeros(self.hasher, step)
            self._advance(step)
            count -= step

    def data(self, view: memoryview) -> None:
        while len(view):
            step = min(len(view), self.chunk_size - self.filled)
            if self.hasher is None:
                self.hasher = blake3.blake3(max_threads=self.threads)
                _hash_zeros(self.hasher, self.filled)
            self.hasher.update(view[:step])
            self._advance(step)
            view = view[step:]

    def _advance(self, step: int) -> None:
        self.filled += step
        done = len(self.entries) // 32 * self.chunk_size + self.filled
        if self.filled == self.chunk_size or done == self.size:
            self._close_chunk()

    def _close_chunk(self) -> None:
        if self.hasher is None:
            self.entries += HOLE
        else:
            digest = self.hasher.digest()
            # Zeros written as data (a preallocated disk) read as a hole does.
            self.entries += HOLE if digest == zero_digest(self.filled) else digest
        self.filled = 0
        self.hasher = None

    def table(self) -> ChunkTable:
        return ChunkTable(self.size, self.chunk_size, bytes(self.entries))
