"""Device discovery rules on plain facts, mountinfo parsing and change reports (no udev)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest

from guestsafe.engine.devices.mountinfo import (
    in_use_devnums,
    is_self_bind,
    mount_containing,
    parse_mountinfo,
)
from guestsafe.engine.devices.udev import BlockDevice, _Facts, select_devices
from guestsafe.engine.devices.watch import DevicesChanged, ManualWatcher, diff

MiB = 1024 * 1024


def fact(
    name: str,
    devnum: int,
    props: Mapping[str, str] | None = None,
    *,
    devtype: str = "partition",
    parent: str | None = None,
    parent_devnum: int | None = None,
    holders: tuple[str, ...] = (),
    slaves: tuple[str, ...] = (),
    backing_devnum: int | None = None,
    size: int = 256 * MiB,
) -> _Facts:
    return _Facts(
        name=name,
        devnum=devnum,
        node=f"/dev/{name}",
        devtype=devtype,
        props=dict(props or {}),
        size=size,
        read_only=False,
        removable=False,
        holders=holders,
        slaves=slaves,
        parent=parent,
        parent_devnum=parent_devnum,
        backing_devnum=backing_devnum,
        backing_file="",
    )


def fs(fstype: str, usage: str = "filesystem", **more: str) -> dict[str, str]:
    return {"ID_FS_TYPE": fstype, "ID_FS_USAGE": usage, "ID_FS_UUID": f"uuid-{fstype}", **more}


def disk(name: str, devnum: int, props: Mapping[str, str] | None = None, **kw: object) -> _Facts:
    return fact(name, devnum, props or {"ID_PART_TABLE_TYPE": "gpt"}, devtype="disk", **kw)  # type: ignore[arg-type]


def names(devices: list[BlockDevice]) -> list[str]:
    return [d.name for d in devices]


# --- mountinfo ------------------------------------------------------------------------


MOUNTINFO = (
    b"22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    b"40 22 8:17 / /mnt/my\\040disk rw,nosuid,nodev,noexec shared:5 master:2 - ext4 /dev/sdb1 rw\n"
    b"41 22 0:45 /sub /srv/b rw - btrfs /dev/sdc1 rw,space_cache=v2\n"
    b"garbage line\n"
)


def test_mountinfo_is_parsed_with_escapes_and_optional_fields() -> None:
    root, mine, btrfs = parse_mountinfo(MOUNTINFO)
    assert root.target == "/" and root.devnum == os.makedev(254, 0) and root.fstype == "ext4"
    assert mine.target == "/mnt/my disk"
    assert mine.options == {"rw", "nosuid", "nodev", "noexec"}
    assert mine.source == "/dev/sdb1" and mine.devnum == os.makedev(8, 17)
    assert btrfs.root == "/sub" and btrfs.fstype == "btrfs" and btrfs.source == "/dev/sdc1"


def test_shared_mounts_are_told_from_private_ones() -> None:
    root, mine, btrfs = parse_mountinfo(MOUNTINFO)
    assert root.shared and mine.shared and not btrfs.shared  # master:2 alone is a slave


def test_a_directory_bound_onto_itself_is_told_from_another_device() -> None:
    entries = parse_mountinfo(
        b"27 1 254:0 / / rw shared:1 - ext4 /dev/vda rw\n"
        b"59 27 254:0 /srv/bk /srv/bk rw shared:3 - ext4 /dev/vda rw\n"
        b"60 59 8:17 / /srv/bk rw shared:4 - ext4 /dev/sdb1 rw\n"
        b"61 27 254:0 /elsewhere /srv/other rw - ext4 /dev/vda rw\n"
    )
    root, bind, device, other = entries
    assert is_self_bind(bind, entries)
    assert not is_self_bind(device, entries) and not is_self_bind(other, entries)
    assert not is_self_bind(root, entries)


def test_the_mount_holding_a_path_is_the_deepest_one() -> None:
    entries = parse_mountinfo(MOUNTINFO)
    assert mount_containing("/srv/b/x", entries).target == "/srv/b"
    assert mount_containing("/srv/bx", entries).target == "/"
    assert mount_containing("/mnt/my disk", entries).target == "/mnt/my disk"


def test_guestsafes_own_short_mounts_do_not_hide_a_device() -> None:
    entries = parse_mountinfo(
        b"50 22 8:33 / /run/guestsafe/guestsafe-ro-x1 ro - ext4 /dev/sdc1 ro\n"
    )
    assert os.makedev(8, 33) in in_use_devnums(entries)
    assert os.makedev(8, 33) not in in_use_devnums(entries, ignore_below="/run/guestsafe")


def test_mount_entry_matches_its_device_number() -> None:
    [_, mine, _] = parse_mountinfo(MOUNTINFO)
    assert mine.is_of(os.makedev(8, 17))
    assert not mine.is_of(os.makedev(8, 18))


# --- what is listed ----------------------------------------------------------------


def test_filesystems_are_listed_and_non_filesystems_left_out() -> None:
    facts = [
        disk("sdb", 10),
        fact("sdb1", 11, fs("ext4", ID_FS_LABEL="backup"), parent="sdb"),
        fact("sdb2", 12, fs("swap", "other"), parent="sdb"),
        fact("sdb3", 13, fs("LVM2_member", "raid"), parent="sdb"),
        fact("sdb4", 14, fs("linux_raid_member", "raid"), parent="sdb"),
        fact("sdb5", 15, {}, parent="sdb"),  # no filesystem at all
        fact("sdb6", 16, fs("ntfs"), parent="sdb"),
    ]
    found = select_devices(facts, busy=set())
    assert names(found) == ["sdb1", "sdb6"]
    assert found[0].label == "backup" and found[0].fstype == "ext4"


def test_mounted_devices_and_what_backs_them_are_left_out() -> None:
    facts = [
        disk("vda", 1),
        fact("vda1", 2, fs("ext4"), parent="vda"),
        fact("vda2", 3, fs("ext4"), parent="vda"),  # next to the mounted one: listed
        disk("sdb", 10),
        fact("sdb1", 11, fs("crypto_LUKS", "crypto"), parent="sdb", holders=("dm-0",)),
        fact("dm-0", 20, fs("ext4"), devtype="disk", slaves=("sdb1",)),
        disk("sdc", 30, fs("xfs")),  # a whole-disk filesystem
    ]
    found = select_devices(facts, busy={2, 20})
    assert names(found) == ["sdc", "vda2"]


def test_the_device_behind_a_mounted_loop_image_is_in_use() -> None:
    facts = [
        disk("sdd", 40, fs("ext4")),  # holds the image file of loop0
        disk("loop0", 50, fs("squashfs"), backing_devnum=40),
    ]
    assert select_devices(facts, busy={50}) == []
    assert names(select_devices(facts, busy=set())) == ["loop0", "sdd"]


def test_every_device_of_a_mounted_btrfs_is_in_use() -> None:
    props = fs("btrfs", ID_FS_UUID="same")
    facts = [disk("sde", 60, props), disk("sdf", 61, props), disk("sdg", 62, fs("ext4"))]
    assert names(select_devices(facts, busy={60})) == ["sdg"]


def test_locked_luks_is_listed_as_locked_and_opened_luks_as_its_filesystem() -> None:
    facts = [
        fact("sdh1", 70, fs("crypto_LUKS", "crypto")),
        fact("sdi1", 71, fs("crypto_LUKS", "crypto"), holders=("dm-1",)),
        fact("dm-1", 72, fs("ext4", DM_NAME="usbcrypt"), devtype="disk", slaves=("sdi1",)),
    ]
    found = select_devices(facts, busy=set())
    assert [(d.name, d.locked, d.filesystem) for d in found] == [
        ("dm-1", False, "ext4"),
        ("sdh1", True, "LUKS (locked)"),
    ]


def test_empty_loop_slots_are_left_out() -> None:
    assert select_devices([disk("loop7", 80, fs("ext4"), size=0)], busy=set()) == []


def test_device_fields_come_from_udev_properties() -> None:
    props = fs(
        "vfat",
        ID_FS_VERSION="FAT32",
        ID_FS_LABEL_ENC="MY\\x20STICK",
        ID_VENDOR_ENC="SanDisk\\x20",
        ID_MODEL="Ultra",
        ID_BUS="usb",
        ID_FS_UUID="ABCD-1234",
    )
    [dev] = select_devices([fact("sdj1", 90, props, parent="sdj", parent_devnum=89)], set())
    assert dev.label == "MY STICK" and dev.vendor == "SanDisk" and dev.model == "Ultra"
    assert dev.bus == "usb" and dev.filesystem == "FAT32" and dev.size == 256 * MiB
    assert dev.spec == "UUID=ABCD-1234" and dev.disk_devnum == 89
    assert dev.describe() == "/dev/sdj1 (FAT32 'MY STICK', UUID=ABCD-1234)"


@pytest.mark.parametrize(
    ("name", "props", "bus"),
    [
        ("sdk1", {"ID_PATH": "pci-0000:00:14.0-usb-0:2:1.0-scsi-0:0:0:0"}, "usb"),
        ("nvme0n1p1", {}, "nvme"),
        ("loop3p1", {}, "loop"),
        ("sdl1", {"ID_BUS": "ata"}, "ata"),
    ],
)
def test_bus_falls_back_to_the_path_and_the_kernel_name(
    name: str, props: dict[str, str], bus: str
) -> None:
    [dev] = select_devices([fact(name, 100, {**fs("ext4"), **props})], set())
    assert dev.bus == bus


def test_spec_prefers_uuid_then_label_then_node() -> None:
    [dev] = select_devices([fact("sdm1", 110, fs("ext4"))], set())
    assert dev.spec == "UUID=uuid-ext4"
    assert dev.with_marker(None, None).spec == "UUID=uuid-ext4"
    no_uuid = {"ID_FS_TYPE": "ext4", "ID_FS_USAGE": "filesystem", "ID_FS_LABEL": "bk"}
    [dev] = select_devices([fact("sdm2", 111, no_uuid)], set())
    assert dev.spec == "LABEL=bk"


# --- change reports ------------------------------------------------------------------


def test_diff_names_what_came_and_went() -> None:
    a, b, c = (
        select_devices([fact(n, i, fs("ext4", ID_FS_UUID=n))], set())[0]
        for i, n in enumerate(("sdx1", "sdy1", "sdz1"), start=1)
    )
    change = diff([a, b], [b, c])
    assert change.added == (c,) and change.removed == (a,) and change.devices == (b, c)
    assert diff([a], [a]).added == () and diff([a], [a]).removed == ()


def test_a_manual_watcher_reports_only_real_changes() -> None:
    a, b = (
        select_devices([fact(n, i, fs("ext4", ID_FS_UUID=n))], set())[0]
        for i, n in enumerate(("sdx1", "sdy1"), start=1)
    )
    heard: list[DevicesChanged] = []
    watcher = ManualWatcher(heard.append, [a]).start()
    assert watcher.devices == [a]
    watcher.set_devices([a])
    assert heard == []
    watcher.set_devices([a, b])
    watcher.set_devices([b])
    assert [(c.added, c.removed) for c in heard] == [((b,), ()), ((), (a,))]
    watcher.stop()
