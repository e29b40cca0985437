"""Retention: which old versions of a guest go, and deleting one safely.

``keep`` counts good versions only. A version is bad when its last verification
failed or its manifest cannot be read; a bad version never counts toward
``keep``, so it can neither protect itself nor push a good version out. It is
deleted once ``keep`` good versions newer than it exist (FORMAT.md, section 11):
until then it may be the operator's only clue to what went wrong.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from guestsafe.engine import failpoints
from guestsafe.engine.archive.layout import DELETING_PREFIX, remove, version_numbers
from guestsafe.engine.archive.versions import read_verified, read_version
from guestsafe.engine.errors import ArchiveError
from guestsafe.engine.fsutil import fsync_dir


def prune(folder: Path, guest: str, keep: int) -> list[int]:
    """Delete the versions of ``guest`` in ``folder`` that ``keep`` lets go; their numbers.

    Kept: the newest ``keep`` good versions, the newest version, and the newest
    one whose last verification passed. A bad version goes once ``keep`` good
    versions are newer than it.
    """
    # Only real folders: a symlink named like a version is not ours to delete.
    found = [n for n in version_numbers(folder) if stat.S_ISDIR(os.lstat(folder / str(n)).st_mode)]
    good = [n for n in found if is_good(folder / str(n), guest)]
    protected = set(found[-1:]) | set(good[-keep:])
    verified = [n for n in good if read_verified(folder / str(n)) is True]
    protected.update(verified[-1:])
    doomed = [n for n in found if n not in protected and _let_go(n, good, keep)]
    for number in doomed:
        delete_version(folder, number)
    return doomed


def is_good(version: Path, guest: str) -> bool:
    """A version that counts toward ``keep``: its manifest reads and no verification failed.

    Never verified counts as good: a job may run without ``verify``.
    """
    try:
        read_version(guest, version)
    except (ArchiveError, OSError):
        return False
    return read_verified(version) is not False


def _let_go(number: int, good: list[int], keep: int) -> bool:
    if number in good:
        return True  # a good version outside the protected set is beyond ``keep``
    return sum(1 for n in good if n > number) >= keep


def delete_version(folder: Path, number: int) -> None:
    source = folder / str(number)
    trash = folder / f"{DELETING_PREFIX}{number}"
    remove(trash)  # garbage from an earlier crash would block the rename
    # The rename is the deletion: atomic and durable, the version is gone from
    # every listing before a single byte is freed.
    os.rename(source, trash)
    fsync_dir(folder)
    failpoints.hit("retention.before-delete")
    # The version is already gone; whatever cannot be removed now shows in
    # problems() and recover() removes it.
    with contextlib.suppress(OSError):
        remove(trash)
