"""Copy disk files extent by extent, hashing with BLAKE3 on the way.

One copy runs as a small pipeline::

    2 reader threads --batch--> 2 writer threads --bytes written--> caller's thread
                     \\-batch--> 1 hasher thread (in file order)     (progress, cancel)

A batch is one 16 MiB page-aligned buffer holding one or more data extents.
A buffer goes back to the pool once both a writer and the hasher are done with
it, so memory stays at ``NBUF`` buffers whatever the size of the disk.

Only data extents (SEEK_DATA/SEEK_HOLE) are written: holes stay holes. Extents
a few KiB apart are read as one span, the hole between read as zeros. The
hasher feeds zeros for the holes, so the digest equals ``b3sum``. The same
stream, cut at every 4 MiB of the file, gives the chunk table of archive format 3
(``ChunkTable``): a digest per chunk, ``HOLE`` where only zeros went in.

I/O is O_DIRECT where the kernel accepts it: buffered readahead into holes and
dirty-page writeback cost more than the disk itself, and a hypervisor's RAM
belongs to its guests. Small pieces, and everything where O_DIRECT is refused,
go through the page cache, kept to two batches with ``sync_file_range`` and
dropped with ``posix_fadvise(DONTNEED)``.

Why this stays one module of about 900 lines: it is one pipeline. The extent
planner, the source and destination wrappers, the pipeline's threads and its
error mapping share the buffer pool, the batch layout and the cancel and
failure handshake (``_Pipeline.fail``, ``_Cancelled``, ``_Shrank``); split
apart, each piece would need the others' private types, and the order in which
buffers are released and errors are raised, which is what makes the copy
correct, would no longer be readable in one place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import queue
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import blake3

from guestsafe.engine import failpoints
from guestsafe.engine.errors import Cancelled, CopyError
from guestsafe.engine.fsutil import fsync_dir

MiB = 1024 * 1024
CHUNK = 16 * MiB
NBUF = 4
READERS = 2
WRITERS = 2
# O_DIRECT needs offsets and lengths aligned to the device's logical block;
# 4096 satisfies both 512-byte and 4Kn devices.
ALIGN = 4096
# Extents closer than this are read as one span, hole included: an O_DIRECT
# read of a small hole (zeros, no disk I/O) costs less than one more request.
MERGE_GAP = 128 * 1024
# Smaller pieces are written through the page cache: each small O_DIRECT write
# into a hole waits for its own block allocation (3.2 s for 50,000 x 4 KiB,
# buffered and flushed in batches 0.9 s).
DIRECT_MIN = 256 * 1024
FICLONE = 0x40049409  # _IOW(0x94, 9, int)
BLKZEROOUT = 0x127F  # _IO(0x12, 127): the device writes (or unmaps to) zeros itself
# A block device has no holes to seek: its zero blocks are found by looking, at the
# filesystem's block size, so a mostly empty LV becomes a mostly sparse file.
ZERO_BLOCK = 4096
_ZERO_BYTES = bytes(ZERO_BLOCK)
O_DIRECT = getattr(os, "O_DIRECT", 0)
_POLL = 0.1  # seconds between cancel checks while waiting on the pipeline

_SFR_WAIT_BEFORE = 1
_SFR_WRITE = 2
_SFR_WAIT_AFTER = 4

ProgressFn = Callable[[int, int], None]


class Pacer(Protocol):
    """How gently a copy runs (``throttle.HostPacer``): its threads' I/O class, its rate."""

    def thread_started(self) -> None:
        """Called first on each of the copy's threads."""

    def wrote(self, nbytes: int, stop: threading.Event) -> None:
        """Called by a writer after each batch; may wait, and returns once ``stop`` is set."""


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
class CopyResult:
    size: int
    data_bytes: int
    blake3: str
    cloned: bool
    chunks: ChunkTable | None = None


@dataclass(frozen=True)
class HashResult:
    blake3: str
    chunks: ChunkTable | None
    data_bytes: int = 0  # the bytes read: the file's data extents


# --------------------------------------------------------------------------- helpers


def _align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_sync_file_range_fn = _load_sync_file_range()


def _sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
    """Start (or wait for) writeback of a range; a no-op where libc lacks it."""
    if _sync_file_range_fn is None:
        return
    if _sync_file_range_fn(fd, offset, length, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _drop_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    # Advice only: a filesystem that ignores it costs us nothing.
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


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

    def __init__(self, size: int, chunk_size: int = TABLE_CHUNK) -> None:
        self.size = size
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
                self.hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
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


def _raw_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP) and pos == 0:
                yield 0, size  # no SEEK_DATA here: all of it is data
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def _extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Data extents as (start, end), widened to ALIGN (capped at EOF) and merged.

    Widening lets O_DIRECT read them; the extra bytes are hole, so read as zeros.
    A generator, not a list, so a badly fragmented file costs no memory.
    """
    cur: tuple[int, int] | None = None
    for raw_start, raw_end in _raw_extents(fd, size):
        start = raw_start // ALIGN * ALIGN
        end = min(_align_up(raw_end), size)
        if cur is not None and start <= cur[1]:
            cur = (cur[0], max(cur[1], end))
            continue
        if cur is not None:
            yield cur
        cur = (start, end)
    if cur is not None:
        yield cur


def _data_bytes(fd: int, size: int) -> int:
    return sum(end - start for start, end in _extents(fd, size))


# --------------------------------------------------------------------------- files


class _Shrank(Exception):
    """The source ended before an extent SEEK_DATA reported."""


class _Cancelled(Exception):
    pass


def _source_size(fd: int, path: Path) -> int:
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return os.fstat(fd).st_size
    if stat.S_ISBLK(mode):  # a disk on LVM or a partition: st_size is 0 there
        return _device_bytes(fd)
    raise CopyError(f"{path} is not a regular file or block device")


def _device_bytes(fd: int) -> int:
    # The kernel's size of the device now (as BLKGETSIZE64): a resize shows at once.
    return os.lseek(fd, 0, os.SEEK_END)


def device_size(path: Path) -> int:
    """The size in bytes of a block device (its st_size is 0)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _device_bytes(fd)
    finally:
        os.close(fd)


class _Source:
    """A file read with O_DIRECT until the kernel refuses it, then buffered.

    ``limit`` reads only the first bytes (a device larger than the disk written on it).
    """

    def __init__(self, path: Path, limit: int | None = None) -> None:
        self.path = path
        self.direct = False
        try:
            self.fd = os.open(path, os.O_RDONLY | O_DIRECT)
            self.direct = bool(O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.fd = os.open(path, os.O_RDONLY)
        try:
            self.block = stat.S_ISBLK(os.fstat(self.fd).st_mode)
            self.size = _source_size(self.fd, path)
            if limit is not None:
                self.size = min(self.size, limit)
            self.data_bytes = _data_bytes(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise

    def _go_buffered(self) -> None:
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~O_DIRECT)
        self.direct = False
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def read_into(self, view: memoryview, offset: int, length: int) -> None:
        """Fill ``view[:length]`` from ``offset``; ``view`` may be longer (alignment)."""
        got = 0
        while got < length:
            # Two reader threads share the fd: the other may go buffered while this
            # read is refused, so the refusal is judged by how this read was made.
            direct = self.direct
            want = _align_up(length) if direct else length
            try:
                count = os.preadv(self.fd, [view[got:want]], offset + got)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not direct:
                    raise
                if self.direct:
                    self._go_buffered()
                continue
            if count == 0:
                raise _Shrank
            got += count
        if not self.direct:
            _drop_cache(self.fd, offset, length)

    def changed_size(self) -> int | None:
        """A block device's size now, when it differs from the size the copy began with."""
        if not self.block:
            return None
        now = _device_bytes(self.fd)
        return None if now == self.size else now

    def close(self) -> None:
        _drop_cache(self.fd)
        os.close(self.fd)


def _nonzero_pieces(view: memoryview, seg: _Piece) -> Iterator[_Piece]:
    """The parts of one written segment that are not all zeros, in ZERO_BLOCK steps.

    Only for a block device's data: its zero blocks must become holes in the copy.
    """
    run_start: int | None = None
    pos = 0
    while pos < seg.length:
        step = min(ZERO_BLOCK, seg.length - pos)
        at = seg.start + pos
        zero = view[at : at + step].tobytes() == _ZERO_BYTES[:step]
        if not zero and run_start is None:
            run_start = pos
        elif zero and run_start is not None:
            yield _Piece(seg.offset + run_start, seg.start + run_start, pos - run_start)
            run_start = None
        pos += step
    if run_start is not None:
        yield _Piece(seg.offset + run_start, seg.start + run_start, seg.length - run_start)


class _Dest:
    """The new file: O_DIRECT for large pieces, the page cache, kept small, for the rest."""

    def __init__(self, path: Path, fd: int, *, skip_zeros: bool = False) -> None:
        self.path = path
        self.fd = fd
        self.skip_zeros = skip_zeros  # the source is a device: its zeros become holes
        self.dfd = -1
        # Reopen through /proc so we reach the file we created, not whatever
        # the name points to now.
        with contextlib.suppress(OSError):
            self.dfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | O_DIRECT)
        self.direct = self.dfd >= 0 and bool(O_DIRECT)
        self._pending: tuple[int, int] | None = None
        self._throttle_lock = threading.Lock()  # two writers share _pending

    def write_batch(self, view: memoryview, segments: tuple[_Piece, ...]) -> None:
        cached: tuple[int, int] | None = None  # range written through the page cache
        if self.skip_zeros:
            segments = tuple(p for seg in segments for p in _nonzero_pieces(view, seg))
        for seg in segments:
            piece = view[seg.start : seg.start + seg.length]
            if self._write(piece, seg.offset):
                low = seg.offset if cached is None else cached[0]
                cached = (low, seg.offset + seg.length)
        if cached is not None:
            with self._throttle_lock:
                self._throttle(cached[0], cached[1] - cached[0])

    def _write(self, view: memoryview, offset: int) -> bool:
        """Write one piece; True when some of it went through the page cache."""
        length = len(view)
        if self.direct and length >= DIRECT_MIN:
            head = length // ALIGN * ALIGN
            if self._write_direct(view[:head], offset):
                view, offset, length = view[head:], offset + head, length - head
        if length:
            _pwrite_all(self.fd, view, offset)
        return length > 0

    def _write_direct(self, view: memoryview, offset: int) -> bool:
        """Write with O_DIRECT; False when the kernel refuses it (buffered from now on)."""
        try:
            _pwrite_all(self.dfd, view, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct = False
            return False
        return True

    def _throttle(self, offset: int, length: int) -> None:
        """Keep at most two batches dirty, then drop them from the page cache.

        Start writeback of this batch now; wait for the previous one, which has
        had a whole batch's time to reach the disk, and drop its clean pages.
        """
        _sync_file_range(self.fd, offset, length, _SFR_WRITE)
        if self._pending is not None:
            prev_off, prev_len = self._pending
            flags = _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER
            _sync_file_range(self.fd, prev_off, prev_len, flags)
            _drop_cache(self.fd, prev_off, prev_len)
        self._pending = (offset, length)

    def finish(self) -> None:
        os.fsync(self.fd)
        _drop_cache(self.fd)

    def close(self) -> None:
        if self.dfd >= 0:
            os.close(self.dfd)
        os.close(self.fd)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


# --------------------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class _Piece:
    offset: int  # in the file
    start: int  # in the buffer, ALIGN-aligned
    length: int


@dataclass(frozen=True)
class _Batch:
    buf: int
    seq: int  # batches are read out of order; the hasher needs them in order
    spans: tuple[_Piece, ...]  # read and hashed: data, and the small holes between
    segments: tuple[_Piece, ...]  # written: data only, so holes stay holes

    @property
    def nbytes(self) -> int:
        return sum(seg.length for seg in self.segments)


_Plan = tuple[tuple[_Piece, ...], tuple[_Piece, ...]]


def _plan(fd: int, size: int) -> Iterator[_Plan]:
    """Pack data extents into buffer-sized batches of (spans, segments)."""
    spans: list[_Piece] = []
    segments: list[_Piece] = []
    for start, end in _extents(fd, size):
        while start < end:
            pos, joins = _place(spans, start)
            if pos >= CHUNK:
                yield tuple(spans), tuple(segments)
                spans, segments = [], []
                continue
            length = min(end - start, CHUNK - pos)
            segments.append(_Piece(start, pos, length))
            if joins:
                last = spans[-1]
                spans[-1] = _Piece(last.offset, last.start, start + length - last.offset)
            else:
                spans.append(_Piece(start, pos, length))
            start += length
    if spans:
        yield tuple(spans), tuple(segments)


def _place(spans: list[_Piece], offset: int) -> tuple[int, bool]:
    """Where data at ``offset`` goes in the buffer, and whether it extends the last span."""
    if not spans:
        return 0, False
    last = spans[-1]
    if offset - (last.offset + last.length) <= MERGE_GAP:
        return last.start + offset - last.offset, True
    return last.start + _align_up(last.length), False


class _Pipeline:
    """Readers, writers (none for hashing alone) and one hasher sharing NBUF buffers.

    Two readers and two writers keep the disk busy while one of them waits for
    a CPU: on a host whose cores run guests, a lone synchronous reader leaves
    the disk idle between requests.
    """

    def __init__(
        self,
        src: _Source,
        dst: _Dest | None,
        cancel: threading.Event | None,
        pace: Pacer | None = None,
        chunk_table: bool = False,
    ) -> None:
        self.src = src
        self.pace = pace
        self.dst = dst
        self.cancel = cancel
        # Page-aligned, as O_DIRECT needs; private, so freed as soon as closed.
        self.bufs = [mmap.mmap(-1, CHUNK, flags=mmap.MAP_PRIVATE) for _ in range(NBUF)]
        self.views = [memoryview(buf) for buf in self.bufs]
        self.free: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        for index in range(NBUF):
            self.free.put(index)
        self.to_write: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self.to_hash: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        # The chunk table's hashing runs on its own thread, beside the whole-file
        # hasher, over the same buffers: each byte read once, both digests at once
        # on two cores instead of one after the other on one.
        self.to_chunk: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self.events: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.refs = [0] * NBUF
        self.lock = threading.Lock()
        self.plan = _plan(src.fd, src.size)
        self.next_seq = 0
        self.readers = READERS
        self.writers = WRITERS if dst is not None else 0
        self.abort = threading.Event()
        self.error: BaseException | None = None
        self.error_side = ""
        self.hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        # Fed the same bytes as ``hasher``: the chunk table costs no extra read.
        self.chunker = _ChunkHasher(src.size) if chunk_table else None
        self.done = 0

    # -- coordination

    def fail(self, side: str, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error, self.error_side = exc, side
        self.abort.set()
        # Wake every thread blocked on a queue so it can see the abort.
        for _ in range(self.readers):
            self.free.put(None)
        for _ in range(self.writers):
            self.to_write.put(None)
        self.to_hash.put(None)
        self.to_chunk.put(None)

    def _release(self, index: int) -> None:
        with self.lock:
            self.refs[index] -= 1
            last = self.refs[index] == 0
        if last:
            self.free.put(index)

    def _thread(self, side: str, body: Callable[[], None]) -> threading.Thread:
        def run() -> None:
            try:
                if self.pace is not None:
                    self.pace.thread_started()
                body()
            except BaseException as exc:
                self.fail(side, exc)
            finally:
                self.events.put(None)

        return threading.Thread(target=run, name=f"guestsafe-copy-{side}", daemon=True)

    def run(self, total: int, progress: ProgressFn | None) -> None:
        """Run all stages; return when every thread has exited."""
        threads = [self._thread("hash", self._hash_loop)]
        if self.chunker is not None:
            threads.append(self._thread("chunks", self._chunk_loop))
        threads += [self._thread("read", self._read_loop) for _ in range(self.readers)]
        threads += [self._thread("write", self._write_loop) for _ in range(self.writers)]
        for thread in threads:
            thread.start()
        try:
            self._supervise(len(threads), total, progress)
        except BaseException as exc:
            self.fail("caller", exc)
            raise
        finally:
            for thread in threads:
                thread.join()
            for view in self.views:
                view.release()
            for buf in self.bufs:
                with contextlib.suppress(BufferError):  # a slice still alive: GC frees it
                    buf.close()

    def _supervise(self, running: int, total: int, progress: ProgressFn | None) -> None:
        while running:
            if self.cancel is not None and self.cancel.is_set() and not self.abort.is_set():
                self.fail("cancel", _Cancelled())
            try:
                event = self.events.get(timeout=_POLL)
            except queue.Empty:
                continue
            if event is None:
                running -= 1
                continue
            self.done += event
            if progress is not None and not self.abort.is_set():
                progress(self.done, total)
        if self.error is None and progress is not None and total == 0:
            progress(0, 0)

    # -- stages

    def _next_batch(self) -> tuple[int, int, _Plan] | None:
        """A free buffer and the next batch to read into it; None when done or aborted."""
        if self.cancel is not None and self.cancel.is_set():
            raise _Cancelled
        index = self.free.get()
        if index is None or self.abort.is_set():
            return None
        with self.lock:  # a generator must not run in two threads at once
            plan = next(self.plan, None)
            seq = self.next_seq
            self.next_seq += 1
        if plan is None:
            self.free.put(index)  # for the other reader, which then sees the end too
            return None
        return index, seq, plan

    def _read_loop(self) -> None:
        while (job := self._next_batch()) is not None:
            index, seq, (spans, segments) = job
            view = self.views[index]
            for span in spans:
                room = view[span.start : span.start + _align_up(span.length)]
                self.src.read_into(room, span.offset, span.length)
            self.refs[index] = 1 + (self.writers > 0) + (self.chunker is not None)
            batch = _Batch(index, seq, spans, segments)
            self.to_hash.put(batch)
            if self.chunker is not None:
                self.to_chunk.put(batch)
            if self.writers:
                self.to_write.put(batch)
        self._reader_finished()

    def _reader_finished(self) -> None:
        with self.lock:
            self.readers -= 1
            last = self.readers == 0
        if last and not self.abort.is_set():
            self.to_hash.put(None)
            self.to_chunk.put(None)
            for _ in range(self.writers):
                self.to_write.put(None)

    def _write_loop(self) -> None:
        assert self.dst is not None
        while (batch := self.to_write.get()) is not None and not self.abort.is_set():
            self.dst.write_batch(self.views[batch.buf], batch.segments)
            failpoints.hit("copy.chunk")
            self._release(batch.buf)
            self.events.put(batch.nbytes)
            if self.pace is not None:  # after the buffer is back: the readers go on meanwhile
                self.pace.wrote(batch.nbytes, self.abort)

    def _in_order(self, batches: queue.SimpleQueue[_Batch | None]) -> Iterator[_Batch]:
        """The batches of ``batches`` in file order, whichever reader read them first."""
        turn = 0  # seq of the next batch to hand out
        early: dict[int, _Batch] = {}  # batches read ahead of their turn
        while (batch := batches.get()) is not None and not self.abort.is_set():
            early[batch.seq] = batch
            while turn in early:
                yield early.pop(turn)
                turn += 1

    def _hash_loop(self) -> None:
        pos = 0  # bytes of the file hashed so far
        for batch in self._in_order(self.to_hash):
            view = self.views[batch.buf]
            for span in batch.spans:
                _hash_zeros(self.hasher, span.offset - pos)
                self.hasher.update(view[span.start : span.start + span.length])
                pos = span.offset + span.length
            self._release(batch.buf)
            if not self.writers:
                self.events.put(batch.nbytes)
                if self.pace is not None:  # a read-only pass of a backup (shared_copy)
                    self.pace.wrote(batch.nbytes, self.abort)
        if not self.abort.is_set():
            _hash_zeros(self.hasher, self.src.size - pos)

    def _chunk_loop(self) -> None:
        """The chunk table, from the same buffers as ``_hash_loop``, at the same time."""
        chunker = self.chunker
        assert chunker is not None
        pos = 0
        for batch in self._in_order(self.to_chunk):
            view = self.views[batch.buf]
            for span in batch.spans:
                chunker.zeros(span.offset - pos)
                chunker.data(view[span.start : span.start + span.length])
                pos = span.offset + span.length
            self._release(batch.buf)
        if not self.abort.is_set():
            chunker.zeros(self.src.size - pos)


# --------------------------------------------------------------------------- errors


def _copy_error(pipe: _Pipeline, src: Path, dst: Path, total: int) -> CopyError:
    exc, side = pipe.error, pipe.error_side
    if isinstance(exc, _Cancelled):
        return Cancelled("copy cancelled")
    # A shrunk device ends a read early, or fails it (EIO with O_DIRECT): name the cause.
    resized = pipe.src.changed_size() if side == "read" else None
    if resized is not None:
        return _resized_error(src, pipe.src.size, resized)
    if isinstance(exc, _Shrank):
        return CopyError(f"{src} shrank while being copied; is something still writing it?")
    if isinstance(exc, OSError):
        if side == "read":
            return CopyError(f"cannot read {src}: {exc.strerror}")
        return _write_error(exc, dst, total - pipe.done, total)
    return CopyError(f"copying {src} to {dst} failed: {exc}")


def _resized_error(src: Path, before: int, now: int) -> CopyError:
    return CopyError(
        f"block device {src} changed size during the copy ({before} -> {now} bytes); "
        "the copy was discarded: leave the device alone (no lvresize, losetup -c) "
        "while the guest is backed up, then run the backup again"
    )


def _write_error(exc: OSError, dst: Path, remaining: int, total: int) -> CopyError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CopyError(
            f"no space left on {dst.parent} for {dst.name}: "
            f"{_human(remaining)} of {_human(total)} still needed"
        )
    return CopyError(f"cannot write {dst}: {exc.strerror}")


# --------------------------------------------------------------------------- public


def _open_source(path: Path, limit: int | None = None) -> _Source:
    try:
        return _Source(path, limit)
    except OSError as exc:
        raise CopyError(f"cannot read {path}: {exc.strerror}") from exc


def _create_dest(dst: Path) -> int:
    try:
        return os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError as exc:
        raise CopyError(f"{dst} already exists; refusing to overwrite it") from exc
    except OSError as exc:
        raise CopyError(f"cannot create {dst}: {exc.strerror}") from exc


def _try_clone(dst_fd: int, src_fd: int) -> bool:
    """Reflink the whole file; False where the filesystem cannot (EXDEV, EOPNOTSUPP...)."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError:
        # Undo anything a failed clone may have left before copying.
        os.ftruncate(dst_fd, 0)
        return False
    return True


def copy_file(
    src: Path,
    dst: Path,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    pace: Pacer | None = None,
    chunk_table: bool = True,
) -> CopyResult:
    """Copy ``src`` to the new file ``dst`` (0600), holes kept, hashed, fsynced.

    Raises CopyError, with ``dst`` removed, on any failure; Cancelled (a
    CopyError) when ``cancel`` is set. ``pace``: the I/O class and rate cap.
    ``chunk_table``: also hash every chunk (``CopyResult.chunks``); a restore,
    which only checks the whole-file digest, saves that work with False.
    """
    source = _open_source(src)
    try:
        fd = _create_dest(dst)
        try:
            return _copy_into(source, dst, fd, progress, cancel, pace, chunk_table)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(dst)
            raise
    finally:
        source.close()


def _copy_into(
    source: _Source,
    dst: Path,
    fd: int,
    progress: ProgressFn | None,
    cancel: threading.Event | None,
    pace: Pacer | None = None,
    chunk_table: bool = True,
) -> CopyResult:
    total = source.data_bytes
    try:
        # A device cannot be reflinked into a file; its zeros are skipped instead.
        cloned = source.size > 0 and not source.block and _try_clone(fd, source.fd)
        if not cloned:
            os.ftruncate(fd, source.size)
    except OSError as exc:
        os.close(fd)
        raise _write_error(exc, dst, total, total) from exc
    dest = _Dest(dst, fd, skip_zeros=source.block)
    try:
        pipe = _Pipeline(source, None if cloned else dest, cancel, pace, chunk_table)
        pipe.run(total, progress)
        if pipe.error is not None:
            raise _copy_error(pipe, source.path, dst, total) from pipe.error
        resized = source.changed_size()
        if resized is not None:
            raise _resized_error(source.path, source.size, resized)
        try:
            dest.finish()
        except OSError as exc:
            # Space runs out at fsync when the filesystem allocates late: all of
            # it is still needed, since the partial copy is removed.
            raise _write_error(exc, dst, total, total) from exc
    finally:
        dest.close()
    fsync_dir(dst.parent)
    digest = str(pipe.hasher.hexdigest())
    table = pipe.chunker.table() if pipe.chunker is not None else None
    return CopyResult(source.size, total, digest, cloned, table)


def copy_to_device(
    src: Path,
    device: Path,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> CopyResult:
    """Write the file ``src`` onto the start of the block device ``device``, then check it.

    A device has no holes: where the file has a hole the device is zeroed
    (BLKZEROOUT, which the kernel carries out by writing zeros where the device
    cannot unmap), the data is written, and everything is fsynced. Then the
    device's first ``size`` bytes are read back cold and hashed: they must hash
    as the file does, so a zeroing or write the device dropped is caught.

    The device is opened O_EXCL, which the kernel refuses while it is mounted or
    held (LVM, RAID, another exclusive user). Raises CopyError; after a failure
    the device's content is undefined, since a device cannot be put back.
    """
    source = _open_source(src)
    try:
        fd = _open_device(device, source.size)
        dest = _Dest(device, fd)
        try:
            _zero_holes(fd, source, device, cancel)
            pipe = _Pipeline(source, dest, cancel)
            pipe.run(source.data_bytes, progress)
            if pipe.error is not None:
                raise _copy_error(pipe, source.path, device, source.data_bytes) from pipe.error
            try:
                dest.finish()
            except OSError as exc:
                raise CopyError(f"cannot write {device}: {exc.strerror}") from exc
        finally:
            dest.close()
    finally:
        source.close()
    digest = str(pipe.hasher.hexdigest())
    written = hash_file(device, cancel=cancel, limit=source.size)
    if written != digest:
        raise CopyError(
            f"{device} does not read back what was written to it (blake3 {written[:12]}.. "
            f"!= {digest[:12]}..); the device is faulty or something else writes to it"
        )
    return CopyResult(source.size, source.data_bytes, digest, False)


def _open_device(device: Path, size: int) -> int:
    try:
        fd = os.open(device, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise CopyError(
                f"{device} is in use (mounted, part of LVM or RAID, or open by a program); "
                "nothing was written to it"
            ) from exc
        raise CopyError(f"cannot open {device}: {exc.strerror}") from exc
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            raise CopyError(f"{device} is not a block device")
        have = _device_bytes(fd)
        if have < size:
            raise CopyError(
                f"{device} holds {_human(have)}, the disk needs {_human(size)}; "
                "nothing was written to it"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


_ZERO_STEP = 1024 * MiB  # one BLKZEROOUT at a time, so a cancel is seen between them
_SECTOR = 512


def _zero_holes(fd: int, source: _Source, device: Path, cancel: threading.Event | None) -> None:
    """Zero on the device every range that is a hole in the source file."""
    pos = 0
    for start, end in _extents(source.fd, source.size):
        if start > pos:
            _zero_range(fd, pos, start, device, cancel)
        pos = end
    if pos < source.size:
        _zero_range(fd, pos, source.size, device, cancel)


def _zero_range(
    fd: int, start: int, end: int, device: Path, cancel: threading.Event | None
) -> None:
    # BLKZEROOUT takes whole sectors; a ragged head or tail is written as zeros.
    low = -(-start // _SECTOR) * _SECTOR
    high = max(low, end // _SECTOR * _SECTOR)
    try:
        _write_zeros(fd, start, min(low, end))
        pos = low
        while pos < high:
            if cancel is not None and cancel.is_set():
                raise Cancelled("copy cancelled")
            step = min(_ZERO_STEP, high - pos)
            _zero_out(fd, pos, step)
            pos += step
        _write_zeros(fd, high, end)
    except OSError as exc:
        raise CopyError(f"cannot write {device}: {exc.strerror}") from exc


def _zero_out(fd: int, offset: int, length: int) -> None:
    try:
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
            raise
        _write_zeros(fd, offset, offset + length)  # the kernel would not: write them


def _write_zeros(fd: int, start: int, end: int) -> None:
    view = memoryview(_ZEROS)
    while start < end:
        step = min(CHUNK, end - start)
        _pwrite_all(fd, view[:step], start)
        start += step


def hash_file(
    path: Path,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    limit: int | None = None,
) -> str:
    """BLAKE3 hex digest of ``path``, holes read as zeros (equals ``b3sum``).

    A cold read-back: O_DIRECT where possible, so it checks the disk, not RAM.
    Only data extents are read. ``limit``: only the first bytes (of a device).
    """
    return _hash(path, progress, cancel, limit, chunk_table=False).blake3


def hash_with_chunks(
    path: Path,
    *,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    pace: Pacer | None = None,
) -> HashResult:
    """``hash_file``, and the file's chunk table from the same read.

    ``pace``: a job's I/O class and rate, where the read is a backup's (shared_copy).
    """
    return _hash(path, progress, cancel, None, chunk_table=True, pace=pace)


def _hash(
    path: Path,
    progress: ProgressFn | None,
    cancel: threading.Event | None,
    limit: int | None,
    *,
    chunk_table: bool,
    pace: Pacer | None = None,
) -> HashResult:
    source = _open_source(path, limit)
    try:
        pipe = _Pipeline(source, None, cancel, pace, chunk_table=chunk_table)
        pipe.run(source.data_bytes, progress)
    finally:
        source.close()
    if isinstance(pipe.error, _Cancelled):
        raise Cancelled("verify cancelled") from None
    if isinstance(pipe.error, _Shrank):
        raise CopyError(f"{path} shrank while being read") from None
    if isinstance(pipe.error, OSError):
        raise CopyError(f"cannot read {path}: {pipe.error.strerror}") from pipe.error
    if pipe.error is not None:
        raise CopyError(f"reading {path} failed: {pipe.error}") from pipe.error
    table = pipe.chunker.table() if pipe.chunker is not None else None
    return HashResult(str(pipe.hasher.hexdigest()), table, source.data_bytes)
