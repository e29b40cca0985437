"""Preflight for a job's device: will the guests' files fit, and is it free to mount?

Both run before any guest stops. FAT32 cannot hold a file of 4 GiB or more, and
FAT and exFAT keep no holes, so a sparse disk needs its whole length there. A
device in use (mounted elsewhere, held by device-mapper, a guest's disk) or a
destination that is another device's mount point is refused.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pyudev

from guestsafe.engine.devices.mounter import NO_OWNERS
from guestsafe.engine.devices.mountinfo import (
    is_self_bind,
    mount_at,
    mount_containing,
    mounts_of,
    read_mounts,
)
from guestsafe.engine.devices.udev import BlockDevice, usage_of
from guestsafe.engine.errors import DeviceError, GuestsafeError, HypervisorError
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import GuestInfo
from guestsafe.engine.jobs.model import Job
from guestsafe.engine.sizes import SPACE_MARGIN, byte_size

FAT_MAX_FILE = 4 * 1024**3 - 1
# Filesystems without holes: a sparse disk file takes its whole length there.
NON_SPARSE = frozenset({"vfat", "msdos", "exfat", "hfsplus"})
FAT = frozenset({"vfat", "msdos"})
# Filesystems whose holes the mount table cannot vouch for (exFAT through FUSE,
# a share whose server decides): a sparse test file tells.
UNKNOWN_HOLES = ("fuse", "nfs", "cifs", "smb3", "9p", "virtiofs")
_PROBE_LENGTH = 1024 * 1024


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


def space_needed_in(directory: Path, info: GuestInfo, sparse_need: int) -> int:
    """Bytes a version of ``info`` takes in ``directory``, given what it takes with holes.

    On a filesystem that keeps no holes (FAT, exFAT) a sparse disk file takes its
    whole length, so the full size is needed there.
    """
    if keeps_holes(directory):
        return sparse_need
    return max(sparse_need, sum(f.length for f in guest_files([info])))


def keeps_holes(directory: Path) -> bool:
    """Whether a sparse file written in ``directory`` stays sparse."""
    fstype = mount_containing(os.path.realpath(directory)).fstype
    if fstype in NON_SPARSE:
        return False
    if fstype.startswith(UNKNOWN_HOLES):
        return _probe_holes(directory)
    return True


def _probe_holes(directory: Path) -> bool:
    """Write a file that is one hole and a byte, and see what it takes on disk."""
    fd, name = _temp_file(directory)
    try:
        os.pwrite(fd, b"x", _PROBE_LENGTH - 1)
        os.fsync(fd)
        return os.fstat(fd).st_blocks * 512 < _PROBE_LENGTH // 2
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)


def _temp_file(directory: Path) -> tuple[int, Path]:
    # A .tmp- name: if we die before the unlink, the archive's recovery removes it.
    name = directory / f".tmp-{os.urandom(6).hex()}-holes"
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    return os.open(name, flags, 0o600), name


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


def guest_infos(job: Job, hv: Hypervisor) -> list[GuestInfo]:
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


def mount_point(destination: Path) -> Path:
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


def check_free_to_mount(
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


def lossy_warnings(device: BlockDevice, files: Sequence[GuestFile]) -> list[str]:
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
