"""Restoring a disk kept with its backing chain (``chain = "keep"`` versions).

Every file of the chain is copied beside the restored top file, checked against
the manifest as any restored file is, and each copy is then rebased unsafely
(``qemu-img rebase -u``, header only) onto the copy beneath it, by its bare
name: qemu resolves a relative backing name from the overlay's own folder, so
the restored files stay usable if the folder is moved as a whole.

A flattened version needs none of this: its disk is one standalone qcow2.
"""

from __future__ import annotations

import threading
from pathlib import Path

from guestsafe.engine.archive.manifest import ChainFile, DiskRecord
from guestsafe.engine.archive.names import printable
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.errors import RestoreError
from guestsafe.engine.events import Reporter
from guestsafe.engine.hypervisor import chains
from guestsafe.engine.restore.files import free_path, restore_file


def backing_path(top: Path, rec: DiskRecord, layer: ChainFile) -> Path:
    """Where a backing file of ``rec`` goes: beside ``top``, named as the top is."""
    prefix = top.name.removesuffix(rec.file)
    return free_path(top.parent / f"{prefix}{layer.file}")


def restore_chain(
    version: VersionInfo,
    rec: DiskRecord,
    top: Path,
    force: bool,
    reporter: Reporter,
    who: str,
    cancel: threading.Event | None,
    warnings: list[str],
) -> list[Path]:
    """Copy the backing files of ``rec`` beside its restored ``top`` and link them up.

    Returns the files written (the top excluded); on failure removes them and raises.
    """
    if not rec.chain:
        return []
    written: list[Path] = []
    try:
        for depth, layer in enumerate(rec.chain, start=1):
            dst = backing_path(top, rec, layer)
            # restore_file checks a DiskRecord's file: the backing file's, named for the log.
            as_record = DiskRecord(
                f"{rec.target} backing {depth}", layer.source, layer.format, 0, 0,
                layer.file, layer.blake3, layer.size,
            )  # fmt: skip
            restore_file(version, as_record, dst, force, reporter, who, cancel, warnings)
            written.append(dst)
        files = [top, *written]
        for upper, lower, layer in zip(files, files[1:], rec.chain, strict=False):
            chains.rebase_unsafe(upper, lower.name, layer.format)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def check_no_kept_chain(version: VersionInfo) -> None:
    """Refuse restoring a kept chain over the original guest (not supported yet).

    Writing the base back could change a file other guests' overlays read, and
    writing only the top over a base that changed since would corrupt the disk;
    a clone restore brings the whole chain back beside the original instead.
    """
    kept = [r.target for r in version.manifest.disks if r.chain]
    if kept:
        guest = printable(version.guest)
        raise RestoreError(
            f"version {version.number} of {guest} keeps the backing chain of "
            f"{', '.join(kept)} (chain = keep); guestsafe does not restore a chain over the "
            f"original, whose base other guests may share: restore it as a new guest "
            f"(guestsafe restore {guest} {version.number} NEW-NAME) and switch to that"
        )

