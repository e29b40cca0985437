"""The runner: takes a job's guests through a cold backup, one step at a time.

``run_job`` is the job-level driver: it checks the hooks, locks the
destination, opens (or mounts) the archive, runs job-start and job-end, and
takes the guests through the steps of ``guest_backup.GuestBackup`` one after
the other, or, for a group job, all together: stop all in order, copy all,
start them in reverse order. What a dead runner leaves is finished by
``recovery.recover``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from guestsafe.engine import events, locks
from guestsafe.engine.archive.sharing import directory_shares, sharing_note
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.backup.context import JobContext, take_archive_lock, take_lock
from guestsafe.engine.backup.guest_backup import GuestBackup
from guestsafe.engine.backup.hooks import HookRunner
from guestsafe.engine.backup.host_plan import Unreached, plan_hosts
from guestsafe.engine.backup.journal import Journal
from guestsafe.engine.backup.results import RunResult
from guestsafe.engine.backup.runlog import RunLog, new_log_path
from guestsafe.engine.devices import mounts
from guestsafe.engine.errors import (
    Cancelled,
    GuestsafeError,
    HypervisorError,
    JobConfigError,
    PreflightError,
)
from guestsafe.engine.events import GuestOutcome, Reporter
from guestsafe.engine.hypervisor.connection import Hypervisor, LibvirtError
from guestsafe.engine.hypervisor.hosts import HostRegistry
from guestsafe.engine.jobs.model import Job
from guestsafe.engine.jobs.validation import misconfigured_device
from guestsafe.engine.paths import Paths

Step = Callable[[GuestBackup], None]
# The steps of one guest, in order; settle() follows whatever happened.
STEPS: tuple[Step, ...] = (
    GuestBackup.preflight,
    GuestBackup.stop,
    GuestBackup.copy,
    GuestBackup.start,
    GuestBackup.commit,
    GuestBackup.verify_and_retain,
)


def run_job(
    job: Job,
    hv: Hypervisor,
    paths: Paths,
    reporter: Reporter = events.null_reporter,
    *,
    cancel: threading.Event | None = None,
    on_log_path: Callable[[Path], None] | None = None,
    interactive: bool = False,
    hosts: HostRegistry | None = None,
) -> RunResult:
    """Back up every guest of ``job``; never raises for a guest's failure.

    ``hv`` is this machine's connection; ``hosts`` reaches the others the job names
    (``host_plan.py``). A host that does not answer fails its own guests alone.

    ``interactive``: a person waits for the result, so a busy guest or
    destination fails at once naming its holder; otherwise (timers, run-due)
    the run waits up to the job's ``lock_wait``.

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
    ctx = JobContext(job, hv, paths, runlog, Journal(paths.state_dir), cancel or threading.Event())
    ctx.interactive = interactive
    result = RunResult(job.name, log_path)
    registry = hosts if hosts is not None else HostRegistry(hv.uri, local=lambda: hv)
    guests = list(job.guests)
    try:
        plan = plan_hosts(job, registry)
        guests = plan.guest_names()
        # The run's job names its guests, "all" resolved: hooks, the device's
        # capacity check and each guest's backup see the same list.
        ctx.job = dataclasses.replace(job, guests=guests)
        ctx.hooks = HookRunner(ctx.job, runlog, ctx.cancel)
        events.info(runlog, f"job {job.name}: {', '.join(guests)} -> {job.destination}")
        for problem in plan.problems:
            events.error(runlog, problem)
        result.problems += plan.problems
        _begin(ctx, result)
        _open_archive(ctx)
        backups = [
            GuestBackup(dataclasses.replace(ctx, hv=target.hv), name, target.host)
            for target in plan.targets
            for name in target.guests
        ]
        if job.group:
            run_group(backups)
        else:
            for backup in backups:
                run_one(backup)
        result.outcomes = [b.outcome() for b in backups] + [_unreached(u) for u in plan.unreached]
        result.causes = {b.series: b.error.exit_code for b in backups if b.error is not None}
        result.causes |= {u.series: u.error.exit_code for u in plan.unreached}
    except GuestsafeError as exc:
        events.error(runlog, exc.message)
        result.outcomes = [
            GuestOutcome(g, False, None, None, 0, 0.0, f"failed: {exc.message}") for g in guests
        ]
        result.causes = dict.fromkeys(guests, exc.exit_code)
        if not guests:
            result.problems.append(exc.message)  # no guest to carry the failure
    finally:
        ctx.cleanup.close()
        for outcome in result.outcomes:
            runlog(outcome)
        runlog(events.backup_ended(result.ok))
        runlog.close()
    return result


def _unreached(unreached: Unreached) -> GuestOutcome:
    """The outcome of a guest whose host did not answer: nothing was touched."""
    message = f"failed: {unreached.error.message}; nothing was done to it"
    return GuestOutcome(unreached.series, False, None, None, 0, 0.0, message)


def _begin(ctx: JobContext, result: RunResult) -> None:
    """Before any guest: check the hooks, lock the destination, run job-start."""
    assert ctx.hooks is not None
    ctx.hooks.check()
    dest = ctx.job.destination
    lock = take_lock(ctx, locks.destination_key(dest), f"destination {dest}")
    ctx.cleanup.callback(lock.release)
    # Registered before the device is mounted, so it runs after the unmount:
    # job-end mirrors job-start, which ran before the mount.
    ctx.cleanup.callback(_job_end, ctx, result)
    ctx.hooks.veto("job-start")


def _job_end(ctx: JobContext, result: RunResult) -> None:
    assert ctx.hooks is not None
    failure = ctx.hooks.run("job-end", status="ok" if result.ok else "failed")
    if failure is not None:
        result.problems.append(failure.message)


def _open_archive(ctx: JobContext) -> None:
    dest = ctx.job.destination
    if ctx.job.device:
        job_archive = mounts.job_archive(ctx.job, ctx.hv, ctx.paths.state_dir, ctx.report)
        ctx.archive = ctx.cleanup.enter_context(job_archive)
        _clear_leftovers(ctx)
        _say_sharing(ctx)
        return
    if not dest.is_dir():
        raise PreflightError(f"destination {dest} does not exist or is not a directory")
    if not os.access(dest, os.W_OK | os.X_OK):
        raise PreflightError(f"destination {dest} is not writable")
    _check_destination_owner(dest)
    ctx.archive = Archive.open(dest, create=True)
    _clear_leftovers(ctx)
    _say_sharing(ctx)


def _say_sharing(ctx: JobContext) -> None:
    """On a destination's first run, whether its versions will share unchanged blocks."""
    assert ctx.archive is not None
    if ctx.archive.guests():
        return  # said on the first run; the log of every later run would only repeat it
    note = sharing_note(directory_shares(ctx.archive.root), str(ctx.archive.root))
    events.info(ctx.report, note)  # advice, not a fault: full copies are still good copies


def _clear_leftovers(ctx: JobContext) -> None:
    """Take the archive's own lock, then remove what a dead writer left in it.

    The journal names most leftovers, but not one begun a moment before the
    crash, nor one of another host. Partials belong to the archive lock's
    holder: once we hold it, their owner is gone (its lock died with it), on
    whichever host and through whichever path it wrote. Should the last holder
    recorded still run on this host, the lock is not doing its job here, and
    nothing is removed.
    """
    assert ctx.archive is not None
    lock = take_archive_lock(ctx, ctx.archive.root)
    ctx.cleanup.callback(lock.release)  # before the device's unmount
    previous = lock.previous
    if previous is not None and previous.pid != os.getpid() and locks.holder_alive(previous):
        events.warn(
            ctx.report,
            f"{ctx.archive.root}: its last writer, {previous.describe()}, still runs, though "
            "its lock is free (a filesystem without working locks?); its partials are kept",
        )
        return
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


def run_one(backup: GuestBackup) -> None:
    """Every step of one guest, then ``settle``; a failure ends up in ``backup.error``."""
    try:
        for step in STEPS:
            step(backup)
    except GuestsafeError as exc:
        backup.fail(exc)
    except OSError as exc:
        backup.fail(backup.unclaimed(exc))
    except LibvirtError as exc:
        backup.fail(_libvirt_failure(backup, exc))
    finally:
        backup.settle()


def run_group(backups: list[GuestBackup]) -> None:
    """Stop all in order, copy all, start in reverse order: one consistent set."""
    try:
        # Preflight takes each guest's lock: in one canonical order (by UUID), so
        # two groups that share guests never each hold one the other waits for.
        _each(_lock_order(backups), GuestBackup.preflight)
        _each(backups, GuestBackup.stop)
        _each(backups, GuestBackup.copy)
        _each(reversed(backups), GuestBackup.start)
        for backup in backups:
            _step(backup, GuestBackup.commit)
            _step(backup, GuestBackup.verify_and_retain)
    except GuestsafeError as exc:
        kind = Cancelled if isinstance(exc, Cancelled) else GuestsafeError
        for backup in backups:
            backup.error = backup.error or kind(f"group aborted: {exc.message}")
    finally:
        for backup in reversed(backups):
            backup.settle()


def _lock_order(backups: list[GuestBackup]) -> list[GuestBackup]:
    """The guests sorted by UUID; one that cannot be looked up first (it fails at once)."""

    def key(backup: GuestBackup) -> tuple[str, str]:
        try:
            return (backup.ctx.hv.guest(backup.name).uuid, backup.name)
        except GuestsafeError:
            return ("", backup.name)

    return sorted(backups, key=key)


def _each(backups: Iterable[GuestBackup], step: Step) -> None:
    for backup in backups:
        _step(backup, step)


def _step(backup: GuestBackup, step: Step) -> None:
    """One step of one guest of a group; its failure ends the group's steps."""
    try:
        step(backup)
    except OSError as exc:
        error: GuestsafeError = backup.unclaimed(exc)
        backup.fail(error)
        raise error from exc
    except LibvirtError as exc:
        error = _libvirt_failure(backup, exc)
        backup.fail(error)
        raise error from exc
    except GuestsafeError as exc:
        backup.fail(exc)
        raise


def _libvirt_failure(backup: GuestBackup, exc: LibvirtError) -> HypervisorError:
    """A libvirt error the hypervisor layer did not name, named after its guest and phase."""
    reason = str(exc.get_error_message() or exc).strip()
    phase = backup.phase or "the backup"
    return HypervisorError(f"guest {backup.name!r}, during {phase}: {reason}")
