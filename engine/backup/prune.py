"""``guestsafe prune JOB``: the job's retention, applied by hand, under a backup's locks.

What goes is what the dry run lists: both read ``Archive.retention_rows`` and
``apply_retention`` plans with the same rules (``calendar_retention``), so the
newest version, the newest verified one and every version a rule keeps stay.
The deletion takes the locks a backup of the job takes, at once or not at all
(a person is waiting): the destination's, the archive's own, and each guest's,
so it never runs beside a backup of the job nor beside a restore reading a
version (a restore holds its guest's lock). A guest whose lock is busy keeps
all its versions, and says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from guestsafe.engine import events, locks
from guestsafe.engine.archive.calendar_retention import Candidate
from guestsafe.engine.archive.in_use import versions_in_use
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.devices import mounts
from guestsafe.engine.errors import LockBusy
from guestsafe.engine.events import Reporter
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.jobs.coverage import job_series
from guestsafe.engine.jobs.model import Job, retention_policy
from guestsafe.engine.paths import Paths


@dataclass
class GuestPrune:
    """One guest's versions as the rules saw them, and what was deleted of them."""

    guest: str
    rows: list[tuple[Candidate, list[str]]]  # newest first; no reasons: it goes
    deleted: list[int] = field(default_factory=list)
    skipped: str | None = None  # why nothing of this guest was deleted


def prune_job(
    job: Job,
    hv: Callable[[], Hypervisor],
    paths: Paths,
    reporter: Reporter = events.null_reporter,
) -> list[GuestPrune]:
    """Delete, per guest of ``job``, the versions its retention lets go; each deletion told.

    Raises ``LockBusy`` if a backup (or another prune) holds the destination or
    the archive. ``hv`` connects, for a job on a device only (its guests' disks
    must not be the device mounted).
    """
    purpose = f"prune of job {job.name}"
    policy = retention_policy(job)
    done: list[GuestPrune] = []
    with _job_archive(job, hv, paths, reporter, purpose) as archive:
        for guest in job_series(job, archive.guests()):
            # Versions an instant-boot clone runs on stay (engine/archive/in_use.py).
            in_use = versions_in_use(paths.state_dir, archive.root, guest)
            outcome = GuestPrune(guest, archive.retention_rows(guest, policy, in_use))
            try:
                with _guest_locks(archive, guest, paths, purpose):
                    in_use = versions_in_use(paths.state_dir, archive.root, guest)
                    outcome.rows = archive.retention_rows(guest, policy, in_use)  # under the locks
                    outcome.deleted = archive.apply_retention(guest, policy, in_use)
            except LockBusy as exc:
                outcome.skipped = f"{exc.message}; its versions are kept"
                events.warn(reporter, f"guest {guest}: {outcome.skipped}")
            for number in outcome.deleted:
                events.info(reporter, f"deleted version {number} of guest {guest}")
            done.append(outcome)
    return done


@contextmanager
def _job_archive(
    job: Job, hv: Callable[[], Hypervisor], paths: Paths, reporter: Reporter, purpose: str
) -> Iterator[Archive]:
    """The job's archive, writable, under the destination's lock and the archive's own."""
    with ExitStack() as stack:
        dest_key = locks.destination_key(job.destination)
        stack.enter_context(locks.acquire(paths.state_dir, dest_key, purpose))
        if job.device is not None:
            archive = stack.enter_context(mounts.job_archive(job, hv(), paths.state_dir, reporter))
        else:
            archive = Archive.open(job.destination)
        stack.enter_context(locks.archive_lock(archive.root, purpose).acquire())
        yield archive


@contextmanager
def _guest_locks(archive: Archive, guest: str, paths: Paths, purpose: str) -> Iterator[None]:
    """The lock of each guest (by UUID) the versions of ``guest`` were taken of."""
    uuids = sorted({version.manifest.uuid for version in archive.versions(guest)})
    with ExitStack() as stack:
        for uuid in uuids:
            stack.enter_context(locks.acquire(paths.state_dir, locks.guest_key(uuid), purpose))
        yield
