"""A disk on a libvirt directory storage pool (``<disk type='volume'>``), issue 11:
backed up, verified, and restored as a clone (a plain file) that boots."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from rig import GuestFactory, TestGuest, unique_name
from rig.gs import GS, boot_counter, shutdown_counter

pytestmark = pytest.mark.integration


@pytest.fixture
def pool_guest(
    guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect
) -> Iterator[tuple[TestGuest, str]]:
    """A running guest whose vda is volume ``vda.qcow2`` of a transient directory pool."""
    guest = guest_factory("vol", start=False)
    directory = guest.directory / "pool"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    pool_name = unique_name("pool")
    pool_xml = (
        f"<pool type='dir'><name>{pool_name}</name><target><path>{directory}</path></target></pool>"
    )
    pool = libvirt_conn.storagePoolCreateXML(pool_xml, 0)
    try:
        disk = guest.disks["vda"]
        disk.path.rename(directory / "vda.qcow2")
        pool.refresh(0)
        root = ET.fromstring(guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        element = root.find("./devices/disk")
        assert element is not None
        element.set("type", "volume")
        source = element.find("source")
        assert source is not None
        source.attrib.clear()
        source.set("pool", pool_name)
        source.set("volume", "vda.qcow2")
        libvirt_conn.defineXML(ET.tostring(root, encoding="unicode"))
        guest.start()
        yield guest, pool_name
    finally:
        guest.destroy_and_undefine()  # before the pool goes: its volume is the guest's disk
        pool.destroy()


def test_volume_disk_backed_up_verified_and_restored_as_a_file(
    gs: GS,
    guest_factory: GuestFactory,
    libvirt_conn: libvirt.virConnect,
    pool_guest: tuple[TestGuest, str],
) -> None:
    original, pool_name = pool_guest
    before = original.console_size()
    gs.job("vols", [original])

    gs.cli("run", "vols", check=True)

    at_shutdown = shutdown_counter(original, before)
    assert at_shutdown > 0 and original.is_running()
    (version,) = gs.versions(original)
    gs.cli("verify", original.name, "1", check=True)
    (disk,) = json.loads((version.path / "manifest.json").read_text())["disks"]
    assert disk["pool"] == pool_name and disk["volume"] == "vda.qcow2"
    assert disk["source"] == str(original.directory / "pool" / "vda.qcow2")

    clone_name = original.name + "-c"
    guest_factory.adopt(clone_name)
    gs.cli("restore", original.name, "1", clone_name, "--start", check=True)

    clone = libvirt_conn.lookupByName(clone_name)
    root = ET.fromstring(clone.XMLDesc(0))
    element = root.find("./devices/disk")
    assert element is not None and element.get("type") == "file"
    source = element.find("source")
    assert source is not None and "pool" not in source.attrib
    assert Path(source.get("file", "")).is_file()
    console = root.find("./devices/serial/source")
    assert console is not None
    assert boot_counter(Path(console.get("path", ""))) == at_shutdown


def test_volume_disk_in_stop_short_is_read_by_qemu(
    gs: GS, pool_guest: tuple[TestGuest, str], workdir: Path
) -> None:
    original, pool_name = pool_guest
    gs.archive = workdir / f"archive-{original.name}"  # where QEMU may write (not 0700 tmp)
    gs.archive.mkdir(mode=0o700)
    gs.job("short", [original], mode="stop-short")

    gs.cli("run", "short", check=True)

    (version,) = gs.versions(original)
    assert version.manifest.mode == "stop-short" and original.is_running()
    (disk,) = version.manifest.disks
    assert (disk.pool, disk.volume) == (pool_name, "vda.qcow2")
    gs.cli("verify", original.name, "1", check=True)
