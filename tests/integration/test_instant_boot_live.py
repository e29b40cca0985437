"""Instant boot of real guests: a clone on overlays over a version, promote, discard."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from rig import GuestFactory, unique_name
from rig.gs import BOOT, GS, file_digests, shutdown_counter

pytestmark = pytest.mark.integration

COUNTER = r"GS-COUNTER (\d+)"


def _console(xml: str) -> Path:
    source = ET.fromstring(xml).find("./devices/serial/source")
    assert source is not None
    return Path(source.get("path", ""))


def _wait_console(console: Path, pattern: str, after: int = 0, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = console.read_bytes()[after:].decode(errors="replace") if console.exists() else ""
        match = re.search(pattern, text)
        if match:
            return match.group(1)
        time.sleep(0.3)
    raise AssertionError(f"no {pattern!r} on {console}")


def _macs(xml: str) -> list[str]:
    return [m.get("address", "") for m in ET.fromstring(xml).findall("./devices/interface/mac")]


def _owners(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {p.name: (p.stat().st_uid, p.stat().st_gid, p.stat().st_mode) for p in folder.iterdir()}


def _disk_files(xml: str) -> list[str]:
    root = ET.fromstring(xml)
    return [s.get("file", "") for s in root.iter("source") if s.get("file")]


def _backing_chain(path: str) -> list[dict[str, object]]:
    proc = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", path],
        capture_output=True,
        text=True,
        check=True,
    )
    found = json.loads(proc.stdout)
    return found if isinstance(found, list) else [found]


def test_boot_beside_the_original_then_retention_spares_it_then_discard(
    gs: GS, guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect
) -> None:
    original = guest_factory("ib")
    before = original.console_size()
    gs.job("ib", [original], keep=1)
    gs.cli("run", "ib", check=True)
    at_shutdown = shutdown_counter(original, before)
    version = gs.versions(original)[0]
    digests, owners = file_digests(version), _owners(version.path)
    clone_name = unique_name("ibnow")
    guest_factory.adopt(clone_name)
    assert original.is_running()  # started again after the backup

    began = time.monotonic()
    proc = gs.cli("boot", original.name, "1", clone_name, check=True)
    boot_seconds = time.monotonic() - began

    assert "booted" in proc.stdout
    clone = libvirt_conn.lookupByName(clone_name)
    assert clone.isActive() and original.is_running()
    assert not clone.autostart()
    clone_xml = clone.XMLDesc(0)
    assert int(_wait_console(_console(clone_xml), BOOT.pattern)) == at_shutdown
    assert clone.UUIDString() != original.dom.UUIDString()
    assert not set(_macs(clone_xml)) & set(original.macs)
    overlay = ET.fromstring(clone_xml).find("./devices/disk/source")
    assert overlay is not None
    chain = _backing_chain(overlay.get("file", ""))
    assert [Path(str(c["filename"])).parent for c in chain[1:]] == [version.path]
    assert boot_seconds < 60
    # QEMU reads the version; neither its bytes nor its owners changed (libvirt did
    # not chown them: QEMU reads through an ACL entry, which shows in the group bits).
    assert file_digests(version) == digests
    assert {n: o[:2] for n, o in _owners(version.path).items()} == {
        n: o[:2] for n, o in owners.items()
    }

    listed = gs.cli("list", original.name, check=True)
    assert f"in use by {clone_name}" in listed.stdout

    # A backup with keep=1 would delete version 1; the clone keeps it.
    second = gs.cli("run", "ib", check=True)
    numbers = [v.number for v in gs.versions(original)]
    assert numbers == [1, 2] or numbers == [2, 1]
    log = Path(re.findall(r"^log: (.+)$", second.stderr, re.M)[-1]).read_text()
    assert f"retention keeps version 1: in use by {clone_name}" in log

    # Only a clone guestsafe booted may be discarded.
    refused = gs.cli("boot", "--discard", original.name)
    assert refused.returncode == 9 and "not an instant-boot clone" in refused.stderr
    assert original.is_running()

    gs.cli("boot", "--discard", clone_name, check=True)

    assert clone_name not in [d.name() for d in libvirt_conn.listAllDomains()]
    assert not Path(overlay.get("file", "")).exists()
    assert not list((gs.home / "state" / "booted").glob("*.json"))
    assert file_digests(version) == digests
    assert _owners(version.path) == owners
    assert gs.cli("verify", original.name, "1", check=True).returncode == 0
    # Free again: the next prune lets it go.
    gs.cli("prune", "ib", check=True)
    assert [v.number for v in gs.versions(original)] == [2]


def test_promote_while_running_cuts_the_tie_to_the_archive(
    gs: GS, guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect
) -> None:
    original = guest_factory("ibp", start=False)
    gs.job("ibp", [original])
    gs.cli("run", "ibp", check=True)
    version = gs.versions(original)[0]
    digests = file_digests(version)
    clone_name = unique_name("ibprom")
    guest_factory.adopt(clone_name)
    gs.cli("boot", original.name, "1", clone_name, "--mac", "keep", check=True)
    clone = libvirt_conn.lookupByName(clone_name)
    console = _console(clone.XMLDesc(0))
    _wait_console(console, BOOT.pattern)
    assert _macs(clone.XMLDesc(0)) == original.macs  # kept: the original is off

    gs.cli("promote", clone_name, check=True)

    archive_path = str(version.path)
    for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
        xml = clone.XMLDesc(flags)
        assert not [f for f in _disk_files(xml) if f.startswith(archive_path)], xml
    for disk in _disk_files(clone.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)):
        if disk.endswith((".qcow2", ".raw")):
            assert len(_backing_chain(disk)) == 1  # standalone
    assert not list((gs.home / "state" / "booted").glob("*.json"))
    assert file_digests(version) == digests
    # The archive folder gone (renamed and unreadable): the clone runs on, counting.
    hidden = version.path.with_name(".hidden-1")
    os.rename(version.path, hidden)
    try:
        os.chmod(hidden, 0)
        offset = console.stat().st_size
        first = int(_wait_console(console, COUNTER, offset, timeout=90))
        offset = console.stat().st_size
        later = int(_wait_console(console, COUNTER, offset, timeout=90))
        assert later > first and clone.isActive()
    finally:
        os.chmod(hidden, 0o700)
        os.rename(hidden, version.path)
    # A promoted clone is an ordinary guest now: not guestsafe's to discard.
    refused = gs.cli("boot", "--discard", clone_name)
    assert refused.returncode == 9
