"""One guest's backup as it goes: the state the runner and a copy strategy share.

The runner owns the phases (``guest_backup.py``); a copy strategy
(``cold_copy.py``, ``push_copy.py``) moves the bytes. Both read and write this
small record, and speak through its callables, so neither needs the other.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from guestsafe.engine.archive.manifest import CheckpointRecord, DiskRecord, NotCopied, TpmRecord
from guestsafe.engine.archive.partial import PartialVersion
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.backup.phases import Phase
from guestsafe.engine.errors import CopyError, naming
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import SHUTOFF, DiskInfo, GuestInfo
from guestsafe.engine.modes import Mode

# say(level, text): a line of the run's log about this guest (level from logging).
Say = Callable[[int, str], None]
# enter(phase, partial): journal the phase (and the partial's path), report it, and
# raise Cancelled when the run was cancelled; the runner supplies it.
EnterPhase = Callable[[Phase, Path | None], None]
# progress(item, done, total): how far the copy or hash of ``item`` has come.
ReportProgress = Callable[[str, int, int], None]
# downtime(seconds): the guest runs again after this long; the run log records it.
ReportDowntime = Callable[[float], None]


def _no_phase(_phase: Phase, _partial: Path | None) -> None:
    """For a run nobody journals (tests)."""


def _no_progress(_item: str, _done: int, _total: int) -> None:
    """For a run nobody watches."""


def _no_downtime(_seconds: float) -> None:
    """For a run nobody watches."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class GuestRun:
    """What is known and done so far in one guest's backup."""

    name: str
    mode: Mode  # what is really done; a push mode may fall back to stop
    cancel: threading.Event
    say: Say
    enter: EnterPhase = _no_phase
    progress: ReportProgress = _no_progress
    downtime_known: ReportDowntime = _no_downtime
    info: GuestInfo | None = None
    was_state: str = "unknown"  # the power state before the job
    partial: PartialVersion | None = None
    records: list[DiskRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the version's notes
    include_readonly: bool = False  # the job's: read-only disks and media copied too
    tpm: TpmRecord | None = None  # the emulated TPM's state, copied while off
    checkpoint: CheckpointRecord | None = None  # the checkpoint a push backup began
    not_copied: list[NotCopied] = field(default_factory=list)  # media recorded only
    # Timings: monotonic seconds, except the ISO start for the manifest.
    # t0 is reset when this guest's own work begins (preflight), and ended set
    # when it is settled: in a job of several guests each has its own duration.
    t0: float = field(default_factory=time.monotonic)
    ended: float | None = None
    started_iso: str = field(default_factory=now_iso)
    stopped_at: float | None = None  # when the shutdown was asked for
    downtime: float | None = None
    bytes_copied: int = 0
    # The guest's name in the archive: its own on this machine, "node2/web1" for web1
    # of host node2 (archive/names.py, series_name); "" means the guest's name.
    series: str = ""

    @property
    def archive_name(self) -> str:
        return self.series or self.name

    def say_info(self, text: str) -> None:
        self.say(logging.INFO, text)

    def say_error(self, text: str) -> None:
        self.say(logging.ERROR, text)

    def warn(self, text: str) -> None:
        """A warning in the log that the version's notes keep too."""
        self.warnings.append(text)
        self.say(logging.WARNING, text)

    def note(self, text: str) -> None:
        """A fact about the version, kept in its notes, logged as information."""
        self.warnings.append(text)
        self.say(logging.INFO, text)

    def running_again(self) -> None:
        """The guest runs again: the downtime is from the shutdown request to now."""
        if self.stopped_at is not None:
            self.downtime = time.monotonic() - self.stopped_at
            self.downtime_known(self.downtime)

    def skip_media(self) -> None:
        """Record the read-only disks and media the job does not copy, and say so."""
        assert self.info is not None
        for disk in self.info.disks:
            if disk.source is None or disk.copied(self.include_readonly):
                continue
            kind = "read-only" if disk.readonly else disk.device
            reason = f"{kind} image, recorded only (include_readonly = true copies it)"
            self.not_copied.append(NotCopied(disk.target, disk.source, disk.device, reason))
            self.say_info(f"not copying {disk.target} ({disk.source}): {reason}")

    def copied_disks(self) -> list[DiskInfo]:
        """The disks this backup copies, in the domain's order."""
        assert self.info is not None
        return [d for d in self.info.disks if d.copied(self.include_readonly)]

    def copy_progress(self, item: str) -> Callable[[int, int], None]:
        """The copier's progress callback for ``item``."""

        def report(done: int, total: int) -> None:
            self.progress(item, done, total)

        return report


def begin_partial(run: GuestRun, archive: Archive, hv: Hypervisor, phase: Phase) -> PartialVersion:
    """The guest's next partial version, journalled as ``phase``, with its domain.xml."""
    with naming("creating a partial version in", archive.root):
        run.partial = archive.begin(run.archive_name)
    run.enter(phase, run.partial.path)
    xml = hv.xml(run.name)
    with naming("writing the domain XML to", run.partial.path):
        run.partial.write_domain_xml(xml)
    return run.partial


def check_still_off(hv: Hypervisor, run: GuestRun) -> None:
    """Someone starting the guest mid-copy makes the copy worthless: refuse it."""
    state = hv.state(run.name)
    if state != SHUTOFF:
        raise CopyError(
            f"guest {run.name!r} was started by someone else during the copy "
            f"(it is {state}); the copy was discarded"
        )
