"""Naming a job's device: resolve ``/dev/...``, ``UUID=...`` or ``LABEL=...``.

Resolution goes through udev: the device must be plugged in and unambiguous (two
disks labelled ``BACKUP`` are refused), and ``check_filesystem`` refuses what
cannot be mounted (swap, a locked LUKS container, a read-only filesystem).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat

import pyudev

from guestsafe.engine.devices.udev import (
    READ_ONLY_FILESYSTEMS,
    BlockDevice,
    all_block_devices,
    device_of,
)
from guestsafe.engine.errors import DeviceError

_NOT_MOUNTABLE = frozenset({"swap", "LVM2_member", "crypto_LUKS"})
_SPEC = re.compile(r"(UUID|LABEL)=(.+)")


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
