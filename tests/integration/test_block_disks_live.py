"""Block-device disks on a real guest: a loop device given to libvirt as <disk type='block'>.

The guest keeps its counter on vda, which is the loop device here, and has a
qcow2 file as vdb. It is backed up in stop mode, the version is verified, and
restored twice: into a file (the default) and onto a second loop device
(--disk-target). Both clones boot and find the counter the original had when it
powered off for the backup.
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from rig import GuestFactory, TestGuest, require
from rig.disks import DiskSpec
from rig.gs import BOOT, GS, boot_counter, shutdown_counter, wait_counted_past

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
VDA_SIZE = 64 * MiB


class Loops:
    """Loop devices for one test, detached at the end (after its guests are gone)."""

    def __init__(self) -> None:
        self.devices: list[str] = []

    def attach(self, image: Path) -> Path:
        out = subprocess.run(
            ["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=True
        )
        self.devices.append(out.stdout.strip())
        return Path(self.devices[-1])

    def detach_all(self) -> None:
        for device in reversed(self.devices):
            subprocess.run(["losetup", "-d", device], capture_output=True, check=False)


@pytest.fixture
def loops() -> Iterator[Loops]:
    require(os.geteuid() == 0, "block-device tests need root (losetup)")
    made = Loops()
    try:
        yield made
    finally:
        made.detach_all()


def _as_block_disk(xml: str, target: str, device: Path) -> str:
    """The domain XML with disk ``target`` turned into <disk type='block'> on ``device``."""
    root = ET.fromstring(xml)
    for disk in root.findall("./devices/disk"):
        dev = disk.find("target")
        source = disk.find("source")
        if dev is not None and dev.get("dev") == target and source is not None:
            disk.set("type", "block")
            source.attrib.clear()
            source.set("dev", str(device))
    return ET.tostring(root, encoding="unicode")


def _disk(xml: str, target: str) -> tuple[str, str]:
    for disk in ET.fromstring(xml).findall("./devices/disk"):
        dev, source = disk.find("target"), disk.find("source")
        if dev is not None and dev.get("dev") == target and source is not None:
            return disk.get("type", ""), source.get("file") or source.get("dev") or ""
    raise AssertionError(f"no disk {target}")


def _console_path(xml: str) -> Path:
    source = ET.fromstring(xml).find("./devices/serial/source")
    assert source is not None
    return Path(source.get("path", ""))


def _read(path: Path, length: int) -> bytes:
    with path.open("rb") as f:
        return f.read(length)


def _block_guest(
    guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect, loops: Loops, label: str
) -> tuple[TestGuest, Path, int]:
    """A guest whose vda (the counter disk) is a loop device; started; its console offset."""
    guest = guest_factory(
        label,
        disks=(DiskSpec("vda", "raw", VDA_SIZE), DiskSpec("vdb", "qcow2", 32 * MiB)),
        vdb_text="the file disk",
        start=False,
    )
    image = guest.disks["vda"].path  # a sparse raw file: the loop device's backing
    with image.open("r+b") as f:  # data deep in the device too, not only the counter
        f.seek(20 * MiB)
        f.write(os.urandom(MiB))
    device = loops.attach(image)
    xml = guest.live_xml(libvirt.VIR_DOMAIN_XML_INACTIVE)
    libvirt_conn.defineXML(_as_block_disk(xml, "vda", device))
    return guest, device, guest.start()


def test_a_block_device_disk_is_backed_up_sparse_and_restored_to_a_file_and_a_device(
    loops: Loops,
    gs: GS,
    guest_factory: GuestFactory,
    libvirt_conn: libvirt.virConnect,
    tmp_path: Path,
) -> None:
    guest, device, before = _block_guest(guest_factory, libvirt_conn, loops, "blk")
    gs.job("blk", [guest])

    gs.cli("run", "blk", check=True)

    at_shutdown = shutdown_counter(guest, before)
    assert at_shutdown > 0 and guest.is_running()
    [version] = gs.versions(guest)
    vda = next(d for d in version.manifest.disks if d.target == "vda")
    assert (vda.source_kind, vda.source, vda.file) == ("block", str(device), "vda.raw")
    copy = version.path / "vda.raw"
    assert copy.stat().st_size == VDA_SIZE
    assert copy.stat().st_blocks * 512 < 4 * MiB  # 1 MiB of data and a counter, not 64 MiB
    gs.cli("verify", guest.name, "1", check=True)

    # 1. Into a file, beside the other restored disk.
    as_file = guest.name + "-f"
    guest_factory.adopt(as_file)
    gs.cli("restore", guest.name, "1", as_file, "--start", check=True)
    clone = libvirt_conn.lookupByName(as_file)
    kind, path = _disk(clone.XMLDesc(0), "vda")
    assert kind == "file" and Path(path).parent == Path(_disk(clone.XMLDesc(0), "vdb")[1]).parent
    assert boot_counter(_console_path(clone.XMLDesc(0))) == at_shutdown
    clone.destroy()  # one TCG guest fewer on a small host

    # 2. Onto a second device that holds old data everywhere: its content must equal the version.
    target_image = tmp_path / "target.img"
    with target_image.open("wb") as f:
        for _ in range(VDA_SIZE // MiB + 8):
            f.write(b"\xaa" * MiB)
    target = loops.attach(target_image)
    on_device = guest.name + "-d"
    guest_factory.adopt(on_device)

    gs.cli("restore", guest.name, "1", on_device, "--disk-target", f"vda={target}", check=True)

    assert _read(target, VDA_SIZE) == copy.read_bytes()
    clone = libvirt_conn.lookupByName(on_device)
    assert _disk(clone.XMLDesc(0), "vda") == ("block", str(target))
    clone.create()
    assert boot_counter(_console_path(clone.XMLDesc(0))) == at_shutdown


def test_stop_short_pushes_a_block_device_disk_into_the_version(
    loops: Loops,
    gs: GS,
    guest_factory: GuestFactory,
    libvirt_conn: libvirt.virConnect,
    workdir: Path,
) -> None:
    """QEMU's push backup reads the device and writes the version's file itself."""
    gs.archive = workdir / "archive"  # where QEMU can reach it
    gs.archive.mkdir(mode=0o700)
    guest, device, before = _block_guest(guest_factory, libvirt_conn, loops, "blkpush")
    gs.job("push", [guest], mode="stop-short")

    result = gs.engine.run_job("push")

    assert result.ok, result.outcomes
    at_shutdown = shutdown_counter(guest, before)
    [version] = gs.versions(guest)
    assert version.manifest.mode == "stop-short" and version.verified is True
    vda = next(d for d in version.manifest.disks if d.target == "vda")
    assert (vda.source_kind, vda.source, vda.virtual_size) == ("block", str(device), VDA_SIZE)
    assert (version.path / "vda.raw").stat().st_blocks * 512 < 4 * MiB
    clone_name = guest.name + "-c"
    guest_factory.adopt(clone_name)
    gs.cli("restore", guest.name, "1", clone_name, "--start", check=True)
    clone = libvirt_conn.lookupByName(clone_name)
    assert boot_counter(_console_path(clone.XMLDesc(0))) == at_shutdown


def test_restore_over_the_original_writes_its_block_device_back_in_place(
    loops: Loops,
    gs: GS,
    guest_factory: GuestFactory,
    libvirt_conn: libvirt.virConnect,
) -> None:
    guest, device, before = _block_guest(guest_factory, libvirt_conn, loops, "blkover")
    gs.job("over", [guest])
    gs.cli("run", "over", check=True)
    backed_up = shutdown_counter(guest, before)
    # The guest runs on and counts further on its device; then it is shut off.
    wait_counted_past(guest, backed_up, before)
    guest.shutdown()
    assert guest.read_counter(device) > backed_up

    proc = gs.cli("restore", guest.name, "1", "--overwrite", "--yes")

    assert proc.returncode == 0, proc.stderr
    assert guest.read_counter(device) == backed_up
    [version] = gs.versions(guest)
    assert _read(device, VDA_SIZE) == (version.path / "vda.raw").read_bytes()
    assert _disk(guest.live_xml(libvirt.VIR_DOMAIN_XML_INACTIVE), "vda") == ("block", str(device))
    offset = guest.start()
    match = guest.wait_for_console(BOOT, timeout=60, after=offset)
    assert int(match.group(1)) == backed_up
