"""Restoring versions of real guests: as a clone, and over the original."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from rig import GuestFactory
from rig.gs import BOOT, GS, boot_counter, shutdown_counter, wait_counted_past

pytestmark = pytest.mark.integration


def _console_path(xml: str) -> Path:
    source = ET.fromstring(xml).find("./devices/serial/source")
    assert source is not None
    return Path(source.get("path", ""))


def _disk_paths(xml: str) -> list[str]:
    return [s.get("file", "") for s in ET.fromstring(xml).findall("./devices/disk/source")]


def _macs(xml: str) -> list[str]:
    return [m.get("address", "") for m in ET.fromstring(xml).findall("./devices/interface/mac")]


def test_cli_restore_as_new_guest_boots_with_the_original_counter(
    gs: GS, guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect
) -> None:
    original = guest_factory("orig", interfaces=2)
    before = original.console_size()
    gs.job("nightly", [original])
    gs.cli("run", "nightly", check=True)
    at_shutdown = shutdown_counter(original, before)
    original_xml = original.live_xml(libvirt.VIR_DOMAIN_XML_INACTIVE)
    clone_name = original.name + "-clone"
    guest_factory.adopt(clone_name)

    proc = gs.cli("restore", original.name, "1", clone_name, "--start", check=True)

    assert "MAC" in proc.stderr  # both MACs clashed with the running original
    clone = libvirt_conn.lookupByName(clone_name)
    clone_xml = clone.XMLDesc(0)
    assert clone.isActive()
    assert boot_counter(_console_path(clone_xml)) == at_shutdown
    assert clone.UUIDString() != original.dom.UUIDString()
    clone_macs = _macs(clone_xml)
    assert len(clone_macs) == 2 and len(set(clone_macs)) == 2
    assert not set(clone_macs) & set(original.macs)
    everyone = gs.engine.hv.all_macs()
    assert all(everyone[mac] == clone_name for mac in clone_macs)
    assert not set(_disk_paths(clone_xml)) & set(_disk_paths(original_xml))
    assert _console_path(clone_xml) != _console_path(original_xml)
    # The original was left exactly as it was defined.
    assert original.live_xml(libvirt.VIR_DOMAIN_XML_INACTIVE) == original_xml
    assert original.is_running()


def test_restore_keeps_macs_when_asked(
    gs: GS, guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect
) -> None:
    original = guest_factory("keepmac", start=False)
    gs.job("k", [original])
    assert gs.engine.run_job("k").ok
    clone_name = original.name + "-k"
    guest_factory.adopt(clone_name)

    gs.cli("restore", original.name, "1", clone_name, "--mac", "keep", check=True)

    clone = libvirt_conn.lookupByName(clone_name)
    assert _macs(clone.XMLDesc(0)) == original.macs
    assert not clone.isActive()


def test_restore_refuses_an_existing_name(gs: GS, guest_factory: GuestFactory) -> None:
    original = guest_factory("dup", start=False)
    other = guest_factory("other", start=False)
    gs.job("d", [original])
    assert gs.engine.run_job("d").ok

    proc = gs.cli("restore", original.name, "1", other.name)

    assert proc.returncode == 9
    assert "already defined" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_restore_over_the_original_puts_the_old_disk_back(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("over")
    before = guest.console_size()
    gs.job("over", [guest])
    assert gs.engine.run_job("over").ok
    backed_up = shutdown_counter(guest, before)
    # The guest runs on and counts further; then it is shut off.
    wait_counted_past(guest, backed_up, before)
    guest.shutdown()
    assert guest.read_counter() > backed_up

    running = gs.cli("restore", guest.name, "1", "--overwrite", "--yes")
    assert running.returncode == 0, running.stderr

    assert guest.read_counter() == backed_up
    assert not list(guest.directory.glob("*.guestsafe-aside"))
    offset = guest.start()
    match = guest.wait_for_console(BOOT, timeout=60, after=offset)
    assert int(match.group(1)) == backed_up


def test_restore_over_a_running_guest_is_refused(gs: GS, guest_factory: GuestFactory) -> None:
    guest = guest_factory("busy")
    gs.job("busy", [guest])
    assert gs.engine.run_job("busy").ok
    vda = guest.disks["vda"].path
    before = vda.stat().st_mtime_ns

    proc = gs.cli("restore", guest.name, "1", "--overwrite")

    assert proc.returncode == 9
    assert re.search(r"is running; shut it off", proc.stderr)
    assert guest.is_running() and vda.stat().st_mtime_ns >= before


def _free_port(low: int = 5900) -> int:
    import socket

    for port in range(low + 50, low + 2000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free TCP port")


def _redefine_with(
    libvirt_conn: libvirt.virConnect, xml: str, *, sysinfo: bool = False, ports: bool = False
) -> tuple[int, int]:
    """The shut-off guest again, with an SMBIOS UUID and/or a fixed VNC port and TCP serial."""
    root = ET.fromstring(xml)
    vnc, serial = _free_port(5900), _free_port(24000)
    if sysinfo:
        info = ET.SubElement(root, "sysinfo", type="smbios")
        ET.SubElement(ET.SubElement(info, "system"), "entry", name="uuid").text = root.findtext(
            "uuid"
        )
        os_el = root.find("os")
        assert os_el is not None
        ET.SubElement(os_el, "smbios", mode="sysinfo")
    if ports:
        devices = root.find("devices")
        assert devices is not None
        ET.SubElement(
            devices, "graphics", type="vnc", port=str(vnc), autoport="no", listen="127.0.0.1"
        )
        tcp = ET.SubElement(devices, "serial", type="tcp")
        ET.SubElement(tcp, "source", mode="bind", host="127.0.0.1", service=str(serial))
        ET.SubElement(tcp, "protocol", type="raw")
        ET.SubElement(tcp, "target", port="1")
    libvirt_conn.defineXML(ET.tostring(root, encoding="unicode"))
    return vnc, serial


def test_case_04_a_clone_of_a_guest_with_an_smbios_uuid_is_defined_and_boots(
    gs: GS, guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect
) -> None:
    original = guest_factory("smbios", start=False)
    _redefine_with(libvirt_conn, original.live_xml(libvirt.VIR_DOMAIN_XML_INACTIVE), sysinfo=True)
    gs.job("s", [original])
    assert gs.engine.run_job("s").ok
    clone_name = original.name + "-c"
    guest_factory.adopt(clone_name)

    proc = gs.cli("restore", original.name, "1", clone_name, "--start")

    assert proc.returncode == 0, proc.stderr
    clone = libvirt_conn.lookupByName(clone_name)
    assert clone.isActive()
    [entry] = ET.fromstring(clone.XMLDesc(0)).findall("./sysinfo/system/entry[@name='uuid']")
    assert entry.text == clone.UUIDString() != original.dom.UUIDString()
    boot_counter(_console_path(clone.XMLDesc(0)))


def test_case_05_a_clone_with_a_fixed_vnc_port_and_tcp_serial_starts_beside_the_original(
    gs: GS, guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect
) -> None:
    original = guest_factory("ports", start=False)
    xml = original.live_xml(libvirt.VIR_DOMAIN_XML_INACTIVE)
    vnc, serial = _redefine_with(libvirt_conn, xml, ports=True)
    original.start()
    before = original.console_size()
    gs.job("p", [original])
    assert gs.engine.run_job("p").ok
    at_shutdown = shutdown_counter(original, before)
    assert original.is_running()
    clone_name = original.name + "-c"
    guest_factory.adopt(clone_name)

    proc = gs.cli("restore", original.name, "1", clone_name, "--start")

    assert proc.returncode == 0, proc.stderr
    clone = libvirt_conn.lookupByName(clone_name)
    live = ET.fromstring(clone.XMLDesc(0))
    assert clone.isActive() and original.is_running()
    assert boot_counter(_console_path(clone.XMLDesc(0))) == at_shutdown
    graphics = live.find("./devices/graphics")
    assert graphics is not None and graphics.get("autoport") == "yes"
    assert graphics.get("port") != str(vnc)
    [tcp] = [s for s in live.findall("./devices/serial") if s.get("type") == "tcp"]
    source = tcp.find("source")
    assert source is not None and source.get("service") not in (None, str(serial))
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note: ")]
    assert any("vnc display" in n and f"port {vnc}" in n for n in notes), proc.stdout
    assert any(f"original's port {serial}" in n for n in notes), proc.stdout
