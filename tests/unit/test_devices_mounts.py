"""The device checks that need no mount: capacity, the wrong-disk rules, specs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from guestsafe.engine.archive.store import MARKER, Archive
from guestsafe.engine.devices.mounts import DeviceMemory, open_job_archive
from guestsafe.engine.devices.preflight import (
    FAT_MAX_FILE,
    GuestFile,
    check_capacity,
    guest_files,
    guest_user,
    needs,
)
from guestsafe.engine.devices.resolve import check_filesystem, resolve
from guestsafe.engine.devices.udev import BlockDevice
from guestsafe.engine.errors import ArchiveError, DeviceError
from guestsafe.engine.hypervisor.domain_xml import DiskInfo, GuestInfo
from guestsafe.engine.jobs.model import Job
from guestsafe.engine.sizes import SPACE_MARGIN

GiB = 1024**3
MiB = 1024**2


def device(
    fstype: str = "ext4", *, uuid: str = "1111-2222", size: int = 100 * GiB, **kw: object
) -> BlockDevice:
    fields: dict[str, object] = {
        "node": "/dev/sdz1",
        "name": "sdz1",
        "devnum": os.makedev(8, 241),
        "disk_devnum": os.makedev(8, 240),
        "kind": "partition",
        "fstype": fstype,
        "fs_version": "FAT32" if fstype == "vfat" else "1.0",
        "label": "backup",
        "uuid": uuid,
        "size": size,
        "vendor": "",
        "model": "",
        "bus": "usb",
        "removable": True,
        "read_only": False,
        "locked": False,
    }
    fields.update(kw)
    return BlockDevice(**fields)  # type: ignore[arg-type]


def big_sparse_disk() -> list[GuestFile]:
    return [GuestFile("db", "/var/lib/libvirt/images/db.raw", 5 * GiB, 300 * MiB)]


# --- capacity -------------------------------------------------------------------------


def test_fat32_refuses_a_disk_file_of_4_gib_or_more() -> None:
    with pytest.raises(DeviceError, match=r"FAT32, which cannot hold files of 4 GiB.*db\.raw"):
        check_capacity(device("vfat"), big_sparse_disk(), free=None)


def test_fat32_takes_files_just_under_the_limit() -> None:
    files = [GuestFile("db", "/x.raw", FAT_MAX_FILE, FAT_MAX_FILE)]
    check_capacity(device("vfat"), files, free=None)


@pytest.mark.parametrize(("fstype", "expected"), [("exfat", 5 * GiB), ("ext4", 300 * MiB)])
def test_filesystems_without_holes_need_the_whole_length(fstype: str, expected: int) -> None:
    assert needs(device(fstype), big_sparse_disk()) == {"db": expected + SPACE_MARGIN}


def test_the_largest_guest_must_fit_the_free_space() -> None:
    files = [*big_sparse_disk(), GuestFile("web", "/w.qcow2", 1 * GiB, 1 * GiB)]
    check_capacity(device("exfat"), files, free=6 * GiB)
    with pytest.raises(
        DeviceError, match=r"need 5\.1 GiB .* for guest db \(no holes.*4\.0 GiB free"
    ):
        check_capacity(device("exfat"), files, free=4 * GiB)


def test_before_mounting_the_device_size_is_the_limit() -> None:
    with pytest.raises(DeviceError, match="in all"):
        check_capacity(device("exfat", size=1 * GiB), big_sparse_disk(), free=None)


def test_guest_files_are_the_backed_up_disks_and_nvram(tmp_path: Path) -> None:
    disk = tmp_path / "vda.raw"
    with disk.open("wb") as f:
        f.truncate(10 * MiB)
    nvram = tmp_path / "nvram.fd"
    nvram.write_bytes(b"x" * 4096)

    def d(
        target: str, source: str | None, device: str = "disk", readonly: bool = False
    ) -> DiskInfo:
        return DiskInfo(target, source, "file", device, "raw", readonly, False)

    info = GuestInfo(
        "vm",
        "uuid",
        "shutoff",
        True,
        disks=[
            d("vda", str(disk)),
            d("hdc", "/iso/x.iso", "cdrom", True),
            d("vdb", str(tmp_path / "gone")),
        ],
        nvram=str(nvram),
    )
    files = guest_files([info])
    assert [(f.source, f.length) for f in files] == [(str(disk), 10 * MiB), (str(nvram), 4096)]
    assert files[0].allocated < 10 * MiB  # sparse


# --- what can be mounted ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("dev", "message"),
    [
        (device("crypto_LUKS", locked=True), "locked LUKS container; unlock it"),
        (device("swap"), "holds swap, not a filesystem"),
        (device("LVM2_member"), "holds LVM2_member"),
        (device("linux_raid_member"), "holds linux_raid_member"),
        (device(""), "holds no filesystem"),
        (device("iso9660"), "read-only filesystem"),
        (device("ext4", read_only=True), "write-protected"),
    ],
)
def test_devices_that_cannot_take_a_backup_are_refused(dev: BlockDevice, message: str) -> None:
    with pytest.raises(DeviceError, match=message):
        check_filesystem(dev, write=True)


def test_a_read_only_filesystem_can_still_be_read() -> None:
    check_filesystem(device("iso9660"), write=False)


def test_a_guest_using_the_disk_or_the_partition_owns_it() -> None:
    dev = device()
    assert guest_user(dev, {dev.disk_devnum: "vm1"}) == "vm1"
    assert guest_user(dev, {dev.devnum: "vm2"}) == "vm2"
    assert guest_user(dev, {os.makedev(8, 0): "vm3"}) is None


@pytest.mark.parametrize("spec", ["sdb1", "/dev/gs-no-such-device-xyz"])
def test_bad_or_missing_nodes_are_refused(spec: str) -> None:
    with pytest.raises(DeviceError, match=r"must be /dev|not plugged in"):
        resolve(spec)


def test_a_node_that_is_no_block_device_is_refused() -> None:
    with pytest.raises(DeviceError, match="not a block device"):
        resolve("/dev/null")


# --- the wrong disk ----------------------------------------------------------------------


@pytest.fixture
def job(tmp_path: Path) -> Job:
    return Job("nightly", ["vm"], tmp_path / "mnt", device="LABEL=backup")


def make_root(tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    root.mkdir()
    return root


def contents(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_first_run_creates_an_archive_and_remembers_it(tmp_path: Path, job: Job) -> None:
    memory = DeviceMemory(tmp_path / "state", job.name)
    root = make_root(tmp_path, "blank")

    archive = open_job_archive(job, device(uuid="U1"), root, memory)

    assert memory.archives() == {"U1": archive.archive_id}
    assert memory.path == tmp_path / "state" / "devices" / "nightly.json"
    assert json.loads(memory.path.read_text()) == {"archives": {"U1": archive.archive_id}}


def test_first_run_adopts_the_archive_it_finds(tmp_path: Path, job: Job) -> None:
    memory = DeviceMemory(tmp_path / "state", job.name)
    root = make_root(tmp_path, "old")
    existing = Archive.open(root, create=True)

    assert open_job_archive(job, device(uuid="U1"), root, memory).archive_id == existing.archive_id


def test_a_known_filesystem_with_another_archive_is_the_wrong_disk(
    tmp_path: Path, job: Job
) -> None:
    memory = DeviceMemory(tmp_path / "state", job.name)
    memory.remember("U1", "5f1e6f36-1111-4c55-9c5c-111111111111")
    root = make_root(tmp_path, "other")
    other = Archive.open(root, create=True)
    before = contents(root)

    with pytest.raises(DeviceError, match=f"wrong disk: .* holds archive {other.archive_id}"):
        open_job_archive(job, device(uuid="U1"), root, memory)

    assert contents(root) == before


def test_a_known_filesystem_that_lost_its_marker_is_refused_and_left_alone(
    tmp_path: Path, job: Job
) -> None:
    memory = DeviceMemory(tmp_path / "state", job.name)
    memory.remember("U1", "5f1e6f36-1111-4c55-9c5c-111111111111")
    root = make_root(tmp_path, "wiped")

    with pytest.raises(DeviceError, match="holds no archive marker now"):
        open_job_archive(job, device(uuid="U1"), root, memory)

    assert contents(root) == []


def test_a_new_disk_with_a_foreign_archive_is_refused(tmp_path: Path, job: Job) -> None:
    memory = DeviceMemory(tmp_path / "state", job.name)
    first = open_job_archive(job, device(uuid="U1"), make_root(tmp_path, "one"), memory)
    root = make_root(tmp_path, "foreign")
    Archive.open(root, create=True)

    with pytest.raises(DeviceError, match=f"never wrote \\(it knows {first.archive_id}\\)"):
        open_job_archive(job, device(uuid="U2"), root, memory)

    assert memory.archives() == {"U1": first.archive_id}


def test_a_blank_disk_joins_the_rotation(tmp_path: Path, job: Job) -> None:
    memory = DeviceMemory(tmp_path / "state", job.name)
    first = open_job_archive(job, device(uuid="U1"), make_root(tmp_path, "one"), memory)
    second = open_job_archive(job, device(uuid="U2"), make_root(tmp_path, "two"), memory)

    assert second.archive_id != first.archive_id
    assert memory.archives() == {"U1": first.archive_id, "U2": second.archive_id}
    # Each disk of the rotation is then held to its own archive.
    with pytest.raises(DeviceError, match="wrong disk"):
        open_job_archive(job, device(uuid="U1"), tmp_path / "two", memory)


def test_a_damaged_marker_is_refused(tmp_path: Path, job: Job) -> None:
    root = make_root(tmp_path, "damaged")
    (root / MARKER).write_text("{}")
    with pytest.raises(ArchiveError, match="damaged"):
        open_job_archive(job, device(), root, DeviceMemory(tmp_path / "state", job.name))


def test_an_unreadable_memory_says_how_to_start_over(tmp_path: Path) -> None:
    memory = DeviceMemory(tmp_path, "j")
    memory.path.parent.mkdir(parents=True)
    memory.path.write_text("not json")
    with pytest.raises(DeviceError, match="delete it"):
        memory.archives()
