"""Versions in use by instant-boot clones: one record per clone in ``<state>/booted/``.

A clone booted from a version (``guestsafe boot``) runs on qcow2 overlays whose
backing files are the version's own files, so until it is promoted or discarded
the version must stay exactly where it is. The record names the clone, the
version (guest, number, archive root) and everything the boot created, so that
retention can skip the version, ``list`` can say who uses it, and ``boot
--discard`` can remove the clone, and nothing else: no record, no discard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from guestsafe.engine import locks
from guestsafe.engine.archive.names import encode_guest_name
from guestsafe.engine.errors import ArchiveError, LockBusy
from guestsafe.engine.fsutil import atomic_write_bytes

BOOTED_DIR = "booted"


@dataclass(frozen=True)
class BootRecord:
    clone: str
    clone_uuid: str
    guest: str
    number: int
    archive: str  # the archive's root, as an absolute path
    version_path: str
    overlays: dict[str, str]  # disk target -> overlay file, the clone's own
    nvram: str | None = None  # the clone's copy of the version's NVRAM
    # Paths given an ACL entry for QEMU's uid (the version's files and the folders
    # above them), taken back when the last clone of the version lets go of it.
    qemu_acl: list[str] = field(default_factory=list)
    qemu_uid: int | None = None
    # A restore test's clone (restore/boottest/): recovery removes it once the test's
    # process is gone, since nobody asked to keep it.
    restore_test: bool = False
    # A ``promote --target-dir`` under way: disk target -> the new file being written,
    # named before the copy starts so that a crash leaves no file nobody knows of
    # (restore/promote_moves.py).
    moving: dict[str, str] = field(default_factory=dict)

    def uses(self, archive_root: Path, guest: str) -> bool:
        return self.guest == guest and _same_path(self.archive, archive_root)


def _same_path(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def booted_dir(state_dir: Path) -> Path:
    return state_dir / BOOTED_DIR


def record_path(state_dir: Path, clone: str) -> Path:
    return booted_dir(state_dir) / f"{encode_guest_name(clone)}.json"


def write_record(state_dir: Path, record: BootRecord) -> None:
    folder = booted_dir(state_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = json.dumps(asdict(record), indent=2, sort_keys=True).encode()
    atomic_write_bytes(record_path(state_dir, record.clone), data + b"\n")


def read_record(state_dir: Path, clone: str) -> BootRecord | None:
    """The record of clone ``clone``; None when guestsafe booted no clone of that name."""
    path = record_path(state_dir, clone)
    try:
        raw = json.loads(path.read_text())
        record = BootRecord(**raw)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise ArchiveError(f"the instant-boot record {path} cannot be read ({exc})") from exc
    return record if record.clone == clone else None


def remove_record(state_dir: Path, clone: str) -> None:
    record_path(state_dir, clone).unlink(missing_ok=True)


def all_records(state_dir: Path) -> list[BootRecord]:
    """Every clone booted and neither promoted nor discarded; unreadable records skipped."""
    folder = booted_dir(state_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            found.append(BootRecord(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return found


def abandoned_records(
    state_dir: Path,
    wanted: Callable[[BootRecord], bool],
    lock_key: Callable[[str], str],
    purpose: str,
) -> Iterator[BootRecord]:
    """Each ``wanted`` record whose lock (``lock_key(clone)``) nobody holds, yielded
    while that lock is taken, so that its owner, dead, is the only one it can be."""
    for record in all_records(state_dir):
        if not wanted(record):
            continue
        try:
            lock = locks.acquire(state_dir, lock_key(record.clone), f"{purpose} {record.clone}")
        except LockBusy:
            continue  # its owner runs on in another process
        with lock:
            yield record


def versions_in_use(state_dir: Path, archive_root: Path, guest: str) -> dict[int, list[str]]:
    """Per version number of ``guest`` in that archive, the clones booted from it."""
    used: dict[int, list[str]] = {}
    for record in all_records(state_dir):
        if record.uses(archive_root, guest):
            used.setdefault(record.number, []).append(record.clone)
    return used


def in_use_reason(clones: list[str]) -> str:
    """How retention names the rule that keeps a version a clone runs on."""
    return "in use by " + ", ".join(sorted(clones))
