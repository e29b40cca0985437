"""Issue 7 against real TCG guests: damaged versions (case 8), a clone beside its
running original (10), a malicious archive (12), permissions and console
passwords (13), and a bad config that must not stop anyone (14).

Hostile guest names (11), and the finer points of 12 to 14, run on libvirt's
test driver in tests/unit/test_hostile_names.py, test_malicious_archive.py,
test_permissions.py and test_bad_config.py.
"""

from __future__ import annotations

import os
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import blake3
import libvirt
import pytest
from rig import DiskSpec, GuestFactory, MiB, TestGuest, unique_name
from rig.gs import GS

pytestmark = pytest.mark.integration

PASSWORD = "s3cr3tPw"  # VNC allows 8 characters


def _digest(path: Path) -> str:
    hasher = blake3.blake3()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return str(hasher.hexdigest())


def _flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def _domains(conn: libvirt.virConnect) -> dict[str, ET.Element]:
    return {
        dom.name(): ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        for dom in conn.listAllDomains()
    }


def _disk_files(xml: ET.Element) -> set[str]:
    return {s.get("file", "") for s in xml.findall("./devices/disk/source")} - {""}


def _macs(xml: ET.Element) -> list[str]:
    return [m.get("address", "") for m in xml.findall("./devices/interface/mac")]


# --- case 8 -------------------------------------------------------------------


def test_damaged_versions_need_force_and_retention_keeps_the_last_good_one(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory(
        "rot",
        start=False,
        disks=(DiskSpec("vda", "raw", 16 * MiB), DiskSpec("vdb", "raw", 8 * MiB)),
        vdb_text="this disk never changes",
    )
    gs.job("rot", [guest], keep=1)
    assert gs.engine.run_job("rot").ok  # version 1, verified
    gs.job("rot", [guest], keep=1, verify=False)
    assert gs.engine.run_job("rot").ok  # version 2, never verified
    assert [(v.number, v.verified) for v in gs.versions(guest)] == [(1, True), (2, None)]
    good = gs.versions(guest)[0]
    good_files = {p.name: _digest(p) for p in good.path.iterdir() if p.name != "verified.json"}

    # A bit flip in the never-verified version 2: the restore's own hash catches it.
    v2 = gs.versions(guest)[1]
    _flip_byte(v2.path / "vda.raw", 4096)
    clone = unique_name("rot-clone")
    guest_factory.adopt(clone)
    proc = gs.cli("restore", guest.name, "2", clone)
    assert proc.returncode == 8, proc.stderr
    assert f"vda.raw of {guest.name} version 2 does not match its manifest" in proc.stderr
    assert "restore it anyway with --force" in proc.stderr
    assert not gs.engine.hv.exists(clone)
    assert not list(guest.directory.glob(f"{clone}*"))  # the bad copy was removed
    proc = gs.cli("restore", guest.name, "2", clone, "--force")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: vda.raw of" in proc.stderr and "kept anyway (--force)" in proc.stderr
    assert gs.engine.hv.exists(clone)

    # verify names the file and the version, and records the failure...
    proc = gs.cli("verify", guest.name, "--dest", str(gs.archive))
    assert proc.returncode == 8
    assert f"{guest.name} version 1: ok" in proc.stdout
    # Format 3: the chunk table names the 4 MiB piece that holds the flipped byte.
    assert f"{guest.name} version 2: FAILED: vda.raw: chunk at offset 0 MiB (0)" in proc.stdout
    # ... which the next restore of it refuses without --force.
    clone2 = unique_name("rot-clone")
    guest_factory.adopt(clone2)
    proc = gs.cli("restore", guest.name, "2", clone2)
    assert proc.returncode == 9
    assert "failed its last verification; restore it anyway with --force" in proc.stderr
    assert not gs.engine.hv.exists(clone2)
    proc = gs.cli("restore", guest.name, "2", clone2, "--force")
    assert proc.returncode == 0, proc.stderr
    assert "failed its last verification; restoring anyway (--force)" in proc.stderr

    # Truncation of a never-verified version: restoring over the original refuses
    # and puts the original's disks back as they were.
    assert gs.engine.run_job("rot").ok
    v3 = gs.versions(guest)[-1]
    assert v3.number == 3
    os.truncate(v3.path / "vdb.raw", 4 * MiB)
    originals = {p: _digest(p) for p in guest.disk_paths}
    proc = gs.cli("restore", guest.name, "3", "--overwrite", "--yes")
    assert proc.returncode == 8, proc.stderr
    assert "vdb.raw of" in proc.stderr and "does not match its manifest" in proc.stderr
    assert {p: _digest(p) for p in guest.disk_paths} == originals
    assert not list(guest.directory.glob("*.guestsafe-aside"))
    proc = gs.cli("verify", guest.name, "3", "--dest", str(gs.archive))
    assert proc.returncode == 8
    assert f"{guest.name} version 3: FAILED: vdb.raw: size {4 * MiB} != {8 * MiB}" in proc.stdout

    # keep = 1 would leave version 4 alone; the last good version stays too.
    assert gs.engine.run_job("rot").ok
    assert [v.number for v in gs.versions(guest)] == [1, 4]
    assert {p.name: _digest(p) for p in good.path.iterdir() if p.name != "verified.json"} == (
        good_files
    )
    proc = gs.cli("verify", guest.name, "1", "--dest", str(gs.archive))
    assert proc.returncode == 0, proc.stdout


# --- case 10 ------------------------------------------------------------------


def test_clone_restored_while_the_original_runs_leaves_it_untouched(
    gs: GS, guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect
) -> None:
    original = guest_factory(
        "uefi",
        nvram=True,
        start=False,
        interfaces=2,
        disks=(DiskSpec("vda", "qcow2", 32 * MiB), DiskSpec("vdb", "raw", 16 * MiB)),
        vdb_text="the original's data disk",
    )
    # libvirt makes the NVRAM file at the first start; then back it up shut off.
    original.start(wait_ready=False)
    original.dom.destroy()
    gs.job("uefi", [original])
    assert gs.engine.run_job("uefi").ok
    original.start(timeout=240)  # UEFI under TCG: slow, but running for real
    vdb = original.disks["vdb"].path
    vdb_before = _digest(vdb)
    xml_before = original.live_xml(libvirt.VIR_DOMAIN_XML_INACTIVE)
    clone = unique_name("uefi-clone")
    guest_factory.adopt(clone)

    proc = gs.cli("restore", original.name, "1", clone)

    assert proc.returncode == 0, proc.stderr
    assert original.is_running()
    assert _digest(vdb) == vdb_before
    assert original.live_xml(libvirt.VIR_DOMAIN_XML_INACTIVE) == xml_before
    domains = _domains(libvirt_conn)
    mine, rest = domains[clone], [x for n, x in domains.items() if n != clone]
    assert mine.findtext("name") == clone
    assert mine.findtext("uuid") not in {x.findtext("uuid") for x in rest}
    macs = _macs(mine)
    assert len(macs) == 2 and len(set(macs)) == 2
    assert not set(macs) & {m for x in rest for m in _macs(x)}
    disks = _disk_files(mine)
    assert len(disks) == 2 and not disks & {f for x in rest for f in _disk_files(x)}
    assert all(Path(f).is_file() for f in disks)
    nvram = mine.findtext("./os/nvram")
    assert nvram and nvram != str(original.nvram_path) and Path(nvram).is_file()
    assert nvram not in {x.findtext("./os/nvram") for x in rest}
    clone_vdb = next(f for f in disks if f.endswith("vdb.raw"))
    assert _digest(Path(clone_vdb)) == vdb_before
    # Nothing is shared: QEMU locks every image, so a shared one would refuse to start.
    dom = libvirt_conn.lookupByName(clone)
    dom.create()
    assert dom.isActive() and original.is_running()
    dom.destroy()


# --- case 12 ------------------------------------------------------------------


def test_retention_and_recovery_never_follow_symlinks_out_of_the_archive(
    gs: GS, guest_factory: GuestFactory, tmp_path: Path
) -> None:
    guest = guest_factory("links", start=False, disks=(DiskSpec("vda", "raw", 8 * MiB),))
    gs.job("links", [guest], keep=1)
    assert gs.engine.run_job("links").ok
    [v1] = gs.versions(guest)
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"an operator's file, not the archive's\n" * 1000)
    outside_dir = tmp_path / "outside-dir"
    outside_dir.mkdir()
    (outside_dir / "keep.txt").write_text("keep\n")
    before = _digest(outside)
    (v1.path / "planted-file").symlink_to(outside)
    (v1.path / "planted-dir").symlink_to(outside_dir)
    guest_dir = v1.path.parent
    (guest_dir / ".partial-7").symlink_to(outside_dir)
    (guest_dir / ".deleting-8").mkdir(mode=0o700)
    (guest_dir / ".deleting-8" / "planted").symlink_to(outside)

    proc = gs.cli("verify", guest.name, "1", "--dest", str(gs.archive))
    assert proc.returncode == 8 and "planted-file is a symlink" in proc.stdout
    clone = unique_name("links")
    guest_factory.adopt(clone)  # case 20: the restored guest goes with the test's others
    proc = gs.cli("restore", guest.name, "1", clone, "--force")
    assert proc.returncode == 0, proc.stderr  # the version's own files are plain files
    # The run first clears the planted leftovers, then retention removes version 1,
    # links and all.
    assert gs.engine.run_job("links").ok
    assert gs.engine.archive(gs.archive).recover() == []  # nothing left to clear

    assert [v.number for v in gs.versions(guest)] == [2]
    assert sorted(p.name for p in guest_dir.iterdir()) == ["2", "last-version"]
    assert _digest(outside) == before
    assert (outside_dir / "keep.txt").read_text() == "keep\n"


# --- cases 13 and 14 ------------------------------------------------------------


def _no_shutdown(guest: TestGuest, since: int) -> bool:
    return guest.is_running() and "GS-POWEROFF" not in guest.console_text(since)


def test_refusals_never_stop_a_running_guest(
    gs: GS, guest_factory: GuestFactory, tmp_path: Path
) -> None:
    guest = guest_factory("refuse")
    since = guest.console_size()
    gs.job("refuse", [guest])
    logs = gs.engine.paths.log_dir

    # 13: a destination others could write into, or that someone else owns.
    for mode, reason in ((0o770, "writable by group or others"), (0o707, "writable by group")):
        gs.archive.chmod(mode)
        proc = gs.cli("run", "refuse")
        assert proc.returncode == 5 and reason in proc.stderr, proc.stderr
    gs.archive.chmod(0o700)
    os.chown(gs.archive, 65534, 65534)
    proc = gs.cli("run", "refuse")
    assert proc.returncode == 5 and "belongs to uid 65534" in proc.stderr, proc.stderr
    os.chown(gs.archive, 0, 0)
    assert _no_shutdown(guest, since) and list(gs.archive.iterdir()) == []

    # 14: a config that is wrong: one line naming job and field, exit 2, no run log.
    regular = Path("/dev/shm") / f"guestsafe-test-{uuid.uuid4().hex[:8]}"
    regular.write_bytes(b"not a disk\n")
    head = f'[jobs.refuse]\nguests = ["{guest.name}"]\ndestination = "{gs.archive}"\n'
    bad = {
        head.replace("]\ndest", "\ndest", 1): "not valid TOML",
        head + "kepp = 3\n": "job 'refuse': unknown key 'kepp'",
        head + "keep = 0\n": "job 'refuse': keep must be at least 1, not 0",
        head + 'time = "25:00"\n': "job 'refuse': time must be",
        head + f'device = "{regular}"\n': f"job 'refuse': device {regular} is not a block device",
    }
    logs_before = sorted(logs.iterdir())
    try:
        for text, expected in bad.items():
            gs.engine.paths.config_file.write_text(text)
            proc = gs.cli("run", "refuse")
            assert proc.returncode == 2, proc.stderr
            [line] = proc.stderr.strip().splitlines()
            assert line.startswith("guestsafe: Invalid configuration:") and expected in line
    finally:
        regular.unlink()
    assert sorted(logs.iterdir()) == logs_before
    assert _no_shutdown(guest, since) and list(gs.archive.iterdir()) == []


def test_console_password_stays_in_the_versions_domain_xml(
    gs: GS, guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect, tmp_path: Path
) -> None:
    guest = guest_factory("vnc", start=False)
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    xml = ET.fromstring(guest.dom.XMLDesc(flags))
    devices = xml.find("devices")
    assert devices is not None
    ET.SubElement(
        devices,
        "graphics",
        type="vnc",
        port="-1",
        autoport="yes",
        listen="127.0.0.1",
        passwd=PASSWORD,
    )
    libvirt_conn.defineXML(ET.tostring(xml, encoding="unicode"))
    guest.start()
    gs.job("vnc", [guest])
    clone = unique_name("vnc-clone")
    guest_factory.adopt(clone)

    outputs = []
    for args in (
        ("run", "vnc"),
        ("list",),
        ("verify",),
        ("jobs",),
        ("guests",),
        ("restore", guest.name, "1", clone),
    ):
        proc = gs.cli(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        outputs.append(proc.stdout + proc.stderr)
    assert guest.is_running()
    assert not [out for out in outputs if PASSWORD in out]

    [version] = gs.versions(guest)
    domain_xml = version.path / "domain.xml"
    assert PASSWORD in domain_xml.read_text()
    assert domain_xml.stat().st_mode & 0o777 == 0o600
    holders = [
        p
        for p in [*gs.home.rglob("*"), *gs.archive.rglob("*")]
        if p.is_file() and PASSWORD.encode() in p.read_bytes()
    ]
    assert holders == [domain_xml]
