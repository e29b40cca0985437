"""A committed version as the archive lists it, read from its folder."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from guestsafe.engine.archive.layout import read_small
from guestsafe.engine.archive.manifest import MANIFEST_FILE, VERIFIED_FILE, Manifest
from guestsafe.engine.archive.names import printable
from guestsafe.engine.archive.restore_record import RestoreTest, read_restore_test
from guestsafe.engine.errors import ArchiveError
from guestsafe.engine.modes import Mode


@dataclass(frozen=True)
class VersionInfo:
    """One committed version as the archive list shows it."""

    guest: str
    number: int
    path: Path
    manifest: Manifest
    size: int  # bytes the folder's files take on disk
    date: str  # manifest.finished
    mode: Mode
    verified: bool | None  # None: never verified, or its record is unreadable
    restore_test: RestoreTest | None = None  # its last restore test; None: never tested


def read_version(guest: str, folder: Path) -> VersionInfo:
    """The version in ``folder`` (named by its number) of ``guest``; ArchiveError if unreadable."""
    number = int(folder.name)
    try:
        data = read_small(folder / MANIFEST_FILE)
    except OSError as exc:
        raise ArchiveError(
            f"version {number} of {printable(guest)} has no readable {MANIFEST_FILE} "
            f"({folder}): {exc.strerror or exc}"
        ) from exc
    manifest = Manifest.from_json(data, version=number, path=folder / MANIFEST_FILE)
    if manifest.series != guest:
        raise ArchiveError(
            f"version {number} of {printable(guest)} holds a manifest of guest "
            f"{printable(manifest.guest)} ({folder}); it was moved here by hand"
        )
    return VersionInfo(
        guest=guest,
        number=number,
        path=folder,
        manifest=manifest,
        size=folder_size(folder),
        date=manifest.finished,
        mode=manifest.mode,
        verified=read_verified(folder),
        restore_test=read_restore_test(folder),
    )


def read_verified(folder: Path) -> bool | None:
    """The last verification result of a version folder; None if there is none."""
    try:
        data = json.loads(read_small(folder / VERIFIED_FILE))
    except (OSError, ValueError):
        return None
    # An unreadable record proves nothing either way: "unknown", not "failed".
    ok = data.get("ok") if isinstance(data, dict) else None
    return ok if isinstance(ok, bool) else None


def folder_size(folder: Path) -> int:
    total = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                total += st.st_blocks * 512
    return total
