"""The runner's phase machine against a fake hypervisor: order, power state, hooks, errors.

The guests' disks are plain files and the archive a real one in a temp dir; only
libvirt is faked, by an object with the methods the runner calls.
"""

from __future__ import annotations

import ast
import errno
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import blake3
import pytest

from guestsafe.engine.archive.store import Archive
from guestsafe.engine.backup import runner
from guestsafe.engine.backup.context import JobContext
from guestsafe.engine.backup.guest_backup import GuestBackup
from guestsafe.engine.backup.hooks import HookRunner
from guestsafe.engine.backup.journal import Journal
from guestsafe.engine.backup.phases import Phase
from guestsafe.engine.backup.results import RunResult
from guestsafe.engine.errors import (
    Cancelled,
    CopyError,
    HookFailed,
    HypervisorError,
    IOFailure,
    RunFailed,
    io_failure,
    naming,
)
from guestsafe.engine.events import Event, GuestDowntime, GuestOutcome, PhaseChanged, Progress
from guestsafe.engine.hypervisor.connection import Hypervisor, ShutdownResult
from guestsafe.engine.hypervisor.domain_xml import PAUSED, RUNNING, SHUTOFF, DiskInfo, GuestInfo
from guestsafe.engine.jobs.model import Hooks, Job
from guestsafe.engine.paths import Paths

MiB = 1024 * 1024
ENGINE = Path(__file__).resolve().parents[2] / "engine"


# --- the fake hypervisor ---------------------------------------------------------


@dataclass
class FakeGuest:
    name: str
    state: str
    disks: list[DiskInfo]
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))


class FakeHypervisor:
    """What the runner asks of libvirt, for guests whose disks are plain files.

    Every call that changes a guest, and every phase the runner reports, lands
    in one ``timeline`` of (what, guest) pairs, so tests can read the order.
    """

    uri = "test:///guestsafe-fake"
    hostname = "fakehost"

    def __init__(self, timeline: list[tuple[str, str]]) -> None:
        self.guests: dict[str, FakeGuest] = {}
        self.timeline = timeline
        self.refuse_start: set[str] = set()

    def guest(self, name: str) -> GuestInfo:
        g = self.guests[name]
        return GuestInfo(g.name, g.uuid, g.state, True, list(g.disks))

    def state(self, name: str) -> str:
        return self.guests[name].state

    def has_managed_save(self, name: str) -> bool:
        return False  # a fake guest is never saved

    def xml(self, name: str, *, inactive: bool = True) -> str:
        g = self.guests[name]
        return f"<domain type='kvm'><name>{g.name}</name><uuid>{g.uuid}</uuid></domain>\n"

    def shutdown(
        self,
        name: str,
        *,
        timeout: float,
        on_timeout: str = "abort",
        log: Callable[[str], None] = lambda _m: None,
        cancel: threading.Event | None = None,
    ) -> ShutdownResult:
        self.timeline.append(("shutdown", name))
        self.guests[name].state = SHUTOFF
        return ShutdownResult(False, 0.0)

    def start(self, name: str, *, paused: bool = False, attempts: int = 5) -> None:
        self.timeline.append(("start", name))
        if name in self.refuse_start:
            raise HypervisorError(f"cannot start guest {name!r}: refused by the test")
        self.guests[name].state = PAUSED if paused else RUNNING

    def resume(self, name: str) -> None:
        self.timeline.append(("resume", name))
        self.guests[name].state = RUNNING

    def wait_state(self, name: str, state: str, timeout: float) -> bool:
        return self.guests[name].state == state

    @contextmanager
    def watch_started(self, name: str) -> Iterator[threading.Event]:
        yield threading.Event()  # nobody else starts a fake guest


# --- a run in a temp dir ------------------------------------------------------------


def _b3(path: Path) -> str:
    return str(blake3.blake3(path.read_bytes()).hexdigest())


@dataclass
class Rig:
    root: Path
    timeline: list[tuple[str, str]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    cancel_on_progress: threading.Event | None = None  # set at the copy's first progress

    def __post_init__(self) -> None:
        self.hv = FakeHypervisor(self.timeline)
        self.archive = self.root / "archive"
        self.archive.mkdir(mode=0o700)
        home = self.root / "home"
        self.paths = Paths(
            home / "config" / "jobs.toml", home / "state", home / "log", home / "cache"
        )
        self.bin = self.root / "bin"
        self.bin.mkdir(mode=0o755)
        self.bin.chmod(0o755)  # hooks must not be writable by others (umask aside)

    def add_guest(self, name: str, state: str = RUNNING, size: int = MiB) -> Path:
        disk = self.root / f"{name}-vda.raw"
        with disk.open("wb") as f:
            f.write(os.urandom(size // 2))
            f.truncate(size)  # a hole at the end: the copier keeps it
        info = DiskInfo("vda", str(disk), "file", "disk", "raw", False, False)
        self.hv.guests[name] = FakeGuest(name, state, [info])
        return disk

    def job(self, guests: list[str], **options: Any) -> Job:
        options.setdefault("lock_wait", 0)
        return Job("nightly", guests, self.archive, **options)

    def report(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, PhaseChanged):
            self.timeline.append((f"phase {event.phase}", event.guest))
        if isinstance(event, Progress) and self.cancel_on_progress is not None:
            self.cancel_on_progress.set()

    def run(self, job: Job, cancel: threading.Event | None = None) -> RunResult:
        return runner.run_job(job, self._hv(), self.paths, self.report, cancel=cancel)

    def _hv(self) -> Hypervisor:
        return cast(Hypervisor, self.hv)

    def phases(self, guest: str) -> list[str]:
        return [e.phase for e in self.events if isinstance(e, PhaseChanged) and e.guest == guest]

    def calls(self) -> list[tuple[str, str]]:
        return [(what, g) for what, g in self.timeline if not what.startswith("phase ")]

    def versions(self, guest: str) -> list[int]:
        return [v.number for v in Archive.open(self.archive).versions(guest)]

    def partials(self) -> list[Path]:
        return sorted(self.archive.glob("*/.partial-*"))

    def hook(self, phase: str, exit_code: int = 0) -> list[str]:
        """A hook that notes its phase in ``hooks.log`` and exits with ``exit_code``."""
        program = self.bin / f"hook-{phase}"
        program.write_text(
            f'#!/bin/sh\necho "$GUESTSAFE_PHASE $GUESTSAFE_GUEST" >> {self.root}/hooks.log\n'
            f"exit {exit_code}\n"
        )
        program.chmod(0o755)
        return [str(program)]

    def hooks_run(self) -> list[str]:
        log = self.root / "hooks.log"
        return log.read_text().splitlines() if log.exists() else []

    def context(self, job: Job, cancel: threading.Event) -> JobContext:
        """What run_job builds, for driving GuestBackup by hand."""
        self.paths.ensure()
        ctx = JobContext(
            job, self._hv(), self.paths, self.report, Journal(self.paths.state_dir), cancel
        )
        ctx.archive = Archive.open(self.archive, create=True)
        ctx.hooks = HookRunner(job, self.report, cancel)
        return ctx


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


# The phases as journal files and run logs spell them (never to change).
ON_DISK_PHASES = [
    "preflight",
    "prepare",
    "shutdown",
    "copy",
    "start",
    "freeze",
    "backup-begin",
    "backup",
    "hash",
    "commit",
    "verify",
    "retention",
    "restart-failed",
]
COLD_PHASES = ["preflight", "shutdown", "copy", "start", "commit", "verify", "retention"]


# --- one guest ----------------------------------------------------------------------


def test_one_guest_goes_through_the_phases_in_order(rig: Rig) -> None:
    disk = rig.add_guest("web1")

    result = rig.run(rig.job(["web1"]))

    assert result.ok, result.outcomes
    assert rig.phases("web1") == COLD_PHASES
    assert rig.calls() == [("shutdown", "web1"), ("start", "web1")]
    assert rig.hv.state("web1") == RUNNING
    [version] = Archive.open(rig.archive).versions("web1")
    assert version.number == 1 and result.outcomes[0].version == 1
    assert _b3(version.path / "vda.raw") == _b3(disk)
    assert rig.partials() == [] and Journal(rig.paths.state_dir).entries() == []


def test_the_downtime_is_reported_as_a_fact_before_the_guests_result(rig: Rig) -> None:
    rig.add_guest("web1")

    result = rig.run(rig.job(["web1"]))

    facts = [e for e in rig.events if isinstance(e, GuestDowntime | GuestOutcome)]
    assert [type(e) for e in facts] == [GuestDowntime, GuestOutcome]
    assert facts[0].guest == "web1" and facts[0].seconds == result.outcomes[0].downtime


def test_the_journal_keeps_its_spellings(rig: Rig) -> None:
    rig.add_guest("web1")
    seen: list[str] = []
    journal = Journal(rig.paths.state_dir)

    def watch(event: Event) -> None:
        rig.report(event)
        if isinstance(event, PhaseChanged):
            seen.extend(e.phase for e in journal.entries())

    runner.run_job(rig.job(["web1"]), rig._hv(), rig.paths, watch)

    # Written before each phase is reported, from the shutdown on (preflight
    # writes the entry last), with the spellings recover() and old files know.
    assert seen == COLD_PHASES[1:]
    # Every spelling a journal file or a run log may hold, exactly.
    assert sorted(p.value for p in Phase) == sorted(ON_DISK_PHASES)


def test_a_guest_shut_off_before_the_job_stays_off(rig: Rig) -> None:
    rig.add_guest("db1", state=SHUTOFF)

    result = rig.run(rig.job(["db1"]))

    assert result.ok, result.outcomes
    assert rig.calls() == []  # neither shut down nor started
    assert rig.hv.state("db1") == SHUTOFF
    assert "start" not in rig.phases("db1")
    assert rig.versions("db1") == [1]
    assert result.outcomes[0].downtime is None


def test_a_failed_copy_restarts_the_guest_and_commits_nothing(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.add_guest("web1")
    monkeypatch.setenv("GUESTSAFE_FAILPOINTS", "copy.chunk=raise")

    result = rig.run(rig.job(["web1"]))

    assert not result.ok
    outcome = result.outcomes[0]
    assert "cannot write" in outcome.message and outcome.version is None
    assert "commit" not in rig.phases("web1")
    assert rig.calls() == [("shutdown", "web1"), ("start", "web1")]  # settle started it
    assert rig.hv.state("web1") == RUNNING
    assert rig.versions("web1") == [] and rig.partials() == []
    assert Journal(rig.paths.state_dir).entries() == []


def test_a_guest_that_cannot_start_again_keeps_its_copy_and_its_journal_entry(
    rig: Rig,
) -> None:
    rig.add_guest("web1")
    rig.hv.refuse_start.add("web1")

    result = rig.run(rig.job(["web1"]))

    assert not result.ok and "refused by the test" in result.outcomes[0].message
    assert rig.versions("web1") == [1]  # the copy was finished: it is kept
    [entry] = Journal(rig.paths.state_dir).entries()
    assert entry.phase == "restart-failed"  # recover() tries again


# --- group jobs --------------------------------------------------------------------


def test_a_group_stops_all_in_order_copies_all_and_starts_in_reverse(rig: Rig) -> None:
    names = ["db", "app", "web"]
    for name in names:
        rig.add_guest(name)

    result = rig.run(rig.job(names, group=True))

    assert result.ok, result.outcomes
    shutdowns = [("shutdown", n) for n in names]
    starts = [("start", n) for n in reversed(names)]
    assert rig.calls() == shutdowns + starts
    # Every guest is off before any copy, and every copy is done before any start.
    order = [what for what, _ in rig.timeline]
    last_shutdown = max(i for i, w in enumerate(order) if w == "shutdown")
    copies = [i for i, w in enumerate(order) if w == "phase copy"]
    first_start = min(i for i, w in enumerate(order) if w == "start")
    assert len(copies) == 3 and last_shutdown < min(copies) and max(copies) < first_start
    assert all(rig.versions(n) == [1] for n in names)


def test_a_group_failure_restarts_every_guest_and_commits_none(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = ["db", "app"]
    for name in names:
        rig.add_guest(name)
    monkeypatch.setenv("GUESTSAFE_FAILPOINTS", "phase.copy=raise")

    result = rig.run(rig.job(names, group=True))

    assert not result.ok
    assert [o.ok for o in result.outcomes] == [False, False]
    assert "group aborted" in result.outcomes[1].message
    # settle runs in reverse order too: the last guest stopped starts first.
    assert rig.calls() == [
        ("shutdown", "db"),
        ("shutdown", "app"),
        ("start", "app"),
        ("start", "db"),
    ]
    assert all(rig.hv.state(n) == RUNNING for n in names)
    assert all(rig.versions(n) == [] for n in names) and rig.partials() == []


# --- hooks ---------------------------------------------------------------------------


def test_a_failing_pre_stop_hook_vetoes_without_stopping_the_guest(rig: Rig) -> None:
    rig.add_guest("web1")
    hooks = Hooks({"pre-stop": rig.hook("pre-stop", 1), "backup-abort": rig.hook("backup-abort")})

    result = rig.run(rig.job(["web1"], hooks=hooks))

    assert not result.ok
    assert "backup vetoed" in result.outcomes[0].message
    assert rig.calls() == []
    assert rig.hv.state("web1") == RUNNING
    assert rig.versions("web1") == [] and rig.partials() == []
    # Armed at pre-stop: backup-abort runs, so a half-done freeze can be undone.
    assert rig.hooks_run() == ["pre-stop web1", "backup-abort web1"]


def test_a_failing_post_start_hook_fails_the_run_but_the_guest_still_started(rig: Rig) -> None:
    rig.add_guest("web1")
    phases = ["pre-stop", "post-stop", "pre-start", "backup-end", "backup-abort"]
    hooks = Hooks({p: rig.hook(p) for p in phases})
    hooks["post-start"] = rig.hook("post-start", 3)

    result = rig.run(rig.job(["web1"], hooks=hooks))

    assert not result.ok
    assert "hook post-start" in result.outcomes[0].message
    assert rig.calls() == [("shutdown", "web1"), ("start", "web1")]
    assert rig.hv.state("web1") == RUNNING
    assert [line.split()[0] for line in rig.hooks_run()] == [
        "pre-stop",
        "post-stop",
        "pre-start",
        "post-start",
        "backup-abort",
    ]


def test_hooks_do_not_run_around_a_guest_that_was_off(rig: Rig) -> None:
    rig.add_guest("db1", state=SHUTOFF)
    phases = ["pre-stop", "post-stop", "pre-start", "post-start", "backup-end"]
    hooks = Hooks({p: rig.hook(p) for p in phases})

    result = rig.run(rig.job(["db1"], hooks=hooks))

    assert result.ok, result.outcomes
    assert rig.hooks_run() == ["backup-end db1"]


# --- errors that say what happened ------------------------------------------------------


def test_a_cancel_mid_copy_is_a_cancel_not_a_copy_failure(rig: Rig) -> None:
    rig.add_guest("web1", size=64 * MiB)
    cancel = rig.cancel_on_progress = threading.Event()
    backup = GuestBackup(rig.context(rig.job(["web1"]), cancel), "web1")

    runner.run_one(backup)

    error = backup.error
    assert isinstance(error, Cancelled)
    assert error.exit_code == 130 and error.title == "Cancelled" != CopyError.title
    assert error.message == "copy cancelled"
    assert rig.hv.state("web1") == RUNNING
    assert rig.versions("web1") == [] and rig.partials() == []
    assert not backup.outcome().ok


def test_a_cancelled_run_ends_cleanly_and_says_so(rig: Rig) -> None:
    rig.add_guest("web1")
    cancel = threading.Event()
    cancel.set()

    result = rig.run(rig.job(["web1"]), cancel=cancel)

    assert not result.ok
    assert "run cancelled before preflight" in result.outcomes[0].message
    assert rig.calls() == [] and rig.hv.state("web1") == RUNNING
    with pytest.raises(RunFailed):
        result.raise_for_failure()


def test_a_cancel_in_a_group_is_a_cancel_for_every_guest(rig: Rig) -> None:
    for name in ("db", "app"):
        rig.add_guest(name, size=64 * MiB)
    cancel = rig.cancel_on_progress = threading.Event()
    ctx = rig.context(rig.job(["db", "app"], group=True), cancel)
    backups = [GuestBackup(ctx, name) for name in ("db", "app")]

    runner.run_group(backups)

    assert all(isinstance(b.error, Cancelled) for b in backups)
    assert all(rig.hv.state(n) == RUNNING for n in ("db", "app"))


def test_an_io_failure_names_the_operation_and_the_path(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.add_guest("web1")
    monkeypatch.setenv("GUESTSAFE_FAILPOINTS", "commit.before-manifest=enospc")
    backup = GuestBackup(rig.context(rig.job(["web1"]), threading.Event()), "web1")

    runner.run_one(backup)

    error = backup.error
    assert isinstance(error, IOFailure) and isinstance(error, CopyError)
    assert error.operation == "committing the version in"
    assert error.path is not None and error.path.name == ".partial-1"
    assert error.message == f"committing the version in {error.path}: No space left on device"
    assert error.errno == errno.ENOSPC and error.exit_code == 6
    assert rig.hv.state("web1") == RUNNING and rig.versions("web1") == []


def test_an_unclaimed_io_error_is_named_after_its_phase(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.add_guest("web1")
    monkeypatch.setenv("GUESTSAFE_FAILPOINTS", "phase.retention=raise")

    result = rig.run(rig.job(["web1"]))

    assert not result.ok
    assert "during retention phase.retention: failpoint phase.retention" in (
        result.outcomes[0].message
    )
    assert rig.versions("web1") == [1]  # committed before retention began


def test_io_failure_messages() -> None:
    exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/y/manifest.json.tmp")
    named = IOFailure("writing the manifest", Path("/x/y"), exc)
    assert str(named) == "writing the manifest /x/y: No space left on device"
    # Without a path of its own, the error's file name is named.
    assert io_failure("during commit", None, exc).message == (
        "during commit /x/y/manifest.json.tmp: No space left on device"
    )
    with (
        pytest.raises(IOFailure, match=r"^reading /nowhere: No such file"),
        naming("reading", "/nowhere"),
    ):
        Path("/nowhere/at/all").read_bytes()


def test_exit_codes_are_distinct_or_explained() -> None:
    assert Cancelled.exit_code == 130 and issubclass(Cancelled, CopyError)
    # README, "Exit codes": a hook's failure is a failed backup, so it shares 11.
    assert HookFailed.exit_code == RunFailed.exit_code == 11
    assert IOFailure.exit_code == CopyError.exit_code == 6


# --- the circle stays broken ---------------------------------------------------------


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_module_imports_the_runner_back() -> None:
    importers = [
        path.name
        for path in sorted((ENGINE / "backup").glob("*.py"))
        if path.name != "runner.py" and "guestsafe.engine.backup.runner" in _imports(path)
    ]
    assert importers == []
    # The copy strategies know the per-guest state, never the phase machine.
    for name in ("cold_copy.py", "push_copy.py", "guest_run.py"):
        assert "guestsafe.engine.backup.guest_backup" not in _imports(ENGINE / "backup" / name)
