"""The two ends of a copy: the source read and the new file (or device) written.

I/O is O_DIRECT where the kernel accepts it: buffered readahead into holes and
dirty-page writeback cost more than the disk itself, and a hypervisor's RAM
belongs to its guests. Small pieces, and everything where O_DIRECT is refused,
go through the page cache, kept to two batches with ``sync_file_range`` and
dropped with ``posix_fadvise(DONTNEED)``. The error messages of a failed write
(``_write_error``) are shared by every copy that writes a file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from guestsafe.engine.copier.extents import ALIGN, _align_up, _data_bytes, _Piece
from guestsafe.engine.errors import CopyError

# Smaller pieces are written through the page cache: each small O_DIRECT write
# into a hole waits for its own block allocation (3.2 s for 50,000 x 4 KiB,
# buffered and flushed in batches 0.9 s).
DIRECT_MIN = 256 * 1024
FICLONE = 0x40049409  # _IOW(0x94, 9, int)
# A block device has no holes to seek: its zero blocks are found by looking, at the
# filesystem's block size, so a mostly empty LV becomes a mostly sparse file.
ZERO_BLOCK = 4096
_ZERO_BYTES = bytes(ZERO_BLOCK)
O_DIRECT = getattr(os, "O_DIRECT", 0)

_SFR_WAIT_BEFORE = 1
_SFR_WRITE = 2
_SFR_WAIT_AFTER = 4


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


class _Shrank(Exception):
    """The source ended before an extent SEEK_DATA reported."""


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
