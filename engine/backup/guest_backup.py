"""One guest's trip through the phases, and the clean-up whatever happens.

The runner (``runner.py``) calls the steps in order: ``preflight``, ``stop``,
``copy``, ``start``, ``commit``, ``verify_and_retain``, and ``settle`` whatever
happened (a group job takes all its guests through each step together). The
bytes are moved by a copy strategy (``copy_strategy.py``) chosen in preflight;
this module owns the power state, the hooks, the journal and the commit.
``settle`` puts the guest back in the power state it had before the job and
removes an uncommitted partial. The journal records each phase before it
begins, so ``recovery.recover()`` can do the same after a crash.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from guestsafe.engine import __version__, failpoints, locks, modes
from guestsafe.engine.archive.calendar_retention import describe_policy
from guestsafe.engine.archive.in_use import in_use_reason, versions_in_use
from guestsafe.engine.archive.manifest import Manifest, manifest_format
from guestsafe.engine.archive.names import series_name
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.backup.cold_copy import ColdCopy
from guestsafe.engine.backup.context import JobContext, take_lock
from guestsafe.engine.backup.copy_strategy import CopyStrategy
from guestsafe.engine.backup.disk_plan import plan_options, refuse_before_stop
from guestsafe.engine.backup.firmware import firmware_record
from guestsafe.engine.backup.guest_run import GuestRun, now_iso
from guestsafe.engine.backup.journal import JournalEntry, config_digest, newest_mtime_ns
from guestsafe.engine.backup.phases import Phase
from guestsafe.engine.backup.push_copy import choose_push
from guestsafe.engine.backup.stream_copy import remote_strategy
from guestsafe.engine.devices.preflight import space_needed_in
from guestsafe.engine.errors import (
    Cancelled,
    CopyError,
    GuestsafeError,
    HypervisorError,
    IOFailure,
    PreflightError,
    ShutdownTimeout,
    io_failure,
    naming,
)
from guestsafe.engine.events import GuestDowntime, GuestOutcome, LogLine, PhaseChanged, Progress
from guestsafe.engine.hypervisor import disk_files, remote_disks, volumes
from guestsafe.engine.hypervisor.domain_xml import PAUSED, RUNNING, SHUTOFF
from guestsafe.engine.hypervisor.hosts import LOCAL_HOST
from guestsafe.engine.jobs.model import retention_policy
from guestsafe.engine.modes import Mode
from guestsafe.engine.sizes import SPACE_MARGIN, byte_size
from guestsafe.engine.throttle import HostPacer

# How long, after a shutdown timeout under "abort", a late power-off is watched for
# by the run itself; after that the journal entry stays until LATE_POWEROFF_MARGIN
# past the timeout, and recover() starts a guest that powers off meanwhile.
LATE_POWEROFF_GRACE = 30.0
# A guest may act on a shutdown request long after the job's timeout (a Windows
# guest installing updates): until then it has not settled.
LATE_POWEROFF_MARGIN = 1800.0
# After a cancel in the shutdown wait, how long the guest is watched for acting on
# the request already sent (it cannot be withdrawn); later, recover() starts it.
CANCEL_POWEROFF_WATCH = 5.0
# A failed restart is tried again at once, before the commit: pauses between tries.
RESTART_BACKOFF = (2.0, 5.0)


class GuestBackup:
    """One guest's backup: the phases the runner calls, on one ``GuestRun``."""

    def __init__(self, ctx: JobContext, name: str, host: str = LOCAL_HOST) -> None:
        self.ctx = ctx
        self.host = host  # the [hosts.NAME] ctx.hv reaches, "local" for this machine
        self.series = series_name(name, host)  # the guest's name in the archive and reports
        self.run = GuestRun(
            name,
            ctx.job.mode,
            ctx.cancel,
            say=self._say,
            enter=self._enter,
            progress=self._progress,
            downtime_known=self._downtime,
            series=self.series,
        )
        self.entry: JournalEntry | None = None
        self.lock: locks.Lock | None = None
        self.version: VersionInfo | None = None
        self.error: GuestsafeError | None = None
        self.hooks_armed = False  # past pre-stop: backup-end or backup-abort will run
        self.strategy: CopyStrategy | None = None  # chosen in preflight
        self.phase: Phase | None = None  # the last one entered

    @property
    def name(self) -> str:
        return self.run.name

    def _copier(self) -> CopyStrategy:
        assert self.strategy is not None, "preflight chooses the copy strategy"
        return self.strategy

    # --- phases ------------------------------------------------------------

    def preflight(self) -> None:
        run, hv, job = self.run, self.ctx.hv, self.ctx.job
        run.t0 = time.monotonic()  # this guest's time, not the job's
        self._enter(Phase.PREFLIGHT, None)
        run.info = hv.guest(run.name)
        key = locks.guest_key(run.info.uuid)
        self.lock = take_lock(self.ctx, key, f"guest {run.name}")
        # Read again under the lock: a restore we waited for may have changed it.
        run.info = hv.guest(run.name)
        run.was_state = run.info.state
        if run.was_state not in (RUNNING, SHUTOFF):
            raise PreflightError(
                f"guest {run.name!r} is {run.was_state}; guestsafe backs up running or "
                "shut-off guests only (resume or stop it first)"
            )
        run.include_readonly = job.include_readonly
        if remote_disks.is_remote(hv):
            # Its disk files are another machine's: streamed from its storage pools.
            assert self.ctx.archive is not None
            pace = HostPacer(self.ctx.job.ionice, self.ctx.job.bwlimit)
            self.strategy = remote_strategy(run, hv, self.ctx.archive, pace)
        else:
            self._check_local_disks()
        transient_xml = self._keep_transient() if not run.info.persistent else None
        with naming(f"measuring the disk files of guest {run.name!r}", None):
            media = 0 if remote_disks.is_remote(hv) else _media_bytes(run)  # remote: in the plan
            sparse_need = self._copier().space_needed(run.info) + media
        with naming("reading the filesystem of", job.destination):
            # FAT and exFAT keep no holes: a sparse disk takes its full size there.
            needed = space_needed_in(job.destination, run.info, sparse_need) + SPACE_MARGIN
        with naming("reading the free space on", job.destination):
            free = disk_files.free_space(job.destination)
        if needed > free:
            raise PreflightError(
                f"need {byte_size(needed)} on {job.destination}, {byte_size(free)} free "
                f"(guest {run.name})"
            )
        self.entry = JournalEntry(job.name, run.name, run.info.uuid, hv.uri, run.was_state)
        self.entry.config_digest = config_digest(hv.xml(run.name))
        self.entry.transient_xml = transient_xml
        with naming("writing the journal in", self.ctx.journal.dir):
            self.ctx.journal.write(self.entry)

    def _check_local_disks(self) -> None:
        """Refuse what a copy of local files cannot save, and choose how to copy."""
        run, hv, job = self.run, self.ctx.hv, self.ctx.job
        assert run.info is not None
        volumes.check_volumes(run.info)
        cold = job.mode == Mode.STOP or run.was_state != RUNNING
        volumes.check_network_disks(run.info, cold=cold)
        with naming(f"reading the disk files of guest {run.name!r}", None):
            # Network disks are QEMU's to read (push backups); checked just above.
            files = [d for d in run.info.disks if d.kind != "network"]
            disk_files.check_backup_disks(replace(run.info, disks=files))
        self.strategy = self._choose_strategy()
        with naming(f"checking the disks of guest {run.name!r}", None):
            options = plan_options(hv, run.info, run.mode, job.include_readonly, job.chain)
            refuse_before_stop(run.info, options)

    def _keep_transient(self) -> str:
        """A transient guest vanishes when it stops: keep its XML to create it again."""
        run, hv = self.run, self.ctx.hv
        assert run.info is not None
        if run.mode == modes.STOP_SHORT:
            raise PreflightError(
                f"guest {run.name!r} is transient (created, not defined): mode stop-short "
                "starts it paused from its definition, which it does not have; use mode stop, "
                "or define it first ('virsh dumpxml G > G.xml; virsh define G.xml')"
            )
        xml = hv.xml(run.name)
        hv.keep_transient(run.name, run.info.uuid, xml)
        if run.was_state == RUNNING:
            run.say_info("guest is transient: it is created again from its XML after the copy")
        return xml

    def _choose_strategy(self) -> CopyStrategy:
        ctx = self.ctx
        assert ctx.archive is not None
        push = choose_push(self.run, ctx.job, ctx.hv, ctx.archive)
        if push is not None:
            return push
        pace = HostPacer(ctx.job.ionice, ctx.job.bwlimit)
        return ColdCopy(self.run, ctx.hv, ctx.archive, pace, chain=ctx.job.chain)

    def stop(self) -> None:
        run, strategy = self.run, self._copier()
        strategy.prepare()  # before any downtime
        if not strategy.stops_guest:
            self.hooks_armed = True  # no stop, but backup-end or backup-abort runs
            return
        self._enter(Phase.SHUTDOWN, None)
        if run.was_state != RUNNING:
            run.say_info("guest is shut off; backing it up as it is")
            self.hooks_armed = True
            return
        self.hooks_armed = True
        if self.ctx.hooks is not None:
            self.ctx.hooks.veto("pre-stop", guest=run.name)
        run.stopped_at = time.monotonic()
        job = self.ctx.job
        self._journal_request()
        run.say_info(f"shutting down (timeout {job.shutdown_timeout} s, then {job.on_timeout})")
        try:
            result = self.ctx.hv.shutdown(
                run.name,
                timeout=job.shutdown_timeout,
                on_timeout=job.on_timeout,
                log=run.warn,
                cancel=self.ctx.cancel,
            )
        except ShutdownTimeout:
            self._watch_late_poweroff()
            raise
        self._journal_off()
        if result.forced:
            run.warnings.append("powered off after the shutdown timeout")
        run.say_info(f"guest is off after {result.seconds:.1f} s")
        self._hook("post-stop")

    def _journal_request(self) -> None:
        """Before the request: a crash from here on may leave the guest going down."""
        if self.entry is None:
            return
        now = time.time()
        self.entry.shutdown_requested = now
        self.entry.shutdown_deadline = now + self.ctx.job.shutdown_timeout
        self.entry.settle_by = self.entry.shutdown_deadline + LATE_POWEROFF_MARGIN
        with naming("writing the journal in", self.ctx.journal.dir):
            self.ctx.journal.write(self.entry)

    def _journal_off(self) -> None:
        """The guest is off by our hand: what recovery compares to see it untouched."""
        if self.entry is None or self.run.info is None:
            return
        self.entry.off_at = time.time()
        disks = [d.source for d in self.run.info.disks if d.backs_up and d.source]
        # A remote guest's paths are another machine's: a local file there is no witness.
        remote = remote_disks.is_remote(self.ctx.hv)
        self.entry.disks_mtime_ns = None if remote else newest_mtime_ns(disks)
        with naming("writing the journal in", self.ctx.journal.dir):
            self.ctx.journal.write(self.entry)

    def _watch_late_poweroff(self) -> None:
        """A guest may still act on the request just after the timeout; notice it.

        settle() then starts it again, so it ends as it began: running. A later
        power-off is left to recover(): the journal entry stays (see settle).
        A cancel ends the watch at once.
        """
        deadline = time.monotonic() + min(LATE_POWEROFF_GRACE, self.ctx.job.shutdown_timeout)
        while not self.ctx.cancel.is_set():
            if self.ctx.hv.wait_state(self.name, SHUTOFF, min(1.0, deadline - time.monotonic())):
                self.run.warn("guest powered off after the shutdown timeout; starting it again")
                return
            if time.monotonic() >= deadline:
                return

    def copy(self) -> None:
        assert self.run.info is not None
        self._copier().copy()

    def start(self) -> None:
        """Start the guest again; a failure here must not cost the finished copy."""
        strategy = self._copier()
        if self.run.was_state != RUNNING or not strategy.stops_guest:
            return
        self._enter(Phase.START, None)
        self._hook("pre-start")
        failure = strategy.start()
        for pause in RESTART_BACKOFF:
            if failure is None:
                break
            # Retried now, not after the commit, verify and retention: each of
            # those could add hours of downtime. A cancel does not stop this.
            self.run.warn(f"{failure.message}; trying again in {pause:g} s")
            time.sleep(pause)
            failure = strategy.start()
        if failure is not None:
            self.fail(failure)
            return
        self._hook("post-start")

    def _hook(self, phase: str) -> None:
        """Run a hook that cannot veto: its failure fails the backup and stops nothing."""
        if self.ctx.hooks is None:
            return
        partial = self.run.partial
        where = self.version.path if self.version else partial.path if partial else None
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
        run = self.run
        assert run.partial is not None and run.info is not None
        run.records += self._copier().finish()  # push: waits for QEMU, hashes what it wrote
        self._enter(Phase.COMMIT, None)
        firmware = firmware_record(run.info)
        manifest = Manifest(
            format=manifest_format(
                run.tpm,
                firmware,
                run.not_copied,
                run.records,
                run.checkpoint,
                host_name=None if self.host == LOCAL_HOST else self.host,
            ),
            guest=run.name,
            uuid=run.info.uuid,
            host=self.ctx.hv.hostname,
            host_name=None if self.host == LOCAL_HOST else self.host,
            mode=run.mode,
            started=run.started_iso,
            finished=now_iso(),
            downtime=run.downtime,
            tool_version=__version__,
            disks=[r for r in run.records if r.target != "nvram"],
            nvram=next((r for r in run.records if r.target == "nvram"), None),
            notes=list(run.warnings),
            tpm=run.tpm,
            firmware=firmware,
            not_copied=list(run.not_copied),
            checkpoint=run.checkpoint,
        )
        with naming("committing the version in", run.partial.path):
            self.version = run.partial.commit(manifest)
        run.partial = None
        run.say_info(f"committed version {self.version.number}")

    def verify_and_retain(self) -> None:
        assert self.version is not None and self.ctx.archive is not None
        archive, job, number = self.ctx.archive, self.ctx.job, self.version.number
        if job.verify:
            self._enter(Phase.VERIFY, None)
            with naming("verifying", self.version.path):
                report = archive.verify(self.series, number)[0]
            if not report.ok:
                raise CopyError(
                    f"version {number} of {self.name} failed verification: "
                    + "; ".join(report.problems)
                    + " (retention skipped, older versions kept)"
                )
            self.run.say_info(f"version {number} verified")
        self._enter(Phase.RETENTION, None)
        with naming("removing old versions next to", self.version.path):
            policy = retention_policy(job)
            in_use = versions_in_use(self.ctx.paths.state_dir, archive.root, self.series)
            deleted = archive.apply_retention(self.series, policy, in_use)
        for number, clones in sorted(in_use.items()):
            self.run.say_info(
                f"retention keeps version {number}: {in_use_reason(clones)} (booted from it; "
                "guestsafe promote or boot --discard lets it go)"
            )
        if deleted:
            rules = describe_policy(policy)
            self.run.say_info(f"retention ({rules}) removed versions {_numbers(deleted)}")

    # --- whatever happened -------------------------------------------------

    def fail(self, error: GuestsafeError) -> None:
        """Record the guest's failure and log it."""
        self.error = error
        self.run.say_error(error.message)

    def unclaimed(self, exc: OSError) -> IOFailure:
        """An ``OSError`` no operation named: named after the phase it came from."""
        return io_failure(f"during {self.phase or 'the backup'}", None, exc)

    def settle(self) -> None:
        """Put the guest back as it was and drop anything uncommitted."""
        run = self.run
        if self.strategy is not None:
            self.strategy.settle()  # nothing may write into a partial being removed
        if run.partial is not None:
            try:
                run.partial.discard()
                run.say_info("unfinished copy removed; older versions untouched")
            except OSError as exc:
                run.warn(f"could not remove {run.partial.path}: {exc}")
            run.partial = None
        restored = self._restore_power_state()
        frozen = self.strategy is not None and self.strategy.still_frozen()
        if frozen:
            self._still_frozen()
        if self.hooks_armed:
            self.hooks_armed = False
            self._hook("backup-end" if self.error is None else "backup-abort")
        if self.entry is not None:
            self._settle_entry(self.entry, restored, frozen)
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        run.ended = time.monotonic()

    def _still_frozen(self) -> None:
        error = HypervisorError(
            f"the filesystems of guest {self.name!r} are still frozen: run "
            f"'virsh domfsthaw {self.name}' now (guestsafe recover tries again)"
        )
        self.run.say_error(error.message)
        self.error = self.error or error

    def _settle_entry(self, entry: JournalEntry, restored: bool, frozen: bool) -> None:
        """Remove the journal entry, or leave it to recover() with what is left to do."""
        journal = self.ctx.journal
        entry.detached = True  # our lock goes: recover() may act on it from now on
        if not restored:
            # Left for recover(): the next guestsafe command tries again.
            journal.phase(entry, Phase.RESTART_FAILED)
        elif frozen:
            journal.phase(entry, Phase.FREEZE)
        elif self._request_in_flight(entry):
            until = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.settle_by))
            self.run.say_info(
                "the guest may still act on the shutdown request; if it powers off before "
                f"{until}, the next guestsafe command (or 'guestsafe recover') starts it again"
            )
            journal.phase(entry, Phase.SHUTDOWN)
        else:
            journal.remove(entry)

    def _request_unanswered(self) -> bool:
        entry = self.entry
        return entry is not None and entry.shutdown_requested is not None and entry.off_at is None

    def _request_in_flight(self, entry: JournalEntry) -> bool:
        """A shutdown request the guest has not acted on yet, and may still."""
        if entry.shutdown_requested is None or entry.off_at is not None:
            return False
        if entry.settle_by is None or time.time() >= entry.settle_by:
            return False
        try:
            return self.ctx.hv.state(self.name) == RUNNING
        except GuestsafeError:
            return True  # unknown: keep the entry, recovery looks again

    def _restore_power_state(self) -> bool:
        """Start or resume a guest that ran before the job; False if that failed."""
        run = self.run
        if run.was_state != RUNNING:
            return True
        try:
            if isinstance(self.error, Cancelled) and self._request_unanswered():
                # The ACPI request is out: a guest that acts on it now is started again.
                self.ctx.hv.wait_state(run.name, SHUTOFF, CANCEL_POWEROFF_WATCH)
            state = self.ctx.hv.state(run.name)
            if state == SHUTOFF:
                if self.entry is not None and self.entry.off_at is None:
                    self.entry.off_at = time.time()  # it acted on the request: not in flight
                self.ctx.hv.start(run.name)
                run.running_again()
                run.say_info("guest is running again")
            elif state == PAUSED:
                self.ctx.hv.resume(run.name)
                run.say_info("guest resumed")
        except GuestsafeError as exc:
            run.say_error(f"could not start the guest again: {exc}")
            self.error = self.error or exc
            return False
        return True

    def outcome(self) -> GuestOutcome:
        run = self.run
        duration = (run.ended or time.monotonic()) - run.t0
        number = self.version.number if self.version else None
        # Data copied, not the version's size on disk (which ``list`` shows).
        spent = f"{byte_size(run.bytes_copied)} copied in {duration:.1f} s"
        if self.error is None:
            message = f"ok: version {number}, downtime {_seconds(run.downtime)}, {spent}"
        else:
            message = (
                f"failed: {self.error.message}; {self._aftermath()}; downtime "
                f"{_seconds(run.downtime)}, {spent}"
            )
        ok = self.error is None
        return GuestOutcome(
            self.series, ok, number, run.downtime, run.bytes_copied, duration, message
        )

    def _aftermath(self) -> str:
        try:
            state = self.ctx.hv.state(self.name)
        except GuestsafeError:
            state = "unknown"
        committed = f"version {self.version.number} committed" if self.version else "no version"
        return f"guest is {state}, {committed}, previous versions untouched"

    # --- what the run and the copy strategy call ----------------------------

    def _enter(self, phase: Phase, partial: Path | None) -> None:
        if self.ctx.cancel.is_set():
            raise Cancelled(f"run cancelled before {phase}")
        self.phase = phase
        if self.entry is not None:
            with naming("writing the journal in", self.ctx.journal.dir):
                self.ctx.journal.phase(self.entry, phase, partial)
        self.ctx.report(PhaseChanged(self.series, phase))
        failpoints.hit(f"phase.{phase}")

    def _say(self, level: int, text: str) -> None:
        self.ctx.report(LogLine(level, text, self.series))

    def _progress(self, item: str, done: int, total: int) -> None:
        self.ctx.report(Progress(self.series, item, done, total))

    def _downtime(self, seconds: float) -> None:
        self.ctx.report(GuestDowntime(self.series, seconds))


def _media_bytes(run: GuestRun) -> int:
    """What the read-only images include_readonly copies take (guestsafe copies them)."""
    media = [Path(d.source) for d in run.copied_disks() if not d.backs_up and d.source]
    return sum(disk_files.allocated_bytes(p) for p in media if p.is_file())


def _seconds(value: float | None) -> str:
    return "none" if value is None else f"{value:.1f} s"


def _numbers(numbers: list[int]) -> str:
    return ", ".join(str(n) for n in numbers)
