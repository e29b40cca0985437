"""One restore test: boot a version cut off from the network, wait, record, remove.

The clone is an instant-boot clone (``instant_boot.boot_clone``): overlays on the
version's files, new MACs, no autostart, and here every link down and one boot
only (``isolate.py``). It lives only for the test: ``discard_clone`` removes it
whatever happened, and a test that dies before that leaves a boot record marked
``restore_test`` that ``guestsafe recover`` finds once the test's lock is free
(``cleanup.py``). The outcome goes to the version's ``restore-test.json``; a failed
test changes nothing else, it only stops the version counting as good.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from guestsafe.engine import events, locks
from guestsafe.engine.archive.names import (
    LOCAL_SERIES_HOST,
    encode_guest_name,
    printable,
    split_series,
)
from guestsafe.engine.archive.restore_record import RestoreTest, write_restore_test
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.errors import Cancelled, GuestsafeError, LockBusy, NotFoundError
from guestsafe.engine.events import Event, Reporter, RunEnded
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.paths import Paths
from guestsafe.engine.restore.boottest.isolate import isolate_xml
from guestsafe.engine.restore.boottest.probes import CloneProbes
from guestsafe.engine.restore.boottest.screenshot import take_screenshot
from guestsafe.engine.restore.boottest.signs import CANCELLED, Outcome, Wanted, watch
from guestsafe.engine.restore.instant_boot import boot_clone, discard_clone
from guestsafe.engine.restore.plan import NEW, RestorePlan, plan_restore

DEFAULT_SECONDS = 60
LOCK_PREFIX = "restore-test:"


@dataclass(frozen=True)
class TestSettings:
    """A job's ``restore_test_console`` and ``restore_test_seconds``."""

    __test__ = False  # not a pytest class, whatever its name

    console_line: str | None = None
    seconds: int = DEFAULT_SECONDS


def clone_name(series: str) -> str:
    """The test clone's name: a series of another host ("node2/web1") gives
    "node2-web1-restore-test", since libvirt refuses a "/" in a guest's name."""
    host, guest = split_series(series)
    prefix = "" if host == LOCAL_SERIES_HOST else f"{host}-"
    return f"{prefix}{guest}-restore-test"


def lock_key(clone: str) -> str:
    return LOCK_PREFIX + clone


def newest_good(archive: Archive, guest: str) -> VersionInfo:
    """The version ``test-restore GUEST`` tests: the newest whose verification did not fail."""
    good = [v for v in archive.versions(guest) if v.verified is not False]
    if not good:
        raise NotFoundError(f"{printable(guest)} has no good version in {archive.root} to test")
    return max(good, key=lambda v: v.number)


def run_restore_test(
    archive: Archive,
    version: VersionInfo,
    hv: Hypervisor,
    paths: Paths,
    settings: TestSettings = TestSettings(),
    *,
    reporter: Reporter = events.null_reporter,
    cancel: threading.Event | None = None,
) -> RestoreTest:
    """Boot ``version`` as a throw-away clone and record whether it came up."""
    name = clone_name(version.guest)
    what = f"restore test of {version.guest} version {version.number}"
    try:
        lock = locks.acquire(paths.state_dir, lock_key(name), what)
    except LockBusy as exc:
        raise LockBusy(f"another restore test of {printable(version.guest)} runs: {exc}") from exc
    with lock:
        plan = plan_restore(archive, version.guest, version.number, name, hv)
        at = datetime.now(UTC).isoformat(timespec="seconds")
        events.info(reporter, f"{what}: booting {name}, every network link down", version.guest)
        outcome, screenshot = _boot_and_watch(plan, hv, paths, settings, reporter, cancel)
    if outcome.problem == CANCELLED:
        raise Cancelled(f"{what} cancelled; nothing recorded, the clone removed")
    test = RestoreTest(
        ok=outcome.ok,
        at=at,
        sign=outcome.sign,
        seconds=round(outcome.seconds, 1) if outcome.ok else None,
        problem=outcome.problem,
        screenshot=screenshot,
        error=outcome.error,
    )
    write_restore_test(version.path, test)
    say = events.info if test.ok else events.error  # an error too: someone must look
    say(reporter, f"{what}: {describe(test)}", version.guest)
    return test


def _boot_and_watch(
    plan: RestorePlan,
    hv: Hypervisor,
    paths: Paths,
    settings: TestSettings,
    reporter: Reporter,
    cancel: threading.Event | None,
) -> tuple[Outcome, str | None]:
    name, version = plan.new_name, plan.version
    began = _now()
    try:
        boot_clone(
            plan,
            hv,
            paths,
            mac_policy=NEW,
            reporter=_without_run_end(reporter),
            cancel=cancel,
            xml_filter=isolate_xml,
            restore_test=True,
        )
    except Cancelled:
        return Outcome(False, None, 0.0, CANCELLED), None
    except LockBusy:
        raise  # a backup of the guest runs: no verdict on the version
    except GuestsafeError as exc:
        # boot_clone removed what it made. The guest never ran (no room or no write
        # access for the overlays, libvirt or QEMU refused the clone): this host
        # failed the test, the version did not, so it stays good for retention.
        problem = f"the clone could not be started: {exc.message}"
        return Outcome(False, None, _now() - began, problem, error=True), None
    screenshot = None
    probes: CloneProbes | None = None
    try:
        probes = CloneProbes(hv, name, began)
        wanted = Wanted(settings.console_line, settings.seconds)
        outcome = watch(probes, wanted, cancel=cancel)
        if outcome.ok:
            screenshot, note = take_screenshot(hv, name, version.path)
            if note:
                events.warn(reporter, note, version.guest)
    finally:
        for line in _discard(name, hv, paths):
            events.info(reporter, f"restore test: {line}", version.guest)
        if probes is not None and probes.console is not None and _owns(name, probes.console):
            # The clone's own console file (clone_xml names it after the clone, new
            # each test); its verdict is recorded, the file would only pile up.
            probes.console.unlink(missing_ok=True)
    return outcome, screenshot


def _owns(clone: str, path: Path) -> bool:
    # clone_xml names a clone's own console file "<encoded clone name>-<original's>".
    return encode_guest_name(clone)[:160] + "-" in path.name


def _discard(name: str, hv: Hypervisor, paths: Paths) -> list[str]:
    # Removing the clone is the test's promise; a failure to do so is said, and
    # recovery tries again (the boot record stays until the clone is gone).
    try:
        return discard_clone(name, hv, paths)
    except GuestsafeError as exc:
        return [f"could not remove {name} ({exc.message}); guestsafe recover removes it"]


def describe(test: RestoreTest) -> str:
    """One line for logs and mails: "passed: guest agent answered after 14.2 s"."""
    if test.error:
        return f"could not run (not the version's fault): {test.problem}"
    if not test.ok:
        return f"FAILED: {test.problem}"
    how = {
        "agent": "the guest agent answered",
        "console": "the console line appeared",
        "running": "it stayed running",
    }
    return f"passed: {how.get(test.sign or '', 'alive')} after {test.seconds} s"


def _without_run_end(reporter: Reporter) -> Reporter:
    """boot_clone's "instant boot successful" is not this test's end."""

    def filtered(event: Event) -> None:
        if not isinstance(event, RunEnded):
            reporter(event)

    return filtered


def _now() -> float:
    return time.monotonic()
