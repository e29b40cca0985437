"""A disk copy that shares the previous version's unchanged chunks (issue 13, reflink).

The new file starts as a reflink clone of the previous version's file of the same
disk. The source is read once by the copier's own read pass (``hash_with_chunks``:
O_DIRECT, several reads in flight, only data extents), which gives the whole-file
BLAKE3 and the chunk table from the same buffers, each byte hashed once for each.
Where the previous version's whole-file digest is known, the whole file is only
hashed once a chunk differs from the previous table: an unchanged disk takes the
previous digest (its bytes are the same), and the pass costs the chunk hashes.
The chunks whose digest differs from the previous version's table are then read
again, checked against the digest just computed (a source that changed meanwhile
is an error, not a wrong version), and written into the clone: only the 64 KiB
blocks of the chunk that differ from the clone's, a block of zeros punched. The
result is byte for byte the file a full copy makes: the chunks that match hold
the same bytes (equal BLAKE3), the others are the source's.

The previous version's file is only ever opened read-only (by ``clone_file``):
its blocks are shared copy-on-write and the writes here land in new blocks of the
new file, so a crash anywhere leaves the previous version as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3

from guestsafe.engine import failpoints
from guestsafe.engine.archive.reflink import clone_file
from guestsafe.engine.copier import (
    HOLE,
    TABLE_CHUNK,
    ChunkTable,
    KnownFile,
    Pacer,
    data_ranges,
    hash_with_chunks,
    zero_digest,
)
from guestsafe.engine.errors import Cancelled, CopyError

ProgressFn = Callable[[int, int], None]
_FALLOC_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
# Private and never written: the kernel's zero page, hashed for holes at no RSS cost.
_ZEROS = mmap.mmap(-1, TABLE_CHUNK, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
_ZERO_VIEW = memoryview(_ZEROS)
# What a changed chunk is compared and written in: a 1 MiB change rewrites about
# 1 MiB, not its whole 4 MiB chunk, so seven versions stay close to one.
_BLOCK = 64 * 1024


@dataclass(frozen=True)
class SharedResult:
    """What a shared copy did: the copier's figures, and what it had to write."""

    size: int
    data_bytes: int  # the source's data (its data extents)
    written: int  # bytes written into the new file: the chunks that changed
    blake3: str
    chunks: ChunkTable
    unchanged: bool = False  # every chunk equals the previous file's: nothing written


@dataclass
class _Chunk:
    """One chunk of the source read into a buffer: its data ranges, chunk-relative."""

    index: int
    offset: int
    length: int
    ranges: list[tuple[int, int]]
    view: memoryview


def _read_chunk(fd: int, index: int, size: int, buf: memoryview) -> _Chunk:
    offset = index * TABLE_CHUNK
    length = min(TABLE_CHUNK, size - offset)
    ranges = []
    for low, high in data_ranges(fd, offset, offset + length):
        got = 0
        while got < high - low:
            count = os.preadv(fd, [buf[low - offset + got : high - offset]], low + got)
            if count == 0:
                raise CopyError("the source shrank while being copied")
            got += count
        ranges.append((low - offset, high - offset))
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    return _Chunk(index, offset, length, ranges, buf)


def _feed(hasher: blake3.blake3, chunk: _Chunk) -> None:
    """The chunk's bytes into ``hasher``: its data from the buffer, zeros for its holes."""
    zeros = memoryview(_ZEROS)
    pos = 0
    for low, high in chunk.ranges:
        if low > pos:
            hasher.update(zeros[: low - pos])
        hasher.update(chunk.view[low:high])
        pos = high
    if pos < chunk.length:
        hasher.update(zeros[: chunk.length - pos])


def chunk_digest(chunk: _Chunk) -> bytes:
    """The chunk's table entry: its BLAKE3, ``HOLE`` for a chunk of zeros."""
    if not chunk.ranges:
        return HOLE
    hasher = blake3.blake3()
    _feed(hasher, chunk)
    digest = hasher.digest()
    return HOLE if digest == zero_digest(chunk.length) else digest


def _rewrite(fd: int, chunk: _Chunk, entry: bytes, old: memoryview) -> int:
    """Make the clone's chunk the source's, block by block; the bytes written.

    Only the blocks that differ from the clone's are touched: a changed block of
    zeros is punched, any other written. The rest stay shared with the previous file.
    """
    if entry == HOLE:
        os_fallocate(fd, _FALLOC_PUNCH, chunk.offset, chunk.length)
        return 0  # zeros: the punched hole reads as them
    _fill_holes(chunk)
    _read_exact(fd, old, chunk.offset, chunk.length)
    written = 0
    for start in range(0, chunk.length, _BLOCK):
        end = min(start + _BLOCK, chunk.length)
        piece = chunk.view[start:end]
        if piece == old[start:end]:
            continue
        if piece == _ZERO_VIEW[: end - start]:
            os_fallocate(fd, _FALLOC_PUNCH, chunk.offset + start, end - start)
            continue
        done = 0
        while done < end - start:
            done += os.pwrite(fd, piece[done:], chunk.offset + start + done)
        written += end - start
    failpoints.hit("copy.chunk")
    return written


def _fill_holes(chunk: _Chunk) -> None:
    """Zeros in the buffer where the chunk has holes: the buffer then holds its bytes."""
    pos = 0
    for low, high in [*chunk.ranges, (chunk.length, chunk.length)]:
        if low > pos:
            chunk.view[pos:low] = _ZERO_VIEW[: low - pos]
        pos = high


def _read_exact(fd: int, view: memoryview, offset: int, length: int) -> None:
    got = 0
    while got < length:
        count = os.preadv(fd, [view[got:length]], offset + got)
        if count == 0:
            raise CopyError("the new version's file ended early")
        got += count


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def os_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (Python's os.posix_fallocate has none)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def shared_copy(
    src: Path,
    dst: Path,
    previous: Path,
    previous_table: ChunkTable,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    pace: Pacer | None = None,
    previous_blake3: str | None = None,
) -> SharedResult | None:
    """Copy ``src`` to ``dst`` as a clone of ``previous``, writing only the changed chunks.

    ``previous_table`` is the previous file's chunk table (``TABLE_CHUNK`` chunks),
    checked against its digest by the caller. ``pace`` paces the read as the
    copier's (a job's I/O class and ``bwlimit``). ``previous_blake3``: the previous
    file's whole-file digest, of the same bytes as ``previous_table`` (its manifest's),
    which an unchanged source then reuses. None, with nothing left behind,
    where ``dst``'s filesystem cannot clone ``previous``: the caller then copies in
    full. On any failure ``dst`` is removed; ``previous`` is never written.
    """
    if not clone_file(previous, dst):
        return None
    try:
        known = None if previous_blake3 is None else KnownFile(previous_table, previous_blake3)
        hashed = hash_with_chunks(src, progress=progress, cancel=cancel, pace=pace, known=known)
        assert hashed.chunks is not None
        written = _write_changes(src, dst, hashed.chunks, previous_table, cancel)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    return SharedResult(
        hashed.chunks.size, hashed.data_bytes, written, hashed.blake3, hashed.chunks,
        unchanged=hashed.reused,
    )  # fmt: skip


def changed_chunks(new: ChunkTable, old: ChunkTable) -> Iterator[int]:
    """The chunks of ``new`` whose entry is not ``old``'s: those a clone must rewrite.

    A chunk past the old file's end (a grown qcow2) has no entry: changed. A last
    chunk of another length never matches (BLAKE3 covers the length), except a
    hole, which reads as zeros at any length, in the clone as in the source.
    """
    for index in range(len(new)):
        if index >= len(old) or new.entry(index) != old.entry(index):
            yield index


def _write_changes(
    src: Path, dst: Path, table: ChunkTable, previous: ChunkTable, cancel: threading.Event | None
) -> int:
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    dst_fd = os.open(dst, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    bufs = [mmap.mmap(-1, TABLE_CHUNK, flags=mmap.MAP_PRIVATE) for _ in range(2)]
    new, old = (memoryview(b) for b in bufs)
    try:
        os.ftruncate(dst_fd, table.size)  # a grown or shrunk file ends where the source does
        written = 0
        for index in changed_chunks(table, previous):
            if cancel is not None and cancel.is_set():
                raise Cancelled("copy cancelled")
            chunk = _read_chunk(src_fd, index, table.size, new)
            entry = chunk_digest(chunk)
            if entry != table.entry(index):
                raise CopyError(f"{src} changed while being copied; is something still writing it?")
            written += _rewrite(dst_fd, chunk, entry, old)
        os.fsync(dst_fd)
        return written
    finally:
        os.close(dst_fd)
        os.close(src_fd)
        for view in (new, old):
            with contextlib.suppress(BufferError):  # a slice still alive (an error's frame)
                view.release()
        for buf in bufs:
            with contextlib.suppress(BufferError):  # then the garbage collector frees it
                buf.close()
