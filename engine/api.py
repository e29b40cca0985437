"""The engine's front door: what the CLI and the console call.

Both front-ends are thin clients of this class. It owns the paths, the jobs
file and one hypervisor connection, and runs crash recovery before the first
real command.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from guestsafe.engine import demo, events, notify
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.archive.verify import VerifyReport
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.backup import recovery, runner
from guestsafe.engine.backup.runlog import RunLog
from guestsafe.engine.backup.runner import RunResult
from guestsafe.engine.devices import mounts, preflight
from guestsafe.engine.devices.resolve import resolve
from guestsafe.engine.devices.udev import BlockDevice, list_devices
from guestsafe.engine.devices.watch import DevicesChanged, DeviceWatcher, ManualWatcher
from guestsafe.engine.errors import ConfigError, GuestsafeError, JobNotFound, NotFoundError
from guestsafe.engine.events import Reporter
from guestsafe.engine.fsutil import atomic_write_bytes
from guestsafe.engine.hypervisor.connection import Hypervisor, resolve_uri
from guestsafe.engine.hypervisor.domain_xml import GuestInfo
from guestsafe.engine.jobs import jobs_file as jobs
from guestsafe.engine.jobs import schedule, timers
from guestsafe.engine.jobs.model import Job
from guestsafe.engine.paths import HOME_ENV, Paths, ensure_dir
from guestsafe.engine.restore import (
    NEW,
    RestorePlan,
    RestoreResult,
    plan_restore,
    restore_clone,
    restore_over_original,
)

RESULTS_DIR = "results"


@dataclass(frozen=True)
class LastResult:
    job: str
    ok: bool
    finished: str
    log_path: str
    summary: list[str]


class Engine:
    def __init__(
        self,
        *,
        uri: str | None = None,
        paths: Paths | None = None,
        sandbox: demo.Sandbox | None = None,
        unit_dir: Path | None = None,
    ) -> None:
        self.uri = resolve_uri(uri)
        self.paths = paths or Paths.default()
        self.sandbox = sandbox
        # Where systemd timers go: /etc/systemd/system unless GUESTSAFE_UNIT_DIR says.
        self.unit_dir = unit_dir or timers.default_unit_dir()
        self._hv: Hypervisor | None = None
        self._hv_lock = threading.Lock()

    @classmethod
    def demo(cls, sandbox: demo.Sandbox) -> Engine:
        """An engine on the demo sandbox's test-driver guests and its own config."""
        paths = Paths(
            config_file=sandbox.home / "config" / "jobs.toml",
            state_dir=sandbox.home / "state",
            log_dir=sandbox.home / "log",
            cache_dir=sandbox.home / "cache",
        )
        return cls(uri=sandbox.uri, paths=paths, sandbox=sandbox, unit_dir=sandbox.home / "systemd")

    # --- connection --------------------------------------------------------

    @property
    def hv(self) -> Hypervisor:
        with self._hv_lock:
            if self._hv is None:
                self._hv = Hypervisor(self.uri)
            return self._hv

    def close(self) -> None:
        if self._hv is not None:
            if self.sandbox is not None:
                demo.save_state(self.sandbox, self._hv.connection)
            self._hv.close()
            self._hv = None

    def recover(self, reporter: Reporter = events.null_reporter) -> list[str]:
        return recovery.recover(self.paths, reporter)

    def guests(self) -> list[GuestInfo]:
        return self.hv.guests()

    # --- jobs --------------------------------------------------------------

    def jobs(self) -> list[Job]:
        return jobs.load_jobs(self.paths.config_file)

    def job(self, name: str) -> Job:
        for job in self.jobs():
            if job.name == name:
                return job
        raise JobNotFound(f"job {name!r} not found in {self.paths.config_file}")

    def save_job(self, job: Job, *, previous_name: str | None = None) -> None:
        ensure_dir(self.paths.config_file.parent)
        jobs.upsert_job(self.paths.config_file, job, previous_name=previous_name)
        self._update_timers()

    def delete_job(self, name: str) -> None:
        jobs.delete_job(self.paths.config_file, name)
        self._update_timers()

    def run_job(
        self,
        name: str,
        reporter: Reporter = events.null_reporter,
        *,
        cancel: threading.Event | None = None,
        on_log_path: Callable[[Path], None] | None = None,
    ) -> RunResult:
        job = self.job(name)
        if job.schedule.time is not None:
            # Whoever starts it (timer, console, cron), this run serves the schedule.
            schedule.write_state(self.paths.state_dir, job, datetime.now(UTC))
        result = runner.run_job(
            job, self.hv, self.paths, reporter, cancel=cancel, on_log_path=on_log_path
        )
        self._save_result(result)
        self._notify(result, reporter)
        return result

    def _notify(self, result: RunResult, reporter: Reporter) -> None:
        """Send the run's report as [notify] says; what happened goes to its log, never up."""
        try:
            config = jobs.load_notify(self.paths.config_file)
        except GuestsafeError as exc:
            lines = [f"failed: cannot read the notify settings: {exc.message}"]
        else:
            report = notify.RunReport(
                result.job, result.ok, str(result.log_path), result.outcomes, result.problems
            )
            lines = notify.send(config, report)
        if not lines:
            return
        log = RunLog(result.log_path, reporter)  # appends below the run's own lines
        try:
            for line in lines:
                say = events.info if line.startswith("ok:") else events.warn
                say(log, f"notify: {line}")
        finally:
            log.close()

    def _save_result(self, result: RunResult) -> None:
        directory = self.paths.state_dir / RESULTS_DIR
        ensure_dir(directory)
        last = LastResult(
            result.job,
            result.ok,
            runner._now_iso(),
            str(result.log_path),
            [f"{o.guest}: {o.message}" for o in result.outcomes] + result.problems,
        )
        atomic_write_bytes(directory / f"{result.job}.json", json.dumps(asdict(last)).encode())

    def last_results(self) -> dict[str, LastResult]:
        directory = self.paths.state_dir / RESULTS_DIR
        found: dict[str, LastResult] = {}
        for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
            try:
                last = LastResult(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            found[last.job] = last
        return found

    def log_files(self) -> list[Path]:
        """Past runs' logs, newest first."""
        if not self.paths.log_dir.is_dir():
            return []
        return sorted(
            self.paths.log_dir.glob("*.log"), key=lambda p: p.stat().st_mtime, reverse=True
        )

    # --- devices -----------------------------------------------------------

    def devices(self, *, probe_marker: bool = False) -> list[BlockDevice]:
        """External devices with a filesystem that nothing uses (engine/devices.py).

        ``probe_marker`` mounts each one briefly, read-only and in a private
        directory, to fill in ``has_marker``; without it ``has_marker`` is None.
        """
        found = self._free_devices()
        return self.probe_markers(found) if probe_marker else found

    def probe_markers(self, found: list[BlockDevice]) -> list[BlockDevice]:
        """``found`` with ``has_marker`` filled in by brief read-only mounts."""
        if self.sandbox is not None:
            return found
        return mounts.probe_markers(found, self.paths.state_dir)

    def _free_devices(self) -> list[BlockDevice]:
        if self.sandbox is not None:
            return demo.devices()
        try:
            guest_disks = preflight.guest_disk_devnums(self.hv)
        except GuestsafeError:
            guest_disks = {}  # no hypervisor: list the devices all the same
        listed = list_devices()
        return [d for d in listed if preflight.guest_user(d, guest_disks) is None]

    def watch_devices(self, callback: Callable[[DevicesChanged], None]) -> DeviceWatcher:
        """A started watcher: ``callback`` hears, on the watcher's thread, what came and went.

        Call ``stop()`` on it when done.
        """
        if self.sandbox is not None:
            return ManualWatcher(callback, demo.devices()).start()
        return DeviceWatcher(callback, lister=self._free_devices).start()

    def resolve_device(self, spec: str) -> BlockDevice:
        """The device a job's ``device`` (``/dev/sdb1``, ``UUID=...``, ``LABEL=...``) names now."""
        return resolve(spec)

    @contextmanager
    def device_archive(self, spec: str) -> Iterator[Archive]:
        """The archive on device ``spec``, mounted read-only for the ``with`` block.

        Listing, planning and restoring all happen inside the block; the device is
        unmounted afterwards (left as it was if it was mounted already).
        """
        if self.sandbox is not None:
            yield Archive.open(demo.device_root(self.sandbox, spec))
            return
        with mounts.browse_archive(spec, self.paths.state_dir) as archive:
            yield archive

    # --- schedule ----------------------------------------------------------

    def next_run(self, job: Job, now: datetime | None = None) -> datetime | None:
        """When ``job`` runs next, in the host's zone; None for a manual job."""
        return schedule.next_run(job, now)

    def unit_settings(self) -> timers.UnitSettings:
        home = os.environ.get(HOME_ENV) or None
        program = timers.find_program()
        return timers.UnitSettings(program, self.paths.config_file, self.uri, home)

    def timer_states(self, job_list: list[Job] | None = None) -> dict[str, str]:
        """Each job's timer: ``manual``, ``installed``, ``outdated`` or ``missing``."""
        try:
            settings: timers.UnitSettings | None = self.unit_settings()
        except GuestsafeError:
            settings = None  # no guestsafe command to compare with: presence only
        listed = self.jobs() if job_list is None else job_list
        return {job.name: timers.timer_state(job, self.unit_dir, settings) for job in listed}

    def install_timers(self, unit_dir: Path | None = None) -> timers.TimerChanges:
        """Write a timer and service per scheduled job; drop those of other jobs."""
        target = unit_dir or self.unit_dir
        return timers.install_timers(self.jobs(), self.unit_settings(), target)

    def remove_timers(self, unit_dir: Path | None = None) -> timers.TimerChanges:
        return timers.remove_timers(unit_dir or self.unit_dir)

    def _update_timers(self) -> None:
        """Keep installed timers in step with the jobs file after an edit."""
        if not timers.timers_wanted(self.unit_dir, self.jobs()):
            return
        try:
            self.install_timers()
        except GuestsafeError as exc:
            raise ConfigError(f"the job is saved, but its timer was not updated: {exc}") from exc

    def run_due(self, reporter: Reporter = events.null_reporter) -> list[schedule.DueRun]:
        """Run each scheduled job whose time came since its last run, once (for cron)."""

        def run(job: Job) -> bool:
            try:
                return self.run_job(job.name, reporter).ok
            except GuestsafeError as exc:
                events.error(reporter, f"job {job.name}: {exc.message}")
                return False

        return schedule.run_due(self.jobs(), self.paths.state_dir, run)

    # --- archives ----------------------------------------------------------

    def destinations(self) -> list[Path]:
        """Every destination a job writes to, in job order, each once."""
        seen: dict[Path, None] = {}
        for job in self.jobs():
            seen.setdefault(job.destination, None)
        return list(seen)

    def archive(self, destination: Path) -> Archive:
        return Archive.open(destination)

    def versions(self, destination: Path, guest: str | None = None) -> list[VersionInfo]:
        return self.archive(destination).versions(guest)

    def find_archive(self, guest: str, destination: Path | None = None) -> Archive:
        """The archive holding ``guest``: the one given, or the first job destination with it."""
        if destination is not None:
            return self.archive(destination)
        for dest in self.destinations():
            try:
                archive = self.archive(dest)
            except GuestsafeError:
                continue  # an unplugged or not yet used destination just is not it
            if guest in archive.guests():
                return archive
        raise NotFoundError(f"no job destination holds backups of {guest!r}; name one with --dest")

    def verify(
        self, destination: Path, guest: str | None = None, number: int | None = None
    ) -> list[VerifyReport]:
        return self.archive(destination).verify(guest, number)

    # --- restore -----------------------------------------------------------

    def plan_restore(
        self,
        archive: Archive,
        guest: str,
        number: int,
        new_name: str,
        *,
        target_dir: Path | None = None,
    ) -> RestorePlan:
        return plan_restore(archive, guest, number, new_name, self.hv, target_dir=target_dir)

    def restore(
        self,
        plan: RestorePlan,
        *,
        mac_policy: str = NEW,
        mac_choices: Mapping[int, str] | None = None,
        start: bool = False,
        force: bool = False,
        reporter: Reporter = events.null_reporter,
        cancel: threading.Event | None = None,
    ) -> RestoreResult:
        return restore_clone(
            plan,
            self.hv,
            self.paths,
            mac_policy=mac_policy,
            mac_choices=mac_choices,
            start=start,
            force=force,
            reporter=reporter,
            cancel=cancel,
        )

    def restore_over(
        self,
        archive: Archive,
        guest: str,
        number: int,
        *,
        force: bool = False,
        reporter: Reporter = events.null_reporter,
    ) -> RestoreResult:
        return restore_over_original(
            archive, guest, number, self.hv, self.paths, force=force, reporter=reporter
        )
