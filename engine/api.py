"""The engine's front door: what the CLI and the console call.

Both front-ends are thin clients of this module: they import nothing of the
engine but it, ``errors`` and ``events`` (a test holds them to it). ``Engine``
owns the paths, the jobs file and one hypervisor connection, and runs crash
recovery before the first real command; the block below re-exports the types
and helpers the front-ends name. What differs in demo mode is one ``Site``
passed in: where the guests and the external devices come from.

It runs a little over 500 lines on purpose: one method per thing a front-end
can do, each a few lines that hand over to the package that does it, so that
the whole surface the front-ends see reads in one file.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

# isort: split
# --- the engine, and the re-exports for the front-ends -----------------------
# The CLI and the console take every engine type and helper they name from
# here (``__all__``). When an engine module moves, only this block changes.
from guestsafe.engine import __version__, demo, events, notify
from guestsafe.engine.archive.calendar_retention import (
    Candidate,
    RetentionPolicy,
    describe_policy,
    keep_reasons,
)
from guestsafe.engine.archive.in_use import BootRecord, all_records, versions_in_use
from guestsafe.engine.archive.names import pick_series, series_name, split_series
from guestsafe.engine.archive.restore_record import RestoreTest
from guestsafe.engine.archive.sharing import (
    device_shares,
    directory_shares,
    sharing_label,
    sharing_note,
)
from guestsafe.engine.archive.space import ArchiveSpace, space_of
from guestsafe.engine.archive.store import MARKER, Archive
from guestsafe.engine.archive.verify import VerifyReport
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.backup import recovery, results, runner
from guestsafe.engine.backup.disk_plan import DiskPlan, PlanOptions, plan_disks, plan_options
from guestsafe.engine.backup.hooks import check_programs
from guestsafe.engine.backup.prune import GuestPrune, prune_job
from guestsafe.engine.backup.remote_plan import plan_remote_disks
from guestsafe.engine.backup.results import LastResult, RunResult
from guestsafe.engine.backup.runlog import ParsedLine, Record, RunLog, escape, parse_line, record_of

# A version's files, read-only through libguestfs (issue #14, browse and extract).
from guestsafe.engine.browse.version_files import (
    Entry,
    Extracted,
    ExtractProgress,
    Filesystem,
    VersionFiles,
    open_version_files,
    split_path,
)
from guestsafe.engine.demo import Sandbox, ensure_sandbox, reset_sandbox
from guestsafe.engine.devices import mounts, preflight
from guestsafe.engine.devices.resolve import resolve
from guestsafe.engine.devices.udev import BlockDevice, list_devices
from guestsafe.engine.devices.watch import DevicesChanged, DeviceWatcher
from guestsafe.engine.errors import (
    AmbiguousGuest,
    ConfigError,
    FieldError,
    GuestsafeError,
    JobConfigError,
    JobNotFound,
    NotFoundError,
    RestoreError,
)
from guestsafe.engine.events import Reporter
from guestsafe.engine.hypervisor import remote_disks
from guestsafe.engine.hypervisor.bounded_open import CONNECT_TIMEOUT
from guestsafe.engine.hypervisor.cluster_macs import mac_census
from guestsafe.engine.hypervisor.connection import Hypervisor, resolve_uri
from guestsafe.engine.hypervisor.domain_xml import GuestInfo
from guestsafe.engine.hypervisor.hosts import (
    LOCAL_HOST,
    HostRegistry,
    HostState,
    HostStatus,
)
from guestsafe.engine.hypervisor.remote_disks import require_local_disks
from guestsafe.engine.jobs import jobs_file as jobs
from guestsafe.engine.jobs import schedule, timers
from guestsafe.engine.jobs.coverage import (
    job_series,
    jobs_covering,
    resolve_guests,
    uncovered_guests,
)
from guestsafe.engine.jobs.model import (
    DEFAULT_HOOK_TIMEOUT,
    DEFAULT_KEEP,
    DEFAULT_LOCK_WAIT,
    DEFAULT_RESTORE_TEST_SECONDS,
    DEFAULT_SHUTDOWN_TIMEOUT,
    HOOK_PHASES,
    IO_CLASSES,
    MODES,
    ON_TIMEOUT,
    RESTORE_TESTS,
    WEEKDAYS,
    Hooks,
    Job,
    RestoreTestWhen,
    Schedule,
    as_choice,
    job_hosts,
    retention_policy,
)
from guestsafe.engine.jobs.schedule import DueRun, on_calendar
from guestsafe.engine.jobs.timers import TimerChanges, UnitSettings
from guestsafe.engine.jobs.validation import check_job_runtime, parse_bwlimit, validate_job
from guestsafe.engine.modes import ChainMode, IoClass, Mode, OnTimeout, is_crash_consistent
from guestsafe.engine.modes import label as mode_label
from guestsafe.engine.modes import short_label as short_mode_label
from guestsafe.engine.paths import HOME_ENV, Paths, ensure_dir
from guestsafe.engine.restore.block_targets import parse_disk_targets
from guestsafe.engine.restore.boottest.after_run import TestLine, settings_of, tests_after_run
from guestsafe.engine.restore.boottest.cleanup import recover_restore_tests
from guestsafe.engine.restore.boottest.run import (
    TestSettings,
    newest_good,
    run_restore_test,
)
from guestsafe.engine.restore.boottest.run import (
    describe as describe_restore_test,
)
from guestsafe.engine.restore.clone import restore_clone
from guestsafe.engine.restore.instant_boot import boot_clone, discard_clone
from guestsafe.engine.restore.over_original import OverwriteNotice, restore_over_original
from guestsafe.engine.restore.over_recovery import recover_restores
from guestsafe.engine.restore.plan import (
    KEEP,
    NEW,
    InterfacePlan,
    RestorePlan,
    RestoreResult,
    plan_restore,
)
from guestsafe.engine.restore.promote import promote_clone
from guestsafe.engine.restore.promote_moves import recover_promotes
from guestsafe.engine.restore.volume_upload import restore_clone_remote
from guestsafe.engine.sizes import byte_rate, byte_size

__all__ = [
    "DEFAULT_HOOK_TIMEOUT",
    "DEFAULT_KEEP",
    "DEFAULT_LOCK_WAIT",
    "DEFAULT_RESTORE_TEST_SECONDS",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "HOOK_PHASES",
    "IO_CLASSES",
    "KEEP",
    "LOCAL_HOST",
    "MARKER",
    "MODES",
    "NEW",
    "ON_TIMEOUT",
    "RESTORE_TESTS",
    "WEEKDAYS",
    "Archive",
    "ArchiveSpace",
    "BlockDevice",
    "BootRecord",
    "Candidate",
    "DeviceWatcher",
    "DevicesChanged",
    "DiskPlan",
    "DueRun",
    "Engine",
    "Entry",
    "ExtractProgress",
    "Extracted",
    "FieldError",
    "Filesystem",
    "GuestInfo",
    "GuestPrune",
    "Hooks",
    "HostGuests",
    "HostSite",
    "HostState",
    "HostStatus",
    "InterfacePlan",
    "IoClass",
    "Job",
    "JobConfigError",
    "JobNotFound",
    "LastResult",
    "Mode",
    "OnTimeout",
    "OverwriteNotice",
    "ParsedLine",
    "Paths",
    "Record",
    "RestorePlan",
    "RestoreResult",
    "RestoreTest",
    "RestoreTestWhen",
    "RetentionPolicy",
    "RunResult",
    "Sandbox",
    "Schedule",
    "Site",
    "TimerChanges",
    "UnitSettings",
    "VerifyReport",
    "VersionFiles",
    "VersionInfo",
    "__version__",
    "as_choice",
    "byte_rate",
    "byte_size",
    "check_job_runtime",
    "check_programs",
    "describe_policy",
    "describe_restore_test",
    "device_shares",
    "directory_shares",
    "ensure_sandbox",
    "escape",
    "is_crash_consistent",
    "job_hosts",
    "jobs_covering",
    "keep_reasons",
    "mode_label",
    "on_calendar",
    "parse_bwlimit",
    "parse_line",
    "pick_series",
    "plan_disks",
    "record_of",
    "reset_sandbox",
    "resolve_guests",
    "retention_policy",
    "series_name",
    "sharing_label",
    "sharing_note",
    "short_mode_label",
    "space_of",
    "split_path",
    "split_series",
    "uncovered_guests",
    "validate_job",
]
# --- end of the re-exports -----------------------------------------------------


class Site(Protocol):
    """Where the engine's guests and external devices are: this host, or a sandbox.

    ``HostSite`` is libvirt, udev and real mounts; ``demo.Sandbox`` is the demo's
    test-driver guests and its one make-believe USB disk. The engine calls the
    same methods on either.
    """

    @property
    def uri(self) -> str | None:
        """The hypervisor's libvirt URI; None for the default."""
        ...

    def free_devices(self, hv: Callable[[], Hypervisor]) -> list[BlockDevice]:
        """External devices with a filesystem that nothing uses."""
        ...

    def probe_markers(self, found: list[BlockDevice], state_dir: Path) -> list[BlockDevice]:
        """``found`` with ``has_marker`` filled in."""
        ...

    def watch_devices(
        self, callback: Callable[[DevicesChanged], None], hv: Callable[[], Hypervisor]
    ) -> DeviceWatcher:
        """A started watcher telling ``callback`` what came and went."""
        ...

    def device_archive(self, spec: str, state_dir: Path) -> AbstractContextManager[Archive]:
        """The archive on device ``spec``, readable for the ``with`` block."""
        ...

    def closing(self, hv: Hypervisor) -> None:
        """The engine is about to close its connection."""
        ...


@dataclass(frozen=True)
class HostSite:
    """This machine: its libvirt daemon, its udev and its mounts."""

    uri: str | None = None

    def free_devices(self, hv: Callable[[], Hypervisor]) -> list[BlockDevice]:
        try:
            guest_disks = preflight.guest_disk_devnums(hv())
        except GuestsafeError:
            guest_disks = {}  # no hypervisor: list the devices all the same
        listed = list_devices()
        return [d for d in listed if preflight.guest_user(d, guest_disks) is None]

    def probe_markers(self, found: list[BlockDevice], state_dir: Path) -> list[BlockDevice]:
        return mounts.probe_markers(found, state_dir)

    def watch_devices(
        self, callback: Callable[[DevicesChanged], None], hv: Callable[[], Hypervisor]
    ) -> DeviceWatcher:
        return DeviceWatcher(callback, lister=lambda: self.free_devices(hv)).start()

    def device_archive(self, spec: str, state_dir: Path) -> AbstractContextManager[Archive]:
        return mounts.browse_archive(spec, state_dir)

    def closing(self, hv: Hypervisor) -> None:
        return None


@dataclass(frozen=True)
class HostGuests:
    """One host's guests for a listing, with the host's state (why it is unreachable)."""

    status: HostStatus
    guests: list[GuestInfo]


class Engine:
    def __init__(
        self,
        *,
        uri: str | None = None,
        paths: Paths | None = None,
        site: Site | None = None,
        unit_dir: Path | None = None,
    ) -> None:
        self.site: Site = site if site is not None else HostSite(uri)
        self.uri = resolve_uri(uri if uri is not None else self.site.uri)
        self.paths = paths or Paths.default()
        # Where systemd timers go: /etc/systemd/system unless GUESTSAFE_UNIT_DIR says.
        self.unit_dir = unit_dir or timers.default_unit_dir()
        self._hv: Hypervisor | None = None
        self._hv_lock = threading.Lock()
        # The other hosts' connections, opened when first needed ([hosts.NAME]).
        self._hosts = HostRegistry(self.uri, local=lambda: self.hv)

    @classmethod
    def demo(cls, sandbox: demo.Sandbox | None = None) -> Engine:
        """An engine on the demo sandbox's test-driver guests and its own config.

        Without ``sandbox``, the default one, built on first use.
        """
        sandbox = sandbox if sandbox is not None else demo.ensure_sandbox()
        paths = Paths(
            config_file=sandbox.home / "config" / "jobs.toml",
            state_dir=sandbox.home / "state",
            log_dir=sandbox.home / "log",
            cache_dir=sandbox.home / "cache",
        )
        return cls(paths=paths, site=sandbox, unit_dir=sandbox.home / "systemd")

    # --- connection --------------------------------------------------------

    @property
    def hv(self) -> Hypervisor:
        with self._hv_lock:
            if self._hv is None:
                self._hv = Hypervisor(self.uri)
            return self._hv

    @property
    def hostname(self) -> str:
        """The hypervisor host's name (connects if need be)."""
        return self.hv.hostname

    def close(self) -> None:
        self._hosts.close()
        if self._hv is not None:
            self.site.closing(self._hv)  # the demo writes its guests back
            self._hv.close()
            self._hv = None

    def recover(
        self,
        reporter: Reporter = events.null_reporter,
        *,
        start: bool = False,
        host: str | None = None,
    ) -> list[str]:
        """Finish what interrupted runs left; ``start``: also start guests the rule leaves off.

        ``host``: only what runs left on that host (a backup whose connection was lost
        mid-stream and could not start the guest again), once the host answers again.
        """
        connect = self._connect_with_host_timeouts()
        if host is not None and host != LOCAL_HOST:
            uri = self.hosts.uri(host)
            return recovery.recover(self.paths, reporter, start=start, connect=connect, uri=uri)
        return (
            recovery.recover(
                self.paths,
                reporter,
                start=start,
                connect=connect,
                uri=self.uri if host is not None else None,
            )
            + recover_restores(self.paths, reporter)
            + recover_restore_tests(self.paths, lambda: self.hv, reporter)
            + recover_promotes(self.paths, lambda: self.hv, reporter)
        )

    def left_to_recover(self, host: str | None = None) -> list[str]:
        """The guests whose interrupted runs recovery could not finish yet (on ``host``)."""
        uri = None if host is None else self.uri if host == LOCAL_HOST else self.hosts.uri(host)
        return [entry.guest for entry in recovery.pending(self.paths, uri)]

    def guests(self) -> list[GuestInfo]:
        return self.hv.guests()

    # --- hosts ([hosts.NAME] in jobs.toml; engine/hypervisor/hosts.py) ------------

    @property
    def hosts(self) -> HostRegistry:
        """Every known host's connection: ``local`` and those jobs.toml names now."""
        configured = jobs.load_hosts(self.paths.config_file)
        self._hosts.configure(
            {name: host.uri for name, host in configured.items()},
            {n: h.reconnect_wait for n, h in configured.items() if h.reconnect_wait is not None},
            {n: h.connect_timeout for n, h in configured.items() if h.connect_timeout is not None},
        )
        return self._hosts

    def _connect_with_host_timeouts(self) -> Callable[[str], Hypervisor]:
        """Connections for journal entries' URIs, each with its host's connect_timeout.

        jobs.toml is read once per recovery, not once per entry. A jobs.toml that
        does not load now must not keep recovery from restarting a guest: the
        default limit serves then.
        """
        by_uri: dict[str, float] = {}
        with suppress(GuestsafeError):
            hosts = self.hosts
            for name in hosts.names():  # the first host naming a URI wins
                by_uri.setdefault(hosts.uri(name), hosts.connect_timeout(name))
        return lambda uri: Hypervisor(uri, by_uri.get(uri, CONNECT_TIMEOUT))

    def host_names(self) -> list[str]:
        """``local`` first, then the hosts of jobs.toml in file order."""
        return self.hosts.names()

    def hv_for(self, host: str | None) -> Hypervisor:
        """Host ``host``'s connection (None: this machine's); ``HostUnreachable`` says why not."""
        if host is None or host == LOCAL_HOST:
            return self.hv
        return self.hosts.get(host)

    def guests_by_host(self, host: str | None = None) -> list[HostGuests]:
        """Each host's guests (only ``host``'s if given), with its state; none fails the rest."""
        registry = self.hosts
        listings = []
        for name in [host] if host is not None else registry.names():
            guests: list[GuestInfo] = []
            hv = registry.try_get(name)
            if hv is not None:
                try:
                    guests = hv.guests()
                except GuestsafeError:
                    guests = []  # lost since: the state below says so on the next try
            listings.append(HostGuests(registry.status(name), guests))
        return listings

    def host_of(self, guest: str, host: str | None = None) -> str:
        """The host defining ``guest``: ``host`` if given, else the one host that does.

        Only hosts that answer are asked; a guest on several asks for ``--host``.
        """
        if host is not None:
            self.hosts.uri(host)  # a host jobs.toml does not name is refused here
            return host
        registry = self.hosts
        if len(registry.names()) == 1:
            return LOCAL_HOST
        owners = [name for name, hv in registry.connected() if hv.exists(guest)]
        if len(owners) > 1:
            raise AmbiguousGuest(
                f"guest {guest!r} is defined on {', '.join(owners)}; name one with --host"
            )
        return owners[0] if owners else LOCAL_HOST

    def series(self, archive: Archive, guest: str, host: str | None = None) -> str:
        """The archive's name for ``guest`` of ``host`` ("node2/web1"); see pick_series."""
        return pick_series(archive.guests(), guest, host)

    def _macs_in_use(self, target: str) -> Callable[[], dict[str, list[str]]]:
        """Every known host's MACs, read when called, for a clone defined on ``target``;
        the hosts that do not answer are named in what it returns (MacOwners)."""
        return lambda: mac_census(target, self.hosts)

    def uncovered_guests(self, guests: list[GuestInfo] | None = None) -> list[str]:
        """The persistent guests no job backs up (``guests``: a listing already made)."""
        listed = self.guests() if guests is None else guests
        local_jobs = [job for job in self.jobs() if LOCAL_HOST in job_hosts(job)]
        return uncovered_guests(local_jobs, [g.name for g in listed if g.persistent])

    def disk_plans(
        self, guest: GuestInfo, job: Job | None = None, *, host: str | None = None
    ) -> list[DiskPlan]:
        """Per disk of ``guest`` (of ``host``): whether ``job`` (default: mode stop) backs
        it up, and how."""
        mode = job.mode if job is not None else Mode.STOP
        include_readonly = job.include_readonly if job is not None else False
        chain = job.chain if job is not None else ChainMode.FLATTEN
        if remote_disks.is_remote(self.hv):
            return plan_remote_disks(self.hv.connection, guest, mode, include_readonly)
        try:
            options = plan_options(self.hv_for(host), guest, mode, include_readonly, chain)
        except GuestsafeError:
            # A guest gone meanwhile: its XML only.
            options = PlanOptions(mode, include_readonly, chain=chain)
        return plan_disks(guest, options)

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
        interactive: bool = False,
    ) -> RunResult:
        """Run job ``name``; ``interactive`` (a person waits): a busy guest fails at once."""
        job = self.job(name)
        if job.schedule.time is not None:
            # Whoever starts it (timer, console, cron), this run serves the schedule.
            schedule.write_state(self.paths.state_dir, job, datetime.now(UTC))
        result = runner.run_job(
            job,
            self.hv,
            self.paths,
            reporter,
            cancel=cancel,
            on_log_path=on_log_path,
            interactive=interactive,
            hosts=self.hosts,
        )
        results.save(self.paths.state_dir, result)
        tests = self._restore_tests(job, result, reporter, cancel)
        result.restore_tests_failed = [t.text for t in tests if t.failed]
        uncovered = self._report_uncovered(result, reporter)
        self._notify(result, reporter, mail_to=job.mail_to, uncovered=uncovered, tests=tests)
        return result

    def _restore_tests(
        self,
        job: Job,
        result: RunResult,
        reporter: Reporter,
        cancel: threading.Event | None,
    ) -> list[TestLine]:
        """The restore tests due after the run, told in its log (restore/boottest/)."""
        if job.restore_test == "never":
            return []
        log = RunLog(result.log_path, reporter)  # appends below the run's own lines
        try:
            return tests_after_run(job, result.outcomes, self.hv, self.paths, log, cancel)
        finally:
            log.close()

    def _report_uncovered(self, result: RunResult, reporter: Reporter) -> list[str]:
        """The guests in no job, told in the run's log so a new guest is never missed."""
        try:
            uncovered = self.uncovered_guests()
        except GuestsafeError as exc:
            self._append_log(result, reporter, [f"cannot list the guests in no job: {exc}"])
            return []
        if uncovered:
            names = ", ".join(uncovered)
            self._append_log(result, reporter, [f"guests not backed up by any job: {names}"])
        return uncovered

    def _notify(
        self,
        result: RunResult,
        reporter: Reporter,
        *,
        mail_to: list[str] | None = None,
        uncovered: list[str] | None = None,
        tests: list[TestLine] | None = None,
    ) -> None:
        """Send the run's report as [notify] says, to the job's own ``mail_to`` if it has one.

        What happened goes to the run's log, never up.
        """
        try:
            config = notify.for_job(jobs.load_notify(self.paths.config_file), mail_to or [])
        except GuestsafeError as exc:
            lines = [f"notify: failed: cannot read the notify settings: {exc.message}"]
        else:
            report = notify.RunReport(
                result.job,
                result.ok,
                str(result.log_path),
                result.outcomes,
                result.problems,
                uncovered=uncovered or [],
                restore_tests=[t.text for t in tests or []],
                restore_tests_failed=sum(t.failed for t in tests or []),
            )
            lines = [f"notify: {line}" for line in notify.send(config, report)]
        self._append_log(result, reporter, lines)

    def _append_log(self, result: RunResult, reporter: Reporter, lines: list[str]) -> None:
        """``lines`` below the run's own in its log: ``ok:`` ones as info, others as warnings."""
        if not lines:
            return
        log = RunLog(result.log_path, reporter)  # appends below the run's own lines
        try:
            for line in lines:
                say = events.info if line.startswith(("ok:", "notify: ok:")) else events.warn
                say(log, line)
        finally:
            log.close()

    def last_results(self) -> dict[str, LastResult]:
        return results.load(self.paths.state_dir)

    def log_files(self) -> list[Path]:
        """Past runs' logs, newest first."""
        if not self.paths.log_dir.is_dir():
            return []
        return sorted(
            self.paths.log_dir.glob("*.log"), key=lambda p: p.stat().st_mtime, reverse=True
        )

    # --- devices -----------------------------------------------------------

    def devices(self, *, probe_marker: bool = False) -> list[BlockDevice]:
        """External devices with a filesystem that nothing uses (engine/devices/).

        ``probe_marker`` mounts each one briefly, read-only and in a private
        directory, to fill in ``has_marker``; without it ``has_marker`` is None.
        """
        found = self.site.free_devices(lambda: self.hv)
        return self.probe_markers(found) if probe_marker else found

    def probe_markers(self, found: list[BlockDevice]) -> list[BlockDevice]:
        """``found`` with ``has_marker`` filled in by brief read-only mounts."""
        return self.site.probe_markers(found, self.paths.state_dir)

    def watch_devices(self, callback: Callable[[DevicesChanged], None]) -> DeviceWatcher:
        """A started watcher: ``callback`` hears, on the watcher's thread, what came and went.

        Call ``stop()`` on it when done.
        """
        return self.site.watch_devices(callback, lambda: self.hv)

    def resolve_device(self, spec: str) -> BlockDevice:
        """The device a job's ``device`` (``/dev/sdb1``, ``UUID=...``, ``LABEL=...``) names now."""
        return resolve(spec)

    @contextmanager
    def device_archive(self, spec: str) -> Iterator[Archive]:
        """The archive on device ``spec``, mounted read-only for the ``with`` block.

        Listing, planning and restoring all happen inside the block; the device is
        unmounted afterwards (left as it was if it was mounted already).
        """
        with self.site.device_archive(spec, self.paths.state_dir) as archive:
            yield archive

    # --- schedule ----------------------------------------------------------

    def now(self) -> datetime:
        """The time the schedules count from: the host's clock, in its zone."""
        return schedule.current_time()

    def next_run(self, job: Job, now: datetime | None = None) -> datetime | None:
        """When ``job`` runs next, in the host's zone; None for a manual job."""
        return schedule.next_run(job, now)

    def unit_settings(self) -> UnitSettings:
        home = os.environ.get(HOME_ENV) or None
        program = timers.find_program()
        return UnitSettings(program, self.paths.config_file, self.uri, home)

    def timer_states(self, job_list: list[Job] | None = None) -> dict[str, str]:
        """Each job's timer: ``manual``, ``installed``, ``outdated`` or ``missing``."""
        try:
            settings: UnitSettings | None = self.unit_settings()
        except GuestsafeError:
            settings = None  # no guestsafe command to compare with: presence only
        listed = self.jobs() if job_list is None else job_list
        return {job.name: timers.timer_state(job, self.unit_dir, settings) for job in listed}

    def install_timers(self, unit_dir: Path | None = None) -> TimerChanges:
        """Write a timer and service per scheduled job; drop those of other jobs."""
        target = unit_dir or self.unit_dir
        return timers.install_timers(self.jobs(), self.unit_settings(), target)

    def remove_timers(self, unit_dir: Path | None = None) -> TimerChanges:
        return timers.remove_timers(unit_dir or self.unit_dir)

    def _update_timers(self) -> None:
        """Keep installed timers in step with the jobs file after an edit."""
        if not timers.timers_wanted(self.unit_dir, self.jobs()):
            return
        try:
            self.install_timers()
        except GuestsafeError as exc:
            raise ConfigError(f"the job is saved, but its timer was not updated: {exc}") from exc

    def run_due(self, reporter: Reporter = events.null_reporter) -> list[DueRun]:
        """Run each scheduled job whose time came since its last run, once (for cron)."""
        tests_failed: dict[str, tuple[str, ...]] = {}

        def run(job: Job) -> bool:
            try:
                result = self.run_job(job.name, reporter)
            except GuestsafeError as exc:
                events.error(reporter, f"job {job.name}: {exc.message}")
                return False
            tests_failed[job.name] = tuple(result.restore_tests_failed)
            return result.ok

        done = schedule.run_due(self.jobs(), self.paths.state_dir, run)
        return [replace(d, restore_tests_failed=tests_failed.get(d.job, ())) for d in done]

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

    @contextmanager
    def job_archive(self, job: Job) -> Iterator[Archive]:
        """The archive ``job`` writes to; a device's is mounted read-only for the block."""
        if job.device is None:
            yield self.archive(job.destination)
            return
        with self.device_archive(job.device) as archive:
            yield archive

    def retention_preview(self, job: Job) -> list[tuple[str, list[tuple[Candidate, list[str]]]]]:
        """Per guest of ``job``, each version (newest first) with the rules that keep it.

        An empty list of rules: the job's retention would delete that version.
        Nothing is deleted; the archive may be read-only.
        """
        policy = retention_policy(job)
        with self.job_archive(job) as archive:
            guests = job_series(job, archive.guests())  # "all": those backed up so far
            state = self.paths.state_dir
            return [
                (g, archive.retention_rows(g, policy, versions_in_use(state, archive.root, g)))
                for g in guests
            ]

    def prune(self, job: Job, reporter: Reporter = events.null_reporter) -> list[GuestPrune]:
        """Delete what ``retention_preview`` says would go, under the locks a backup takes.

        Per guest: the rows the rules saw (as the preview shows them), the versions
        deleted, or why none were (its guest busy). ``LockBusy`` if a backup runs.
        """
        return prune_job(job, lambda: self.hv, self.paths, reporter)

    def find_archive(
        self, guest: str, destination: Path | None = None, *, host: str | None = None
    ) -> Archive:
        """The archive holding ``guest``: the one given, or the first job destination with it.

        ``guest`` is a series name ("node2/web1"), or a guest name with ``host``, or one
        that a single host's series holds (``pick_series``).
        """
        if destination is not None:
            return self.archive(destination)
        for dest in self.destinations():
            try:
                archive = self.archive(dest)
            except GuestsafeError:
                continue  # an unplugged or not yet used destination just is not it
            if self.series(archive, guest, host) in archive.guests():
                return archive
        raise NotFoundError(f"no job destination holds backups of {guest!r}; name one with --dest")

    def verify(
        self,
        destination: Path | None = None,
        guest: str | None = None,
        number: int | None = None,
        *,
        device: str | None = None,
    ) -> list[VerifyReport]:
        """Re-read and check versions in ``destination``, or on ``device`` (mounted
        read-only meanwhile, so the result is shown but not recorded there)."""
        if device is None:
            if destination is None:
                raise ConfigError("verify: give the archive's destination or its device")
            return self.archive(destination).verify(guest, number)
        if destination is not None:
            raise ConfigError("verify: give a destination or a device, not both")
        with self.device_archive(device) as archive:
            return archive.verify(guest, number)

    # --- restore -----------------------------------------------------------

    def plan_restore(
        self,
        archive: Archive,
        guest: str,
        number: int,
        new_name: str,
        *,
        target_dir: Path | None = None,
        disk_targets: Iterable[str] = (),
        to_host: str | None = None,
    ) -> RestorePlan:
        """``disk_targets``: "vdb=/dev/vg/lv" specs, disks written onto existing devices.

        ``guest`` is the version's series ("node2/web1" for a guest of node2);
        ``to_host`` the host the clone is defined on (default: this machine). Its MACs
        are checked against the guests of every known host that answers.
        """
        target = to_host or LOCAL_HOST
        return plan_restore(
            archive,
            guest,
            number,
            new_name,
            self.hv_for(target),
            target_dir=target_dir,
            disk_targets=parse_disk_targets(disk_targets),
            macs_in_use=self._macs_in_use(target),
            host=target,
        )

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
        target_pool: str | None = None,
    ) -> RestoreResult:
        """``target_pool``: on a remote host, the storage pool the disks are uploaded into
        (default: the pool that held each original disk)."""
        target_hv = self.hv_for(plan.host)
        if remote_disks.is_remote(target_hv):
            return restore_clone_remote(
                plan,
                target_hv,
                self.paths,
                target_pool=target_pool,
                mac_policy=mac_policy,
                mac_choices=mac_choices,
                start=start,
                force=force,
                reporter=reporter,
                cancel=cancel,
                macs_in_use=self._macs_in_use(plan.host),
            )
        if target_pool is not None:
            raise RestoreError("--target-pool is for restores onto a remote host")
        return restore_clone(
            plan,
            target_hv,
            self.paths,
            mac_policy=mac_policy,
            mac_choices=mac_choices,
            start=start,
            force=force,
            reporter=reporter,
            cancel=cancel,
            macs_in_use=self._macs_in_use(plan.host),
        )

    def _local_only(self, what: str) -> None:
        """Refuse what writes or reads files beside the guest on a remote host."""
        if remote_disks.is_remote(self.hv):
            raise RestoreError(
                f"{what} works on the local host only: on {self.hv.uri} guestsafe reaches "
                "disks through storage pools; restore as a new guest there instead (its "
                "disks are uploaded into a pool)"
            )

    def restore_over(
        self,
        archive: Archive,
        guest: str,
        number: int,
        *,
        force: bool = False,
        keep_replaced: bool = False,
        confirm: Callable[[OverwriteNotice], bool] | None = None,
        reporter: Reporter = events.null_reporter,
        cancel: threading.Event | None = None,
    ) -> RestoreResult:
        """Restore over the original; ``confirm`` is asked after every check, before any write.

        ``guest`` is the version's series: a guest of another host goes back there.
        """
        self._local_only("restoring over the original")
        host, name = split_series(guest)
        if host != LOCAL_HOST:
            require_local_disks(self.hv_for(host), name, "restoring over it")
            raise GuestsafeError(
                f"restoring over guest {name!r} of host {host!r} is not supported yet; "
                "restore it as a new guest"
            )
        return restore_over_original(
            archive,
            guest,
            number,
            self.hv,
            self.paths,
            force=force,
            keep_replaced=keep_replaced,
            confirm=confirm,
            reporter=reporter,
            cancel=cancel,
        )

    # --- instant boot (engine/restore/instant_boot.py, promote.py) ------------

    def boot(
        self,
        plan: RestorePlan,
        *,
        mac_policy: str = NEW,
        mac_choices: Mapping[int, str] | None = None,
        force: bool = False,
        reporter: Reporter = events.null_reporter,
        cancel: threading.Event | None = None,
    ) -> RestoreResult:
        """Define and start ``plan``'s clone on overlays backed by the version's files."""
        self._local_only("instant boot")
        return boot_clone(
            plan,
            self.hv_for(plan.host),
            self.paths,
            mac_policy=mac_policy,
            mac_choices=mac_choices,
            force=force,
            reporter=reporter,
            cancel=cancel,
            macs_in_use=self._macs_in_use(plan.host),
        )

    def promote(
        self,
        name: str,
        *,
        target_dir: Path | None = None,
        reporter: Reporter = events.null_reporter,
        cancel: threading.Event | None = None,
    ) -> list[str]:
        """Copy into clone ``name``'s overlays what they read from the archive; cut the tie.

        ``target_dir``: move its disks into that directory meanwhile.
        """
        return promote_clone(
            name, self.hv, self.paths, reporter=reporter, cancel=cancel, target_dir=target_dir
        )

    def discard_boot(self, name: str, reporter: Reporter = events.null_reporter) -> list[str]:
        """Remove an instant-boot clone, its overlays and its record; never another guest."""
        return discard_clone(name, self.hv, self.paths, reporter)

    def test_restore(
        self,
        guest: str,
        number: int | None = None,
        destination: Path | None = None,
        *,
        host: str | None = None,
        reporter: Reporter = events.null_reporter,
        cancel: threading.Event | None = None,
    ) -> tuple[VersionInfo, RestoreTest]:
        """Boot version ``number`` (default: the newest good one) cut off, wait, record.

        ``guest`` of ``host`` names the series, as for a restore; the clone runs here.
        The console line and the wait come from the first job that backs that guest
        up into that archive; without one, the defaults (the guest stays running).
        """
        archive = self.find_archive(guest, destination, host=host)
        series = self.series(archive, guest, host)
        version = (
            newest_good(archive, series) if number is None else archive.version(series, number)
        )
        series_host, name = split_series(series)
        settings = TestSettings()
        for job in self.jobs():
            same = os.path.realpath(job.destination) == os.path.realpath(archive.root)
            backs_up = series_host in job_hosts(job) and name in resolve_guests(job, [name])
            if same and backs_up:
                settings = settings_of(job)
                break
        test = run_restore_test(
            archive, version, self.hv, self.paths, settings, reporter=reporter, cancel=cancel
        )
        return version, test

    def booted_clones(self) -> list[BootRecord]:
        """The instant-boot clones neither promoted nor discarded, each naming its version."""
        return all_records(self.paths.state_dir)

    @contextmanager
    def version_files(self, archive: Archive, guest: str, number: int) -> Iterator[VersionFiles]:
        """Browse a version's filesystems read-only (libguestfs appliance; seconds to open)."""
        version = archive.version(guest, number)
        purpose = f"browsing the files of version {number} of {guest}"
        with open_version_files(version, self.paths.state_dir, purpose) as files:
            yield files
