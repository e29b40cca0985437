"""External block devices: what is plugged in and what uses it (pyudev).

``list_devices()`` lists the block devices (partitions and whole disks) that
carry a filesystem and are not in use. Left out are:

- swap, LVM physical volumes, RAID members and other non-filesystems;
- every device that is mounted or active swap, and every device that backs one:
  the disk of a mounted partition, the slaves of a mounted device-mapper device,
  the device holding a mounted loop device's backing file. An unmounted
  partition next to a mounted one is listed: it backs nothing;
- devices with holders (an opened LUKS container, an active PV): the device on
  top is what a person mounts, and it is listed instead.

Locked LUKS containers are listed with ``locked=True``, so the console can say
"unlock it first". Whether a device holds a guestsafe archive is only known once
it is mounted; ``mounts.probe_markers`` finds out on request.

Hot-plug is watched in ``watch.py``, the mount table read in ``mountinfo.py``.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyudev

from guestsafe.engine.devices.mountinfo import in_use_devnums, mounts_of, read_mounts

SYS_BLOCK = Path("/sys/class/block")
# guestsafe's own short read-only mounts (browsing, probing) go below this. A device
# mounted there stays listed, so the list does not flicker while it is looked at.
RUNTIME_DIR = Path("/run/guestsafe")
SECTOR = 512
# ID_FS_USAGE values (blkid) that a person can mount or unlock.
_USABLE = ("filesystem", "crypto")
# Filesystems that can never take a backup, whatever the device.
READ_ONLY_FILESYSTEMS = frozenset({"iso9660", "squashfs", "erofs", "cramfs", "romfs"})


@dataclass(frozen=True)
class BlockDevice:
    """A partition or whole disk that carries a filesystem (or a LUKS container)."""

    node: str  # /dev/sdb1, /dev/mapper/backup
    name: str  # sdb1, dm-3: the kernel's name
    devnum: int
    disk_devnum: int  # the whole disk it is on (its own devnum for a disk)
    kind: str  # "partition" or "disk"
    fstype: str  # ext4, ntfs, exfat, vfat, crypto_LUKS ...
    fs_version: str  # FAT32, 1.0 ... as blkid says
    label: str
    uuid: str
    size: int  # bytes
    vendor: str
    model: str
    bus: str  # usb, ata, scsi, nvme, loop, dm ...
    removable: bool
    read_only: bool
    locked: bool  # a LUKS container nobody has opened
    has_marker: bool | None = None  # None: not known (never probed)
    archive_id: str | None = None

    @property
    def spec(self) -> str:
        """How a job should name it: the UUID survives re-plugging, a node does not."""
        if self.uuid:
            return f"UUID={self.uuid}"
        if self.label:
            return f"LABEL={self.label}"
        return self.node

    @property
    def filesystem(self) -> str:
        """The filesystem as a person says it: ext4, FAT32, LUKS (locked)."""
        if self.locked:
            return "LUKS (locked)"
        if self.fstype == "vfat" and self.fs_version.startswith("FAT"):
            return self.fs_version
        return self.fstype

    def describe(self) -> str:
        label = f" '{self.label}'" if self.label else ""
        return f"{self.node} ({self.filesystem}{label}, UUID={self.uuid or 'none'})"

    def with_marker(self, has_marker: bool | None, archive_id: str | None) -> BlockDevice:
        return replace(self, has_marker=has_marker, archive_id=archive_id)


@dataclass(frozen=True)
class _Facts:
    """What udev and sysfs say about one block device; plain data, for the rules."""

    name: str
    devnum: int
    node: str
    devtype: str
    props: Mapping[str, str]
    size: int
    read_only: bool
    removable: bool
    holders: tuple[str, ...]
    slaves: tuple[str, ...]
    parent: str | None  # the disk's name, for a partition
    parent_devnum: int | None
    backing_devnum: int | None  # loop: the filesystem holding the backing file
    backing_file: str


def _sys_list(name: str, what: str) -> tuple[str, ...]:
    try:
        return tuple(sorted(os.listdir(SYS_BLOCK / name / what)))
    except OSError:
        return ()


def _sys_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _facts(dev: Any) -> _Facts | None:
    """The facts of a pyudev device, or None for one that is gone or has no node."""
    node = dev.device_node
    if not node or dev.device_type not in ("disk", "partition"):
        return None
    name = dev.sys_name
    parent = dev.find_parent("block", "disk") if dev.device_type == "partition" else None
    disk_dir = SYS_BLOCK / (parent.sys_name if parent is not None else name)
    # A partition of a loop device shows its disk's image as its model.
    backing = _sys_text(disk_dir / "loop" / "backing_file")
    backing_devnum = None
    if backing and parent is None:
        with contextlib.suppress(OSError):
            backing_devnum = os.stat(backing.removesuffix(" (deleted)")).st_dev
    return _Facts(
        name=name,
        devnum=dev.device_number,
        node=_best_node(node, dev.properties),
        devtype=dev.device_type,
        props=dict(dev.properties),
        size=int(_sys_text(SYS_BLOCK / name / "size") or 0) * SECTOR,
        read_only=_sys_text(SYS_BLOCK / name / "ro") == "1",
        removable=_sys_text(disk_dir / "removable") == "1",
        holders=_sys_list(name, "holders"),
        slaves=_sys_list(name, "slaves"),
        parent=parent.sys_name if parent is not None else None,
        parent_devnum=parent.device_number if parent is not None else None,
        backing_devnum=backing_devnum,
        backing_file=backing,
    )


def _best_node(node: str, props: Mapping[str, str]) -> str:
    # /dev/dm-3 means nothing to a person; /dev/mapper/<name> is what they opened.
    dm_name = props.get("DM_NAME")
    return f"/dev/mapper/{dm_name}" if dm_name else node


def _system_names(facts: Sequence[_Facts], busy: set[int]) -> set[str]:
    """Names of the devices in use and of everything they stand on.

    Upwards only: the disk of a mounted partition backs it and is in use, but the
    partition next to it is not.
    """
    by_devnum = {f.devnum: f for f in facts}
    by_name = {f.name: f for f in facts}
    in_use = [f for f in facts if f.devnum in busy]
    # Every device of a mounted multi-device btrfs is in use, though one is named.
    btrfs = {f.props.get("ID_FS_UUID") for f in in_use if _fstype(f) == "btrfs"}
    in_use += [f for f in facts if _fstype(f) == "btrfs" and f.props.get("ID_FS_UUID") in btrfs]
    todo = [f.name for f in in_use]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        fact = by_name[name]
        todo.extend(fact.slaves)
        if fact.parent:
            todo.append(fact.parent)
        backing = by_devnum.get(fact.backing_devnum) if fact.backing_devnum else None
        if backing is not None:
            todo.append(backing.name)
    return seen


def _fstype(fact: _Facts) -> str:
    return fact.props.get("ID_FS_TYPE", "")


def _bus(fact: _Facts) -> str:
    bus = fact.props.get("ID_BUS", "")
    if bus:
        return bus
    path = fact.props.get("ID_PATH", "")
    for word in ("usb", "nvme", "ata", "scsi", "virtio"):
        if f"-{word}-" in path or path.startswith(f"{word}-"):
            return word
    for prefix, word in (("loop", "loop"), ("dm-", "dm"), ("md", "md"), ("nvme", "nvme")):
        if fact.name.startswith(prefix):
            return word
    return ""


def _model(fact: _Facts) -> str:
    model = fact.props.get("ID_MODEL_ENC") or fact.props.get("ID_MODEL", "")
    model = _decode_udev(model).strip() if model else ""
    if not model and fact.backing_file:
        return os.path.basename(fact.backing_file)  # a loop device: its image names it
    return model


def _decode_udev(text: str) -> str:
    # udev's *_ENC values escape unsafe bytes as \xNN.
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def _device(fact: _Facts) -> BlockDevice:
    props = fact.props
    return BlockDevice(
        node=fact.node,
        name=fact.name,
        devnum=fact.devnum,
        disk_devnum=fact.parent_devnum or fact.devnum,
        kind=fact.devtype,
        fstype=_fstype(fact),
        fs_version=props.get("ID_FS_VERSION", ""),
        label=_decode_udev(props.get("ID_FS_LABEL_ENC", "")) or props.get("ID_FS_LABEL", ""),
        uuid=props.get("ID_FS_UUID", ""),
        size=fact.size,
        vendor=_decode_udev(props.get("ID_VENDOR_ENC", "") or props.get("ID_VENDOR", "")).strip(),
        model=_model(fact),
        bus=_bus(fact),
        removable=fact.removable,
        read_only=fact.read_only,
        locked=props.get("ID_FS_USAGE") == "crypto" and not fact.holders,
    )


def select_devices(facts: Sequence[_Facts], busy: set[int]) -> list[BlockDevice]:
    """The rules of the module docstring, applied to plain facts (testable alone)."""
    system = _system_names(facts, busy)
    chosen = []
    for fact in facts:
        if fact.props.get("ID_FS_USAGE") not in _USABLE or not _fstype(fact):
            continue  # swap, LVM2_member, *_raid_member, a bare partition table
        if fact.name in system:
            continue
        if fact.holders or fact.size == 0:
            continue  # opened (its holder is listed) or an empty loop slot
        chosen.append(_device(fact))
    return sorted(chosen, key=lambda d: d.node)


def _all_facts(context: pyudev.Context) -> list[_Facts]:
    facts = []
    for dev in context.list_devices(subsystem="block"):
        fact = _facts(dev)
        if fact is not None:
            facts.append(fact)
    return facts


def list_devices(context: pyudev.Context | None = None) -> list[BlockDevice]:
    """External devices with a filesystem, not in use: see the module docstring."""
    context = context or pyudev.Context()
    facts = _all_facts(context)
    return select_devices(facts, in_use_devnums(read_mounts(), ignore_below=str(RUNTIME_DIR)))


def device_of(dev: Any) -> BlockDevice | None:
    """A pyudev device as a BlockDevice, whatever its use (for resolving a job's device)."""
    fact = _facts(dev)
    return _device(fact) if fact is not None else None


def all_block_devices(context: pyudev.Context | None = None) -> list[BlockDevice]:
    """Every block device with a node, in use or not, with whatever filesystem."""
    context = context or pyudev.Context()
    return [_device(f) for f in _all_facts(context)]


@dataclass(frozen=True)
class Usage:
    """Why a device is not free to mount, or an empty ``reasons`` when it is."""

    reasons: tuple[str, ...]

    @property
    def free(self) -> bool:
        return not self.reasons


def usage_of(device: BlockDevice, context: pyudev.Context | None = None) -> Usage:
    """What on the running system uses ``device``: mounts, swap, holders, what it backs."""
    context = context or pyudev.Context()
    facts = _all_facts(context)
    entries = read_mounts()
    busy = in_use_devnums(entries)
    fact = next((f for f in facts if f.devnum == device.devnum), None)
    if fact is None:
        return Usage(("it is gone",))
    reasons = [f"mounted at {e.target}" for e in mounts_of(device.devnum, entries)]
    if fact.devnum in busy and not reasons:
        reasons.append("active swap")
    if fact.holders:
        reasons.append(f"held by {', '.join(fact.holders)} (device-mapper, RAID or LVM)")
    for user in facts:
        if user is fact or user.devnum not in busy:
            continue
        if fact.name in _system_names(facts, {user.devnum}):
            where = ", ".join(e.target for e in mounts_of(user.devnum, entries)) or "swap"
            reasons.append(f"it backs {user.node} ({where})")
    return Usage(tuple(reasons))
