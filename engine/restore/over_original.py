"""Restore a version over the guest it came from, which must be shut off.

The order is what makes it safe: the guest's lock first, then every check
(power state, a saved memory image, paths another guest uses, the version's
own checks), then the caller's confirmation, and only then a file is written.
Each restored file is copied beside its original under a temporary name and
fsynced; only when every copy is complete are they swapped in by rename, and
the original is kept under a ``.replaced-`` name until the new definition is
in place. The restore journal records each step, so ``recover`` can finish the
swap or leave the originals as they were after a crash (``over_recovery``).

A block-device disk cannot be copied beside itself or renamed: it is written in
place, last, once every file copy is complete and its version file checked, with
the journal saying so first; it cannot be put back (block_targets, FORMAT.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from guestsafe.engine import events, failpoints, locks
from guestsafe.engine.archive.manifest import DiskRecord
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.errors import Cancelled, RestoreError, io_failure
from guestsafe.engine.events import PhaseChanged, Reporter
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import GuestInfo
from guestsafe.engine.paths import Paths
from guestsafe.engine.restore import swap
from guestsafe.engine.restore.block_targets import check_device_target, restore_to_device
from guestsafe.engine.restore.chain_restore import (
    chain_targets,
    check_base_not_shared,
    relink_in_place,
)
from guestsafe.engine.restore.files import check_verified, restore_file, warn_missing_firmware
from guestsafe.engine.restore.over_checks import (
    check_managed_save,
    check_not_shared,
    check_shut_off,
)
from guestsafe.engine.restore.plan import (
    RestoreResult,
    accept_damage,
    check_plain_files,
    check_sources,
    domain_xml_problem,
    read_domain_xml,
)
from guestsafe.engine.restore.swap_journal import FileSwap, RestoreEntry, RestoreJournal, SwapPhase


@dataclass(frozen=True)
class OverwriteNotice:
    """What a restore over the original is about to do, for the person asked to confirm it."""

    guest: str
    number: int
    finished: str
    replaced: list[tuple[Path, Path | None]]  # each path and the name it is kept under
    keep_replaced: bool
    discards_saved_memory: bool
    in_place: tuple[Path, ...] = ()  # block devices, overwritten where they are

    def lines(self) -> list[str]:
        lines = [f"restore version {self.number} ({self.finished}) over guest {self.guest!r}:"]
        for path, kept in self.replaced:
            if path in self.in_place:
                lines.append(
                    f"  {path}: block device overwritten in place; what it holds now is lost "
                    "(a device cannot be kept aside)"
                )
            elif kept is None:
                lines.append(f"  {path}: written (no file there now)")
            elif self.keep_replaced:
                lines.append(f"  {path}: replaced; the current file is kept as {kept}")
            else:
                lines.append(f"  {path}: replaced; the current file is deleted after success")
        if not self.keep_replaced and any(k for _, k in self.replaced):
            lines.append(
                "  anything written since the version was taken is lost "
                "(guestsafe restore --overwrite --keep-replaced keeps the current files)"
            )
        if self.discards_saved_memory:
            lines.append("  the guest's saved memory image is discarded")
        return lines


Confirm = Callable[[OverwriteNotice], bool]


class _AnyEvent(threading.Event):
    """Set when it, or any event it watches, is set (for the copier's cancel)."""

    def __init__(self, *watched: threading.Event | None) -> None:
        super().__init__()
        self._watched = [e for e in watched if e is not None]

    def is_set(self) -> bool:
        return super().is_set() or any(e.is_set() for e in self._watched)


def restore_over_original(
    archive: Archive,
    guest: str,
    number: int,
    hv: Hypervisor,
    paths: Paths,
    *,
    force: bool = False,
    keep_replaced: bool = False,
    confirm: Confirm | None = None,
    reporter: Reporter = events.null_reporter,
    cancel: threading.Event | None = None,
) -> RestoreResult:
    """Put a version back in place of the guest it came from.

    ``confirm`` is asked once every check has passed and before anything is
    written; False cancels. None means the caller has asked already.
    """
    version = archive.version(guest, number)
    key = f"guest:{version.manifest.uuid}"
    with locks.acquire(paths.state_dir, key, f"restore over {guest}"):
        check_shut_off(hv, guest)
        discard_saved = check_managed_save(hv, guest, force, reporter)
        warnings = check_verified(version, force, reporter, guest)
        check_plain_files(version)
        check_sources(version)  # the files land at the sources: they must be plain paths
        xml = read_domain_xml(version)
        accept_damage(domain_xml_problem(version, xml), force, reporter, guest, warnings)
        warn_missing_firmware(version, reporter, guest, warnings)
        targets = _targets(version)
        check_not_shared(hv, guest, [dst for _, dst in targets])
        _check_devices(hv, guest, targets)
        check_base_not_shared(hv, guest, version)
        swaps = [swap.plan_swap(dst, datetime.now()) for _, dst in targets]
        notice = _notice(version, swaps, keep_replaced, discard_saved)
        if confirm is not None and not confirm(notice):
            raise Cancelled(f"restore over {guest!r} not confirmed; nothing was changed")
        if discard_saved:
            hv.discard_managed_save(guest)
        entry = RestoreEntry(
            guest, version.manifest.uuid, hv.uri, number, swaps, xml, keep_replaced
        )
        info = _run(hv, paths, entry, version, targets, force, reporter, cancel, warnings)
    _say_done(entry, reporter)
    reporter(events.RunEnded(events.RunKind.RESTORE, True, "restore successful", guest))
    disk_paths = [dst for _, dst in targets]
    return RestoreResult(guest, info.uuid, info.macs, disk_paths, False, warnings)


def _targets(version: VersionInfo) -> list[tuple[DiskRecord, Path]]:
    targets = [(rec, Path(rec.source)) for rec in version.manifest.disks]
    targets += chain_targets(version)  # a kept chain's backing files go back too
    if version.manifest.nvram:
        targets.append((version.manifest.nvram, Path(version.manifest.nvram.source)))
    if version.manifest.tpm is not None:  # back where swtpm keeps it for this UUID
        targets += [(rec, Path(rec.source)) for rec in version.manifest.tpm.files]
    return targets


def _check_devices(hv: Hypervisor, guest: str, targets: list[tuple[DiskRecord, Path]]) -> None:
    """The original's block devices: there, large enough, not mounted, no other guest's."""
    for rec, dst in targets:
        if rec.source_kind != "block":
            continue
        if not swap.plan_swap(dst, datetime.now()).in_place:
            raise RestoreError(
                f"{rec.target} of guest {guest!r} was the block device {dst}, which is missing "
                "now; activate it (or restore as a new guest with --disk-target)"
            )
        check_device_target(dst, rec, hv, owner=guest, check_signatures=False)


def _notice(
    version: VersionInfo, swaps: list[FileSwap], keep: bool, discard_saved: bool
) -> OverwriteNotice:
    replaced = [(Path(s.path), Path(s.replaced) if s.had_original else None) for s in swaps]
    in_place = tuple(Path(s.path) for s in swaps if s.in_place)
    return OverwriteNotice(
        version.guest, version.number, version.date, replaced, keep, discard_saved, in_place
    )


def _run(
    hv: Hypervisor,
    paths: Paths,
    entry: RestoreEntry,
    version: VersionInfo,
    targets: list[tuple[DiskRecord, Path]],
    force: bool,
    reporter: Reporter,
    cancel: threading.Event | None,
    warnings: list[str],
) -> GuestInfo:
    journal = RestoreJournal(paths.state_dir)
    journal.write(entry)  # phase copy: before the first byte is written
    guest = entry.guest
    with _watch_started(hv, guest) as started:
        stop = _AnyEvent(cancel, started)
        try:
            reporter(PhaseChanged(guest, "copy"))
            pairs = list(zip(targets, entry.files, strict=True))
            for (rec, _), planned in pairs:
                if not planned.in_place:
                    restore_file(
                        version, rec, Path(planned.temp), force, reporter, guest, stop, warnings
                    )
                    failpoints.hit("restore-over.copied")
            relink_in_place(version, {p.path: Path(p.temp) for p in entry.files})
            _check_still_off(hv, guest, started)
            # Devices last: once written they cannot go back, so every file is ready first.
            for (rec, _), planned in pairs:
                if planned.in_place:
                    planned.writing = True
                    journal.write(entry)  # recover must know the device may be half-written
                    failpoints.hit("restore-over.device")
                    dev = Path(planned.path)
                    restore_to_device(version, rec, dev, force, reporter, guest, stop, warnings)
                    _check_still_off(hv, guest, started)
        except BaseException as exc:
            for planned in entry.files:
                swap.discard_copy(planned)
            journal.remove(entry)
            _warn_half_written(entry, reporter)
            if isinstance(exc, Cancelled) and started is not None and started.is_set():
                raise RestoreError(_started_message(guest)) from exc
            raise
        info = _swap_and_define(hv, journal, entry, reporter)
    _cleanup(journal, entry)
    return info


def _warn_half_written(entry: RestoreEntry, reporter: Reporter) -> None:
    for planned in entry.files:
        if planned.writing:
            events.warn(reporter, half_written_message(entry, planned.path), entry.guest)


def half_written_message(entry: RestoreEntry, device: str) -> str:
    return (
        f"the block device {device} of guest {entry.guest!r} was being overwritten with "
        f"version {entry.number} and may be incomplete; do not start the guest: run "
        f"'guestsafe restore {entry.guest} {entry.number} --overwrite' again"
    )


def _swap_and_define(
    hv: Hypervisor, journal: RestoreJournal, entry: RestoreEntry, reporter: Reporter
) -> GuestInfo:
    journal.phase(entry, SwapPhase.SWAP)
    current: str | None = None
    try:
        failpoints.hit("restore-over.swap")
        reporter(PhaseChanged(entry.guest, "swap"))
        for planned in entry.files:
            current = planned.path
            swap.swap_in(planned)
            failpoints.hit("restore-over.swapped")
        current = None
        journal.phase(entry, SwapPhase.DEFINE)
        failpoints.hit("restore-over.define")
        return hv.define(entry.new_xml)
    except BaseException as exc:
        # Not a crash: the originals can go straight back, and the old definition stayed.
        for planned in reversed(entry.files):
            swap.put_back(planned)
        journal.remove(entry)
        events.warn(reporter, "restore failed: every file was put back as it was", entry.guest)
        for planned in entry.files:
            if planned.in_place:
                events.warn(
                    reporter,
                    f"the block device {planned.path} keeps the restored version "
                    "(a device written in place cannot be put back)",
                    entry.guest,
                )
        if isinstance(exc, OSError):
            raise io_failure("putting the restored copy in place", current, exc) from exc
        raise


def _cleanup(journal: RestoreJournal, entry: RestoreEntry) -> None:
    journal.phase(entry, SwapPhase.CLEANUP)
    failpoints.hit("restore-over.cleanup")
    finish_cleanup(entry)
    journal.remove(entry)


def finish_cleanup(entry: RestoreEntry) -> None:
    """The restore succeeded: delete the replaced files unless they are kept."""
    if not entry.keep_replaced:
        for planned in entry.files:
            swap.drop_replaced(planned)


def _say_done(entry: RestoreEntry, reporter: Reporter) -> None:
    for planned in entry.files:
        if planned.in_place:
            events.info(reporter, f"wrote the version onto {planned.path} in place", entry.guest)
            continue
        if not planned.had_original:
            continue
        if entry.keep_replaced:
            kept = f"kept the replaced {planned.path} as {planned.replaced}"
            events.info(reporter, kept, entry.guest)
        else:
            events.info(reporter, f"deleted the replaced {planned.path}", entry.guest)


@contextmanager
def _watch_started(hv: Hypervisor, guest: str) -> Iterator[threading.Event | None]:
    """libvirt's start event for the guest, when it is defined (else nothing can start it)."""
    if not hv.exists(guest):
        with nullcontext(None) as nothing:
            yield nothing
        return
    with hv.watch_started(guest) as started:
        yield started


def _check_still_off(hv: Hypervisor, guest: str, started: threading.Event | None) -> None:
    if (started is not None and started.is_set()) or hv.exists(guest):
        try:
            check_shut_off(hv, guest)
        except RestoreError as exc:
            raise RestoreError(_started_message(guest)) from exc
        if started is not None and started.is_set():
            raise RestoreError(_started_message(guest))


def _started_message(guest: str) -> str:
    return (
        f"guest {guest!r} was started during the restore; the restored copies were "
        "discarded and its disks are as they were"
    )
