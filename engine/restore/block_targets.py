"""Restoring a disk onto a block device: ``--disk-target vdb=/dev/vg/new-lv``, and the
original's own device when a block disk is restored over the original.

A device cannot be created beside the original or renamed into place like a file:
it is written in place. So everything that can be checked is checked before the
first byte: the version's file against its manifest, the device's size, that no
other guest uses it, that it is not mounted or held, and (for a device the
operator names) that it holds no partition table or filesystem, which guestsafe
would otherwise destroy. After the write the device is read back (copier).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path

from guestsafe.engine import events
from guestsafe.engine.archive.manifest import DiskRecord
from guestsafe.engine.archive.names import printable
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.copier import copy_to_device, device_size, hash_file
from guestsafe.engine.devices.mountinfo import mounts_of, read_mounts
from guestsafe.engine.errors import Cancelled, CopyError, RestoreError, VerifyError
from guestsafe.engine.events import Reporter
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.restore.files import mismatch, progress_of, version_file
from guestsafe.engine.sizes import byte_size

BLKID_TIMEOUT = 30.0


def parse_disk_targets(specs: Iterable[str]) -> dict[str, Path]:
    """``["vdb=/dev/vg/lv"]`` as ``{"vdb": Path("/dev/vg/lv")}``; one clear line when wrong."""
    targets: dict[str, Path] = {}
    for spec in specs:
        target, sep, device = spec.partition("=")
        target, device = target.strip(), device.strip()
        if not sep or not target or not device:
            raise RestoreError(
                f"--disk-target {spec!r}: write it as TARGET=DEVICE, e.g. vdb=/dev/vg/new-lv"
            )
        if not device.startswith("/"):
            raise RestoreError(
                f"--disk-target {spec!r}: {device!r} is not an absolute device path "
                "(e.g. /dev/vg/new-lv)"
            )
        if target in targets:
            raise RestoreError(f"--disk-target names {target} twice; give one device per disk")
        targets[target] = Path(device)
    devices = [os.path.realpath(d) for d in targets.values()]
    twice = sorted({d for d in devices if devices.count(d) > 1})
    if twice:
        raise RestoreError(f"--disk-target gives {twice[0]} to two disks; give each its own")
    return targets


def check_device_target(
    device: Path,
    rec: DiskRecord,
    hv: Hypervisor,
    *,
    owner: str | None = None,
    force: bool = False,
    check_signatures: bool = True,
) -> None:
    """Refuse a device that restoring ``rec`` onto would harm, or that cannot hold it.

    ``owner``: the guest the device belongs to (restore over the original), which may
    use it. ``check_signatures``: refuse a partition table or filesystem unless ``force``
    (off for the original's own device, which holds the guest's own data).
    """
    rdev = _block_rdev(device, rec)
    have = device_size(device)
    need = rec.size if rec.size is not None else rec.virtual_size
    if have < need:
        raise RestoreError(
            f"{device} holds {byte_size(have)}, but {rec.target} needs {byte_size(need)}; "
            "give a device at least that large (e.g. lvcreate -L ...)"
        )
    _check_no_other_guest(device, rdev, hv, owner)
    _check_not_mounted(device, rdev)
    _check_not_held(device)
    if check_signatures and not force:
        found = signatures(device)
        if found:
            raise RestoreError(
                f"{device} holds {found}; restoring {rec.target} onto it destroys that. "
                f"Wipe it first (wipefs -a {device}) or give --force"
            )


def _block_rdev(device: Path, rec: DiskRecord) -> int:
    try:
        st = os.stat(device)
    except OSError as exc:
        raise RestoreError(
            f"{rec.target}: device {device} cannot be used ({exc.strerror}); "
            "give an existing block device such as /dev/vg/new-lv"
        ) from exc
    if not stat.S_ISBLK(st.st_mode):
        raise RestoreError(
            f"{rec.target}: {device} is not a block device; --disk-target takes a device "
            "such as /dev/vg/new-lv (leave it out to restore into a file)"
        )
    return st.st_rdev


def _check_no_other_guest(device: Path, rdev: int, hv: Hypervisor, owner: str | None) -> None:
    for source, names in sorted(hv.disk_users().items()):
        others = sorted(n for n in names if n != owner)
        if others and _rdev_of(source) == rdev:
            who = ", ".join(repr(printable(n)) for n in others)
            raise RestoreError(
                f"{device} is a disk of guest {who} ({source}); nothing was written. "
                "Choose a device no guest uses"
            )


def _rdev_of(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def _check_not_mounted(device: Path, rdev: int) -> None:
    mounted = mounts_of(rdev, read_mounts())
    if mounted:
        raise RestoreError(
            f"{device} is mounted at {mounted[0].target}; nothing was written. "
            f"Unmount it (umount {mounted[0].target}) or choose another device"
        )


def _check_not_held(device: Path) -> None:
    # The kernel refuses an exclusive open while a partition of the device is mounted,
    # or LVM, RAID or a program holds it: what mountinfo alone cannot see.
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        raise RestoreError(
            f"{device} is in use ({exc.strerror}: a partition of it is mounted, or LVM, "
            "RAID or a program holds it); nothing was written. Free it or choose another device"
        ) from exc
    os.close(fd)


def signatures(device: Path) -> str:
    """What ``blkid -p`` finds on the device ("an ext4 filesystem"), or "" for nothing."""
    if shutil.which("blkid") is None:
        raise RestoreError(
            f"blkid is not installed, so guestsafe cannot tell whether {device} holds data; "
            "install util-linux, or give --force"
        )
    try:
        proc = subprocess.run(
            ["blkid", "-p", "-o", "export", str(device)],
            capture_output=True,
            text=True,
            timeout=BLKID_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RestoreError(f"blkid -p {device} did not answer in {BLKID_TIMEOUT:.0f} s") from exc
    if proc.returncode == 2:  # nothing found
        return ""
    if proc.returncode != 0:
        raise RestoreError(
            f"blkid -p {device} failed ({proc.stderr.strip() or proc.returncode}); "
            "cannot tell whether it holds data (give --force to write it anyway)"
        )
    found = dict(line.partition("=")[::2] for line in proc.stdout.splitlines())
    if found.get("PTTYPE"):
        return f"a {found['PTTYPE']} partition table"
    if found.get("TYPE"):
        return f"a {found['TYPE']} filesystem"
    return "a signature blkid recognises"


def restore_to_device(
    version: VersionInfo,
    rec: DiskRecord,
    device: Path,
    force: bool,
    reporter: Reporter,
    who: str,
    cancel: threading.Event | None,
    warnings: list[str],
) -> None:
    """Check the version's file, then write it onto ``device`` and read it back."""
    src = version_file(version, rec)
    progress = progress_of(reporter, who, rec)
    # Before the device is touched: its content cannot be put back afterwards.
    events.info(reporter, f"checking {rec.file} before writing it onto {device}", who)
    actual = hash_file(src, progress=progress, cancel=cancel)
    if actual != rec.blake3:
        message = mismatch(version, rec, actual)
        if not force:
            raise VerifyError(message + f"; nothing was written to {device}")
        events.warn(reporter, message + f"; written onto {device} anyway (--force)", who)
        warnings.append(message)
    events.info(reporter, f"restoring {rec.file} onto the block device {device}", who)
    try:
        copy_to_device(src, device, progress=progress, cancel=cancel)
    except Cancelled as exc:
        raise Cancelled(
            f"restore cancelled; {device} is incomplete: restore onto it again"
        ) from exc
    except CopyError as exc:
        raise CopyError(f"{exc}; {device} is incomplete: restore onto it again") from exc
