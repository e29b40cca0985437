"""Retention: which old versions of a guest go, and deleting one safely."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from guestsafe.engine import failpoints
from guestsafe.engine.archive.layout import DELETING_PREFIX, remove, version_numbers
from guestsafe.engine.archive.versions import read_verified
from guestsafe.engine.fsutil import fsync_dir


def prune(folder: Path, keep: int) -> list[int]:
    """Delete the versions in a guest folder beyond the newest ``keep``; their numbers.

    The newest version and the newest one whose last verification passed are
    never deleted (see ``Archive.apply_retention``).
    """
    # Only real folders: a symlink named like a version is not ours to delete.
    found = [n for n in version_numbers(folder) if stat.S_ISDIR(os.lstat(folder / str(n)).st_mode)]
    protected = set(found[-1:])
    verified = [n for n in found if read_verified(folder / str(n)) is True]
    protected.update(verified[-1:])
    doomed = [n for n in found[: max(len(found) - keep, 0)] if n not in protected]
    for number in doomed:
        delete_version(folder, number)
    return doomed


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
