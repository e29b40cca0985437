"""Write a disk file onto a block device (a restore onto LVM or a partition), then check it.

A device has no holes: where the file has a hole the device is zeroed with
BLKZEROOUT, the data is written through the copy's pipeline, and the device's
first bytes are read back cold and hashed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import threading
from pathlib import Path

from guestsafe.engine.copier.extents import CHUNK, MiB, _extents
from guestsafe.engine.copier.filecopy import CopyResult, hash_file
from guestsafe.engine.copier.files import (
    _Dest,
    _device_bytes,
    _human,
    _open_source,
    _pwrite_all,
    _Source,
)
from guestsafe.engine.copier.hashing import _ZEROS
from guestsafe.engine.copier.pipeline import ProgressFn, _copy_error, _Pipeline
from guestsafe.engine.errors import Cancelled, CopyError

BLKZEROOUT = 0x127F  # _IO(0x12, 127): the device writes (or unmaps to) zeros itself


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
