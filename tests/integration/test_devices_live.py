"""External backup disks against real udev, real loop devices, real mounts and guests.

Each disk is a sparse image with a GPT partition table on a loop device
(rig.loopdisk); filesystems are small, and guests are shut off wherever their
running state does not matter, so the module stays fast on a TCG host.
"""

from __future__ import annotations

import json
import queue
import subprocess
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rig import DiskSpec, GuestFactory, MiB, TestGuest, read_disk_counter, unique_name
from rig.gs import GS, shutdown_counter
from rig.loopdisk import LoopDisks, Part, make_loop_disks, mount_points

from guestsafe.engine.archive.store import MARKER, Archive
from guestsafe.engine.devices.mountinfo import mount_at
from guestsafe.engine.devices.mounts import DeviceMemory
from guestsafe.engine.devices.resolve import resolve
from guestsafe.engine.devices.udev import list_devices
from guestsafe.engine.devices.watch import DevicesChanged, DeviceWatcher
from guestsafe.engine.errors import DeviceError
from guestsafe.engine.events import Event, PhaseChanged

pytestmark = pytest.mark.integration

GiB = 1024 * MiB
SAFE = {"nosuid", "nodev", "noexec"}


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[LoopDisks]:
    """Make loop disks with ``disks(Part(...), ...)``; all detached and deleted afterwards."""
    yield from make_loop_disks(tmp_path)


def _mount(node: str, target: Path, *options: str) -> None:
    opts = ["-o", ",".join(options)] if options else []
    subprocess.run(["mount", *opts, node, str(target)], check=True, capture_output=True)


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True, capture_output=True)


def _files_on(node: str, scratch: Path) -> dict[str, bytes]:
    """Every file on the device and its content, seen through a read-only mount."""
    scratch.mkdir(exist_ok=True)
    fstype = subprocess.run(
        ["blkid", "-o", "value", "-s", "TYPE", node], capture_output=True, text=True
    ).stdout.strip()
    _mount(node, scratch, "ro", *(["noload"] if fstype == "ext4" else []))
    try:
        return {
            str(p.relative_to(scratch)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(scratch.rglob("*"))
        }
    finally:
        _umount(scratch)


def _guest_untouched(guest: TestGuest, dom_id: int, offset: int) -> None:
    """The guest was never stopped: same libvirt domain id, nothing new on its console."""
    assert guest.is_running()
    assert guest.dom.ID() == dom_id
    later = guest.console_text(offset)
    assert "GS-POWEROFF" not in later and "GS-BOOT" not in later


# --- discovery and hot-plug ------------------------------------------------------------


def test_discovery_lists_filesystems_and_leaves_out_mounted_swap_and_lvm(
    disks: LoopDisks, tmp_path: Path
) -> None:
    disk = disks(
        Part("ext4", 64, "gsdisc-ext4"),
        Part("exfat", 64, "GSDISCX"),
        Part("swap", 16),
        Part("ext4", 64, "gsdisc-busy"),
        Part("crypto_LUKS", 16),
        Part("LVM2_member", 16),
    )
    whole = disks(Part("btrfs", 128, "gsdisc-whole"), whole=True)
    ext4, exfat, swap, busy, luks, lvm = disk.partitions
    target = tmp_path / "busy"
    target.mkdir()
    _mount(busy.node, target)

    found = {d.node: d for d in list_devices()}

    assert (found[ext4.node].label, found[ext4.node].uuid, found[ext4.node].fstype) == (
        "gsdisc-ext4",
        ext4.uuid,
        "ext4",
    )
    assert found[ext4.node].size == 64 * MiB and found[ext4.node].kind == "partition"
    assert found[ext4.node].bus == "loop" and found[ext4.node].model == disk.image.name
    assert (found[exfat.node].label, found[exfat.node].uuid, found[exfat.node].fstype) == (
        "GSDISCX",
        exfat.uuid,
        "exfat",
    )
    assert found[luks.node].locked and found[luks.node].filesystem == "LUKS (locked)"
    assert found[whole.loop].kind == "disk" and found[whole.loop].fstype == "btrfs"
    for left_out in (busy, swap, lvm):
        assert left_out.node not in found, left_out
    assert disk.loop not in found  # a partition table is no filesystem
    _umount(target)
    assert busy.node in {d.node for d in list_devices()}


def _wait_for(
    changes: queue.Queue[DevicesChanged], test: Callable[[DevicesChanged], bool], timeout: float
) -> float:
    """Seconds until a change passing ``test`` arrived; fails after ``timeout``."""
    start = time.monotonic()
    while True:
        left = timeout - (time.monotonic() - start)
        assert left > 0, "the watcher reported nothing matching in time"
        try:
            change = changes.get(timeout=left)
        except queue.Empty:
            continue
        if test(change):
            return time.monotonic() - start


def test_the_watcher_reports_an_attach_and_a_detach_within_a_second(
    disks: LoopDisks,
) -> None:
    disk = disks(Part("ext4", 64, "gshotplug"))
    uuid = disk.partitions[0].uuid
    disk.detach()  # a formatted disk on the shelf
    changes: queue.Queue[DevicesChanged] = queue.Queue()

    with DeviceWatcher(changes.put) as watcher:
        assert all(d.uuid != uuid for d in watcher.devices)
        disk.attach()  # returns once udev has processed the plug-in
        seconds = _wait_for(changes, lambda c: any(d.uuid == uuid for d in c.added), 5)
        assert seconds < 1.0
        assert any(d.uuid == uuid and d.label == "gshotplug" for d in watcher.devices)

        disk.detach()
        seconds = _wait_for(changes, lambda c: any(d.uuid == uuid for d in c.removed), 5)
        assert seconds < 1.0
        assert all(d.uuid != uuid for d in watcher.devices)


# --- a job's device ------------------------------------------------------------------------


def test_job_on_uuid_mounts_backs_up_unmounts_and_the_device_restores(
    gs: GS, guest_factory: GuestFactory, disks: LoopDisks, workdir: Path
) -> None:
    part = disks(Part("ext4", 256, "gsjob")).partitions[0]
    guest = guest_factory("dev")
    before = guest.console_size()
    gs.job("usb", [guest], device=part.spec)
    during: list[frozenset[str]] = []

    def watch(event: Event) -> None:
        if isinstance(event, PhaseChanged) and event.phase == "copy":
            entry = mount_at(gs.archive)
            during.append(entry.options if entry else frozenset())

    result = gs.engine.run_job("usb", watch)

    assert result.ok, result.outcomes
    assert guest.is_running()
    assert during and during[0] >= SAFE
    assert not mount_points(part.node)
    assert list(gs.archive.iterdir()) == []  # the mount point itself got nothing
    log = result.log_path.read_text()
    assert f"mounted {part.node}" in log and f"unmounted {part.node}" in log
    memory = DeviceMemory(gs.home / "state", "usb").archives()
    assert list(memory) == [part.uuid]
    backed_up = shutdown_counter(guest, before)

    # The guest started again while the device was mounted; its QEMU has a mount
    # namespace of its own, which must not keep the filesystem mounted either.
    listing = gs.cli("list", "--device", part.spec, check=True)
    assert guest.name in listing.stdout and part.spec in listing.stdout
    assert not mount_points(part.node)
    shown = gs.cli("devices", check=True).stdout
    [line] = [row for row in shown.splitlines() if row.startswith(part.node + " ")]
    assert "gsjob" in line and part.uuid in line and "ext4" in line and line.endswith("yes")

    clone = unique_name("devclone")
    target = workdir / "restored"
    target.mkdir()
    guest_factory.adopt(clone, target)
    gs.cli(
        "restore", guest.name, "1", clone, "--device", part.spec, "--target-dir", str(target),
        check=True,
    )  # fmt: skip

    assert not mount_points(part.node)
    assert read_disk_counter(target / f"{clone}-vda.qcow2", "qcow2") == backed_up


def test_an_absent_device_stops_no_guest_and_writes_nothing(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("absent")
    dom_id, offset = guest.dom.ID(), guest.console_size()
    gs.job("gone", [guest], device=f"UUID={uuidlib.uuid4()}")

    result = gs.engine.run_job("gone")

    assert not result.ok
    assert "is not plugged in" in result.outcomes[0].message
    assert "is not plugged in" in result.log_path.read_text()
    _guest_untouched(guest, dom_id, offset)
    assert list(gs.archive.iterdir()) == []
    assert not (gs.home / "state" / "devices").exists()


def test_another_archives_marker_stops_no_guest_and_writes_nothing(
    gs: GS, guest_factory: GuestFactory, disks: LoopDisks, tmp_path: Path
) -> None:
    # Two disks with one label, as rotated disks have; the job has met the first.
    first = disks(Part("ext4", 128, "gsrotate"))
    other = disks(Part("ext4", 128, "gsrotate"))
    other_node = other.partitions[0].node
    with pytest.raises(DeviceError, match="LABEL=gsrotate is ambiguous"):
        resolve("LABEL=gsrotate")  # both plugged in: neither is taken
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    _mount(other_node, scratch)
    foreign = Archive.open(scratch, create=True).archive_id
    _umount(scratch)
    other.detach()
    guest = guest_factory("wrong")
    gs.job("rot", [guest], device="LABEL=gsrotate")
    assert gs.engine.run_job("rot").ok
    first.detach()
    other.attach()
    other_node = other.partitions[0].node
    files_before = _files_on(other_node, scratch)
    dom_id, offset = guest.dom.ID(), guest.console_size()

    result = gs.engine.run_job("rot")

    assert not result.ok
    message = result.outcomes[0].message
    assert "wrong disk" in message and foreign in message
    _guest_untouched(guest, dom_id, offset)
    assert not mount_points(other_node)
    assert list(gs.archive.iterdir()) == []
    assert _files_on(other_node, scratch) == files_before
    assert json.loads(files_before[MARKER])["archive_id"] == foreign


def test_a_device_mounted_elsewhere_or_a_taken_mount_point_is_refused(
    gs: GS, guest_factory: GuestFactory, disks: LoopDisks, tmp_path: Path
) -> None:
    mine, other = disks(Part("ext4", 128, "gsbusy"), Part("ext4", 128, "gsother")).partitions
    guest = guest_factory("busy", start=False)
    gs.job("busy", [guest], device=mine.spec)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    _mount(mine.node, elsewhere)
    result = gs.engine.run_job("busy")
    _umount(elsewhere)
    assert not result.ok and f"is mounted at {elsewhere}" in result.outcomes[0].message

    _mount(other.node, gs.archive)
    result = gs.engine.run_job("busy")
    _umount(gs.archive)
    assert not result.ok and "already a mount point of" in result.outcomes[0].message
    assert not mount_points(mine.node)
    assert list(gs.archive.iterdir()) == []


def test_a_mount_point_bound_onto_itself_is_no_other_device(
    gs: GS, guest_factory: GuestFactory, disks: LoopDisks
) -> None:
    # What an administrator does to make a mount point shared, or what a killed run
    # leaves: it must not pass for "another device mounted here".
    part = disks(Part("ext4", 128, "gsbind")).partitions[0]
    guest = guest_factory("bind", start=False)
    gs.job("bind", [guest], device=part.spec)
    subprocess.run(["mount", "--bind", gs.archive, gs.archive], check=True)
    try:
        result = gs.engine.run_job("bind")
        assert result.ok, result.outcomes
        assert not mount_points(part.node)
        assert mount_at(gs.archive) is not None  # the bind is left as it was found
    finally:
        _umount(gs.archive)


@pytest.mark.parametrize("fstype", ["ntfs", "exfat"])
def test_ntfs_and_exfat_hold_a_restorable_version(
    fstype: str, gs: GS, guest_factory: GuestFactory, disks: LoopDisks, workdir: Path
) -> None:
    part = disks(Part(fstype, 256, "GSFOREIGN")).partitions[0]
    guest = guest_factory(fstype, disks=(DiskSpec("vda", "raw", 32 * MiB),))
    guest.shutdown()  # the counter it wrote stays on its disk; off, it needs no restart
    counter = guest.read_counter()
    assert counter > 0
    gs.job(fstype, [guest], device=part.spec)

    result = gs.engine.run_job(fstype)

    assert result.ok, result.outcomes
    assert not mount_points(part.node)
    log = result.log_path.read_text()
    assert "keeps no Unix owners or modes" in log
    assert ("keeps no sparse files" in log) == (fstype == "exfat")
    clone = unique_name(f"{fstype}clone")
    target = workdir / "restored"
    target.mkdir()
    guest_factory.adopt(clone, target)
    with gs.engine.device_archive(part.spec) as archive:
        assert mount_points(part.node)
        [version] = archive.versions(guest.name)
        assert version.verified is True
        plan = gs.engine.plan_restore(archive, guest.name, version.number, clone, target_dir=target)
        gs.engine.restore(plan)
    assert not mount_points(part.node)
    assert read_disk_counter(target / f"{clone}-vda.raw", "raw") == counter


@pytest.mark.parametrize(("fstype", "size"), [("xfs", 320), ("btrfs", 160)])
def test_xfs_and_btrfs_take_a_backup(
    fstype: str, size: int, gs: GS, guest_factory: GuestFactory, disks: LoopDisks
) -> None:
    part = disks(Part(fstype, size, f"gs{fstype}")).partitions[0]
    guest = guest_factory(fstype, start=False, disks=(DiskSpec("vda", "raw", 16 * MiB),))
    gs.job(fstype, [guest], device=part.spec)

    result = gs.engine.run_job(fstype)

    assert result.ok, result.outcomes
    assert not mount_points(part.node)
    with gs.engine.device_archive(part.spec) as archive:
        assert [v.number for v in archive.versions(guest.name)] == [1]


def test_fat32_with_a_large_disk_is_refused_up_front(
    gs: GS, guest_factory: GuestFactory, disks: LoopDisks
) -> None:
    part = disks(Part("vfat", 64, "GSFAT")).partitions[0]
    guest = guest_factory("fat", start=False, disks=(DiskSpec("vda", "raw", 5 * GiB),))
    gs.job("fat", [guest], device=part.spec)

    result = gs.engine.run_job("fat")

    assert not result.ok
    message = result.outcomes[0].message
    assert "FAT32, which cannot hold files of 4 GiB or more" in message and "vda.raw" in message
    assert "mounted" not in result.log_path.read_text()  # refused before any mount
    assert not guest.is_running()
    assert list(gs.archive.iterdir()) == []


def test_cli_run_of_a_refused_device_job_exits_with_the_failure(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("cli", start=False)
    gs.job("nodisk", [guest], device="LABEL=gs-no-such-label")

    proc = gs.cli("run", "nodisk")

    assert proc.returncode == 10  # case 22: a device error
    assert "LABEL=gs-no-such-label is not plugged in" in proc.stderr
