"""The runner: takes a job's guests through a cold backup, one phase at a time.

Phases of one guest: preflight, shutdown, copy, start, commit, verify,
retention. Whatever fails, ``_settle`` puts the guest back in the power state
it had before the job, and an uncommitted partial is removed. The journal
records each phase before it begins, so ``recover()`` can do the same after a
crash.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from guestsafe.engine import __version__, events, failpoints, locks
from guestsafe.engine.archive.manifest import DiskRecord, Manifest
from guestsafe.engine.archive.store import Archive, PartialVersion, VersionInfo
from guestsafe.engine.backup.hooks import HookRunner
from guestsafe.engine.backup.journal import Journal, JournalEntry, remove_partial
from guestsafe.engine.backup.push_copy import (
    PushBackup,
    choose_push,
    recover_leftover,
    space_needed,
)
from guestsafe.engine.backup.runlog import RunLog, new_log_path
from guestsafe.engine.copier import copy_file
from guestsafe.engine.devices import mounts
from guestsafe.engine.errors import (
    CopyError,
    GuestsafeError,
    LockBusy,
    PreflightError,
    RunFailed,
    ShutdownTimeout,
)
from guestsafe.engine.events import GuestOutcome, PhaseChanged, Progress, Reporter
from guestsafe.engine.hypervisor import disk_files
from guestsafe.engine.hypervisor.connection import PAUSED, RUNNING, SHUTOFF, GuestInfo, Hypervisor
from guestsafe.engine.jobs.model import Job, JobConfigError, misconfigured_device
from guestsafe.engine.paths import Paths
from guestsafe.engine.sizes import SPACE_MARGIN, byte_size

# How long, after a shutdown timeout under "abort", a late power-off is watched for.
LATE_POWEROFF_GRACE = 30.0


@dataclass
class RunResult:
    job: str
    log_path: Path
    outcomes: list[GuestOutcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # job-level, e.g. a failed job-end hook

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes) and not self.problems

    def raise_for_failure(self) -> None:
        if not self.ok:
            failed = ", ".join(o.guest for o in self.outcomes if not o.ok)
            what = f"backup failed for {failed}" if failed else "; ".join(self.problems)
            raise RunFailed(f"job {self.job}: {what} (log: {self.log_path})")


@dataclass
class _Context:
    job: Job
    hv: Hypervisor
    paths: Paths
    report: Reporter
    journal: Journal
    cancel: threading.Event
    archive: Archive | None = None
    # Closed when the job ends, whatever happened: unmounts the job's device.
    cleanup: ExitStack = field(default_factory=ExitStack)
    hooks: HookRunner | None = None


class AnyEvent(threading.Event):
    """Set when it, or any of the events it watches, is set (for the copier's cancel)."""

    def __init__(self, *events: threading.Event) -> None:
        super().__init__()
        self._events = events

    def is_set(self) -> bool:
        return super().is_set() or any(e.is_set() for e in self._events)


class GuestBackup:
    """One guest's trip through the phases, and the clean-up whatever happens."""

    def __init__(self, ctx: _Context, name: str) -> None:
        self.ctx = ctx
        self.name = name
        self.info: GuestInfo | None = None
        self.was_state = "unknown"
        self.entry: JournalEntry | None = None
        self.lock: locks.Lock | None = None
        self.partial: PartialVersion | None = None
        self.version: VersionInfo | None = None
        self.records: list[DiskRecord] = []
        self.stopped_at: float | None = None
        self.downtime: float | None = None
        self.bytes_copied = 0
        self.t0 = time.monotonic()
        self.started_iso = _now_iso()
        self.error: GuestsafeError | None = None
        self._copy_cancel: threading.Event = ctx.cancel
        self.warnings: list[str] = []
        self.hooks_armed = False  # past pre-stop: backup-end or backup-abort will run
        self.mode = ctx.job.mode  # what is really done; a push mode may fall back to stop
        self.push: PushBackup | None = None  # stop-short and snapshot: QEMU copies the disks

    # --- phases ------------------------------------------------------------

    def preflight(self) -> None:
        self._phase("preflight")
        hv, job = self.ctx.hv, self.ctx.job
        self.info = hv.guest(self.name)
        key = locks.guest_key(self.info.uuid)
        self.lock = _take_lock(self.ctx, key, f"guest {self.name}")
        # Read again under the lock: a restore we waited for may have changed it.
        self.info = hv.guest(self.name)
        self.was_state = self.info.state
        if self.was_state not in (RUNNING, SHUTOFF):
            raise PreflightError(
                f"guest {self.name!r} is {self.was_state}; guestsafe backs up running or "
                "shut-off guests only (resume or stop it first)"
            )
        disk_files.check_backup_disks(self.info)
        self.push = choose_push(self)
        data = space_needed(self.info) if self.push else disk_files.allocated_total(self.info)
        needed = data + SPACE_MARGIN
        free = disk_files.free_space(job.destination)
        if needed > free:
            raise PreflightError(
                f"need {byte_size(needed)} on {job.destination}, {byte_size(free)} free "
                f"(guest {self.name})"
            )
        self.entry = JournalEntry(job.name, self.name, self.info.uuid, hv.uri, self.was_state)
        self.ctx.journal.write(self.entry)

    def stop(self) -> None:
        if self.push is not None:
            self.push.prepare()  # partial and QEMU's access, before any downtime
            if self.push.live:
                self.hooks_armed = True  # no stop, but backup-end or backup-abort runs
                return
        self._phase("shutdown")
        if self.was_state != RUNNING:
            self._info("guest is shut off; backing it up as it is")
            self.hooks_armed = True
            return
        self.hooks_armed = True
        if self.ctx.hooks is not None:
            self.ctx.hooks.veto("pre-stop", guest=self.name)
        self.stopped_at = time.monotonic()
        job = self.ctx.job
        self._info(f"shutting down (timeout {job.shutdown_timeout} s, then {job.on_timeout})")
        try:
            result = self.ctx.hv.shutdown(
                self.name,
                timeout=job.shutdown_timeout,
                on_timeout=job.on_timeout,
                log=lambda m: self._warn(m),
            )
        except ShutdownTimeout:
            self._watch_late_poweroff()
            raise
        if result.forced:
            self.warnings.append("powered off after the shutdown timeout")
        self._info(f"guest is off after {result.seconds:.1f} s")
        self._hook("post-stop")

    def _watch_late_poweroff(self) -> None:
        """A guest may still act on the request just after the timeout; notice it.

        settle() then starts it again, so it ends as it began: running.
        """
        grace = min(LATE_POWEROFF_GRACE, self.ctx.job.shutdown_timeout)
        if self.ctx.hv.wait_state(self.name, SHUTOFF, grace):
            self._warn("guest powered off after the shutdown timeout; starting it again")

    def copy(self) -> None:
        assert self.info is not None and self.ctx.archive is not None
        if self.push is not None:
            self.push.copy()  # the NVRAM; QEMU copies the disks
            return
        self.partial = self.ctx.archive.begin(self.name)
        self._phase("copy", self.partial.path)
        self.partial.write_domain_xml(self.ctx.hv.xml(self.name))
        # Someone starting the guest mid-copy makes the copy worthless: stop at once.
        with self.ctx.hv.watch_started(self.name) as started:
            self._copy_cancel = AnyEvent(self.ctx.cancel, started)
            try:
                self._copy_disks()
            except CopyError:
                self._check_still_off()
                raise

    def _copy_disks(self) -> None:
        assert self.info is not None
        for disk in self.info.disks:
            if disk.backs_up:
                self.records.append(self._copy_disk(disk.target, disk.source, disk.format))
            elif disk.source:
                self._info(f"skipping {disk.target} ({disk.device}, read-only or not a disk)")
        if self.info.nvram:
            self.records.append(self._copy_disk("nvram", self.info.nvram, "fd"))

    def _copy_disk(self, target: str, source: str | None, fmt: str | None) -> DiskRecord:
        assert self.partial is not None and source is not None
        file_name = disk_files.archive_file_name(target, fmt)
        dst = self.partial.file_path(file_name)
        src = Path(source)
        self._info(f"copying {target} ({source})")

        def progress(done: int, total: int) -> None:
            self.ctx.report(Progress(self.name, target, done, total))

        result = copy_file(src, dst, progress=progress, cancel=self._copy_cancel)
        self._check_still_off()
        self.bytes_copied += result.data_bytes
        return DiskRecord(
            target=target,
            source=source,
            format=fmt or "raw",
            virtual_size=disk_files.virtual_size(dst),
            allocated_size=dst.stat().st_blocks * 512,
            file=file_name,
            blake3=result.blake3,
        )

    def _check_still_off(self) -> None:
        state = self.ctx.hv.state(self.name)
        if state != SHUTOFF:
            raise CopyError(
                f"guest {self.name!r} was started by someone else during the copy "
                f"(it is {state}); the copy was discarded"
            )

    def start(self) -> None:
        """Start the guest again; a failure here must not cost the finished copy."""
        if self.was_state != RUNNING or (self.push is not None and self.push.live):
            return
        self._phase("start")
        self._hook("pre-start")
        if self.push is not None:
            self.push.start()  # paused, backup begun, resumed; raises: no copy to keep
            self._hook("post-start")
            return
        try:
            self.ctx.hv.start(self.name)
        except GuestsafeError as exc:
            self.error = exc
            self._error(exc.message)
            return
        if self.stopped_at is not None:
            self.downtime = time.monotonic() - self.stopped_at
        self._info(f"guest is running again (downtime {self.downtime or 0:.1f} s)")
        self._hook("post-start")

    def _hook(self, phase: str) -> None:
        """Run a hook that cannot veto: its failure fails the backup and stops nothing."""
        if self.ctx.hooks is None:
            return
        where = self.version.path if self.version else self.partial.path if self.partial else None
        failure = self.ctx.hooks.run(
            phase,
            guest=self.name,
            version_path=where,
            status="ok" if self.error is None else "failed",
            error=self.error.message if self.error is not None else "",
        )
        if failure is not None and self.error is None:
            self.error = failure

    def commit(self) -> None:
        assert self.partial is not None and self.info is not None
        if self.push is not None:
            self.records += self.push.finish()  # waits for QEMU, hashes what it wrote
        self._phase("commit")
        manifest = Manifest(
            format=1,
            guest=self.name,
            uuid=self.info.uuid,
            host=self.ctx.hv.hostname,
            mode=self.mode,
            started=self.started_iso,
            finished=_now_iso(),
            downtime=self.downtime,
            tool_version=__version__,
            disks=[r for r in self.records if r.target != "nvram"],
            nvram=next((r for r in self.records if r.target == "nvram"), None),
            notes=list(self.warnings),
        )
        self.version = self.partial.commit(manifest)
        self.partial = None
        self._info(f"committed version {self.version.number}")

    def verify_and_retain(self) -> None:
        assert self.version is not None and self.ctx.archive is not None
        archive, job = self.ctx.archive, self.ctx.job
        if job.verify:
            self._phase("verify")
            report = archive.verify(self.name, self.version.number)[0]
            if not report.ok:
                raise CopyError(
                    f"version {self.version.number} of {self.name} failed verification: "
                    + "; ".join(report.problems)
                    + " (retention skipped, older versions kept)"
                )
            self._info(f"version {self.version.number} verified")
        self._phase("retention")
        deleted = archive.apply_retention(self.name, job.keep)
        if deleted:
            self._info(f"retention (keep {job.keep}) removed versions {_numbers(deleted)}")

    # --- whatever happened -------------------------------------------------

    def settle(self) -> None:
        """Put the guest back as it was and drop anything uncommitted."""
        if self.push is not None:
            self.push.settle()  # no backup job may write into a partial being removed
        if self.partial is not None:
            try:
                self.partial.discard()
                self._info("unfinished copy removed; older versions untouched")
            except OSError as exc:
                self._warn(f"could not remove {self.partial.path}: {exc}")
            self.partial = None
        restored = self._restore_power_state()
        if self.hooks_armed:
            self.hooks_armed = False
            self._hook("backup-end" if self.error is None else "backup-abort")
        if self.entry is not None:
            if restored:
                self.ctx.journal.remove(self.entry)
            else:
                # Left for recover(): the next guestsafe command tries again.
                self.ctx.journal.phase(self.entry, "restart-failed")
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _restore_power_state(self) -> bool:
        """Start or resume a guest that ran before the job; False if that failed."""
        if self.was_state != RUNNING:
            return True
        try:
            state = self.ctx.hv.state(self.name)
            if state == SHUTOFF:
                self.ctx.hv.start(self.name)
                if self.stopped_at is not None:
                    self.downtime = time.monotonic() - self.stopped_at
                self._info("guest is running again")
            elif state == PAUSED:
                self.ctx.hv.resume(self.name)
                self._info("guest resumed")
        except GuestsafeError as exc:
            self._error(f"could not start the guest again: {exc}")
            self.error = self.error or exc
            return False
        return True

    def outcome(self) -> GuestOutcome:
        duration = time.monotonic() - self.t0
        ok = self.error is None
        number = self.version.number if self.version else None
        if ok:
            message = (
                f"ok: version {number}, downtime {_seconds(self.downtime)}, "
                f"{byte_size(self.bytes_copied)} in {duration:.1f} s"
            )
        else:
            assert self.error is not None
            message = (
                f"failed: {self.error.message}; {self._aftermath()}; downtime "
                f"{_seconds(self.downtime)}, {byte_size(self.bytes_copied)} in {duration:.1f} s"
            )
        return GuestOutcome(
            self.name, ok, number, self.downtime, self.bytes_copied, duration, message
        )

    def _aftermath(self) -> str:
        try:
            state = self.ctx.hv.state(self.name)
        except GuestsafeError:
            state = "unknown"
        committed = f"version {self.version.number} committed" if self.version else "no version"
        return f"guest is {state}, {committed}, previous versions untouched"

    # --- reporting ---------------------------------------------------------

    def _phase(self, phase: str, partial: Path | None = None) -> None:
        if self.ctx.cancel.is_set():
            raise CopyError(f"run cancelled before {phase}")
        if self.entry is not None:
            self.ctx.journal.phase(self.entry, phase, partial)
        self.ctx.report(PhaseChanged(self.name, phase))
        failpoints.hit(f"phase.{phase}")

    def _info(self, message: str) -> None:
        events.info(self.ctx.report, message, self.name)

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        events.warn(self.ctx.report, message, self.name)

    def _error(self, message: str) -> None:
        events.error(self.ctx.report, message, self.name)


def run_job(
    job: Job,
    hv: Hypervisor,
    paths: Paths,
    reporter: Reporter = events.null_reporter,
    *,
    cancel: threading.Event | None = None,
    on_log_path: Callable[[Path], None] | None = None,
) -> RunResult:
    """Back up every guest of ``job``; never raises for a guest's failure.

    A device path naming something other than a block device is refused with
    JobConfigError before anything is written or any guest touched.
    """
    wrong = misconfigured_device(job)
    if wrong is not None:
        raise JobConfigError(str(wrong), [wrong])
    paths.ensure()
    log_path = new_log_path(paths.log_dir, job.name)
    if on_log_path is not None:
        on_log_path(log_path)
    runlog = RunLog(log_path, reporter)
    ctx = _Context(job, hv, paths, runlog, Journal(paths.state_dir), cancel or threading.Event())
    ctx.hooks = HookRunner(job, runlog, ctx.cancel)
    result = RunResult(job.name, log_path)
    try:
        events.info(runlog, f"job {job.name}: {', '.join(job.guests)} -> {job.destination}")
        _begin(ctx, result)
        _open_archive(ctx)
        backups = [GuestBackup(ctx, name) for name in job.guests]
        if job.group:
            _run_group(backups)
        else:
            for backup in backups:
                _run_one(backup)
        result.outcomes = [b.outcome() for b in backups]
    except GuestsafeError as exc:
        events.error(runlog, exc.message)
        result.outcomes = [
            GuestOutcome(g, False, None, None, 0, 0.0, f"failed: {exc.message}") for g in job.guests
        ]
    finally:
        ctx.cleanup.close()
        for outcome in result.outcomes:
            runlog(outcome)
        runlog(events.backup_ended(result.ok))
        runlog.close()
    return result


def _begin(ctx: _Context, result: RunResult) -> None:
    """Before any guest: check the hooks, lock the destination, run job-start."""
    assert ctx.hooks is not None
    ctx.hooks.check()
    dest = ctx.job.destination
    lock = _take_lock(ctx, locks.destination_key(dest), f"destination {dest}")
    ctx.cleanup.callback(lock.release)
    # Registered before the device is mounted, so it runs after the unmount:
    # job-end mirrors job-start, which ran before the mount.
    ctx.cleanup.callback(_job_end, ctx, result)
    ctx.hooks.veto("job-start")


def _job_end(ctx: _Context, result: RunResult) -> None:
    assert ctx.hooks is not None
    failure = ctx.hooks.run("job-end", status="ok" if result.ok else "failed")
    if failure is not None:
        result.problems.append(failure.message)


def _take_lock(ctx: _Context, key: str, what: str) -> locks.Lock:
    """The lock on ``key``, waiting up to the job's ``lock_wait`` for its holder.

    Waits in short steps so a cancel is seen; never runs alongside the holder.
    """
    state_dir, purpose = ctx.paths.state_dir, f"backup of job {ctx.job.name}"
    try:
        return locks.acquire(state_dir, key, purpose)
    except LockBusy as exc:
        if ctx.job.lock_wait <= 0:
            raise _busy(ctx, key, what) from exc
    held = _held_by(ctx, key)
    events.info(ctx.report, f"{what} is busy ({held}); waiting up to {ctx.job.lock_wait} s")
    deadline = time.monotonic() + ctx.job.lock_wait
    while True:
        remaining = deadline - time.monotonic()
        try:
            return locks.acquire(state_dir, key, purpose, wait=max(0.0, min(1.0, remaining)))
        except LockBusy as exc:
            if ctx.cancel.is_set():
                raise LockBusy(f"cancelled while waiting for {what}") from exc
            if remaining <= 1.0:
                raise _busy(ctx, key, what) from exc


def _held_by(ctx: _Context, key: str) -> str:
    current = locks.holder(ctx.paths.state_dir, key)
    return f"held by {current.describe()}" if current is not None else "locked by another process"


def _busy(ctx: _Context, key: str, what: str) -> LockBusy:
    waited = f"; gave up after {ctx.job.lock_wait} s" if ctx.job.lock_wait > 0 else ""
    return LockBusy(f"busy: {what} {_held_by(ctx, key)}{waited}")


def _open_archive(ctx: _Context) -> None:
    dest = ctx.job.destination
    if ctx.job.device:
        job_archive = mounts.job_archive(ctx.job, ctx.hv, ctx.paths.state_dir, ctx.report)
        ctx.archive = ctx.cleanup.enter_context(job_archive)
        _clear_leftovers(ctx)
        return
    if not dest.is_dir():
        raise PreflightError(f"destination {dest} does not exist or is not a directory")
    if not os.access(dest, os.W_OK | os.X_OK):
        raise PreflightError(f"destination {dest} is not writable")
    _check_destination_owner(dest)
    ctx.archive = Archive.open(dest, create=True)
    _clear_leftovers(ctx)


def _clear_leftovers(ctx: _Context) -> None:
    """Remove partials and half-deleted versions a crash left in this archive.

    The journal names most of them, but not one begun a moment before the
    crash. Safe here: the destination lock keeps every other writer out.
    """
    assert ctx.archive is not None
    for leftover in ctx.archive.recover():
        events.info(ctx.report, f"removed {leftover}, left by an interrupted run")


def _check_destination_owner(dest: Path) -> None:
    """Refuse a destination someone else could swap files in (or read domain XML from)."""
    st = dest.stat()
    if st.st_uid != os.geteuid():
        raise PreflightError(
            f"destination {dest} belongs to uid {st.st_uid}, not to the user running guestsafe; "
            "chown it or choose another destination"
        )
    if st.st_mode & 0o022:
        raise PreflightError(
            f"destination {dest} is writable by group or others (mode {st.st_mode & 0o7777:04o}); "
            f"run 'chmod go-w {dest}'"
        )


def _run_one(backup: GuestBackup) -> None:
    try:
        backup.preflight()
        backup.stop()
        backup.copy()
        backup.start()
        backup.commit()
        backup.verify_and_retain()
    except GuestsafeError as exc:
        backup.error = exc
        backup._error(exc.message)
    except OSError as exc:
        backup.error = CopyError(f"{exc.strerror or exc} ({exc.filename or 'no file'})")
        backup._error(backup.error.message)
    finally:
        backup.settle()


def _run_group(backups: list[GuestBackup]) -> None:
    """Stop all in order, copy all, start in reverse order: one consistent set."""
    try:
        for step in ("preflight", "stop", "copy"):
            for backup in backups:
                _step(backup, step)
        for backup in reversed(backups):
            _step(backup, "start")
        for backup in backups:
            _step(backup, "commit")
            _step(backup, "verify_and_retain")
    except GuestsafeError as exc:
        for backup in backups:
            backup.error = backup.error or GuestsafeError(f"group aborted: {exc.message}")
    finally:
        for backup in reversed(backups):
            backup.settle()


def _step(backup: GuestBackup, step: str) -> None:
    try:
        getattr(backup, step)()
    except OSError as exc:
        error = CopyError(f"{exc.strerror or exc} ({exc.filename or 'no file'})")
        backup.error = error
        backup._error(error.message)
        raise error from exc
    except GuestsafeError as exc:
        backup.error = exc
        backup._error(exc.message)
        raise


def recover(paths: Paths, reporter: Reporter = events.null_reporter) -> list[str]:
    """Finish what dead runners left: restart guests they stopped, drop partials."""
    journal = Journal(paths.state_dir)
    done: list[str] = []
    for entry in journal.orphans():
        log = lambda m, g=entry.guest: events.info(reporter, m, g)  # noqa: E731
        recover_leftover(entry, log)  # a push backup job must not outlive its partial
        remove_partial(entry.partial, log)
        if entry.was_state == RUNNING and not _restart(entry, log):
            continue  # keep the entry: the next command tries again
        journal.remove(entry)
        done.append(entry.guest)
    return done


def _restart(entry: JournalEntry, log: Callable[[str], None]) -> bool:
    try:
        with Hypervisor(entry.uri) as hv:
            state = hv.state(entry.guest)
            if state == SHUTOFF:
                hv.start(entry.guest)
                log("recovered: guest started again after an interrupted backup")
            elif state == PAUSED:
                hv.resume(entry.guest)
                log("recovered: guest resumed after an interrupted backup")
    except GuestsafeError as exc:
        log(f"recovery could not restart the guest: {exc}")
        return False
    return True


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _seconds(value: float | None) -> str:
    return "none" if value is None else f"{value:.1f} s"


def _numbers(numbers: list[int]) -> str:
    return ", ".join(str(n) for n in numbers)
