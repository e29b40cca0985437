"""Copying a version's files out of the archive, checked against the manifest."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from guestsafe.engine import events
from guestsafe.engine.archive.manifest import DiskRecord
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.copier import copy_file
from guestsafe.engine.errors import RestoreError, VerifyError
from guestsafe.engine.events import Progress, Reporter


def check_verified(version: VersionInfo, force: bool, reporter: Reporter, who: str) -> list[str]:
    if version.verified is False:
        message = f"version {version.number} of {version.guest} failed its last verification"
        if not force:
            raise RestoreError(message + "; restore it anyway with --force")
        events.warn(reporter, message + "; restoring anyway (--force)", who)
        return [message]
    return []


def warn_missing_firmware(
    version: VersionInfo, reporter: Reporter, who: str, warnings: list[str]
) -> None:
    """The loader and NVRAM template the version recorded, if this host lacks them."""
    fw = version.manifest.firmware
    if fw is None:
        return
    for what, path in (("firmware loader", fw.loader), ("NVRAM template", fw.nvram_template)):
        if path and not Path(path).exists():
            message = (
                f"the {what} {path} that {version.guest} version {version.number} used is "
                "not on this host; the guest will not start until it is installed (the "
                "package ovmf provides the usual ones) or <os> names another"
            )
            events.warn(reporter, message, who)
            warnings.append(message)


def restore_file(
    version: VersionInfo,
    rec: DiskRecord,
    dst: Path,
    force: bool,
    reporter: Reporter,
    who: str,
    cancel: threading.Event | None,
    warnings: list[str],
) -> None:
    src = version_file(version, rec)
    dst.parent.mkdir(parents=True, exist_ok=True)
    events.info(reporter, f"restoring {rec.file} to {dst}", who)
    progress = progress_of(reporter, who, rec)
    # Checked whole against the manifest: no chunk table needed.
    result = copy_file(src, dst, progress=progress, cancel=cancel, chunk_table=False)
    if result.blake3 != rec.blake3:
        message = mismatch(version, rec, result.blake3)
        if not force:
            dst.unlink(missing_ok=True)
            raise VerifyError(message + "; restore it anyway with --force")
        events.warn(reporter, message + "; kept anyway (--force)", who)
        warnings.append(message)


def version_file(version: VersionInfo, rec: DiskRecord) -> Path:
    """The version's file for ``rec``, refused unless a regular file (never a link)."""
    src = version.path / rec.file
    if src.is_symlink() or not src.is_file():
        raise RestoreError(f"{src} is missing or not a regular file; the version is damaged")
    return src


def progress_of(reporter: Reporter, who: str, rec: DiskRecord) -> Callable[[int, int], None]:
    """The copier's progress callback, reported as ``rec``'s target."""

    def progress(done: int, total: int) -> None:
        reporter(Progress(who, rec.target, done, total))

    return progress


def mismatch(version: VersionInfo, rec: DiskRecord, actual: str) -> str:
    """Why ``rec``'s file, whose BLAKE3 is ``actual``, is not what the manifest says."""
    return (
        f"{rec.file} of {version.guest} version {version.number} does not match its "
        f"manifest (blake3 {actual[:12]}.. != {rec.blake3[:12]}..)"
    )


def free_path(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{n}-{path.name}")
        n += 1
    return candidate
