"""The stop-short and snapshot modes: push backups inside the runner's phases.

In preflight the runner asks ``choose_push`` whether a guest gets a push backup;
then its phases hand over to ``PushBackup``:

=========  ======================================  =================================
phase      stop-short                              snapshot
=========  ======================================  =================================
stop       partial and QEMU's access, then the     partial and QEMU's access; the
           runner's clean shutdown                 guest keeps running
copy       the NVRAM, while the guest is off       the NVRAM, then freeze, begin, thaw
start      start paused, begin the job, resume     nothing: the guest never stopped
commit     wait for QEMU, adopt and hash its files, then the usual commit
settle     abort a job still writing, thaw, take QEMU's access back
=========  ======================================  =================================

In stop-short the guest runs no instruction between its clean shutdown and the
start of the job, so QEMU's copy holds the disks exactly as the shutdown left
them, while the guest is already back. The downtime, from the shutdown request
to the resume, is a shutdown plus a start whatever the disk size. A group job
starts its guests in reverse order, as in stop, after all of them stopped.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import libvirt

from guestsafe.engine import failpoints, modes
from guestsafe.engine.archive.manifest import DiskRecord
from guestsafe.engine.backup.journal import JournalEntry
from guestsafe.engine.copier import copy_file, hash_file
from guestsafe.engine.errors import CopyError, GuestsafeError, HypervisorError, PreflightError
from guestsafe.engine.events import Progress
from guestsafe.engine.fsutil import lstat_or_none
from guestsafe.engine.hypervisor import disk_files, push_jobs
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import RUNNING, GuestInfo, parse_domain_xml
from guestsafe.engine.hypervisor.push_jobs import JobOutcome, JobWatch, PushTarget
from guestsafe.engine.hypervisor.qemu_access import QemuAccess, qemu_sees, qemu_uid
from guestsafe.engine.sizes import byte_size

if TYPE_CHECKING:
    from guestsafe.engine.backup.runner import GuestBackup

PUSH_MODES = (modes.STOP_SHORT, modes.SNAPSHOT)
FILE_MODE = 0o600
# Journal phases in which a job of ours may still write, or filesystems be frozen.
LEFTOVER_PHASES = ("freeze", "backup-begin", "backup")
# Tests arm these (failpoints.py): a failure while QEMU copies, a crash while paused.
FAILPOINT = "push.during-backup"
PAUSED_FAILPOINT = "push.paused"


def choose_push(backup: GuestBackup) -> PushBackup | None:
    """The push backup of this guest, or None when it is copied cold as in stop.

    Sets ``backup.mode`` to what is really done, and notes why when that differs
    from the job's mode.
    """
    job, info = backup.ctx.job, backup.info
    assert info is not None
    if job.mode not in PUSH_MODES:
        return None
    if backup.was_state != RUNNING:
        backup.mode = modes.STOP
        note = f"guest is shut off: copied as it is (consistent), without a {job.mode} backup"
        backup.warnings.append(note)
        backup._info(note)
        return None
    problem = push_jobs.unsupported(backup.ctx.hv, backup.name, info)
    if problem is None:
        return PushBackup(backup, live=job.mode == modes.SNAPSHOT)
    if not job.fallback_to_stop:
        raise PreflightError(
            f"guest {backup.name!r}: mode {job.mode} needs a libvirt push backup, but {problem}; "
            "use mode stop, or set fallback_to_stop = true in the job"
        )
    backup.mode = modes.STOP
    backup._warn(f"{problem}: falling back to mode stop (the guest stays off for the whole copy)")
    return None


def space_needed(info: GuestInfo) -> int:
    """Bytes a push backup of ``info`` may take at its peak.

    QEMU writes the zero ranges of a raw target with fallocate(ZERO_RANGE), which
    allocates them until ``give_back_zeros`` punches them after the job: a raw
    disk needs its full size meanwhile. A qcow2 target marks zeros in its tables.
    """
    total = 0
    for disk in info.disks:
        if disk.backs_up and disk.source:
            path = Path(disk.source)
            raw = (disk.format or "raw") == "raw"
            total += disk_files.virtual_size(path) if raw else disk_files.allocated_bytes(path)
    if info.nvram:
        total += disk_files.allocated_bytes(Path(info.nvram))
    return total


class PushBackup:
    """One guest's push backup, driven by the runner's phases (see the table above)."""

    def __init__(self, backup: GuestBackup, *, live: bool) -> None:
        self.backup = backup
        self.live = live  # snapshot: the guest never stops
        self.targets: list[PushTarget] = []
        self.access: QemuAccess | None = None
        self.watch: JobWatch | None = None
        self.running = False  # a job of ours may be writing into the partial
        self.frozen = False
        self.frozen_at = 0.0
        self.begun_at = 0.0

    @property
    def _hv(self) -> Hypervisor:
        return self.backup.ctx.hv

    def _dom(self) -> libvirt.virDomain:
        try:
            return self._hv.connection.lookupByName(self.backup.name)
        except libvirt.libvirtError as exc:
            raise HypervisorError(
                f"cannot look up guest {self.backup.name!r}: {push_jobs.message(exc)}"
            ) from exc

    # --- stop: before any downtime ---------------------------------------------

    def prepare(self) -> None:
        """The partial version, its domain.xml, and QEMU's way into it."""
        b = self.backup
        assert b.info is not None and b.ctx.archive is not None
        b.partial = b.ctx.archive.begin(b.name)
        b._phase("prepare", b.partial.path)
        b.partial.write_domain_xml(self._hv.xml(b.name))
        for disk in b.info.disks:
            if disk.backs_up and disk.source is not None:
                fmt = disk.format or "raw"
                path = b.partial.file_path(disk_files.archive_file_name(disk.target, fmt))
                self.targets.append(PushTarget(disk.target, disk.source, fmt, path))
            elif disk.source:
                b._info(f"skipping {disk.target} ({disk.device}, read-only or not a disk)")
        self.access = QemuAccess(qemu_uid(self._hv, b.name), b.ctx.archive.root, b.partial.path)
        self.access.grant()

    # --- copy --------------------------------------------------------------------

    def copy(self) -> None:
        """stop-short: the NVRAM while the guest is off. snapshot: NVRAM, then the job."""
        b = self.backup
        assert b.info is not None
        if b.info.nvram:
            b.records.append(self._copy_nvram(b.info.nvram))
        if self.live:
            self._snapshot()

    def _copy_nvram(self, source: str) -> DiskRecord:
        b = self.backup
        assert b.partial is not None
        b._phase("copy")
        name = disk_files.archive_file_name("nvram", "fd")
        dst = b.partial.file_path(name)
        b._info(f"copying nvram ({source})")
        result = copy_file(Path(source), dst, progress=self._progress("nvram"), cancel=b.ctx.cancel)
        if not self.live:
            b._check_still_off()
        b.bytes_copied += result.data_bytes
        allocated = dst.stat().st_blocks * 512
        size = disk_files.virtual_size(dst)
        return DiskRecord("nvram", source, "fd", size, allocated, name, result.blake3)

    def _snapshot(self) -> None:
        """Begin the job on the running guest, its filesystems frozen if an agent answers."""
        b = self.backup
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
        b._info("live backup begun; the guest kept running (crash-consistent)")

    def _freeze(self, dom: libvirt.virDomain) -> None:
        b = self.backup
        if not push_jobs.agent_connected(self._hv.xml(b.name, inactive=False)):
            note = "no guest agent answers: filesystems were not frozen"
            b.warnings.append(note)
            b._info(note)
            return
        b._phase("freeze")
        self.frozen, self.frozen_at = True, time.monotonic()  # thaw even after a failed freeze
        try:
            count = dom.fsFreeze(None, 0)
        except libvirt.libvirtError as exc:
            b._warn(f"the guest agent could not freeze the filesystems ({push_jobs.message(exc)})")
            return
        b._info(f"froze {count} filesystem(s) through the guest agent")

    def _thaw(self, dom: libvirt.virDomain) -> str | None:
        b = self.backup
        if not self.frozen:
            return None
        problem = push_jobs.thaw(dom)
        if problem is not None:
            b._error(f"could not thaw the guest's filesystems: {problem}")
            return problem
        self.frozen = False
        b._info(f"filesystems thawed after {time.monotonic() - self.frozen_at:.2f} s")
        return None

    # --- start: stop-short only -------------------------------------------------

    def start(self) -> None:
        """Start paused, begin the job, resume; raises when no copy will come."""
        b = self.backup
        # Journaled before the start: no fsync while the guest is down for it.
        b._phase("backup-begin")
        t0 = time.monotonic()
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
        b._info(
            f"started paused in {t1 - t0:.2f} s, backup begun in {t2 - t1:.2f} s, "
            f"resumed in {time.monotonic() - t2:.2f} s"
        )

    def _resumed(self, what: str) -> None:
        b = self.backup
        if b.stopped_at is not None:
            b.downtime = time.monotonic() - b.stopped_at
        b._info(f"{what} (downtime {b.downtime or 0:.1f} s)")

    def _begin(self, dom: libvirt.virDomain) -> None:
        b = self.backup
        assert b.partial is not None
        if qemu_sees(b.name, b.partial.path) is False:
            raise CopyError(
                f"QEMU of guest {b.name!r} cannot see {b.partial.path}: that filesystem was "
                "mounted after the guest started, and this host does not share mounts with "
                "QEMU (make / shared with 'mount --make-rshared /', or use mode stop)"
            )
        live = parse_domain_xml(self._hv.xml(b.name, inactive=False))
        self._check_attached(live)
        ours = {t.target for t in self.targets}
        others = [d.target for d in live.disks if d.target not in ours]
        xml = push_jobs.backup_xml(self.targets, others)
        if self.live:
            b._phase("backup-begin")
        self.watch = JobWatch(self._hv.connection, dom)
        try:
            dom.backupBegin(xml, None, 0)
        except libvirt.libvirtError as exc:
            raise CopyError(self._begin_failure(push_jobs.message(exc))) from exc
        self.running = True
        self.begun_at = time.monotonic()

    def _check_attached(self, live: GuestInfo) -> None:
        running = {d.target: d.source for d in live.disks}
        for target in self.targets:
            if running.get(target.target) != target.source:
                raise CopyError(
                    f"guest {self.backup.name!r} runs with another disk {target.target} than "
                    f"its configuration ({target.source}); nothing was copied (use mode stop)"
                )

    def _begin_failure(self, problem: str) -> str:
        b = self.backup
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
        b = self.backup
        assert self.watch is not None and self.access is not None
        b._phase("backup")
        outcome = self.watch.wait_outcome(
            b.ctx.cancel, self._progress("backup"), lambda: failpoints.hit(FAILPOINT)
        )
        if outcome is None:
            raise CopyError(f"backup of {b.name!r} cancelled; the unfinished copy is discarded")
        self.running = False
        if not outcome.ok:
            raise CopyError(self._failure(outcome))
        b._info(f"QEMU copied the disks in {time.monotonic() - self.begun_at:.1f} s")
        # The job's end comes before QEMU closes the targets; their block-job ends
        # come after. Waiting for those first leaves the check below one look.
        self.watch.wait_detached({t.target for t in self.targets}, CLOSE_WAIT_SECONDS)
        self.watch.close()
        self.watch = None
        wait_until_closed([t.path for t in self.targets], CLOSE_WAIT_SECONDS)
        self.access.close_partial()
        b._phase("hash")
        return [self._adopt(target) for target in self.targets]

    def _failure(self, outcome: JobOutcome) -> str:
        b = self.backup
        if outcome.guest_stopped:
            return (
                f"guest {b.name!r} stopped while QEMU was copying its disks "
                f"({outcome.reason}); the unfinished copy is discarded"
            )
        where = ""
        if b.ctx.archive is not None:
            free = byte_size(disk_files.free_space(b.ctx.archive.root))
            where = f" ({free} free on {b.ctx.archive.root})"
        return f"the push backup of {b.name!r} failed: {outcome.reason}{where}"

    def _progress(self, item: str) -> Callable[[int, int], None]:
        b = self.backup

        def report(done: int, total: int) -> None:
            b.ctx.report(Progress(b.name, item, done, total))

        return report

    def _adopt(self, target: PushTarget) -> DiskRecord:
        """QEMU's file made ours: root's, 0600, zeros given back, size checked, hashed."""
        b = self.backup
        path = target.path
        st = lstat_or_none(path)
        if st is None or not stat.S_ISREG(st.st_mode):
            raise CopyError(f"QEMU reported success, but {path} is missing or not a file")
        _own(path)
        if target.fmt == "raw":
            give_back_zeros(path)
        self._check_size(target)
        b._info(f"hashing {target.target} ({path.name}, written by QEMU)")
        digest = hash_file(path, progress=self._progress(target.target), cancel=b.ctx.cancel)
        allocated = os.stat(path).st_blocks * 512
        b.bytes_copied += allocated
        return DiskRecord(
            target=target.target,
            source=target.source,
            format=target.fmt,
            virtual_size=disk_files.virtual_size(path),
            allocated_size=allocated,
            file=path.name,
            blake3=digest,
        )

    def _check_size(self, target: PushTarget) -> None:
        expected = disk_files.virtual_size(Path(target.source))
        written = disk_files.virtual_size(target.path)
        if written != expected:
            raise CopyError(
                f"{target.path.name}: QEMU wrote a {written}-byte disk, but {target.target} of "
                f"guest {self.backup.name!r} has {expected} bytes (resized meanwhile?)"
            )

    # --- settle ------------------------------------------------------------------

    def settle(self) -> None:
        """Whatever happened: filesystems thawed, no job of ours writing, access taken back."""
        b = self.backup
        if self.frozen or self.running:
            try:
                dom = self._dom()
            except GuestsafeError as exc:
                b._error(f"cannot stop the push backup: {exc.message}")
            else:
                self._thaw(dom)
                if self.running:
                    self._abort(dom)
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        if self.access is not None:
            self.access.revoke()

    def _abort(self, dom: libvirt.virDomain) -> None:
        b = self.backup
        stopped = push_jobs.abort(self._hv.connection, dom, self.watch)
        self.running = False
        if stopped:
            b._info("push backup job aborted")
        else:
            b._error(f"the push backup job did not stop within {push_jobs.ABORT_WAIT:.0f} s")


# --- recovery ---------------------------------------------------------------------


def recover_leftover(entry: JournalEntry, log: Callable[[str], None]) -> None:
    """After a crash in a push phase: thaw the guest, stop a job still writing.

    Runs before the partial is removed, so QEMU is not left writing into it.
    Only a job whose targets lie in the entry's partial is aborted.
    """
    if entry.phase not in LEFTOVER_PHASES or not entry.partial:
        return
    try:
        with Hypervisor(entry.uri) as hv:
            dom = hv.connection.lookupByName(entry.guest)
            if entry.phase in ("freeze", "backup-begin") and push_jobs.thaw(dom, 1) is None:
                log("recovered: guest filesystems thawed")
            if push_jobs.writes_into(dom, Path(entry.partial)):
                stopped = push_jobs.abort(hv.connection, dom, None)
                log(
                    "recovered: stopped the push backup of the interrupted run"
                    if stopped
                    else "recovery could not stop the push backup of the interrupted run"
                )
    except (GuestsafeError, libvirt.libvirtError) as exc:
        log(f"recovery could not look for a leftover push backup: {exc}")


# --- files QEMU wrote ------------------------------------------------------------


# How long QEMU may take to close a backup target after the job-completed event.
CLOSE_WAIT_SECONDS = 60.0


def wait_until_closed(paths: list[Path], timeout: float) -> None:
    """Wait until no process holds these files open.

    libvirt reports the backup job complete before QEMU has detached the target
    block nodes; a qcow2 target's header and refcounts are written as it closes.
    A hash taken earlier would not match the file as it finally is.
    """
    wanted = {str(p) for p in paths}
    deadline = time.monotonic() + timeout
    while _open_anywhere(wanted):
        if time.monotonic() > deadline:
            raise CopyError(
                f"QEMU still holds {', '.join(sorted(wanted))} open {timeout:g} s after the "
                "backup finished; the copy is discarded"
            )
        time.sleep(0.1)


def _open_anywhere(wanted: set[str]) -> bool:
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
        except OSError:
            continue  # the process ended, or is not ours to look at
        if wanted.intersection(links):
            return True
    return False


def _own(path: Path) -> None:
    """Root's and 0600 like every archive file, whoever libvirt left it to."""
    try:
        os.chown(path, os.geteuid(), os.getegid())
        os.chmod(path, FILE_MODE)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP):  # exFAT/FAT have no owners
            raise


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).fallocate64
    except (OSError, AttributeError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    func.restype = ctypes.c_int
    return func


_fallocate = _load_fallocate()


def give_back_zeros(path: Path) -> int:
    """Free the blocks of the ranges that read as zeros; return the bytes freed.

    QEMU writes a raw target's zero ranges with fallocate(ZERO_RANGE): they read
    as holes (SEEK_HOLE finds them) but hold blocks, so a sparse 500 GiB disk
    would take 500 GiB. Punching a range that reads as zeros changes no byte.
    """
    if _fallocate is None:
        return 0
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        # SEEK_HOLE counts cached pages of a zero range as data: write them out,
        # then drop them, so it sees the extents as they are on disk.
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        before = os.fstat(fd).st_blocks
        flags = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        for start, end in _zero_ranges(fd, os.fstat(fd).st_size):
            if _fallocate(fd, flags, start, end - start) != 0:
                err = ctypes.get_errno()
                if err in (errno.EOPNOTSUPP, errno.ENOSYS):
                    return 0  # the filesystem cannot punch: the file stays as QEMU left it
                raise OSError(err, os.strerror(err), str(path))
        os.fsync(fd)
        return max(0, before - os.fstat(fd).st_blocks) * 512
    finally:
        os.close(fd)


def _zero_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of every range SEEK_HOLE reports, in order."""
    offset = 0
    while offset < size:
        try:
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            raise
        if hole >= size:
            return
        try:
            data = os.lseek(fd, hole, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = size
        yield hole, data
        offset = data
