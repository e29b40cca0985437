"""Small durability helpers: fsync a directory, write a file atomically.

A rename is only durable once the directory holding it is fsynced, and a file's
content only once the file is. Every place in guestsafe that must survive a power
cut goes through these helpers, so the order is right in one place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

# Temporary files start with this prefix. Recovery removes leftovers of a crash by
# this prefix alone, so no other file guestsafe writes may start with it.
TEMP_PREFIX = ".tmp-"

# Some filesystems (several FUSE ones, CIFS) cannot fsync a directory and say EINVAL;
# the data is then as durable as that filesystem allows and failing would help no one.
_DIR_FSYNC_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP)


def is_temp_name(name: str) -> bool:
    """True for a name ``atomic_write_bytes`` uses for its temporary file."""
    return name.startswith(TEMP_PREFIX)


def fsync_dir(path: Path) -> None:
    """Make renames, creations and removals inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def lstat_or_none(path: Path) -> os.stat_result | None:
    """The path's own status (a symlink is not followed), or None when nothing is there."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def fsync_file(path: Path) -> None:
    """Flush a file written by someone else (another process, QEMU) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so a crash leaves either the old or the new file.

    The temporary file lives in the same directory (a rename cannot cross
    filesystems) and is created with ``mode`` from the start, so a secret is never
    readable by others, not even for a moment.
    """
    path = Path(path)
    # The name stays short: the target's own name may already be close to NAME_MAX.
    tmp = path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(6)}-{path.name[:64]}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        try:
            _set_mode(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _set_mode(fd: int, mode: int) -> None:
    # The umask may have narrowed ``mode``; callers ask for an exact mode. Filesystems
    # without Unix modes (exFAT, FAT) refuse chmod; their mount options decide instead.
    try:
        os.fchmod(fd, mode)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP):
            raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
