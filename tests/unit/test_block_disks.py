"""Block-device disks: copied into a sparse file, written back onto a device, checked first.

Real loop devices (root and losetup), real mounts and real filesystems; no mocks.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest
from rig import require
from rig.testnode import DriverNode, NodeGuest, node_engine, run_cli, save_job, write_node

from guestsafe.engine import failpoints
from guestsafe.engine.api import Engine, OverwriteNotice
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.copier import copy_file, copy_to_device, device_size, hash_file
from guestsafe.engine.errors import CopyError

MiB = 1024 * 1024


def _need_loop() -> None:
    require(os.geteuid() == 0, "block-device tests need root (losetup)")
    require(shutil.which("losetup") is not None, "losetup is not installed")


class Loops:
    """Loop devices over sparse files, detached whatever the test did."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.devices: list[str] = []

    def make(self, size: int, *, fill: bytes | None = None, data: bytes = b"") -> Path:
        image = self.directory / f"loop{len(self.devices)}.img"
        with image.open("wb") as f:
            if fill is not None:
                block = fill * (MiB // len(fill))
                for _ in range(size // MiB):
                    f.write(block)
            f.truncate(size)
            if data:
                f.seek(0)
                f.write(data)
        loop = _run("losetup", "-f", "--show", str(image)).strip()
        self.devices.append(loop)
        return Path(loop)

    def image_of(self, device: Path) -> Path:
        return self.directory / f"loop{self.devices.index(str(device))}.img"

    def cleanup(self) -> None:
        for loop in self.devices:
            subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Loops]:
    _need_loop()
    made = Loops(tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


def _content(size: int, pieces: list[tuple[int, int]], seed: int = 7) -> bytearray:
    rng = random.Random(seed)
    content = bytearray(size)
    for offset, length in pieces:
        content[offset : offset + length] = rng.randbytes(length)
    return content


def _write_device(device: Path, content: bytes) -> None:
    with device.open("r+b") as f:
        f.write(content)
        os.fsync(f.fileno())


def _read_device(device: Path, length: int) -> bytes:
    with device.open("rb") as f:
        return f.read(length)


# --------------------------------------------------------------------------- backup side


def test_a_block_device_is_copied_into_a_sparse_file(loops: Loops, tmp_path: Path) -> None:
    size = 64 * MiB
    # Data scattered between long runs of zeros, one run of zeros inside the data too.
    content = _content(size, [(0, 8192), (5 * MiB + 4096, 300 * 1024), (40 * MiB, 2 * MiB)])
    content[40 * MiB + 64 * 1024 : 40 * MiB + 128 * 1024] = bytes(64 * 1024)
    device = loops.make(size)
    _write_device(device, bytes(content))
    dst = tmp_path / "vdb.raw"

    result = copy_file(device, dst)

    assert result.size == size == dst.stat().st_size
    assert dst.read_bytes() == content
    assert result.blake3 == str(blake3.blake3(bytes(content)).hexdigest()) == hash_file(dst)
    allocated = dst.stat().st_blocks * 512
    assert allocated < 3 * MiB  # about its data's size (2.3 MiB), not 64 MiB


def test_an_empty_device_takes_no_space(loops: Loops, tmp_path: Path) -> None:
    device = loops.make(32 * MiB)
    dst = tmp_path / "vdb.raw"
    result = copy_file(device, dst)
    assert dst.stat().st_size == 32 * MiB
    assert dst.stat().st_blocks == 0
    assert result.blake3 == str(blake3.blake3(bytes(32 * MiB)).hexdigest())


def _resize(loops: Loops, device: Path, new_size: int) -> None:
    os.truncate(loops.image_of(device), new_size)
    _run("losetup", "-c", str(device))


@pytest.mark.parametrize("new_size", [96 * MiB, 32 * MiB], ids=["grows", "shrinks"])
def test_a_device_that_changes_size_mid_copy_fails_the_copy(
    loops: Loops, tmp_path: Path, new_size: int
) -> None:
    device = loops.make(64 * MiB, fill=b"\x5a")
    dst = tmp_path / "vdb.raw"
    resized: list[int] = []

    def progress(done: int, total: int) -> None:
        if not resized:  # the first batch is written: resize while the copy runs
            _resize(loops, device, new_size)
            resized.append(device_size(device))

    with pytest.raises(CopyError, match=r"changed size during the copy") as caught:
        copy_file(device, dst, progress=progress)

    assert resized == [new_size]
    assert str(device) in str(caught.value)
    assert not dst.exists()


# --------------------------------------------------------------------------- restore side


def test_a_version_file_is_written_onto_a_device_zeros_included(
    loops: Loops, tmp_path: Path
) -> None:
    size = 48 * MiB
    content = bytes(_content(size, [(4096, 4096), (9 * MiB, 5 * MiB), (47 * MiB, MiB)]))
    src = tmp_path / "vdb.raw"
    with src.open("wb") as f:  # sparse, as in a version
        f.truncate(size)
        for offset, length in [(4096, 4096), (9 * MiB, 5 * MiB), (47 * MiB, MiB)]:
            f.seek(offset)
            f.write(content[offset : offset + length])
    # A device larger than the disk, full of old data everywhere.
    device = loops.make(size + 8 * MiB, fill=b"\xa5")

    result = copy_to_device(src, device)

    assert _read_device(device, size) == content  # the holes are zeros on the device
    assert _read_device(device, size + 8 * MiB)[size:] == b"\xa5" * (8 * MiB)  # tail untouched
    assert result.blake3 == str(blake3.blake3(content).hexdigest())
    assert hash_file(device, limit=size) == result.blake3


def test_a_device_too_small_is_not_written(loops: Loops, tmp_path: Path) -> None:
    src = tmp_path / "vdb.raw"
    with src.open("wb") as f:
        f.truncate(32 * MiB)
    device = loops.make(16 * MiB, fill=b"\xa5")
    with pytest.raises(CopyError, match=r"holds 16\.0 MiB, the disk needs 32\.0 MiB"):
        copy_to_device(src, device)
    assert _read_device(device, 16 * MiB) == b"\xa5" * (16 * MiB)


# --------------------------------------------------------------------------- manifest


def test_the_manifest_records_a_block_source_and_reads_file_records_as_before() -> None:
    from guestsafe.engine.archive.manifest import DiskRecord, Manifest, manifest_format
    from guestsafe.engine.errors import ArchiveError
    from guestsafe.engine.modes import Mode

    digest = "0" * 64
    block = DiskRecord("vdb", "/dev/vg0/data", "raw", MiB, 4096, "vdb.raw", digest, MiB, "block")
    plain = DiskRecord("vda", "/img/a.qcow2", "qcow2", MiB, 4096, "vda.qcow2", digest, 9)
    stamp = "2026-01-01T00:00:00+00:00"
    manifest = Manifest(
        manifest_format(None, None, [], [plain, block]),
        "g",
        "00000000-0000-4000-8000-000000000000",
        "h",
        Mode.STOP,
        stamp,
        stamp,
        1.0,
        "t",
        [plain, block],
        None,
        [],
        digest,
    )
    text = manifest.to_json()
    assert text.count('"source_kind": "block"') == 1  # file records stay as they were
    assert manifest.format == 2  # a reader of format 1 alone would take the device for a file
    assert Manifest.from_json(text).disks == [plain, block]
    with pytest.raises(ArchiveError, match=r"unknown key"):
        Manifest.from_json(text.replace('"format": 2', '"format": 1'))
    with pytest.raises(ArchiveError, match=r"source_kind 'tape'"):
        Manifest.from_json(text.replace('"source_kind": "block"', '"source_kind": "tape"'))


# --------------------------------------------------------------------------- restore flows
# On libvirt's test driver with real loop devices: a guest "blk" with a file vda and a
# loop device as its vdb (<disk type='block'>), backed up while shut off (cold copy).

GUEST = "blk"
VDB_SIZE = 32 * MiB
VDB_PIECES = [(0, 4096), (3 * MiB, 512 * 1024), (30 * MiB, MiB)]


def _block_disk(device: Path, target: str = "vdb") -> ET.Element:
    disk = ET.Element("disk", {"type": "block", "device": "disk"})
    ET.SubElement(disk, "driver", {"name": "qemu", "type": "raw"})
    ET.SubElement(disk, "source", {"dev": str(device)})
    ET.SubElement(disk, "target", {"dev": target, "bus": "virtio"})
    return disk


@dataclass
class BlockSetup:
    node: DriverNode
    home: Path
    engine: Engine
    loops: Loops
    device: Path  # the guest's vdb
    content: bytes  # what vdb held when version 1 was taken

    def version(self) -> VersionInfo:
        return self.engine.find_archive(GUEST).version(GUEST, 1)

    def restore(self, new_name: str, *disk_targets: str, force: bool = False) -> None:
        archive = self.engine.find_archive(GUEST)
        plan = self.engine.plan_restore(archive, GUEST, 1, new_name, disk_targets=disk_targets)
        self.engine.restore(plan, force=force)

    def cli(self, *args: str) -> tuple[int, str, str]:
        proc = run_cli(self.node, self.home, *args)
        return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def blk(tmp_path: Path, loops: Loops) -> Iterator[BlockSetup]:
    content = bytes(_content(VDB_SIZE, VDB_PIECES))
    device = loops.make(VDB_SIZE)
    _write_device(device, content)
    guest = NodeGuest(GUEST, running=False, disk_mib=(2,), extra_devices=[_block_disk(device)])
    node = write_node(tmp_path / "node", [guest])
    tree = ET.parse(node.file)  # a fixed UUID: the test driver makes one up per connection
    for dom in tree.getroot().findall("domain"):
        ET.SubElement(dom, "uuid").text = str(uuid.uuid4())
    tree.write(node.file)
    engine = node_engine(node, tmp_path / "home")
    dest = tmp_path / "archive"
    dest.mkdir(mode=0o700)
    save_job(engine, "nightly", [GUEST], dest)
    assert engine.run_job("nightly").ok
    try:
        yield BlockSetup(node, tmp_path / "home", engine, loops, device, content)
    finally:
        engine.close()


def test_backup_records_the_device_and_keeps_its_zeros_as_holes(blk: BlockSetup) -> None:
    version = blk.version()
    [vda, vdb] = version.manifest.disks
    assert (vda.source_kind, vdb.source_kind) == ("file", "block")
    assert (vdb.source, vdb.file, vdb.format) == (str(blk.device), "vdb.raw", "raw")
    assert vdb.virtual_size == VDB_SIZE == vdb.size
    copy = version.path / "vdb.raw"
    assert copy.read_bytes() == blk.content
    assert copy.stat().st_blocks * 512 < 2 * MiB  # 1.5 MiB of data in a 32 MiB disk
    [report] = blk.engine.verify(version.path.parent.parent, GUEST, 1)
    assert report.ok, report.problems


def _clone_disks(engine: Engine, name: str) -> dict[str, tuple[str, str]]:
    root = ET.fromstring(engine.hv.xml(name))
    found = {}
    for disk in root.findall("./devices/disk"):
        source, target = disk.find("source"), disk.find("target")
        assert source is not None and target is not None
        path = source.get("file") or source.get("dev") or ""
        found[target.get("dev", "")] = (disk.get("type", ""), path)
    return found


def test_restore_as_a_new_guest_writes_the_block_disk_into_a_file(blk: BlockSetup) -> None:
    blk.restore("blk-copy")

    disks = _clone_disks(blk.engine, "blk-copy")
    assert disks["vdb"][0] == "file"
    vdb = Path(disks["vdb"][1])
    assert vdb.parent == Path(disks["vda"][1]).parent  # beside the other restored disk
    assert vdb.read_bytes() == blk.content
    assert vdb.stat().st_blocks * 512 < 2 * MiB


def test_disk_target_writes_onto_a_device_and_the_clone_uses_it(blk: BlockSetup) -> None:
    target = blk.loops.make(VDB_SIZE + 4 * MiB, fill=b"\xa5")  # old data everywhere

    blk.restore("blk-dev", f"vdb={target}")

    assert _clone_disks(blk.engine, "blk-dev")["vdb"] == ("block", str(target))
    assert _read_device(target, VDB_SIZE) == blk.content  # zeros written where it had data
    assert _read_device(blk.device, VDB_SIZE) == blk.content  # the original untouched


def _refused(blk: BlockSetup, *args: str) -> str:
    code, _out, err = blk.cli("restore", GUEST, "1", "blk-no", *args)
    assert code == 9, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_disk_target_refuses_a_device_too_small(blk: BlockSetup) -> None:
    small = blk.loops.make(VDB_SIZE // 2, fill=b"\xa5")
    err = _refused(blk, "--disk-target", f"vdb={small}")
    assert f"{small} holds 16.0 MiB, but vdb needs 32.0 MiB" in err
    assert _read_device(small, VDB_SIZE // 2) == b"\xa5" * (VDB_SIZE // 2)


def test_disk_target_refuses_another_guests_disk(blk: BlockSetup) -> None:
    err = _refused(blk, "--disk-target", f"vdb={blk.device}")
    assert f"{blk.device} is a disk of guest 'blk'" in err


def _mkfs(device: Path) -> None:
    require(shutil.which("mkfs.ext4") is not None, "mkfs.ext4 is not installed")
    _run("mkfs.ext4", "-q", "-F", str(device))


def test_disk_target_refuses_a_filesystem_unless_forced(blk: BlockSetup) -> None:
    target = blk.loops.make(VDB_SIZE)
    _mkfs(target)
    before = _read_device(target, VDB_SIZE)

    err = _refused(blk, "--disk-target", f"vdb={target}")
    assert f"{target} holds a ext4 filesystem" in err and "wipefs -a" in err
    assert _read_device(target, VDB_SIZE) == before

    blk.restore("blk-forced", f"vdb={target}", force=True)
    assert _clone_disks(blk.engine, "blk-forced")["vdb"] == ("block", str(target))
    assert _read_device(target, VDB_SIZE) == blk.content


def test_disk_target_refuses_a_mounted_device(blk: BlockSetup, tmp_path: Path) -> None:
    target = blk.loops.make(VDB_SIZE)
    _mkfs(target)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    _run("mount", str(target), str(mountpoint))
    try:
        err = _refused(blk, "--disk-target", f"vdb={target}", "--force")
    finally:
        _run("umount", str(mountpoint))
    assert f"{target} is mounted at {mountpoint}" in err


def test_disk_target_refuses_an_unknown_disk_and_a_bad_spec(blk: BlockSetup) -> None:
    assert "has no disk vdz (it has vda, vdb)" in _refused(blk, "--disk-target", "vdz=/dev/x")
    assert "write it as TARGET=DEVICE" in _refused(blk, "--disk-target", "/dev/loop0")
    assert "is not a block device" in _refused(blk, "--disk-target", "vdb=/etc/hostname")


def test_restore_over_the_original_writes_the_device_back_in_place(blk: BlockSetup) -> None:
    _write_device(blk.device, b"newer data" * 100_000)  # written after the backup
    notices: list[list[str]] = []

    def confirm(notice: OverwriteNotice) -> bool:
        notices.append(notice.lines())
        return True

    archive = blk.engine.find_archive(GUEST)
    blk.engine.restore_over(archive, GUEST, 1, confirm=confirm)

    assert _read_device(blk.device, VDB_SIZE) == blk.content
    [lines] = notices
    assert any(f"{blk.device}: block device overwritten in place" in line for line in lines)
    assert _clone_disks(blk.engine, GUEST)["vdb"] == ("block", str(blk.device))
    assert not list(Path("/dev").glob(".guestsafe-restore-*"))


def test_a_crash_while_writing_the_device_is_reported_by_recover(blk: BlockSetup) -> None:
    env_before = os.environ.get(failpoints.ENV)
    os.environ[failpoints.ENV] = "restore-over.device=kill"
    try:
        code, _out, _err = blk.cli("restore", GUEST, "1", "--overwrite", "--yes")
    finally:
        if env_before is None:
            os.environ.pop(failpoints.ENV)
        else:
            os.environ[failpoints.ENV] = env_before
    assert code == -signal.SIGKILL

    code, _out, err = blk.cli("recover")

    assert code == 0, err
    assert f"the block device {blk.device} of guest 'blk' was being overwritten" in err
    assert f"guestsafe restore {GUEST} 1 --overwrite' again" in err


def test_push_mode_files_of_block_disks_lose_their_zero_blocks(tmp_path: Path) -> None:
    from guestsafe.engine.backup.push_files import punch_zero_blocks

    size = 24 * MiB
    content = bytes(_content(size, [(MiB, 8192), (10 * MiB, MiB)]))
    path = tmp_path / "vda.raw"
    path.write_bytes(content)  # every block allocated, as QEMU leaves a device's copy
    assert path.stat().st_blocks * 512 >= size

    freed = punch_zero_blocks(path)

    assert path.read_bytes() == content
    assert path.stat().st_blocks * 512 < 2 * MiB
    assert freed > 20 * MiB
