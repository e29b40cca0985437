"""Retention: which old versions of a guest go, and deleting one safely.

Which rules keep a version is decided in ``calendar_retention`` (``keep`` is its
``last`` rule); this module reads the versions and deletes. Rules count good
versions only. A version is bad when its last verification
failed or its manifest cannot be read; a bad version never counts toward
a rule, so it can neither protect itself nor push a good version out. It is
deleted once ``max(last, 1)`` good versions newer than it exist (FORMAT.md, section 11):
until then it may be the operator's only clue to what went wrong.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping
from datetime import datetime, tzinfo
from pathlib import Path

from guestsafe.engine import failpoints
from guestsafe.engine.archive.calendar_retention import Candidate, RetentionPolicy, keep_reasons
from guestsafe.engine.archive.in_use import in_use_reason
from guestsafe.engine.archive.layout import DELETING_PREFIX, remove, version_numbers
from guestsafe.engine.archive.restore_record import last_test_failed
from guestsafe.engine.archive.versions import read_verified, read_version
from guestsafe.engine.errors import ArchiveError
from guestsafe.engine.fsutil import fsync_dir


def prune(
    folder: Path,
    guest: str,
    policy: RetentionPolicy,
    in_use: Mapping[int, list[str]] | None = None,
) -> list[int]:
    """Delete the versions of ``guest`` in ``folder`` that ``policy`` lets go; their numbers.

    Kept: what a rule of ``policy`` keeps (``calendar_retention.keep_reasons``),
    the newest version, the newest one whose last verification passed, and those
    ``in_use`` names (number -> the instant-boot clones running on it). A bad
    version goes once ``max(policy.last, 1)`` good versions are newer than it.
    """
    reasons = plan(folder, guest, policy, in_use=in_use)
    doomed = [n for n, why in sorted(reasons.items()) if not why]
    for number in doomed:
        delete_version(folder, number)
    return doomed


def plan(
    folder: Path,
    guest: str,
    policy: RetentionPolicy,
    tz: tzinfo | None = None,
    in_use: Mapping[int, list[str]] | None = None,
) -> dict[int, list[str]]:
    """Per version of ``guest`` in ``folder``, the rules that keep it; empty: it would go."""
    return keep_in_use(keep_reasons(candidates(folder, guest), policy, tz), in_use)


def keep_in_use(
    reasons: dict[int, list[str]], in_use: Mapping[int, list[str]] | None
) -> dict[int, list[str]]:
    """``reasons`` with "in use by CLONE" added to each version a booted clone reads."""
    for number, clones in (in_use or {}).items():
        if number in reasons and clones:
            reasons[number].append(in_use_reason(clones))
    return reasons


def candidates(folder: Path, guest: str) -> list[Candidate]:
    """The versions in ``folder`` as retention sees them, oldest first."""
    # Only real folders: a symlink named like a version is not ours to delete.
    found = [n for n in version_numbers(folder) if stat.S_ISDIR(os.lstat(folder / str(n)).st_mode)]
    return [_candidate(folder / str(n), guest) for n in found]


def _candidate(version: Path, guest: str) -> Candidate:
    number = int(version.name)
    try:
        info = read_version(guest, version)
    except (ArchiveError, OSError):
        return Candidate(number, None, good=False)
    verified = read_verified(version)
    started = datetime.fromisoformat(info.manifest.started)
    # A version that did not boot in its last restore test is no version to fall back on.
    good = verified is not False and not last_test_failed(version)
    return Candidate(number, started, good=good, verified=good and verified is True)


def is_good(version: Path, guest: str) -> bool:
    """A version that counts toward ``keep``: its manifest reads, and neither its last
    verification nor its last restore test failed.

    Never verified counts as good: a job may run without ``verify``.
    """
    return _candidate(version, guest).good


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
