"""The stop-short and snapshot modes: push backups inside the runner's phases.

In preflight the runner asks ``choose_push`` whether a guest gets a push backup;
then its phases call the steps of ``PushCopy`` (a ``CopyStrategy``):

=========  ======================================  =================================
phase      stop-short                              snapshot
=========  ======================================  =================================
stop       prepare: partial and QEMU's access,     prepare: partial and QEMU's
           then the runner's clean shutdown        access; the guest keeps running
copy       copy: the NVRAM, while the guest is     copy: the NVRAM, then freeze,
           off                                     begin, thaw
start      start: start paused, begin the job,     nothing: the guest never stopped
           resume
commit     finish: wait for QEMU, adopt and hash its files; then the usual commit
settle     settle: abort a job still writing, thaw, take QEMU's access back
=========  ======================================  =================================

In stop-short the guest runs no instruction between its clean shutdown and the
start of the job, so QEMU's copy holds the disks exactly as the shutdown left
them, while the guest is already back. The downtime, from the shutdown request
to the resume, is a shutdown plus a start whatever the disk size. A group job
starts its guests in reverse order, as in stop, after all of them stopped.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from dataclasses import replace
from pathlib import Path

import libvirt

from guestsafe.engine import failpoints, modes
from guestsafe.engine.archive.manifest import CheckpointRecord, DiskRecord
from guestsafe.engine.archive.reflink import clone_file, supports_reflink
from guestsafe.engine.archive.space import unique_bytes
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.backup.cold_copy import copy_disk_file
from guestsafe.engine.backup.guest_run import GuestRun, begin_partial, check_still_off
from guestsafe.engine.backup.incremental import Base, bitmaps_problem, choose_base, source_id
from guestsafe.engine.backup.phases import Phase
from guestsafe.engine.backup.push_files import (
    CLOSE_WAIT_SECONDS,
    give_back_zeros,
    own,
    punch_zero_blocks,
    wait_until_closed,
)
from guestsafe.engine.backup.tpm_copy import copy_tpm_state
from guestsafe.engine.copier import copy_file, hash_with_chunks
from guestsafe.engine.errors import (
    Cancelled,
    CopyError,
    GuestsafeError,
    HypervisorError,
    PreflightError,
    naming,
)
from guestsafe.engine.fsutil import lstat_or_none
from guestsafe.engine.hypervisor import chains, checkpoints, disk_files, push_jobs, volumes
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import RUNNING, GuestInfo, parse_domain_xml
from guestsafe.engine.hypervisor.push_jobs import JobOutcome, JobWatch, PushTarget
from guestsafe.engine.hypervisor.qemu_access import QemuAccess, qemu_sees, qemu_uid
from guestsafe.engine.jobs.model import Job
from guestsafe.engine.modes import ChainMode
from guestsafe.engine.sizes import byte_size

PUSH_MODES = (modes.STOP_SHORT, modes.SNAPSHOT)
# Tests arm these (failpoints.py): a failure while QEMU copies, a crash while paused.
FAILPOINT = "push.during-backup"
PAUSED_FAILPOINT = "push.paused"


def choose_push(run: GuestRun, job: Job, hv: Hypervisor, archive: Archive) -> PushCopy | None:
    """The push backup of this guest, or None when it is copied cold as in stop.

    Sets ``run.mode`` to what is really done, and notes why when that differs
    from the job's mode.
    """
    info = run.info
    assert info is not None
    if job.mode not in PUSH_MODES:
        return None
    if run.was_state != RUNNING:
        run.mode = modes.STOP
        run.note(f"guest is shut off: copied as it is (consistent), without a {job.mode} backup")
        return None
    if job.chain == ChainMode.KEEP and chains.check_chains(info):
        raise PreflightError(
            f"guest {run.name!r}: chain = keep needs mode stop, since a push backup writes "
            f"each disk as one flattened file; use chain = flatten or mode stop"
        )
    problem = push_jobs.unsupported(hv, run.name, info)
    if problem is None:
        return PushCopy(run, hv, archive, live=job.mode == modes.SNAPSHOT)
    if not job.fallback_to_stop:
        raise PreflightError(
            f"guest {run.name!r}: mode {job.mode} needs a libvirt push backup, but {problem}; "
            "use mode stop, or set fallback_to_stop = true in the job"
        )
    run.mode = modes.STOP
    run.warn(f"{problem}: falling back to mode stop (the guest stays off for the whole copy)")
    return None


def space_needed(info: GuestInfo) -> int:
    """Bytes a push backup of ``info`` may take at its peak.

    QEMU writes the zero ranges of a raw target with fallocate(ZERO_RANGE), which
    allocates them until ``give_back_zeros`` punches them after the job: a raw
    disk needs its full size meanwhile. A qcow2 target marks zeros in its tables.
    """
    total = 0
    for disk in info.disks:
        # A network disk has no path here: PushCopy.space_needed asks QEMU its size.
        if disk.backs_up and disk.source and disk.kind != "network":
            path = Path(disk.source)
            raw = (disk.format or "raw") == "raw"
            total += (
                disk_files.virtual_size(path, "raw") if raw else disk_files.allocated_bytes(path)
            )
    if info.nvram:
        total += disk_files.allocated_bytes(Path(info.nvram))
    # QEMU writes a chain's data into one file: up to what its backing files hold.
    return total + chains.backing_allocated(info)


class PushCopy:
    """One guest's push backup, driven by the runner's phases (see the table above)."""

    def __init__(self, run: GuestRun, hv: Hypervisor, archive: Archive, *, live: bool) -> None:
        self.run = run
        self._hv = hv
        self.archive = archive
        self.live = live  # snapshot: the guest never stops
        self.targets: list[PushTarget] = []
        self.access: QemuAccess | None = None
        self.watch: JobWatch | None = None
        self.running = False  # a job of ours may be writing into the partial
        self.frozen = False
        self.frozen_at = 0.0
        self.begun_at = 0.0
        self.checkpoint: str | None = None  # the checkpoint this backup begins
        self.base: Base | None = None  # set: QEMU writes only what changed since it
        self.sources: dict[str, str] = {}  # target -> device:inode of its file

    @property
    def stops_guest(self) -> bool:
        return not self.live

    def space_needed(self, info: GuestInfo) -> int:
        network = volumes.network_disks(info)
        return space_needed(info) + sum(self._capacity(d.target) for d in network)

    def _capacity(self, target: str) -> int:
        """The size of a disk as the running QEMU sees it (a network disk has no file)."""
        try:
            return int(self._dom().blockInfo(target, 0)[0])
        except libvirt.libvirtError as exc:
            raise HypervisorError(
                f"cannot ask QEMU the size of disk {target} of guest {self.run.name!r}: "
                f"{push_jobs.message(exc)}"
            ) from exc

    def _dom(self) -> libvirt.virDomain:
        try:
            return self._hv.connection.lookupByName(self.run.name)
        except libvirt.libvirtError as exc:
            raise HypervisorError(
                f"cannot look up guest {self.run.name!r}: {push_jobs.message(exc)}"
            ) from exc

    # --- stop: before any downtime ---------------------------------------------

    def prepare(self) -> None:
        """The partial version, its domain.xml, and QEMU's way into it."""
        b = self.run
        assert b.info is not None
        partial = begin_partial(b, self.archive, self._hv, Phase.PREPARE)
        b.skip_media()
        for disk in b.copied_disks():
            if not disk.backs_up:
                continue  # read-only: guestsafe copies it itself in copy()
            assert disk.source is not None
            fmt = disk.format or "raw"
            path = partial.file_path(disk_files.archive_file_name(disk.target, fmt))
            self.targets.append(PushTarget(disk.target, disk.source, fmt, path))
        self.access = QemuAccess(qemu_uid(self._hv, b.name), self.archive.root, partial.path)
        self.access.grant()
        self._plan_incremental(partial.path)

    # --- incremental: only what changed since the previous version's checkpoint ---

    def _plan_incremental(self, folder: Path) -> None:
        """Begin a checkpoint with this backup; build on the previous one if nothing doubts it."""
        b = self.run
        if not self.targets or not checkpoints.supported():
            return
        if any(t.fmt != "qcow2" for t in self.targets):
            return  # a raw disk keeps no bitmap: no checkpoint, every backup reads it all
        reflink = supports_reflink(folder)
        if not reflink:
            # No version can start as a clone here, so a checkpoint would only cost
            # the guest a bitmap to keep up to date on every write.
            b.say_info("reading every block: the destination has no reflink (XFS, btrfs)")
            return
        try:
            self.sources = {t.target: source_id(t.source) for t in self.targets}
            sizes = {t.target: disk_files.virtual_size(Path(t.source), t.fmt) for t in self.targets}
        except (OSError, GuestsafeError):
            return  # a network disk, or one that cannot be read here: read all, as before
        self.checkpoint = checkpoints.new_name()
        try:
            leaves: list[str] | None = checkpoints.leaves(self._dom())
        except libvirt.libvirtError:
            leaves = None
        base = choose_base(
            self.archive.latest(b.name),
            self.targets,
            reflink=reflink,
            leaves=leaves,
            sources=self.sources,
            sizes=sizes,
        )
        if isinstance(base, str):
            b.say_info(f"reading every block: {base}")
            return
        for target in self.targets:
            with naming("cloning the previous version's file into", target.path):
                cloned = clone_file(base.files[target.target], target.path)
            if not cloned:
                self._drop_base(f"{target.path.parent} refused a reflink clone")
                return
        self.base = base
        b.say_info(
            f"QEMU writes only what changed since checkpoint {base.checkpoint} into clones "
            f"of version {base.previous}"
        )

    def _drop_base(self, reason: str) -> None:
        """Give up the incremental backup: remove the clones, so QEMU writes new files."""
        for target in self.targets:
            with contextlib.suppress(FileNotFoundError), naming("removing", target.path):
                target.path.unlink()
        self.base = None
        self.run.say_info(f"reading every block: {reason}")

    # --- copy --------------------------------------------------------------------

    def copy(self) -> None:
        """stop-short: the NVRAM while the guest is off. snapshot: NVRAM, then the job."""
        b = self.run
        assert b.info is not None
        if b.info.nvram:
            b.records.append(self._copy_nvram(b.info.nvram))
        for disk in b.copied_disks():
            if not disk.backs_up and disk.source is not None:  # read-only: nothing writes it
                b.records.append(copy_disk_file(b, disk.target, disk.source, disk.format, b.cancel))
        if not self.live:  # snapshot refuses TPM guests in preflight (preflight_disks.py)
            b.tpm = copy_tpm_state(b, b.cancel)
            check_still_off(self._hv, b)
        if self.live:
            self._snapshot()

    def _copy_nvram(self, source: str) -> DiskRecord:
        b = self.run
        assert b.partial is not None
        b.enter(Phase.COPY, None)
        name = disk_files.archive_file_name("nvram", "fd")
        dst = b.partial.file_path(name)
        b.say_info(f"copying nvram ({source})")
        result = copy_file(Path(source), dst, progress=b.copy_progress("nvram"), cancel=b.cancel)
        if not self.live:
            check_still_off(self._hv, b)
        b.bytes_copied += result.data_bytes
        with naming("reading the copy", dst):
            allocated = dst.stat().st_blocks * 512
            size = disk_files.virtual_size(dst, "raw")
        chunks = b.partial.write_chunk_table(name, result.chunks)
        return DiskRecord(
            "nvram", source, "fd", size, allocated, name, result.blake3, chunks=chunks
        )

    def _snapshot(self) -> None:
        """Begin the job on the running guest, its filesystems frozen if an agent answers."""
        b = self.run
        b.warnings.append(modes.SNAPSHOT_NOTE)
        dom = self._dom()
        self._freeze(dom)
        try:
            self._begin(dom)
        finally:
            problem = self._thaw(dom)
        if problem is not None:
            raise HypervisorError(
                f"could not thaw the filesystems of guest {b.name!r}: {problem}; "
                f"run 'virsh domfsthaw {b.name}' now"
            )
        b.downtime = 0.0
        b.say_info("live backup begun; the guest kept running (crash-consistent)")

    def _freeze(self, dom: libvirt.virDomain) -> None:
        b = self.run
        if not push_jobs.agent_connected(self._hv.xml(b.name, inactive=False)):
            b.note("no guest agent answers: filesystems were not frozen")
            return
        b.enter(Phase.FREEZE, None)
        self.frozen, self.frozen_at = True, time.monotonic()  # thaw even after a failed freeze
        try:
            count = dom.fsFreeze(None, 0)
        except libvirt.libvirtError as exc:
            b.warn(f"the guest agent could not freeze the filesystems ({push_jobs.message(exc)})")
            return
        b.say_info(f"froze {count} filesystem(s) through the guest agent")

    def _thaw(self, dom: libvirt.virDomain) -> str | None:
        b = self.run
        if not self.frozen:
            return None
        problem = push_jobs.thaw(dom)
        if problem is not None:
            b.say_error(f"could not thaw the guest's filesystems: {problem}")
            return problem
        self.frozen = False
        b.say_info(f"filesystems thawed after {time.monotonic() - self.frozen_at:.2f} s")
        return None

    # --- start: stop-short only -------------------------------------------------

    def start(self) -> GuestsafeError | None:
        """Start paused, begin the job, resume; raises when no copy will come."""
        b = self.run
        # Journaled before the start: no fsync while the guest is down for it.
        b.enter(Phase.BACKUP_BEGIN, None)
        t0 = time.monotonic()
        if self.base is not None:  # the guest is off: its bitmaps can be read now
            problem = bitmaps_problem(self.base, self.targets, checkpoints.bitmap_consistent)
            if problem is not None:
                self._drop_base(problem)
        self._hv.start(b.name, paused=True)
        failpoints.hit(PAUSED_FAILPOINT)
        dom = self._dom()
        t1 = time.monotonic()
        try:
            self._begin(dom)
        except BaseException:
            with contextlib.suppress(GuestsafeError):  # settle tries again
                self._hv.resume(b.name)
                self._resumed("guest is running again")
            raise
        t2 = time.monotonic()
        self._hv.resume(b.name)
        self._resumed("guest is running again; QEMU copies its disks meanwhile")
        # Where the downtime beyond the shutdown went, for whoever tunes the host.
        b.say_info(
            f"started paused in {t1 - t0:.2f} s, backup begun in {t2 - t1:.2f} s, "
            f"resumed in {time.monotonic() - t2:.2f} s"
        )
        return None

    def _resumed(self, what: str) -> None:
        b = self.run
        b.running_again()
        b.say_info(f"{what} (downtime {b.downtime or 0:.1f} s)")

    def _begin(self, dom: libvirt.virDomain) -> None:
        b = self.run
        assert b.partial is not None
        if qemu_sees(b.name, b.partial.path) is False:
            raise CopyError(
                f"QEMU of guest {b.name!r} cannot see {b.partial.path}: that filesystem was "
                "mounted after the guest started, and this host does not share mounts with "
                "QEMU (make / shared with 'mount --make-rshared /', or use mode stop)"
            )
        live = volumes.resolve_volumes(
            self._hv.connection, parse_domain_xml(self._hv.xml(b.name, inactive=False))
        )
        self._check_attached(live)
        ours = [t.target for t in self.targets]
        others = [d.target for d in live.disks if d.target not in ours]
        if self.live:
            b.enter(Phase.BACKUP_BEGIN, None)
        while True:
            base = self.base.checkpoint if self.base is not None else None
            xml = push_jobs.backup_xml(self.targets, others, base)
            ckpt = None
            if self.checkpoint is not None:
                ckpt = checkpoints.checkpoint_xml(self.checkpoint, ours, others)
            flags = libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL if base is not None else 0
            if self.watch is not None:
                self.watch.close()
            self.watch = JobWatch(self._hv.connection, dom)
            try:
                dom.backupBegin(xml, ckpt, flags)
                break
            except libvirt.libvirtError as exc:
                problem = push_jobs.message(exc)
                if base is not None:  # libvirt doubts the chain (a bitmap gone): read all
                    self._drop_base(f"libvirt refused the incremental backup ({problem})")
                elif ckpt is not None:  # a qcow2 v2 file keeps no bitmap: no checkpoint
                    self.checkpoint = None
                    b.note(f"no checkpoint for the next backup: {problem}")
                else:
                    raise CopyError(self._begin_failure(problem)) from exc
        self.running = True
        self.begun_at = time.monotonic()

    def _check_attached(self, live: GuestInfo) -> None:
        running = {d.target: d.source for d in live.disks}
        for target in self.targets:
            if running.get(target.target) != target.source:
                raise CopyError(
                    f"guest {self.run.name!r} runs with another disk {target.target} than "
                    f"its configuration ({target.source}); nothing was copied (use mode stop)"
                )

    def _begin_failure(self, problem: str) -> str:
        b = self.run
        uid = self.access.uid if self.access is not None else None
        if "Permission denied" in problem and uid is not None and b.partial is not None:
            return (
                f"QEMU (uid {uid}) may not open its backup target in {b.partial.path}: "
                f"{problem}; every folder above the archive must let it pass "
                f"(setfacl -m u:{uid}:x FOLDER)"
            )
        return f"libvirt could not begin the push backup of {b.name!r}: {problem}"

    # --- commit: wait, adopt, hash -------------------------------------------------

    def finish(self) -> list[DiskRecord]:
        """Wait for QEMU to finish, then make its files ours and hash them."""
        b = self.run
        assert self.watch is not None and self.access is not None and b.partial is not None
        b.enter(Phase.BACKUP, None)
        with naming("waiting for QEMU's push backup into", b.partial.path):
            outcome = self.watch.wait_outcome(
                b.cancel, b.copy_progress("backup"), lambda: failpoints.hit(FAILPOINT)
            )
        if outcome is None:
            raise Cancelled(f"backup of {b.name!r} cancelled; the unfinished copy is discarded")
        self.running = False
        if not outcome.ok:
            raise CopyError(self._failure(outcome))
        b.say_info(
            f"QEMU copied the disks in {time.monotonic() - self.begun_at:.1f} s "
            f"({self._bytes_read()} bytes read)"
        )
        self._keep_checkpoint()
        # The job's end comes before QEMU closes the targets; their block-job ends
        # come after. Waiting for those first leaves the check below one look.
        self.watch.wait_detached({t.target for t in self.targets}, CLOSE_WAIT_SECONDS)
        self.watch.close()
        self.watch = None
        wait_until_closed([t.path for t in self.targets], CLOSE_WAIT_SECONDS)
        self.access.close_partial()
        b.enter(Phase.HASH, None)
        assert self.run.info is not None
        disks = {d.target: d for d in self.run.info.disks}
        records = [self._adopt(target) for target in self.targets]
        # A pool's volume keeps its pool and volume in the manifest, as in a cold copy.
        return [
            replace(r, pool=disks[r.target].pool, volume=disks[r.target].volume)
            if r.target in disks
            else r
            for r in records
        ]

    def _bytes_read(self) -> int:
        """What QEMU read: every disk for a full backup, the changed clusters otherwise."""
        assert self.watch is not None
        stats = self.watch.completed or {}
        return int(stats.get(libvirt.VIR_DOMAIN_JOB_DISK_PROCESSED, 0))

    def _keep_checkpoint(self) -> None:
        """Record the checkpoint begun (and the base) for the manifest; drop older ones."""
        b = self.run
        if self.checkpoint is None:
            return
        base = self.base
        b.checkpoint = CheckpointRecord(
            name=self.checkpoint,
            based_on=base.checkpoint if base is not None else None,
            previous=base.previous if base is not None else None,
            sources=dict(self.sources),
        )
        try:
            checkpoints.drop_others(self._dom(), self.checkpoint)
        except (libvirt.libvirtError, GuestsafeError) as exc:
            # Only a cost (each bitmap is kept up to date), never a wrong version.
            b.note(f"older checkpoints of the guest stay: {exc}")

    def _failure(self, outcome: JobOutcome) -> str:
        b = self.run
        if outcome.guest_stopped:
            return (
                f"guest {b.name!r} stopped while QEMU was copying its disks "
                f"({outcome.reason}); the unfinished copy is discarded"
            )
        try:
            where = f" ({byte_size(disk_files.free_space(self.archive.root))} free on "
            where += f"{self.archive.root})"
        except OSError:
            where = ""  # the failure itself is what matters
        return f"the push backup of {b.name!r} failed: {outcome.reason}{where}"

    def _adopt(self, target: PushTarget) -> DiskRecord:
        """QEMU's file made ours: root's, 0600, zeros given back, size checked, hashed."""
        b = self.run
        assert b.partial is not None
        path = target.path
        st = lstat_or_none(path)
        if st is None or not stat.S_ISREG(st.st_mode):
            raise CopyError(f"QEMU reported success, but {path} is missing or not a file")
        with naming("taking over the file QEMU wrote", path):
            own(path)
        if target.fmt == "raw":
            with naming("giving back the zero ranges of", path):
                give_back_zeros(path)
                if disk_files.is_block_device(Path(target.source)):
                    punch_zero_blocks(path)  # QEMU copied the device's zeros as data
        self._check_size(target)
        b.say_info(f"hashing {target.target} ({path.name}, written by QEMU)")
        hashed = hash_with_chunks(path, progress=b.copy_progress(target.target), cancel=b.cancel)
        with naming("reading the copy", path):
            allocated = os.stat(path).st_blocks * 512
            size = disk_files.virtual_size(path, target.fmt)
        # Into a clone of the previous version QEMU wrote only what changed: the
        # blocks the clone no longer shares are this run's copy, not the whole file.
        b.bytes_copied += unique_bytes(path) if self.base is not None else allocated
        return DiskRecord(
            target=target.target,
            source=target.source,
            format=target.fmt,
            virtual_size=size,
            allocated_size=allocated,
            file=path.name,
            blake3=hashed.blake3,
            chunks=b.partial.write_chunk_table(path.name, hashed.chunks),
            source_kind="block" if disk_files.is_block_device(Path(target.source)) else "file",
        )

    def _check_size(self, target: PushTarget) -> None:
        assert self.run.info is not None
        if target.target in {d.target for d in volumes.network_disks(self.run.info)}:
            expected = self._capacity(target.target)
        else:
            with naming("reading the disk size of", target.source):
                expected = disk_files.virtual_size(Path(target.source), target.fmt)
        with naming("reading the disk size of", target.path):
            written = disk_files.virtual_size(target.path, target.fmt)
        if written != expected:
            raise CopyError(
                f"{target.path.name}: QEMU wrote a {written}-byte disk, but {target.target} of "
                f"guest {self.run.name!r} has {expected} bytes (resized meanwhile?)"
            )

    # --- settle ------------------------------------------------------------------

    def settle(self) -> None:
        """Whatever happened: filesystems thawed, no job of ours writing, access taken back."""
        b = self.run
        if self.frozen or self.running:
            try:
                dom = self._dom()
            except GuestsafeError as exc:
                b.say_error(f"cannot stop the push backup: {exc.message}")
            else:
                self._thaw(dom)
                if self.running:
                    self._abort(dom)
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        if self.access is not None:
            self.access.revoke()

    def still_frozen(self) -> bool:
        """The thaw failed every time, in the run and in settle: recovery retries it."""
        return self.frozen

    def _abort(self, dom: libvirt.virDomain) -> None:
        b = self.run
        stopped = push_jobs.abort(self._hv.connection, dom, self.watch)
        self.running = False
        if stopped:
            b.say_info("push backup job aborted")
        else:
            b.say_error(f"the push backup job did not stop within {push_jobs.ABORT_WAIT:.0f} s")
