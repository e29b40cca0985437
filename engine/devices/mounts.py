"""A job's external device: resolve it, mount it, check it, unmount it.

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

A destination where the job's own device is already mounted is used as it is
and left mounted. ``browse_archive`` mounts a device read-only in a private
temporary directory to list and restore, and unmounts it afterwards.
``probe_markers`` does the same briefly, to tell which devices hold an archive.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pyudev

from guestsafe.engine import events, locks
from guestsafe.engine.archive.store import MARKER, Archive
from guestsafe.engine.devices.udev import (
    READ_ONLY_FILESYSTEMS,
    RUNTIME_DIR,
    BlockDevice,
    all_block_devices,
    device_of,
    is_self_bind,
    mount_at,
    mount_containing,
    mounts_of,
    read_mounts,
    usage_of,
)
from guestsafe.engine.errors import ArchiveError, DeviceError, GuestsafeError, HypervisorError
from guestsafe.engine.events import Reporter
from guestsafe.engine.fsutil import atomic_write_bytes
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import GuestInfo
from guestsafe.engine.jobs.model import Job
from guestsafe.engine.paths import ensure_dir
from guestsafe.engine.sizes import SPACE_MARGIN, byte_size

SAFE_OPTIONS = ("nosuid", "nodev", "noexec")
FAT_MAX_FILE = 4 * 1024**3 - 1
MEMORY_DIR = "devices"
MOUNT_TIMEOUT = 120.0
DEVICE_LOCK_WAIT = 30.0
# Filesystems without holes: a sparse disk file takes its whole length there.
NON_SPARSE = frozenset({"vfat", "msdos", "exfat", "hfsplus"})
FAT = frozenset({"vfat", "msdos"})
# Filesystems without Unix owners and modes: the mount options give every file one.
NO_OWNERS = frozenset({"vfat", "msdos", "exfat", "ntfs"})
# The drivers to try for a filesystem blkid names, best first.
DRIVERS = {"ntfs": ("ntfs-3g", "ntfs3"), "exfat": ("exfat", "exfat-fuse"), "msdos": ("vfat",)}
# Options that keep a read-only look from replaying a journal (which writes).
NO_REPLAY = {"ext2": "noload", "ext3": "noload", "ext4": "noload", "xfs": "norecovery"}
_NOT_MOUNTABLE = frozenset({"swap", "LVM2_member", "crypto_LUKS"})
_SPEC = re.compile(r"(UUID|LABEL)=(.+)")
_SBIN = (Path("/sbin"), Path("/usr/sbin"), Path("/bin"), Path("/usr/bin"))


# --- resolving ---------------------------------------------------------------------


def resolve(spec: str, context: pyudev.Context | None = None) -> BlockDevice:
    """The block device ``spec`` names now: ``/dev/...``, ``UUID=...`` or ``LABEL=...``.

    An opened LUKS container resolves to the filesystem inside it.
    """
    context = context or pyudev.Context()
    match = _SPEC.fullmatch(spec)
    if match is None:
        device = _by_node(spec, context)
    else:
        device = _by_property(match.group(1), match.group(2), spec, context)
    return _unlocked(device, context)


def _by_node(spec: str, context: pyudev.Context) -> BlockDevice:
    if not spec.startswith("/dev/"):
        raise DeviceError(f"device {spec!r} must be /dev/..., UUID=... or LABEL=...")
    try:
        st = os.stat(spec)
    except FileNotFoundError:
        raise DeviceError(f"device {spec} is not plugged in (no such device node)") from None
    except OSError as exc:
        raise DeviceError(f"device {spec}: {exc.strerror}") from exc
    if not stat.S_ISBLK(st.st_mode):
        raise DeviceError(f"device {spec} is not a block device")
    try:
        dev = pyudev.Devices.from_device_number(context, "block", st.st_rdev)
    except pyudev.DeviceNotFoundError:
        raise DeviceError(
            f"device {spec} is not known to udev; is systemd-udevd running?"
        ) from None
    device = device_of(dev)
    if device is None:
        raise DeviceError(f"device {spec} is not a disk or partition")
    return device


def _by_property(kind: str, value: str, spec: str, context: pyudev.Context) -> BlockDevice:
    found = [d for d in all_block_devices(context) if _matches(d, kind, value)]
    if not found:
        raise DeviceError(
            f"device {spec} is not plugged in (no filesystem with that {kind.lower()}); "
            "plug it in, or see 'guestsafe devices'"
        )
    if len(found) > 1:
        nodes = ", ".join(d.node for d in found)
        raise DeviceError(
            f"device {spec} is ambiguous: {nodes} all match; unplug all but one, "
            "or name the device by UUID"
        )
    return found[0]


def _matches(device: BlockDevice, kind: str, value: str) -> bool:
    if kind == "UUID":
        # blkid prints FAT and NTFS serials in upper case; people type either.
        return device.uuid.lower() == value.lower() and bool(device.uuid)
    return device.label == value


def _unlocked(device: BlockDevice, context: pyudev.Context) -> BlockDevice:
    """The filesystem inside an opened LUKS container; the device itself otherwise."""
    if device.fstype != "crypto_LUKS" or device.locked:
        return device
    holders = sorted(os.listdir(f"/sys/class/block/{device.name}/holders"))
    for name in holders:
        with contextlib.suppress(pyudev.DeviceNotFoundError):
            inner = device_of(pyudev.Devices.from_name(context, "block", name))
            if inner is not None and inner.fstype:
                return inner
    return device


def check_filesystem(device: BlockDevice, *, write: bool) -> None:
    """Refuse what cannot be mounted (for writing, with ``write``)."""
    if device.locked:
        raise DeviceError(
            f"{device.describe()} is a locked LUKS container; unlock it first "
            "(cryptsetup open), then name the device or keep naming the container"
        )
    if not device.fstype or device.fstype in _NOT_MOUNTABLE or "raid_member" in device.fstype:
        what = device.fstype or "no filesystem"
        raise DeviceError(f"{device.node} holds {what}, not a filesystem guestsafe can use")
    if write and device.fstype in READ_ONLY_FILESYSTEMS:
        raise DeviceError(f"{device.describe()} is a read-only filesystem ({device.fstype})")
    if write and device.read_only:
        raise DeviceError(f"{device.describe()} is read-only (write-protected?)")


# --- what the guests need ------------------------------------------------------


@dataclass(frozen=True)
class GuestFile:
    """One file a backup of the job will write, as found before anything stops."""

    guest: str
    source: str
    length: int  # what the copy's length will be
    allocated: int  # bytes the source takes on disk (less for a sparse file)


def guest_files(infos: Sequence[GuestInfo]) -> list[GuestFile]:
    files = []
    for info in infos:
        sources = [d.source for d in info.disks if d.backs_up and d.source]
        sources += [info.nvram] if info.nvram else []
        for source in sources:
            with contextlib.suppress(OSError):  # a missing file is preflight's to report
                files.append(GuestFile(info.name, source, *_lengths(source)))
    return files


def _lengths(source: str) -> tuple[int, int]:
    st = os.stat(source)
    if not stat.S_ISBLK(st.st_mode):
        return st.st_size, st.st_blocks * 512
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        length = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    return length, length


def needs(device: BlockDevice, files: Sequence[GuestFile]) -> dict[str, int]:
    """Bytes each guest's version takes on ``device``'s filesystem, margin included."""
    per_guest: dict[str, int] = {}
    for f in files:
        size = f.length if device.fstype in NON_SPARSE else f.allocated
        per_guest[f.guest] = per_guest.get(f.guest, SPACE_MARGIN) + size
    return per_guest


def check_capacity(device: BlockDevice, files: Sequence[GuestFile], free: int | None) -> None:
    """Refuse a filesystem that cannot hold the files: FAT's 4 GiB limit, the space.

    ``free`` is the free space once mounted; None checks the device's size instead.
    """
    if device.fstype in FAT:
        for f in files:
            if f.length > FAT_MAX_FILE:
                raise DeviceError(
                    f"{device.describe()} is {device.filesystem}, which cannot hold files of "
                    f"4 GiB or more; guest {f.guest}'s disk {f.source} is {byte_size(f.length)}. "
                    "Use a device with ext4, XFS, btrfs, exFAT or NTFS"
                )
    per_guest = needs(device, files)
    if not per_guest:
        return
    guest, need = max(per_guest.items(), key=lambda item: item[1])
    room, what = (device.size, "in all") if free is None else (free, "free")
    if need > room:
        holes = " (no holes on this filesystem)" if device.fstype in NON_SPARSE else ""
        raise DeviceError(
            f"need {byte_size(need)} on {device.describe()} for guest {guest}{holes}, "
            f"{byte_size(room)} {what}"
        )


def _guest_infos(job: Job, hv: Hypervisor) -> list[GuestInfo]:
    infos = []
    for name in job.guests:
        with contextlib.suppress(GuestsafeError):  # a missing guest fails its own preflight
            infos.append(hv.guest(name))
    return infos


def guest_disk_devnums(hv: Hypervisor) -> dict[int, str]:
    """Block devices that guests use as disks, and a guest using each."""
    found: dict[int, str] = {}
    for info in _all_guests(hv):
        for disk in info.disks:
            rdev = _rdev(disk.source) if disk.kind == "block" and disk.source else None
            if rdev is not None:
                found[rdev] = info.name
    return found


def _all_guests(hv: Hypervisor, attempts: int = 3) -> list[GuestInfo]:
    # Hypervisor.guests() lets a libvirt error escape when a guest is undefined
    # while it is listed; the next listing no longer has it.
    for attempt in range(attempts):
        try:
            return hv.guests()
        except libvirt.libvirtError as exc:
            if attempt == attempts - 1:
                raise HypervisorError(f"cannot list the guests: {exc}") from exc
    return []


def guest_user(device: BlockDevice, guest_disks: dict[int, str]) -> str | None:
    """The guest using ``device``, or the whole disk it is on, as its disk."""
    return guest_disks.get(device.devnum) or guest_disks.get(device.disk_devnum)


def _rdev(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


# --- mounting ------------------------------------------------------------------


def _drivers(fstype: str) -> list[str]:
    """The drivers for ``fstype`` this system has: kernel ones or a mount helper."""
    try:
        kernel = {line.split()[-1] for line in Path("/proc/filesystems").read_text().splitlines()}
    except OSError:
        kernel = set()
    candidates = DRIVERS.get(fstype, (fstype,))
    return [d for d in candidates if d in kernel or any((s / f"mount.{d}").exists() for s in _SBIN)]


def _owner_options(fstype: str) -> list[str]:
    if fstype not in NO_OWNERS:
        return []
    # No owners of their own: make everything root's (ours) and private, as the
    # archive holds whole disks and domain XML with passwords.
    return [f"uid={os.geteuid()}", f"gid={os.getegid()}", "dmask=0077", "fmask=0177"]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=MOUNT_TIMEOUT,
            env={**os.environ, "LC_ALL": "C"},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DeviceError(f"{argv[0]} failed: {exc}") from exc


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "no message"


@dataclass(frozen=True)
class Mounted:
    """A device guestsafe mounted, and whether a shared bind mount lies beneath it."""

    device: BlockDevice
    target: Path
    bind: bool

    def unmount(self) -> str | None:
        """Unmount, lazily if busy; a warning to log, or None if all went well."""
        warnings = []
        top = mount_at(self.target)
        if top is not None and top.is_of(self.device.devnum):
            warnings.append(_umount(self.target))
        top = mount_at(self.target)
        if self.bind and top is not None and not top.is_of(self.device.devnum):
            warnings.append(_umount(self.target))
        return "; ".join(w for w in warnings if w) or None


def mount_device(
    device: BlockDevice, target: Path, *, read_only: bool = False, extra: Sequence[str] = ()
) -> Mounted:
    """Mount ``device`` at ``target`` with nosuid, nodev and noexec, and check it is so."""
    drivers = _drivers(device.fstype)
    if not drivers:
        wanted = " or ".join(DRIVERS.get(device.fstype, (device.fstype,)))
        raise DeviceError(
            f"this system cannot mount {device.describe()}: no kernel driver or mount "
            f"helper for {wanted} (install the package that provides it)"
        )
    options = ["ro" if read_only else "rw", *SAFE_OPTIONS, *_owner_options(device.fstype), *extra]
    mounted = Mounted(device, target, _share_mount_point(target))
    result = _run(
        ["mount", "-t", drivers[0], "-o", ",".join(options), "--", device.node, str(target)]
    )
    try:
        if result.returncode != 0:
            raise DeviceError(
                f"mounting {device.describe()} at {target} failed: {_one_line(result.stderr)}"
            )
        _check_mounted(device, target, read_only)
    except DeviceError:
        with contextlib.suppress(DeviceError):
            mounted.unmount()
        raise
    return mounted


def _share_mount_point(target: Path) -> bool:
    """Put a shared bind mount at ``target`` unless its mount is shared already.

    libvirt starts each QEMU in a mount namespace of its own, a copy of every mount
    there is, kept as a slave. An unmount reaches those copies only when the mount
    beneath is shared, as systemd makes ``/``. Where it is private (no systemd,
    many containers), a guest started while the device is mounted (the restart
    of a backup) would keep the filesystem mounted in its namespace after the
    job, and the disk would never be safe to unplug. Returns True if it bound.
    """
    if mount_containing(target).shared:
        return False
    for argv in (["mount", "--bind"], ["mount", "--make-shared"]):
        result = _run([*argv, "--", str(target), *([str(target)] if "--bind" in argv else [])])
        if result.returncode != 0:
            with contextlib.suppress(DeviceError):
                _umount(target)
            raise DeviceError(
                f"cannot prepare mount point {target} ({' '.join(argv[1:])}): "
                f"{_one_line(result.stderr)}"
            )
    return True


def _check_mounted(device: BlockDevice, target: Path, read_only: bool) -> None:
    entry = mount_at(target)
    if entry is None or not entry.is_of(device.devnum):
        raise DeviceError(f"{device.node} did not end up mounted at {target}")
    if set(SAFE_OPTIONS) <= entry.options:
        return
    # Some FUSE helpers drop flags they do not know; the flags are the VFS's and a
    # bind remount sets them without asking the filesystem.
    flags = ",".join(["remount", "bind", "ro" if read_only else "rw", *SAFE_OPTIONS])
    _run(["mount", "-o", flags, "--", str(target)])
    entry = mount_at(target)
    if entry is None or not set(SAFE_OPTIONS) <= entry.options:
        raise DeviceError(f"could not mount {device.node} with {','.join(SAFE_OPTIONS)}")


def _umount(target: Path) -> str | None:
    """Unmount the top mount at ``target``, lazily if busy; a warning, or None."""
    result = _run(["umount", "--", str(target)])
    if result.returncode == 0:
        return None
    if "busy" in result.stderr:
        lazy = _run(["umount", "-l", "--", str(target)])
        if lazy.returncode == 0:
            return (
                f"{target} was busy ({_one_line(result.stderr)}); unmounted lazily: it "
                "detaches once the last user lets go, unplug the disk only after that"
            )
    raise DeviceError(f"could not unmount {target}: {_one_line(result.stderr)}")


def _runtime_dir() -> Path | None:
    """Where private temporary mount points go: /run (RAM) for root, else the default."""
    if os.geteuid() != 0:
        return None
    ensure_dir(RUNTIME_DIR)
    return RUNTIME_DIR


@contextmanager
def _temporary_mount(device: BlockDevice, extra: Sequence[str] = ()) -> Iterator[Path]:
    """``device`` mounted read-only in a private directory for the ``with`` block."""
    directory = Path(tempfile.mkdtemp(prefix="guestsafe-ro-", dir=_runtime_dir()))
    try:
        mounted = mount_device(device, directory, read_only=True, extra=extra)
        try:
            yield directory
        finally:
            mounted.unmount()
    finally:
        with contextlib.suppress(OSError):  # still mounted (lazily): leave the empty dir
            directory.rmdir()


def _device_key(device: BlockDevice) -> str:
    return f"device:{device.uuid or device.node}"


# --- archive memory --------------------------------------------------------------


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


# --- the job's device ---------------------------------------------------------------


def _mount_point(destination: Path) -> Path:
    try:
        st = destination.stat()
    except FileNotFoundError:
        raise DeviceError(
            f"mount point {destination} does not exist; create it (mkdir) for the device"
        ) from None
    except OSError as exc:
        raise DeviceError(f"mount point {destination}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise DeviceError(f"mount point {destination} is not a directory")
    return Path(os.path.realpath(destination))


def _check_free_to_mount(
    device: BlockDevice, dest: Path, hv: Hypervisor, context: pyudev.Context
) -> bool:
    """Refuse a device in use or a taken mount point; True if it is already mounted at dest."""
    entries = read_mounts()
    on_dest = mount_at(dest, entries)
    if on_dest is not None and on_dest.is_of(device.devnum):
        return True
    if on_dest is not None and is_self_bind(on_dest, entries):
        on_dest = None  # the mount point bound onto itself (see _share_mount_point)
    if on_dest is not None:
        raise DeviceError(
            f"mount point {dest} is already a mount point of {on_dest.source} "
            f"({on_dest.fstype}); unmount it or give the job another destination"
        )
    elsewhere = [e.target for e in mounts_of(device.devnum, entries)]
    if elsewhere:
        raise DeviceError(
            f"{device.describe()} is mounted at {', '.join(elsewhere)}; unmount it "
            f"(guestsafe mounts it at {dest} itself)"
        )
    usage = usage_of(device, context)
    if not usage.free:
        raise DeviceError(f"{device.describe()} is in use: {'; '.join(usage.reasons)}")
    user = guest_user(device, guest_disk_devnums(hv))
    if user is not None:
        raise DeviceError(f"{device.describe()} is a disk of guest {user}; refusing to mount it")
    return False


def _lossy_warnings(device: BlockDevice, files: Sequence[GuestFile]) -> list[str]:
    warnings = []
    if device.fstype in NON_SPARSE:
        full = sum(f.length for f in files)
        used = sum(f.allocated for f in files)
        warnings.append(
            f"{device.filesystem} keeps no sparse files: holes are written out in full "
            f"({byte_size(full)} for {byte_size(used)} of data)"
        )
    if device.fstype in NO_OWNERS:
        via = " through ntfs-3g" if device.fstype == "ntfs" else ""
        warnings.append(
            f"{device.filesystem}{via} keeps no Unix owners or modes: every file on it is "
            "root's with mode 0600 (mount options)"
        )
    return warnings


@contextmanager
def job_archive(job: Job, hv: Hypervisor, state_dir: Path, report: Reporter) -> Iterator[Archive]:
    """The job's device mounted at its destination, and the archive on it; see above."""
    assert job.device is not None
    context = pyudev.Context()
    device = resolve(job.device, context)
    check_filesystem(device, write=True)
    dest = _mount_point(job.destination)
    files = guest_files(_guest_infos(job, hv))
    check_capacity(device, files, free=None)
    purpose = f"job {job.name} mounts {device.node} at {dest}"
    with (
        # A console that looks for an archive on a new device holds it for a moment.
        locks.acquire(state_dir, _device_key(device), purpose, wait=DEVICE_LOCK_WAIT),
        locks.acquire(state_dir, f"mountpoint:{dest}", purpose),
    ):
        mounted: Mounted | None = None
        if _check_free_to_mount(device, dest, hv, context):
            events.info(report, f"{device.describe()} is already mounted at {dest}; using it")
        else:
            if any(dest.iterdir()):
                events.warn(report, f"mount point {dest} is not empty; the device hides its files")
            mounted = mount_device(device, dest)
            events.info(report, f"mounted {device.describe()} at {dest} (nosuid,nodev,noexec)")
        try:
            yield _checked_archive(job, device, dest, files, state_dir, report)
        finally:
            if mounted is not None:
                _unmount_logged(mounted, report)


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
    for warning in _lossy_warnings(device, files):
        events.warn(report, warning)
    return archive


def _unmount_logged(mounted: Mounted, report: Reporter) -> None:
    try:
        warning = mounted.unmount()
    except DeviceError as exc:
        events.error(report, f"{exc.message}; unmount it before unplugging the disk")
        return
    if warning:
        events.warn(report, warning)
    else:
        events.info(report, f"unmounted {mounted.device.node} from {mounted.target}")


# --- read-only access --------------------------------------------------------------


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
        with _temporary_mount(device) as root:
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
            _temporary_mount(device, extra) as root,
        ):
            try:
                found = _marker_id(root)
            except ArchiveError:
                return device.with_marker(True, None)  # a marker, if a damaged one
            return device.with_marker(found is not None, found)
    except GuestsafeError:
        return device
