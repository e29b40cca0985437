"""Reflink clones: a new file that shares every block of an old one, copy-on-write.

On XFS (with reflink), btrfs and any other filesystem where the FICLONE ioctl works,
a clone costs no data blocks until one of the two files is written, and writing one
never changes the other. Versions built as clones of the previous version therefore
stay complete, standalone files while sharing the blocks that did not change.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
from pathlib import Path

from guestsafe.engine.fsutil import TEMP_PREFIX

FICLONE = 0x40049409  # _IOW(0x94, 9, int), from linux/fs.h

# What a filesystem without reflink says to FICLONE: ext4 EOPNOTSUPP, others EINVAL,
# tmpfs and a few FUSE filesystems ENOTTY; EXDEV when the two files are on two filesystems.
_NO_REFLINK = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOTTY, errno.EXDEV)


def clone_file(source: Path, target: Path, mode: int = 0o600) -> bool:
    """Create ``target`` as a reflink clone of ``source``; False when the filesystem cannot.

    ``target`` must not exist. On False nothing is left behind; on True the clone
    is fsynced, so a crash right after leaves either no file or the whole clone.
    """
    src_fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        dst_fd = os.open(target, flags, mode)
        try:
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
            os.fsync(dst_fd)
        except OSError as exc:
            os.close(dst_fd)
            os.unlink(target)
            if exc.errno in _NO_REFLINK:
                return False
            raise
        os.close(dst_fd)
        return True
    finally:
        os.close(src_fd)


def supports_reflink(directory: Path) -> bool:
    """Whether files in ``directory`` can be reflink clones of each other (a probe file pair)."""
    token = secrets.token_hex(6)
    probe = directory / f"{TEMP_PREFIX}reflink-probe-{token}"
    clone = directory / f"{TEMP_PREFIX}reflink-clone-{token}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)  # an empty file clones on every filesystem
        finally:
            os.close(fd)
        return clone_file(probe, clone)
    except OSError:
        return False
    finally:
        for path in (clone, probe):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
