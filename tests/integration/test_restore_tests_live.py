"""Automatic restore tests of real TCG guests: a good version passes, a panicking one
fails and says so in the list, a guest agent's answer is the first sign and a pty
console's line the next, a test killed midway leaves nothing after recover, and
promote --target-dir moves a running clone's disks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from rig import GuestFactory, TestGuest, unique_name
from rig.gs import GS, file_digests

pytestmark = pytest.mark.integration

READY = "GS-READY"  # what the rig's init prints once it is up


def _clone_of(guest: TestGuest) -> str:
    return f"{guest.name}-restore-test"


def _domains(conn: libvirt.virConnect) -> list[str]:
    return [d.name() for d in conn.listAllDomains()]


def _record(gs: GS, guest: TestGuest) -> dict[str, object]:
    version = gs.versions(guest)[0]
    data = json.loads((version.path / "restore-test.json").read_text())
    assert isinstance(data, dict)
    return data


def _booted(gs: GS) -> list[Path]:
    return list((gs.home / "state" / "booted").glob("*.json"))


def _row(listing: str, guest: TestGuest) -> str:
    rows = [line for line in listing.splitlines() if line.startswith(guest.name + " ")]
    assert len(rows) == 1, listing
    return rows[0]


def _panic_at_boot(conn: libvirt.virConnect, guest: TestGuest) -> None:
    """Redefine the (shut off) guest so its kernel finds no init and panics."""
    root = ET.fromstring(guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    cmdline = root.find("./os/cmdline")
    assert cmdline is not None
    cmdline.text = f"{cmdline.text} rdinit=/gs-no-such-init init=/gs-no-such-init"
    conn.defineXML(ET.tostring(root, encoding="unicode"))


def test_a_good_version_passes_and_the_clone_is_gone(
    gs: GS, guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect
) -> None:
    original = guest_factory("rtok", start=False)
    gs.job("rtok", [original], restore_test_console=READY, restore_test_seconds=120)
    gs.cli("run", "rtok", check=True)
    guest_factory.adopt(_clone_of(original))
    version = gs.versions(original)[0]
    digests = file_digests(version)

    proc = gs.cli("test-restore", original.name, check=True)

    assert f"{original.name} version 1: restore test passed" in proc.stdout, proc.stderr
    record = _record(gs, original)
    assert record["ok"] is True and record["sign"] == "console"
    assert isinstance(record["seconds"], float) and 0 < record["seconds"] < 120
    assert _clone_of(original) not in _domains(libvirt_conn)
    assert not _booted(gs)
    # Nor its overlays or console file, beside the original's files.
    assert not list(original.console_log.parent.glob(f"{_clone_of(original)}-*"))
    # The record is beside the version, not in it: bytes, B3SUMS and verify unchanged.
    after = file_digests(version)
    assert after.pop("restore-test.json") and after == digests
    assert gs.cli("verify", original.name, "1", check=True).returncode == 0
    listed = _row(gs.cli("list", original.name, check=True).stdout, original)
    assert f"boot ok {round(float(record['seconds']))} s" in listed
    assert not original.is_running()  # the test never starts the original


def test_a_version_that_panics_fails_and_says_so(
    gs: GS, guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect
) -> None:
    original = guest_factory("rtbad", start=False)
    _panic_at_boot(libvirt_conn, original)
    gs.job(
        "rtbad",
        [original],
        restore_test="always",
        restore_test_console=READY,
        restore_test_seconds=120,
    )
    guest_factory.adopt(_clone_of(original))

    run = gs.cli("run", "rtbad")

    # The backup itself went well, but cron must hear of the failed test: 9, as below.
    assert run.returncode == 9, run.stderr
    assert f"restore test of {original.name} version 1: FAILED" in run.stderr
    assert "backup failed" not in run.stderr
    log = Path(re.findall(r"^log: (.+)$", run.stderr, re.M)[-1]).read_text()
    assert "restore test of" in log and "FAILED" in log, log
    record = _record(gs, original)
    assert record["ok"] is False and "panic" in str(record["problem"]).lower(), record
    assert _clone_of(original) not in _domains(libvirt_conn)
    assert not _booted(gs)
    assert "boot FAILED" in _row(gs.cli("list", original.name, check=True).stdout, original)

    again = gs.cli("test-restore", original.name, "1")

    assert again.returncode == 9
    last = again.stderr.strip().splitlines()[-1]
    assert "restore test FAILED" in last and original.name in last
    assert _clone_of(original) not in _domains(libvirt_conn)
    # A failed test deletes nothing.
    assert [v.number for v in gs.versions(original)] == [1]
    assert gs.cli("verify", original.name, "1", check=True).returncode == 0


def _silent_agent_on_a_pty(conn: libvirt.virConnect, guest: TestGuest) -> None:
    """Redefine the (shut off) guest: its agent responder off (the channel stays), and its
    serial console a pty that logs nowhere, as a guest made by virt-install has."""
    root = ET.fromstring(guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    cmdline = root.find("./os/cmdline")
    assert cmdline is not None
    cmdline.text = f"{cmdline.text} gs.agent=0"
    for dev in [*root.findall("./devices/serial"), *root.findall("./devices/console")]:
        dev.set("type", "pty")
        for source in dev.findall("source"):
            dev.remove(source)
    conn.defineXML(ET.tostring(root, encoding="unicode"))


def test_the_agent_answers_first_and_without_it_a_pty_console_line_does(
    gs: GS, guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect
) -> None:
    original = guest_factory("rtagent", start=False, agent_channel=True)
    # No console line: the agent is the only sign short of staying up 120 s.
    gs.job("rtagent", [original], restore_test_seconds=120)
    gs.cli("run", "rtagent", check=True)
    guest_factory.adopt(_clone_of(original))

    gs.cli("test-restore", original.name, "1", check=True)

    record = _record(gs, original)
    assert record["ok"] is True and record["sign"] == "agent", record
    assert isinstance(record["seconds"], float) and record["seconds"] < 60
    listed = _row(gs.cli("list", original.name, check=True).stdout, original)
    assert f"boot ok {round(record['seconds'])} s" in listed, listed

    # Version 2: the channel is there but nobody answers, and the console is a pty.
    _silent_agent_on_a_pty(libvirt_conn, original)
    gs.job("rtagent", [original], restore_test_console=READY, restore_test_seconds=120)
    gs.cli("run", "rtagent", check=True)

    gs.cli("test-restore", original.name, "2", check=True)

    version = next(v for v in gs.versions(original) if v.number == 2)
    record = json.loads((version.path / "restore-test.json").read_text())
    assert record["ok"] is True and record["sign"] == "console", record
    assert _clone_of(original) not in _domains(libvirt_conn) and not _booted(gs)
    # The console log the clone was given went with it; the original's XML has none.
    assert not list(original.directory.glob(f"{_clone_of(original)}-*"))
    assert "<log " not in original.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)


def test_a_clone_this_host_cannot_make_is_a_boot_error_not_a_failed_version(
    gs: GS, guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect
) -> None:
    original = guest_factory("rterr", start=False)
    gs.job("rterr", [original], restore_test_console=READY)
    gs.cli("run", "rterr", check=True)
    guest_factory.adopt(_clone_of(original))
    # The overlays go beside the original's disks; immutable, not even root writes there.
    subprocess.run(["chattr", "+i", str(original.directory)], check=True)
    try:
        proc = gs.cli("test-restore", original.name, "1")
    finally:
        subprocess.run(["chattr", "-i", str(original.directory)], check=True)

    assert proc.returncode == 9, proc.stderr
    assert "could not run (not the version's fault)" in proc.stderr.strip().splitlines()[-1]
    record = _record(gs, original)
    assert record["ok"] is False and record["error"] is True and record["sign"] is None
    assert "boot error" in _row(gs.cli("list", original.name, check=True).stdout, original)
    assert _clone_of(original) not in _domains(libvirt_conn) and not _booted(gs)


def test_a_test_killed_midway_leaves_no_clone_after_recover(
    gs: GS, guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect
) -> None:
    original = guest_factory("rtkill", start=False)
    gs.job("rtkill", [original], restore_test_seconds=600)  # no console line: waits it out
    gs.cli("run", "rtkill", check=True)
    clone = _clone_of(original)
    guest_factory.adopt(clone)
    proc = gs.popen("test-restore", original.name)
    try:
        deadline = time.monotonic() + 120
        while (
            clone not in _domains(libvirt_conn) or not libvirt_conn.lookupByName(clone).isActive()
        ):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.3)
        overlays = [
            s.get("file", "")
            for s in ET.fromstring(libvirt_conn.lookupByName(clone).XMLDesc(0)).findall(
                "./devices/disk/source"
            )
        ]
        # Cut off: every link of the clone is down.
        links = ET.fromstring(libvirt_conn.lookupByName(clone).XMLDesc(0)).findall(
            "./devices/interface/link"
        )
        assert links and all(link.get("state") == "down" for link in links)
        assert not libvirt_conn.lookupByName(clone).autostart()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert clone in _domains(libvirt_conn) and _booted(gs)  # what the dead test left

    gs.cli("recover", check=True)

    assert clone not in _domains(libvirt_conn)
    assert not _booted(gs)
    assert overlays and not any(Path(p).exists() for p in overlays)
    assert not (gs.versions(original)[0].path / "restore-test.json").exists()


def test_promote_into_a_target_dir_while_running(
    gs: GS, guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect, tmp_path: Path
) -> None:
    original = guest_factory("rtprom", start=False)
    target = guest_factory.workdir / "promoted"  # a directory QEMU's user can reach
    target.mkdir()
    gs.job("rtprom", [original])
    gs.cli("run", "rtprom", check=True)
    clone_name = unique_name("rtpnow")
    guest_factory.adopt(clone_name)
    gs.cli("boot", original.name, "1", clone_name, check=True)
    clone = libvirt_conn.lookupByName(clone_name)
    old = [
        s.get("file", "") for s in ET.fromstring(clone.XMLDesc(0)).findall("./devices/disk/source")
    ]

    refused = gs.cli("promote", clone_name, "--target-dir", str(gs.archive))
    assert refused.returncode == 9 and "inside the archive" in refused.stderr
    missing = gs.cli("promote", clone_name, "--target-dir", str(tmp_path / "nope"))
    assert missing.returncode == 9 and "does not exist" in missing.stderr
    assert clone.isActive() and _booted(gs)  # refused: nothing changed

    gs.cli("promote", clone_name, "--target-dir", str(target), check=True)

    assert clone.isActive()
    for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
        root = ET.fromstring(clone.XMLDesc(flags))
        files = [s.get("file", "") for s in root.findall("./devices/disk/source")]
        assert files and all(Path(f).parent == target for f in files), files
        for f in files:
            info = subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", f],
                capture_output=True,
                text=True,
                check=True,
            )
            assert "backing-filename" not in json.loads(info.stdout)
    assert not any(Path(p).exists() for p in old)
    assert not _booted(gs)


def test_promote_a_shut_off_clone_into_a_target_dir(
    gs: GS, guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect
) -> None:
    original = guest_factory("rtoff", start=False)
    target = guest_factory.workdir / "promoted-off"
    target.mkdir()
    gs.job("rtoff", [original])
    gs.cli("run", "rtoff", check=True)
    version = gs.versions(original)[0]
    digests = file_digests(version)
    clone_name = unique_name("rtoffnow")
    guest_factory.adopt(clone_name)
    gs.cli("boot", original.name, "1", clone_name, check=True)
    clone = libvirt_conn.lookupByName(clone_name)
    clone.destroy()

    gs.cli("promote", clone_name, "--target-dir", str(target), check=True)

    root = ET.fromstring(clone.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    files = [s.get("file", "") for s in root.findall("./devices/disk/source")]
    assert files and all(Path(f).parent == target for f in files), files
    assert not [s for s in root.iter("source") if str(version.path) in s.get("file", "")]
    assert file_digests(version) == digests and not _booted(gs)
    clone.create()  # it boots from its own file
    assert clone.isActive()


DISPLAY = (
    "<graphics type='vnc' autoport='yes' listen='127.0.0.1'/>",
    "<video><model type='vga'/></video>",
)
PPM_HEADER = re.compile(rb"P6\s+(\d+)\s+(\d+)\s+255\s")


def _with_display(conn: libvirt.virConnect, guest: TestGuest) -> None:
    """Redefine the (shut off) guest with a VNC display on a VGA card."""
    root = ET.fromstring(guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    devices = root.find("./devices")
    assert devices is not None
    for text in DISPLAY:
        devices.append(ET.fromstring(text))
    conn.defineXML(ET.tostring(root, encoding="unicode"))


def test_a_clone_with_a_display_leaves_a_screenshot_beside_the_record(
    gs: GS, guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect
) -> None:
    original = guest_factory("rtshot", start=False)
    _with_display(libvirt_conn, original)
    gs.job("rtshot", [original], restore_test_console=READY, restore_test_seconds=120)
    gs.cli("run", "rtshot", check=True)
    guest_factory.adopt(_clone_of(original))

    gs.cli("test-restore", original.name, check=True)

    record = _record(gs, original)
    assert record["ok"] is True and isinstance(record["screenshot"], str), record
    image = (gs.versions(original)[0].path / record["screenshot"]).read_bytes()
    size = PPM_HEADER.match(image) if image.startswith(b"P6") else None
    if size is not None:  # QEMU's PPM: a real frame of the VGA card's mode
        width, height = int(size.group(1)), int(size.group(2))
        assert width >= 320 and height >= 200 and len(image) >= width * height * 3
    else:
        assert image.startswith(b"\x89PNG\r\n\x1a\n"), image[:16]
    assert _clone_of(original) not in _domains(libvirt_conn)
    assert gs.cli("verify", original.name, "1", check=True).returncode == 0
