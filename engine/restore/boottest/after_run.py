"""The restore tests a backup run owes: each guest's new version, when its job says so.

Called once the run is over (the destination's lock released): the test boots a
clone from the archive, which a run holding that lock must not wait for. A job
on an external device is not tested after its run: its archive is unmounted
then (run test-restore with the device mounted instead).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from guestsafe.engine import events
from guestsafe.engine.archive.restore_record import RestoreTest
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.errors import GuestsafeError
from guestsafe.engine.events import GuestOutcome, Reporter
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.jobs.model import Job, RestoreTestWhen
from guestsafe.engine.paths import Paths
from guestsafe.engine.restore.boottest.due import is_due
from guestsafe.engine.restore.boottest.run import TestSettings, describe, run_restore_test


@dataclass(frozen=True)
class TestLine:
    """One guest's restore test after a run, as the log and the notification say it."""

    __test__ = False

    guest: str
    version: int
    test: RestoreTest | None  # None: the test could not be run at all
    text: str

    @property
    def failed(self) -> bool:
        return self.test is None or not self.test.ok


def settings_of(job: Job) -> TestSettings:
    return TestSettings(job.restore_test_console, job.restore_test_seconds)


def tests_after_run(
    job: Job,
    outcomes: Sequence[GuestOutcome],
    hv: Hypervisor,
    paths: Paths,
    reporter: Reporter = events.null_reporter,
    cancel: threading.Event | None = None,
) -> list[TestLine]:
    """Test each version the run made whose test is due; one line per test."""
    made = [(o.guest, o.version) for o in outcomes if o.ok and o.version is not None]
    if job.restore_test == RestoreTestWhen.NEVER or not made:
        return []
    if job.device is not None:
        return [
            TestLine(g, n, None, f"restore test of {g} version {n} skipped: on a device")
            for g, n in made
        ]
    lines = []
    for guest, number in made:
        if cancel is not None and cancel.is_set():
            break
        lines.append(_one(job, guest, number, hv, paths, reporter, cancel))
    return [line for line in lines if line is not None]


def _one(
    job: Job,
    guest: str,
    number: int,
    hv: Hypervisor,
    paths: Paths,
    reporter: Reporter,
    cancel: threading.Event | None,
) -> TestLine | None:
    what = f"restore test of {guest} version {number}"
    try:
        archive = Archive.open(job.destination)
        versions = archive.versions(guest)
        if not is_due(job.restore_test, [v for v in versions if v.number != number]):
            return None
        version = archive.version(guest, number)
        test = run_restore_test(
            archive, version, hv, paths, settings_of(job), reporter=reporter, cancel=cancel
        )
    except GuestsafeError as exc:
        events.error(reporter, f"{what}: could not run: {exc.message}", guest)
        return TestLine(guest, number, None, f"{what}: could not run: {exc.message}")
    return TestLine(guest, number, test, f"{what}: {describe(test)}")
