"""Block-device disks: copied into a sparse file, written back onto a device, checked first.

Real loop devices (root and losetup), real mounts and real filesystems; no mocks.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
from rig import require

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
    from guestsafe.engine.archive.manifest import DiskRecord, Manifest
    from guestsafe.engine.errors import ArchiveError
    from guestsafe.engine.modes import Mode

    digest = "0" * 64
    block = DiskRecord("vdb", "/dev/vg0/data", "raw", MiB, 4096, "vdb.raw", digest, MiB, "block")
    plain = DiskRecord("vda", "/img/a.qcow2", "qcow2", MiB, 4096, "vda.qcow2", digest, 9)
    stamp = "2026-01-01T00:00:00+00:00"
    manifest = Manifest(
        1,
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
    assert Manifest.from_json(text).disks == [plain, block]
    with pytest.raises(ArchiveError, match=r"source_kind 'tape'"):
        Manifest.from_json(text.replace('"source_kind": "block"', '"source_kind": "tape"'))
