"""Mounting and unmounting a device safely: nosuid, nodev, noexec, and checked.

FAT, exFAT and NTFS keep no owners of their own, so they are mounted root-only.
A mount point whose mount is not shared gets a shared bind mount first, so an
unmount reaches the copies in QEMU's mount namespaces (see ``_share_mount_point``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from guestsafe.engine.devices.mountinfo import mount_at, mount_containing
from guestsafe.engine.devices.udev import RUNTIME_DIR, BlockDevice
from guestsafe.engine.errors import DeviceError
from guestsafe.engine.paths import ensure_dir

SAFE_OPTIONS = ("nosuid", "nodev", "noexec")
MOUNT_TIMEOUT = 120.0
# Filesystems without Unix owners and modes: the mount options give every file one.
NO_OWNERS = frozenset({"vfat", "msdos", "exfat", "ntfs"})
# The drivers to try for a filesystem blkid names, best first.
DRIVERS = {"ntfs": ("ntfs-3g", "ntfs3"), "exfat": ("exfat", "exfat-fuse"), "msdos": ("vfat",)}
_SBIN = (Path("/sbin"), Path("/usr/sbin"), Path("/bin"), Path("/usr/bin"))


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
            warnings.append(umount_target(self.target))
        top = mount_at(self.target)
        if self.bind and top is not None and not top.is_of(self.device.devnum):
            warnings.append(umount_target(self.target))
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
                umount_target(target)
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


def umount_target(target: Path) -> str | None:
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
def temporary_mount(device: BlockDevice, extra: Sequence[str] = ()) -> Iterator[Path]:
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
