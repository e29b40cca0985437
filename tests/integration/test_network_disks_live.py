"""A guest with a network disk (nbd, served by qemu-nbd on a unix socket), issue 11.

Mode stop must refuse it before the guest stops: nobody but QEMU can read it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from rig import GuestFactory, TestGuest
from rig.gs import GS, POWEROFF

pytestmark = pytest.mark.integration

NBD_LINE = "SERVED-OVER-NBD"
EXPORT = "gsexport"


@pytest.fixture
def nbd_guest(
    guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect
) -> Iterator[tuple[TestGuest, Path]]:
    """A running guest whose vdb is an nbd export of a raw file; yields it and the file."""
    guest = guest_factory("nbd", start=False)
    image = guest.directory / "exported.raw"
    with image.open("wb") as f:
        f.write(NBD_LINE.encode() + b"\n")
        f.truncate(16 * 1024 * 1024)
    sock = guest.directory / "nbd.sock"
    server = subprocess.Popen(
        ["qemu-nbd", "-k", str(sock), "-f", "raw", "-x", EXPORT, "-t", str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline and server.poll() is None, "qemu-nbd did not start"
            time.sleep(0.05)
        os.chmod(sock, 0o777)  # QEMU runs as its own user
        root = ET.fromstring(guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        devices = root.find("devices")
        assert devices is not None
        disk = ET.SubElement(devices, "disk", type="network", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="raw")
        source = ET.SubElement(disk, "source", protocol="nbd", name=EXPORT)
        ET.SubElement(source, "host", transport="unix", socket=str(sock))
        ET.SubElement(disk, "target", dev="vdb", bus="virtio")
        libvirt_conn.defineXML(ET.tostring(root, encoding="unicode"))
        offset = guest.start()
        assert f"GS-VDB {NBD_LINE}" in guest.console_text(offset)  # QEMU reads the export
        yield guest, image
    finally:
        guest.destroy_and_undefine()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)


def test_network_disk_refused_in_stop_mode_before_the_guest_stops(
    gs: GS, nbd_guest: tuple[TestGuest, Path]
) -> None:
    guest, _image = nbd_guest
    before = guest.console_size()
    gs.job("net", [guest], mode="stop")

    proc = gs.cli("run", "net")

    assert proc.returncode == 5, proc.stderr
    assert "vdb is a network disk" in proc.stderr and "stop-short" in proc.stderr
    assert guest.is_running()
    assert not POWEROFF.search(guest.console_text(before))  # never asked to stop
    assert gs.versions(guest) == [] and gs.partials() == []


def test_network_disk_read_by_qemu_in_stop_short(
    gs: GS,
    nbd_guest: tuple[TestGuest, Path],
    workdir: Path,
    guest_factory: GuestFactory,
    libvirt_conn: libvirt.virConnect,
) -> None:
    guest, image = nbd_guest
    gs.archive = workdir / f"archive-{guest.name}"  # where QEMU may write (not 0700 tmp)
    gs.archive.mkdir(mode=0o700)
    gs.job("net", [guest], mode="stop-short")

    proc = gs.cli("run", "net")

    assert proc.returncode == 0, proc.stderr
    assert guest.is_running()
    (version,) = gs.versions(guest)
    assert (version.path / "vdb.raw").read_bytes() == image.read_bytes()
    gs.cli("verify", guest.name, "1", check=True)

    # A clone gets the network disk's data as a plain file (it has no server of its own).
    target = guest.directory / "clone"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    clone = guest.name + "-c"
    guest_factory.adopt(clone)
    gs.cli("restore", guest.name, "1", clone, "--start", "--target-dir", str(target), check=True)
    root = ET.fromstring(libvirt_conn.lookupByName(clone).XMLDesc(0))
    kinds = {d.find("target").get("dev"): d.get("type") for d in root.iter("disk")}  # type: ignore[union-attr]
    assert kinds == {"vda": "file", "vdb": "file"}
    console = root.find("./devices/serial/source")
    assert console is not None
    log = Path(console.get("path", ""))
    deadline = time.monotonic() + 90
    while f"GS-VDB {NBD_LINE}" not in (log.read_text(errors="replace") if log.exists() else ""):
        assert time.monotonic() < deadline, f"the clone never read its vdb ({log})"
        time.sleep(0.3)
