"""The names an archive gives its files and folders, and the safe ways to touch them.

Everything here works on one path and trusts nothing found there: metadata is
read without following a symlink planted in its place, and removal never follows
a link out of the archive. ``store``, ``partial``, ``verify`` and ``retention``
build on it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
from datetime import UTC, datetime
from pathlib import Path

from guestsafe.engine.fsutil import lstat_or_none

COUNTER_FILE = "last-version"
GUEST_NAME_FILE = "guest-name"
PARTIAL_PREFIX = ".partial-"
DELETING_PREFIX = ".deleting-"
DIR_MODE = 0o700
FILE_MODE = 0o600

# Version numbers are decimal without leading zeros, so each has one spelling.
NUMBER = re.compile(r"[1-9][0-9]{0,17}")
# Metadata files are small; a huge one is damage, and reading it whole would hurt.
MAX_METADATA = 16 * 1024 * 1024


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_small(path: Path) -> bytes:
    """Read a metadata file without following a symlink planted in its place."""
    # O_NONBLOCK: a FIFO in a manifest's place must fail, not hang the open.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = f.read(MAX_METADATA + 1)
    if len(data) > MAX_METADATA:
        raise OSError(errno.EFBIG, "larger than any metadata file guestsafe writes")
    return data


def mkdir_private(path: Path) -> None:
    os.mkdir(path, DIR_MODE)
    # mkdir's mode is narrowed by the umask only, never widened; the chmod makes the
    # mode exact whatever umask the timer or shell left us with.
    try:
        os.chmod(path, DIR_MODE)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP):  # exFAT/FAT have no modes
            raise


def kind_of(st: os.stat_result) -> str:
    """What a thing that is not a regular file is, for messages."""
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    return "a special file"


def remove(path: Path) -> None:
    """Remove a file or a whole tree, never following a symlink out of it."""
    st = lstat_or_none(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        # shutil.rmtree works on file descriptors here (avoids_symlink_attacks): a
        # symlink inside is unlinked, never followed.
        shutil.rmtree(path)
    else:
        os.unlink(path)


def version_numbers(folder: Path, prefix: str = "") -> list[int]:
    """Numbers of entries named ``<prefix><n>`` in a guest folder, any file type."""
    found = []
    for name in os.listdir(folder):
        if name.startswith(prefix) and NUMBER.fullmatch(name[len(prefix) :]):
            found.append(int(name[len(prefix) :]))
    return sorted(found)


def join_numbers(values: list[int]) -> str:
    return ", ".join(map(str, values)) if values else "none"
