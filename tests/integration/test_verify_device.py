"""`guestsafe verify --device`: an archive on an unplugged-by-default disk, checked
without mounting it by hand (issue 12, case 25), on a real loop device."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from rig import GuestFactory
from rig.gs import GS
from rig.loopdisk import LoopDisks, Part, make_loop_disks, mount_points

from guestsafe.engine.archive.names import encode_guest_name

pytestmark = pytest.mark.integration


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[LoopDisks]:
    yield from make_loop_disks(tmp_path)


def _mounted_rw(node: str, target: Path) -> Iterator[Path]:
    target.mkdir(exist_ok=True)
    subprocess.run(["mount", node, str(target)], check=True, capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True, capture_output=True)


def test_case_25_verify_device_mounts_read_only_checks_and_unmounts(
    gs: GS, guest_factory: GuestFactory, disks: LoopDisks, tmp_path: Path
) -> None:
    part = disks(Part("ext4", 256, "gsverify")).partitions[0]
    guest = guest_factory("verdev", start=False)
    gs.job("usb", [guest], device=part.spec)
    assert gs.engine.run_job("usb").ok
    assert not mount_points(part.node)

    good = gs.cli("verify", guest.name, "--device", part.spec)

    assert good.returncode == 0, good.stderr
    assert good.stdout.splitlines() == [f"{guest.name} version 1: ok"]
    assert not mount_points(part.node)

    # Bit rot on the device: verify says so, and writes nothing there (read-only).
    version = Path(encode_guest_name(guest.name)) / "1"
    for root in _mounted_rw(part.node, tmp_path / "rw"):
        image = root / version / "vda.qcow2"
        with image.open("r+b") as f:
            f.seek(4096)
            byte = f.read(1)
            f.seek(4096)
            f.write(bytes([byte[0] ^ 0xFF]))
        sidecar = root / version / "verified.json"
        recorded = sidecar.read_bytes() if sidecar.exists() else None

    bad = gs.cli("verify", "--device", part.spec)

    assert bad.returncode == 8, bad.stderr
    assert bad.stdout.startswith(f"{guest.name} version 1: FAILED: ")
    assert "vda.qcow2" in bad.stdout
    assert not mount_points(part.node)
    for root in _mounted_rw(part.node, tmp_path / "rw"):
        sidecar = root / version / "verified.json"
        assert (sidecar.read_bytes() if sidecar.exists() else None) == recorded

    both = gs.cli("verify", "--device", part.spec, "--dest", str(tmp_path))
    assert both.returncode == 2 and "not both" in both.stderr
