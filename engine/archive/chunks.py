"""Chunk tables (archive format 3): one ``<file>.chunks`` beside each archived file.

The copier hashes every 4 MiB chunk on the way (``copier.ChunkTable``); this module
writes that table as text, reads it back, and verifies a file against it: only
the chunks that hold data are read, several at once, and a chunk the table calls a
hole is checked with SEEK_DATA instead of being read (FORMAT.md, "Chunk tables").
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3

from guestsafe.engine.copier import HOLE, ChunkTable, data_ranges, zero_digest
from guestsafe.engine.errors import Cancelled

CHUNKS_SUFFIX = ".chunks"
HOLE_LINE = b"hole"
_LINE_BYTES = 65  # 64 hex digits and a newline: the longest line
_ALIGN = 4096  # O_DIRECT offsets and lengths (as the copier)
# Chunks read at once. blake3 releases the GIL while it hashes, so the workers
# overlap reads and hashing, and the disk likes many requests in flight: on two
# cores eight workers verified the benchmark's 8 GiB file (1 GiB of data) in 0.57
# to 0.65 s, four in 0.62 to 0.76 s, two in 0.84 to 0.87 s, sixteen no faster than
# eight (issue 13). Each costs one 4 MiB buffer.
MAX_THREADS = 8
# A disk full of damage names its first chunks and counts the rest.
MAX_REPORTED = 10
O_DIRECT = getattr(os, "O_DIRECT", 0)
# One hashing thread per worker: the workers already keep every core busy, and
# BLAKE3's own pool on top of them only contends (measured: 4 x 1 beats 4 x AUTO).
_HASH_THREADS = 1

ProgressFn = Callable[[int], None]


def table_file_name(file: str) -> str:
    """The chunk table of the archived file ``file``: ``vda.qcow2.chunks``."""
    return file + CHUNKS_SUFFIX


def table_bytes(table: ChunkTable) -> bytes:
    """The table file: one line per chunk, 64 hex digits or ``hole``."""
    lines = [
        HOLE_LINE if table.entry(i) == HOLE else table.entry(i).hex().encode()
        for i in range(len(table))
    ]
    return b"".join(line + b"\n" for line in lines)


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def file_digest(path: Path) -> str:
    """BLAKE3 of a table file, read in pieces: constant memory for a 2 TiB disk's table."""
    hasher = blake3.blake3()
    with path.open("rb") as f:
        while piece := f.read(1 << 20):
            hasher.update(piece)
    return str(hasher.hexdigest())


class TableError(Exception):
    """The table file is not a valid table for the file it describes."""


def read_entries(path: Path, count: int) -> Iterator[bytes]:
    """The table's entries, streamed: 32 bytes each, ``HOLE`` for a hole.

    Raises TableError, after the entries before the fault, for a malformed table.
    Check the table's digest (``file_digest``) first: only then does it describe
    the file.
    """
    with path.open("rb") as f:
        index = -1
        for index, line in enumerate(f):
            if index >= count:
                raise TableError(f"has more than the {count} lines of its file's chunks")
            yield _parse_line(line, index)
        if index + 1 != count:
            raise TableError(f"has {index + 1} lines, its file has {count} chunks")


def _parse_line(line: bytes, index: int) -> bytes:
    text = line.rstrip(b"\n")
    if text == HOLE_LINE:
        return HOLE
    if len(line) == _LINE_BYTES and line.endswith(b"\n"):
        with contextlib.suppress(ValueError):
            if text == text.lower():
                return bytes.fromhex(text.decode("ascii"))
    raise TableError(f"line {index + 1} is neither 64 hex digits nor 'hole'")


def offset_text(offset: int) -> str:
    """``12 MiB (12582912)``: chunks start at whole MiB, so the short form is exact."""
    return f"{offset // (1 << 20)} MiB ({offset})"


@dataclass
class ChunkCheck:
    """What verifying one file against its table found."""

    problems: list[str]
    bad_chunks: int = 0


class _Reader:
    """A file opened O_DIRECT where the kernel accepts it, buffered otherwise."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.direct_fd = -1
        with contextlib.suppress(OSError):
            self.direct_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | O_DIRECT)
        if not O_DIRECT and self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1

    def read(self, view: memoryview, offset: int, length: int) -> None:
        """Fill ``view[:length]`` from ``offset``; ``view`` is longer, aligned."""
        got = 0
        while got < length:
            count = self._read_once(view, offset + got, got, length - got)
            if count == 0:
                raise OSError(errno.EIO, "the file ended early")
            got += min(count, length - got)

    def _read_once(self, view: memoryview, offset: int, at: int, want: int) -> int:
        if self.direct_fd >= 0 and at % _ALIGN == 0 and offset % _ALIGN == 0:
            try:
                return os.preadv(self.direct_fd, [view[at : at + _align_up(want)]], offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                os.close(self.direct_fd)  # refused here: buffered from now on
                self.direct_fd = -1
        count = os.preadv(self.fd, [view[at : at + want]], offset)
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, offset, count, os.POSIX_FADV_DONTNEED)
        return count

    def data_in(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The data extents of ``[start, end)``, clipped to it."""
        return data_ranges(self.fd, start, end)

    def close(self) -> None:
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
        os.close(self.fd)


def _align_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


# Read errors that mean the chunk's blocks are damaged, not that verify cannot run:
# a device's I/O error, a filesystem's failed data checksum (btrfs: EIO) or a
# corrupt structure (XFS, ext4: EUCLEAN).
_DAMAGED = frozenset({errno.EIO, errno.ENODATA, errno.EBADMSG, errno.EUCLEAN})


class _Verifier:
    """Worker threads taking chunks from one stream of table entries."""

    def __init__(
        self,
        reader: _Reader,
        file: str,
        size: int,
        chunk_size: int,
        entries: Iterator[bytes],
        cancel: threading.Event | None,
        progress: ProgressFn | None,
    ) -> None:
        self.reader = reader
        self.file = file
        self.size = size
        self.chunk_size = chunk_size
        self.entries = enumerate(entries)
        self.cancel = cancel
        self.progress = progress
        self.lock = threading.Lock()
        # Bytes checked, passed to the caller's thread: progress is reported there,
        # as the copier reports it, never from a worker.
        self.checked: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.result = ChunkCheck([])
        # The first bad chunks by offset, whichever worker found them first:
        # a max-heap of (-offset, problem), at most MAX_REPORTED long.
        self.first_bad: list[tuple[int, str]] = []
        self.error: BaseException | None = None
        # Never written, so every page is the kernel's zero page: fills holes for free.
        self.zero_map = mmap.mmap(-1, chunk_size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        self.zeros = memoryview(self.zero_map)

    def run(self, threads: int) -> ChunkCheck:
        workers = [
            threading.Thread(target=self._work, name="guestsafe-verify", daemon=True)
            for _ in range(threads)
        ]
        for worker in workers:
            worker.start()
        self._supervise(len(workers))
        for worker in workers:
            worker.join()
        with contextlib.suppress(BufferError):  # a slice in an error's frame: GC frees it
            self.zeros.release()
            self.zero_map.close()
        if self.error is not None:
            raise self.error
        self.result.problems = [problem for _, problem in sorted(self.first_bad, reverse=True)]
        extra = self.result.bad_chunks - MAX_REPORTED
        if extra > 0:
            self.result.problems.append(f"{self.file}: {extra} more chunks do not match")
        return self.result

    def _supervise(self, running: int) -> None:
        done = 0
        while running:
            try:
                event = self.checked.get(timeout=0.1)
            except queue.Empty:
                continue
            if event is None:
                running -= 1
            elif self.progress is not None:
                done += event
                self.progress(done)

    def _next(self) -> tuple[int, bytes] | None:
        with self.lock:
            if self.error is not None:
                return None
            if self.cancel is not None and self.cancel.is_set():
                self.error = Cancelled("verify cancelled")
                return None
            return next(self.entries, None)

    def _work(self) -> None:
        buf = mmap.mmap(-1, self.chunk_size, flags=mmap.MAP_PRIVATE)  # page-aligned
        view = memoryview(buf)
        try:
            while (job := self._next()) is not None:
                index, expected = job
                offset = index * self.chunk_size
                length = min(self.chunk_size, self.size - offset)
                problem = self._check(view, offset, length, expected)
                self._finished(offset, length, problem)
        except BaseException as exc:
            with self.lock:
                if self.error is None:
                    self.error = exc
        finally:
            # First: the supervisor waits for every worker's end. The buffer's release
            # can fail while a stored traceback still holds slices of it.
            self.checked.put(None)
            with contextlib.suppress(BufferError):
                view.release()
                buf.close()

    def _check(self, view: memoryview, offset: int, length: int, expected: bytes) -> str | None:
        ranges = list(self.reader.data_in(offset, offset + length))
        if expected == HOLE and not ranges:
            return None  # a hole in the file: nothing to read
        try:
            digest = self._hash(view, offset, length, ranges)
        except OSError as exc:
            if exc.errno not in _DAMAGED:
                raise
            # The device or the filesystem's own checksum refuses this chunk: it is
            # named as a bad chunk, and the rest of the file is still checked.
            return f"cannot be read ({exc.strerror or exc})"
        if expected == HOLE:
            if digest == zero_digest(length):
                return None  # zeros stored as data (a filesystem without holes)
            return "does not match (a hole in the table, data in the file)"
        return None if digest == expected else "does not match"

    def _hash(
        self, view: memoryview, offset: int, length: int, ranges: list[tuple[int, int]]
    ) -> bytes:
        """BLAKE3 of the chunk: its data extents read, the holes between them zeros.

        The zeros come from a never-written map (the kernel's zero page), fed to
        the hasher as they are: no copying them into the buffer, under the GIL.
        """
        hasher = blake3.blake3(max_threads=_HASH_THREADS)
        pos = 0  # in the chunk
        for low, high in ranges:
            start = max(pos, (low - offset) // _ALIGN * _ALIGN)
            end = min(_align_up(high - offset), length)
            if start > pos:
                hasher.update(self.zeros[: start - pos])
            self.reader.read(view[start:], offset + start, end - start)
            hasher.update(view[start:end])
            pos = end
        if pos < length:
            hasher.update(self.zeros[: length - pos])
        return hasher.digest()

    def _finished(self, offset: int, length: int, problem: str | None) -> None:
        with self.lock:
            if problem is not None:
                self.result.bad_chunks += 1
                line = f"{self.file}: chunk at offset {offset_text(offset)} {problem}"
                heapq.heappush(self.first_bad, (-offset, line))
                if len(self.first_bad) > MAX_REPORTED:
                    heapq.heappop(self.first_bad)  # the one furthest into the file
        self.checked.put(length)


def verify_file(
    path: Path,
    file: str,
    table: Path,
    chunk_size: int,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    threads: int | None = None,
) -> ChunkCheck:
    """Check ``path`` (named ``file`` in messages) chunk by chunk against ``table``.

    The caller has checked the table's own digest. Raises OSError when the file
    cannot be read, TableError for a malformed table, Cancelled when ``cancel``
    is set. ``progress`` gets the bytes of the file checked so far.
    """
    size = os.stat(path).st_size
    entries = read_entries(table, chunk_count(size, chunk_size))
    reader = _Reader(path)
    try:
        count = threads or min(MAX_THREADS, 4 * (os.cpu_count() or 1))
        verifier = _Verifier(reader, file, size, chunk_size, entries, cancel, progress)
        return verifier.run(count)
    finally:
        reader.close()
