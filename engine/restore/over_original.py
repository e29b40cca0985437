"""Restore a version over the guest it came from, which must be shut off."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from guestsafe.engine import events, locks
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.errors import RestoreError
from guestsafe.engine.events import PhaseChanged, Reporter
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import SHUTOFF
from guestsafe.engine.paths import Paths
from guestsafe.engine.restore.files import check_verified, free_path, restore_file
from guestsafe.engine.restore.plan import (
    RestoreResult,
    accept_damage,
    check_plain_files,
    check_sources,
    domain_xml_problem,
    read_domain_xml,
)


def restore_over_original(
    archive: Archive,
    guest: str,
    number: int,
    hv: Hypervisor,
    paths: Paths,
    *,
    force: bool = False,
    reporter: Reporter = events.null_reporter,
    cancel: threading.Event | None = None,
) -> RestoreResult:
    """Put a version back in place of the guest it came from.

    The guest must be shut off. Its current files are renamed aside and only
    removed once the restored ones are complete and the guest is redefined;
    on any failure they are renamed back.
    """
    version = archive.version(guest, number)
    if hv.exists(guest) and hv.state(guest) != SHUTOFF:
        raise RestoreError(
            f"guest {guest!r} is {hv.state(guest)}; shut it off before restoring over it"
        )
    warnings = check_verified(version, force, reporter, guest)
    check_plain_files(version)
    check_sources(version)  # the files land at the sources: they must be plain paths
    xml = read_domain_xml(version)
    accept_damage(domain_xml_problem(version, xml), force, reporter, guest, warnings)
    targets = [(rec, Path(rec.source)) for rec in version.manifest.disks]
    if version.manifest.nvram:
        targets.append((version.manifest.nvram, Path(version.manifest.nvram.source)))
    with locks.acquire(paths.state_dir, f"guest:{version.manifest.uuid}", f"restore over {guest}"):
        aside = _set_aside([dst for _, dst in targets], reporter, guest)
        try:
            reporter(PhaseChanged(guest, "copy"))
            for rec, dst in targets:
                restore_file(version, rec, dst, force, reporter, guest, cancel, warnings)
            info = hv.define(xml)
        except BaseException:
            _put_back(aside, reporter, guest)
            raise
        for moved in aside.values():
            moved.unlink(missing_ok=True)
    reporter(events.RunEnded(events.RunKind.RESTORE, True, "restore successful", guest))
    return RestoreResult(guest, info.uuid, info.macs, [dst for _, dst in targets], False, warnings)


def _set_aside(files: list[Path], reporter: Reporter, who: str) -> dict[Path, Path]:
    aside: dict[Path, Path] = {}
    try:
        for path in files:
            if path.exists():
                moved = free_path(path.with_name(path.name + ".guestsafe-aside"))
                os.rename(path, moved)
                aside[path] = moved
                events.info(reporter, f"kept {path} aside as {moved}", who)
    except OSError:
        _put_back(aside, reporter, who)
        raise
    return aside


def _put_back(aside: dict[Path, Path], reporter: Reporter, who: str) -> None:
    for original, moved in aside.items():
        original.unlink(missing_ok=True)
        os.rename(moved, original)
        events.warn(reporter, f"restore failed: put {original} back as it was", who)
