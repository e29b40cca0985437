"""Restoring a disk kept with its backing chain (``chain = "keep"`` versions).

Every file of the chain is copied beside the restored top file, checked against
the manifest as any restored file is, and each copy is then rebased unsafely
(``qemu-img rebase -u``, header only) onto the copy beneath it, by its bare
name: qemu resolves a relative backing name from the overlay's own folder, so
the restored files stay usable if the folder is moved as a whole.

Over the original, every file of the chain goes back where it was on the host,
through the same swap as any restored file (``over_original``), each copy rebased
onto the final path of the one beneath it before the swap. A backing file that
another guest's disk also reads is refused: their overlays would then read a
base that changed under them.

A flattened version needs none of this: its disk is one standalone qcow2.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path, PurePosixPath

from guestsafe.engine.archive.manifest import ChainFile, DiskRecord
from guestsafe.engine.archive.names import printable
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.errors import RestoreError
from guestsafe.engine.events import Reporter
from guestsafe.engine.hypervisor import chains
from guestsafe.engine.hypervisor.connection import Hypervisor
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
            record = as_record(rec, depth, layer)
            restore_file(version, record, dst, force, reporter, who, cancel, warnings)
            written.append(dst)
        files = [top, *written]
        for upper, lower, layer in zip(files, files[1:], rec.chain, strict=False):
            chains.rebase_unsafe(upper, lower.name, layer.format)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def as_record(rec: DiskRecord, depth: int, layer: ChainFile) -> DiskRecord:
    """A backing file as the record restore_file copies and checks, named for the log."""
    return DiskRecord(
        f"{rec.target} backing {depth}", layer.source, layer.format, 0, 0,
        layer.file, layer.blake3, layer.size,
    )  # fmt: skip


# --- over the original ----------------------------------------------------------


def chain_targets(version: VersionInfo) -> list[tuple[DiskRecord, Path]]:
    """Every kept backing file and the path it goes back to (where it was on the host)."""
    targets = []
    for rec in version.manifest.disks:
        for depth, layer in enumerate(rec.chain, start=1):
            source = PurePosixPath(layer.source)
            if not source.is_absolute() or ".." in source.parts or "\x00" in layer.source:
                raise RestoreError(
                    f"the manifest of version {version.number} of {printable(version.guest)} "
                    f"gives a backing file of {rec.target} the source {printable(layer.source)}, "
                    "not a plain absolute path; it was edited or is corrupt (restore as a new "
                    "guest with --target-dir)"
                )
            targets.append((as_record(rec, depth, layer), Path(layer.source)))
    return targets


def check_base_not_shared(hv: Hypervisor, guest: str, version: VersionInfo) -> None:
    """Refuse when a backing file to be written back is read by another guest's disk.

    Other guests' overlays on a shared base would read the restored base under
    data they wrote over the old one: their disks would be corrupt.
    """
    ours = {_identity(path) for _, path in chain_targets(version)}
    if not ours:
        return
    for info in hv.guests():
        if info.name == guest:
            continue
        for disk in info.disks:
            try:
                layers = chains.disk_chain(replace(disk, readonly=False, device="disk"))
            except chains.ChainError:
                continue  # a chain qemu-img cannot read cannot be ours either
            for layer in (layers or [])[1:]:
                if _identity(layer.path) in ours:
                    raise RestoreError(
                        f"{layer.path} is also the backing file of disk {disk.target} of "
                        f"guest {printable(info.name)!r}; restoring the chain over "
                        f"{guest!r} would corrupt that guest's disk. Nothing was changed "
                        f"(restore as a new guest: guestsafe restore {printable(guest)} "
                        f"{version.number} NEW-NAME)"
                    )


def relink_in_place(version: VersionInfo, temps: dict[str, Path]) -> None:
    """Rebase each restored copy (still under its temporary name) onto the final path
    of the file beneath it, so the chain holds together once the copies are swapped in."""
    for rec in version.manifest.disks:
        # Keyed as plan_swap names them: str(Path(source)).
        sources = [str(Path(rec.source)), *(str(Path(layer.source)) for layer in rec.chain)]
        for upper, lower, layer in zip(sources, sources[1:], rec.chain, strict=False):
            chains.rebase_unsafe(temps[upper], lower, layer.format)


def _identity(path: Path) -> tuple[object, ...]:
    try:
        st = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    return ("inode", st.st_dev, st.st_ino)
