"""A job's external device: the mount lifecycle around a run, and read-only looks.

A job names its device as ``/dev/sdb1``, ``UUID=...`` or ``LABEL=...``. At run
time ``job_archive`` (a context manager around the whole job) does, in order,
and refuses with a ``DeviceError`` before any guest stops when a step fails:

1. resolve the device through udev: it must be plugged in, carry a filesystem
   that can be written (not swap, not a locked LUKS container, not read-only)
   and be unambiguous (two disks labelled ``BACKUP`` are refused);
2. check that the guests' files fit the filesystem: FAT32 cannot hold a file of
   4 GiB or more, and FAT and exFAT keep no holes, so a sparse disk needs its
   whole length there;
3. check that nothing uses the device (mounted elsewhere, a holder such as
   device-mapper, the disk of something mounted, a guest's disk) and that the
   destination is not already a mount point of another device;
4. mount it at the job's destination, which only serves as the mount point,
   with nosuid, nodev and noexec (on FAT, exFAT and NTFS also root-only modes,
   as those filesystems keep no owners of their own);
5. check the free space and the archive marker. The job remembers, in
   ``<state>/devices/<job>.json``, which archive it wrote on which filesystem
   (by filesystem UUID). A known filesystem must hold that archive; a new one
   must be blank or hold an archive the job already knows (a disk that joins a
   rotation). Anything else is the wrong disk. The first run of a job adopts
   whatever archive it finds;
6. afterwards, also when the job failed, unmount it, lazily if it is busy.

While mounted, ``<state>/mounts/<id>.json`` records the mount and the process
that made it. If that process dies (SIGKILL, a crash), ``recover_mounts``, which
``recover()`` runs before every command, unmounts what it left.

A destination where the job's own device is already mounted is used as it is
and left mounted. ``browse_archive`` mounts a device read-only in a private
temporary directory to list and restore, and unmounts it afterwards.
``probe_markers`` does the same briefly, to tell which devices hold an archive.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyudev

from guestsafe.engine import events, locks
from guestsafe.engine.archive.store import MARKER, Archive
from guestsafe.engine.devices.mounter import Mounted, mount_device, temporary_mount, umount_target
from guestsafe.engine.devices.mountinfo import mount_at, mounts_of
from guestsafe.engine.devices.preflight import (
    GuestFile,
    check_capacity,
    check_free_to_mount,
    guest_files,
    guest_infos,
    lossy_warnings,
    mount_point,
)
from guestsafe.engine.devices.resolve import check_filesystem, resolve
from guestsafe.engine.devices.udev import RUNTIME_DIR, BlockDevice, usage_of
from guestsafe.engine.errors import ArchiveError, DeviceError, GuestsafeError
from guestsafe.engine.events import Reporter
from guestsafe.engine.fsutil import atomic_write_bytes
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.jobs.model import Job
from guestsafe.engine.paths import ensure_dir
from guestsafe.engine.sizes import byte_size

MEMORY_DIR = "devices"
DEVICE_LOCK_WAIT = 30.0
# Options that keep a read-only look from replaying a journal (which writes).
NO_REPLAY = {"ext2": "noload", "ext3": "noload", "ext4": "noload", "xfs": "norecovery"}


def _device_key(device: BlockDevice) -> str:
    return f"device:{device.uuid or device.node}"


# --- the mount journal: what a dead run left mounted -------------------------------------

MOUNTS_DIR = "mounts"


@dataclass
class MountRecord:
    """One mount a job made, and who made it."""

    job: str
    node: str
    devnum: int
    target: str
    bind: bool
    pid: int = field(default_factory=os.getpid)
    pid_start: str | None = field(default_factory=lambda: locks.process_start_stamp(os.getpid()))
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def path(self, state_dir: Path) -> Path:
        return state_dir / MOUNTS_DIR / f"{self.record_id}.json"

    def owner_alive(self) -> bool:
        return locks.process_start_stamp(self.pid) == self.pid_start


def _journal_mount(state_dir: Path, job: Job, mounted: Mounted) -> MountRecord:
    record = MountRecord(
        job.name, mounted.device.node, mounted.device.devnum, str(mounted.target), mounted.bind
    )
    ensure_dir(state_dir / MOUNTS_DIR)
    data = json.dumps(asdict(record), indent=1).encode()
    atomic_write_bytes(record.path(state_dir), data, mode=0o600)
    return record


def _mount_records(state_dir: Path) -> list[MountRecord]:
    folder = state_dir / MOUNTS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            found.append(MountRecord(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue  # junk: never a reason to unmount anything
    return found


def recover_mounts(state_dir: Path, report: Reporter = events.null_reporter) -> list[str]:
    """Unmount what dead runs left mounted (lazily if busy); the mount points done."""
    done = []
    for record in _mount_records(state_dir):
        if record.owner_alive():
            continue
        purpose = f"recovery unmounts {record.node} from {record.target}"
        try:
            lock = locks.acquire(state_dir, f"mountpoint:{record.target}", purpose)
        except GuestsafeError:
            continue  # a live job uses the mount point now
        with lock:
            if _unmount_left(record, report):
                record.path(state_dir).unlink(missing_ok=True)
                done.append(record.target)
    return done


def _unmount_left(record: MountRecord, report: Reporter) -> bool:
    """Unmount the record's device if it is still the top mount at its target."""
    target = Path(record.target)
    top = mount_at(target)
    if top is None or not top.is_of(record.devnum):
        return True  # unmounted since, or another mount on top: not ours to remove
    try:
        warning = umount_target(target)
        below = mount_at(target)
        if record.bind and below is not None and not below.is_of(record.devnum):
            warning = umount_target(target) or warning
    except DeviceError as exc:
        events.error(report, f"recovery: {exc.message}; unmount it before unplugging the disk")
        return False
    message = f"recovered: unmounted {record.node} from {target}, left by an interrupted run"
    events.info(report, message + (f" ({warning})" if warning else ""))
    return True


class DeviceMemory:
    """Which archive a job wrote on which filesystem: ``{fs UUID: archive id}``."""

    def __init__(self, state_dir: Path, job: str) -> None:
        self.path = state_dir / MEMORY_DIR / f"{job}.json"

    def archives(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise DeviceError(
                f"cannot read {self.path} ({exc}); delete it to let the job adopt its disks again"
            ) from exc
        found = data.get("archives") if isinstance(data, dict) else None
        if not isinstance(found, dict):
            return {}
        return {str(k): str(v) for k, v in found.items()}

    def remember(self, key: str, archive_id: str) -> None:
        known = self.archives()
        if known.get(key) == archive_id:
            return
        known[key] = archive_id
        ensure_dir(self.path.parent)
        atomic_write_bytes(self.path, (json.dumps({"archives": known}, indent=2) + "\n").encode())


def _marker_id(root: Path) -> str | None:
    """The archive id of the marker at ``root``, None without one; damage raises."""
    if not os.path.lexists(root / MARKER):
        return None
    return Archive.open(root).archive_id


def open_job_archive(job: Job, device: BlockDevice, root: Path, memory: DeviceMemory) -> Archive:
    """Open (or create) the archive on a mounted device, refusing the wrong disk."""
    key = device.uuid or device.node
    known = memory.archives()
    found = _marker_id(root)
    expected = known.get(key)
    if expected is not None and found != expected:
        now = f"holds archive {found}" if found else "holds no archive marker now"
        raise DeviceError(
            f"wrong disk: {device.describe()} {now}, but job {job.name} wrote archive "
            f"{expected} there; plug in the job's disk (or delete {memory.path} to "
            "start over on this one)"
        )
    if expected is None and found is not None and known and found not in known.values():
        raise DeviceError(
            f"wrong disk: {device.describe()} holds archive {found}, which job {job.name} "
            f"never wrote (it knows {', '.join(sorted(set(known.values())))}); plug in one of "
            f"its disks or a blank one (or delete {memory.path} to adopt this archive)"
        )
    archive = Archive.open(root, create=True, expected_id=expected)
    memory.remember(key, archive.archive_id)
    return archive


@contextmanager
def job_archive(job: Job, hv: Hypervisor, state_dir: Path, report: Reporter) -> Iterator[Archive]:
    """The job's device mounted at its destination, and the archive on it; see above."""
    assert job.device is not None
    context = pyudev.Context()
    device = resolve(job.device, context)
    check_filesystem(device, write=True)
    dest = mount_point(job.destination)
    files = guest_files(guest_infos(job, hv))
    check_capacity(device, files, free=None)
    purpose = f"job {job.name} mounts {device.node} at {dest}"
    with (
        # A console that looks for an archive on a new device holds it for a moment.
        locks.acquire(state_dir, _device_key(device), purpose, wait=DEVICE_LOCK_WAIT),
        locks.acquire(state_dir, f"mountpoint:{dest}", purpose),
    ):
        mounted: Mounted | None = None
        record: MountRecord | None = None
        if check_free_to_mount(device, dest, hv, context):
            events.info(report, f"{device.describe()} is already mounted at {dest}; using it")
        else:
            if any(dest.iterdir()):
                events.warn(report, f"mount point {dest} is not empty; the device hides its files")
            mounted = mount_device(device, dest)
            record = _journal_mount(state_dir, job, mounted)
            events.info(report, f"mounted {device.describe()} at {dest} (nosuid,nodev,noexec)")
        try:
            yield _checked_archive(job, device, dest, files, state_dir, report)
        finally:
            if mounted is not None and _unmount_logged(mounted, report) and record is not None:
                with suppress(OSError):
                    record.path(state_dir).unlink(missing_ok=True)


def _checked_archive(
    job: Job,
    device: BlockDevice,
    dest: Path,
    files: Sequence[GuestFile],
    state_dir: Path,
    report: Reporter,
) -> Archive:
    free = shutil.disk_usage(dest).free
    check_capacity(device, files, free=free)
    archive = open_job_archive(job, device, dest, DeviceMemory(state_dir, job.name))
    events.info(report, f"archive {archive.archive_id} on {device.node}, {byte_size(free)} free")
    for warning in lossy_warnings(device, files):
        events.warn(report, warning)
    return archive


def _unmount_logged(mounted: Mounted, report: Reporter) -> bool:
    try:
        warning = mounted.unmount()
    except DeviceError as exc:
        events.error(report, f"{exc.message}; unmount it before unplugging the disk")
        return False
    if warning:
        events.warn(report, warning)
    else:
        events.info(report, f"unmounted {mounted.device.node} from {mounted.target}")
    return True


@contextmanager
def browse_archive(spec: str, state_dir: Path) -> Iterator[Archive]:
    """The archive on device ``spec``, mounted read-only for the ``with`` block.

    A device that is mounted already is read where it is and left mounted; one
    that another guestsafe is looking at for a moment is waited for.
    """
    device = resolve(spec)
    check_filesystem(device, write=False)
    entries = [e for e in mounts_of(device.devnum) if e.root == "/" and not _ours(e.target)]
    if entries:
        yield _device_archive(device, Path(entries[0].target))
        return
    purpose = f"reading the archive on {device.node}"
    with locks.acquire(state_dir, _device_key(device), purpose, wait=DEVICE_LOCK_WAIT):
        usage = usage_of(device)
        if not usage.free:
            raise DeviceError(f"{device.describe()} is in use: {'; '.join(usage.reasons)}")
        with temporary_mount(device) as root:
            yield _device_archive(device, root)


def _ours(target: str) -> bool:
    """A short read-only mount of guestsafe's own (it goes away with its lock)."""
    return target.startswith(f"{RUNTIME_DIR}/")


def _device_archive(device: BlockDevice, root: Path) -> Archive:
    if not os.path.lexists(root / MARKER):
        raise ArchiveError(f"{device.describe()} holds no guestsafe archive")
    return Archive.open(root)


def probe_markers(devices: Sequence[BlockDevice], state_dir: Path) -> list[BlockDevice]:
    """``devices`` with ``has_marker`` filled in where a brief read-only mount tells.

    Journals are not replayed (``noload``, ``norecovery``), so looking writes
    nothing. A device that is locked, busy or will not mount stays unknown.
    """
    return [_probe(device, state_dir) for device in devices]


def _probe(device: BlockDevice, state_dir: Path) -> BlockDevice:
    if device.locked:
        return device
    extra = [NO_REPLAY[device.fstype]] if device.fstype in NO_REPLAY else []
    purpose = f"looking for an archive on {device.node}"
    try:
        with (
            locks.acquire(state_dir, _device_key(device), purpose),
            temporary_mount(device, extra) as root,
        ):
            try:
                found = _marker_id(root)
            except ArchiveError:
                return device.with_marker(True, None)  # a marker, if a damaged one
            return device.with_marker(found is not None, found)
    except GuestsafeError:
        return device
