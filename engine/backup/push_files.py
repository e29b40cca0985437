"""The files QEMU wrote for a push backup, made into archive files.

QEMU closes its backup targets some time after libvirt reports the job done,
leaves them to its own user, and allocates the zero ranges of a raw target;
``push_copy`` waits, takes the files over and gives the zeros back before it
hashes them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from guestsafe.engine.errors import CopyError

FILE_MODE = 0o600

# How long QEMU may take to close a backup target after the job-completed event.
CLOSE_WAIT_SECONDS = 60.0


def wait_until_closed(paths: list[Path], timeout: float) -> None:
    """Wait until no process holds these files open.

    libvirt reports the backup job complete before QEMU has detached the target
    block nodes; a qcow2 target's header and refcounts are written as it closes.
    A hash taken earlier would not match the file as it finally is.
    """
    wanted = {str(p) for p in paths}
    deadline = time.monotonic() + timeout
    while _open_anywhere(wanted):
        if time.monotonic() > deadline:
            raise CopyError(
                f"QEMU still holds {', '.join(sorted(wanted))} open {timeout:g} s after the "
                "backup finished; the copy is discarded"
            )
        time.sleep(0.1)


def _open_anywhere(wanted: set[str]) -> bool:
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
        except OSError:
            continue  # the process ended, or is not ours to look at
        if wanted.intersection(links):
            return True
    return False


def own(path: Path) -> None:
    """Root's and 0600 like every archive file, whoever libvirt left it to."""
    try:
        os.chown(path, os.geteuid(), os.getegid())
        os.chmod(path, FILE_MODE)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP):  # exFAT/FAT have no owners
            raise


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).fallocate64
    except (OSError, AttributeError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    func.restype = ctypes.c_int
    return func


_fallocate = _load_fallocate()


def give_back_zeros(path: Path) -> int:
    """Free the blocks of the ranges that read as zeros; return the bytes freed.

    QEMU writes a raw target's zero ranges with fallocate(ZERO_RANGE): they read
    as holes (SEEK_HOLE finds them) but hold blocks, so a sparse 500 GiB disk
    would take 500 GiB. Punching a range that reads as zeros changes no byte.
    """
    if _fallocate is None:
        return 0
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        # SEEK_HOLE counts cached pages of a zero range as data: write them out,
        # then drop them, so it sees the extents as they are on disk.
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        before = os.fstat(fd).st_blocks
        flags = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        for start, end in _zero_ranges(fd, os.fstat(fd).st_size):
            if _fallocate(fd, flags, start, end - start) != 0:
                err = ctypes.get_errno()
                if err in (errno.EOPNOTSUPP, errno.ENOSYS):
                    return 0  # the filesystem cannot punch: the file stays as QEMU left it
                raise OSError(err, os.strerror(err), str(path))
        os.fsync(fd)
        return max(0, before - os.fstat(fd).st_blocks) * 512
    finally:
        os.close(fd)


_SCAN_CHUNK = 16 * 1024 * 1024
_ZERO_BLOCK = 4096
_ZERO_BYTES = bytes(_ZERO_BLOCK)


def punch_zero_blocks(path: Path) -> int:
    """Free the blocks of a raw file's data that is all zeros; return the bytes freed.

    A block-device disk has no holes to report, so QEMU copies its zero blocks as
    data: a mostly empty LV would take its whole size in the version. Punching
    blocks that read as zeros changes no byte (the hash is taken afterwards).
    """
    if _fallocate is None:
        return 0
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        before = os.fstat(fd).st_blocks
        size = os.fstat(fd).st_size
        for start, end in list(_data_ranges(fd, size)):
            for pos in range(start, end, _SCAN_CHUNK):
                chunk = os.pread(fd, min(_SCAN_CHUNK, end - pos), pos)
                for zero_start, zero_end in _zero_runs(chunk, pos):
                    if not _punch(fd, zero_start, zero_end - zero_start):
                        return 0  # the filesystem cannot punch: the file stays as it is
                os.posix_fadvise(fd, pos, len(chunk), os.POSIX_FADV_DONTNEED)
        os.fsync(fd)
        return max(0, before - os.fstat(fd).st_blocks) * 512
    finally:
        os.close(fd)


def _punch(fd: int, offset: int, length: int) -> bool:
    assert _fallocate is not None
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


def _zero_runs(chunk: bytes, offset: int) -> Iterator[tuple[int, int]]:
    """(start, end) in the file of each run of whole zero blocks in ``chunk``."""
    run: int | None = None
    full = len(chunk) // _ZERO_BLOCK * _ZERO_BLOCK  # a ragged tail stays data
    for at in range(0, full, _ZERO_BLOCK):
        zero = chunk[at : at + _ZERO_BLOCK] == _ZERO_BYTES
        if zero and run is None:
            run = at
        elif not zero and run is not None:
            yield offset + run, offset + at
            run = None
    if run is not None:
        yield offset + run, offset + full


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of every data range SEEK_DATA reports, in order."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end


def _zero_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of every range SEEK_HOLE reports, in order."""
    offset = 0
    while offset < size:
        try:
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            raise
        if hole >= size:
            return
        try:
            data = os.lseek(fd, hole, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = size
        yield hole, data
        offset = data
