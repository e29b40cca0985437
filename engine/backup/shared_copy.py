"""A disk copy that shares the previous version's unchanged chunks (issue 13, reflink).

The new file starts as a reflink clone of the previous version's file of the same
disk; the source is read in full, each chunk's BLAKE3 is compared with the previous
version's chunk table, and only the chunks that differ are written (punched first,
so the clone's old blocks of that chunk are let go, then the source's data extents
written). The result is byte for byte the file a full copy makes: the chunks that
match hold the same bytes (equal BLAKE3), the others are the source's.

The previous version's file is only ever opened read-only (by ``clone_file``):
its blocks are shared copy-on-write and the writes here land in new blocks of the
new file, so a crash anywhere leaves the previous version as it was.

One pass over the source: each chunk's bytes are hashed once for its table entry,
and the same bytes feed the whole-file BLAKE3 (on a second thread, at the same time).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import blake3

from guestsafe.engine import failpoints
from guestsafe.engine.archive.reflink import clone_file
from guestsafe.engine.copier import HOLE, TABLE_CHUNK, ChunkTable, Pacer, zero_digest
from guestsafe.engine.errors import Cancelled, CopyError

ProgressFn = Callable[[int, int], None]
_FALLOC_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
# Private and never written: the kernel's zero page, hashed for holes at no RSS cost.
_ZEROS = mmap.mmap(-1, TABLE_CHUNK, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)


@dataclass(frozen=True)
class SharedResult:
    """What a shared copy did: the copier's figures, and what it had to write."""

    size: int
    data_bytes: int  # the source's data (its data extents)
    written: int  # bytes written into the new file: the chunks that changed
    blake3: str
    chunks: ChunkTable


@dataclass
class _Chunk:
    """One chunk of the source read into a buffer: its data ranges, chunk-relative."""

    index: int
    offset: int
    length: int
    ranges: list[tuple[int, int]]
    view: memoryview


def data_ranges(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The data extents of ``[start, end)`` of ``fd``, clipped to it (SEEK_DATA/SEEK_HOLE)."""
    pos = start
    while pos < end:
        try:
            low = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, end  # no SEEK_DATA here: all of it is data
                return
            raise
        if low >= end:
            return
        high = min(os.lseek(fd, low, os.SEEK_HOLE), end)
        yield low, high
        pos = high


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


def _rewrite(fd: int, chunk: _Chunk, entry: bytes) -> int:
    """Make the new file's chunk the source's: punch it, write its data; bytes written."""
    os_fallocate(fd, _FALLOC_PUNCH, chunk.offset, chunk.length)
    if entry == HOLE:
        return 0  # zeros: the punched hole reads as them
    written = 0
    for low, high in chunk.ranges:
        done = 0
        while done < high - low:
            done += os.pwrite(fd, chunk.view[low + done : high], chunk.offset + low + done)
        written += high - low
    failpoints.hit("copy.chunk")
    return written


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
) -> SharedResult | None:
    """Copy ``src`` to ``dst`` as a clone of ``previous``, writing only the changed chunks.

    ``previous_table`` is the previous file's chunk table (``TABLE_CHUNK`` chunks),
    checked against its digest by the caller. ``pace`` paces the reads as the
    copier's (a job's I/O class and ``bwlimit``). None, with nothing left behind, where
    ``dst``'s filesystem cannot clone ``previous``: the caller then copies in full.
    On any failure ``dst`` is removed; ``previous`` is never written.
    """
    if not clone_file(previous, dst):
        return None
    try:
        return _fill(src, dst, previous_table, _Run(progress, cancel, pace))
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class _Run:
    progress: ProgressFn | None
    cancel: threading.Event | None
    pace: Pacer | None


def _fill(src: Path, dst: Path, previous: ChunkTable, run: _Run) -> SharedResult:
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    dst_fd = os.open(dst, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    bufs = [mmap.mmap(-1, TABLE_CHUNK, flags=mmap.MAP_PRIVATE) for _ in range(3)]
    views = [memoryview(b) for b in bufs]
    try:
        size = os.fstat(src_fd).st_size
        os.ftruncate(dst_fd, size)  # a grown or shrunk file (a qcow2) ends where the source does
        result = _copy_chunks(src_fd, dst_fd, size, previous, views, run)
        os.fsync(dst_fd)
        return result
    finally:
        for view in views:
            view.release()
        for buf in bufs:
            buf.close()
        os.close(dst_fd)
        os.close(src_fd)


def _copy_chunks(
    src_fd: int, dst_fd: int, size: int, previous: ChunkTable, views: list[memoryview], run: _Run
) -> SharedResult:
    """Read ahead one chunk, hash the current one twice at once, write it if it changed."""
    count = -(-size // TABLE_CHUNK)
    whole = blake3.blake3(max_threads=blake3.blake3.AUTO)  # the holes' zeros, on every core
    entries = bytearray()
    data_bytes = written = 0
    stop = run.cancel or threading.Event()  # a cancel ends the pacer's wait
    started = run.pace.thread_started if run.pace is not None else None
    if started is not None:
        started()
    with ThreadPoolExecutor(2, "guestsafe-shared", initializer=started) as pool:
        ahead: Future[_Chunk] | None = (
            pool.submit(_read_chunk, src_fd, 0, size, views[0]) if count else None
        )
        for index in range(count):
            if run.cancel is not None and run.cancel.is_set():
                raise Cancelled("copy cancelled")
            assert ahead is not None
            chunk = ahead.result()
            if index + 1 < count:
                ahead = pool.submit(_read_chunk, src_fd, index + 1, size, views[(index + 1) % 3])
            entry_future = pool.submit(chunk_digest, chunk)
            _feed(whole, chunk)
            entry = entry_future.result()
            entries += entry
            data_bytes += sum(high - low for low, high in chunk.ranges)
            # A chunk past the previous file's end (a grown qcow2) has no entry: written.
            # A last chunk of another length never matches: BLAKE3 covers the length,
            # and a hole reads as zeros at any length, in the clone as in the source.
            old = previous.entry(index) if index < len(previous) else None
            if entry != old:
                written += _rewrite(dst_fd, chunk, entry)
            if run.progress is not None:
                run.progress(chunk.offset + chunk.length, size)
            if run.pace is not None:
                run.pace.wrote(chunk.length if chunk.ranges else 0, stop)
    table = ChunkTable(size, TABLE_CHUNK, bytes(entries))
    return SharedResult(size, data_bytes, written, str(whole.hexdigest()), table)
