"""qcow2 backing chains of real guests (issue 11): both chain modes, backed up,
verified, restored as a clone that boots and reads every layer."""

from __future__ import annotations

import json
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from rig import DiskSpec, GuestFactory, TestGuest, read_first_line
from rig.gs import BOOT, GS, shutdown_counter, wait_counted_past

pytestmark = pytest.mark.integration

BASE_LINE = "ONLY-IN-THE-BASE-LAYER"
VDB_LINE = re.compile(r"GS-VDB (.*)")


def _qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def _chain(path: Path) -> list[dict[str, object]]:
    return list(json.loads(_qemu_img("info", "--backing-chain", "--output=json", "-U", str(path))))


def _make_overlays(guest: TestGuest) -> None:
    """Turn every disk of the (shut off) guest into an overlay on its former self."""
    for disk in guest.disks.values():
        base = disk.path.with_name(f"{disk.target}-base.qcow2")
        disk.path.rename(base)
        _qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(disk.path))


def _chained_guest(guest_factory: GuestFactory) -> tuple[TestGuest, int]:
    """A running guest whose vda and vdb are overlays; vdb's line lives only in its base.

    Returns the guest and the counter its base layer holds.
    """
    guest = guest_factory("chain", disks=(DiskSpec("vda"), DiskSpec("vdb")), vdb_text=BASE_LINE)
    offset = guest.console_size()
    guest.shutdown()
    in_base = shutdown_counter(guest, offset)
    assert in_base > 0
    _make_overlays(guest)
    guest.start()
    return guest, in_base


def _console(xml: str) -> Path:
    source = ET.fromstring(xml).find("./devices/serial/source")
    assert source is not None
    return Path(source.get("path", ""))


def _boot_lines(console: Path, timeout: float = 90) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = console.read_text(errors="replace") if console.exists() else ""
        boot, vdb = BOOT.search(text), VDB_LINE.search(text)
        if boot and vdb and "GS-READY" in text:
            return int(boot.group(1)), vdb.group(1).strip()
        time.sleep(0.3)
    raise AssertionError(f"no GS-BOOT/GS-VDB on {console}")


def _disk_sources(xml: str) -> dict[str, Path]:
    found = {}
    for disk in ET.fromstring(xml).findall("./devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        assert target is not None and source is not None
        found[target.get("dev", "")] = Path(source.get("file", ""))
    return found


@pytest.mark.parametrize("chain", ["flatten", "keep"])
def test_overlay_backed_up_verified_and_restored_clone_reads_every_layer(
    chain: str, gs: GS, guest_factory: GuestFactory, libvirt_conn: libvirt.virConnect
) -> None:
    original, in_base = _chained_guest(guest_factory)
    before = original.console_size()
    gs.job("chains", [original], chain=chain)

    gs.cli("run", "chains", check=True)

    at_shutdown = shutdown_counter(original, before)
    assert at_shutdown > in_base  # the overlay holds newer data than the base
    assert original.is_running()
    (version,) = gs.versions(original)
    gs.cli("verify", original.name, "1", check=True)
    folder = version.path
    names = sorted(p.name for p in folder.iterdir() if p.name != "verified.json")
    summed = sorted(line.split("  ", 1)[1] for line in (folder / "B3SUMS").read_text().splitlines())
    assert summed == sorted(set(names) - {"manifest.json", "B3SUMS"})
    subprocess.run(["b3sum", "--check", "B3SUMS"], cwd=folder, check=True, capture_output=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    vda = folder / "vda.qcow2"
    if chain == "keep":
        assert {"vda.1.qcow2", "vdb.1.qcow2"} <= set(names)
        assert [c["file"] for d in manifest["disks"] for c in d["chain"]] == [
            "vda.1.qcow2",
            "vdb.1.qcow2",
        ]
        # The version folder alone is usable: the chain resolves inside it.
        layers = _chain(vda)
        assert [Path(str(layer["filename"])).parent for layer in layers] == [folder, folder]
        assert layers[0]["backing-filename"] == "vda.1.qcow2"
    else:
        assert not any(p.endswith(".1.qcow2") for p in names)
        assert all("chain" not in d for d in manifest["disks"])
        assert len(_chain(vda)) == 1  # standalone
        assert any("flattened from a chain of 2 files" in n for n in manifest["notes"])

    clone_name = original.name + "-c"
    guest_factory.adopt(clone_name)
    gs.cli("restore", original.name, "1", clone_name, "--start", check=True)

    clone_xml = libvirt_conn.lookupByName(clone_name).XMLDesc(0)
    counter, vdb_line = _boot_lines(_console(clone_xml))
    assert counter == at_shutdown  # the overlay's data
    assert vdb_line == BASE_LINE  # data only the base layer holds
    originals = {p.path for p in original.disks.values()}
    originals |= {p.path.with_name(f"{t}-base.qcow2") for t, p in original.disks.items()}
    for top in _disk_sources(clone_xml).values():
        files = {Path(str(layer["filename"])) for layer in _chain(top)}
        assert len(files) == (2 if chain == "keep" else 1)
        assert not files & originals  # the clone reads its own files only


def test_kept_chain_restored_over_the_original_boots_its_state(
    gs: GS, guest_factory: GuestFactory
) -> None:
    original, _in_base = _chained_guest(guest_factory)
    before = original.console_size()
    gs.job("chains", [original], chain="keep")
    gs.cli("run", "chains", check=True)
    at_backup = shutdown_counter(original, before)
    original.wait_for_console(r"^GS-READY", after=before)  # it hears the power button now
    wait_counted_past(original, at_backup, before)  # the counter runs on past the backup
    later = original.console_size()
    original.shutdown()
    assert shutdown_counter(original, later) > at_backup
    base = original.disks["vdb"].path.with_name("vdb-base.qcow2")
    base.write_bytes(b"")  # lost: only the version still holds this base

    gs.cli("restore", original.name, "1", "--overwrite", "--yes", check=True)

    layers = _chain(original.disks["vda"].path)
    assert [Path(str(layer["filename"])) for layer in layers] == [
        original.disks["vda"].path,
        original.disks["vda"].path.with_name("vda-base.qcow2"),
    ]
    offset = original.start()
    text = original.console_text(offset)
    assert BOOT.search(text) and int(BOOT.search(text).group(1)) == at_backup  # type: ignore[union-attr]
    assert f"GS-VDB {BASE_LINE}" in text


def test_kept_chain_over_the_original_refused_while_another_guest_reads_its_base(
    gs: GS, guest_factory: GuestFactory
) -> None:
    original, _in_base = _chained_guest(guest_factory)
    before = original.console_size()
    gs.job("chains", [original], chain="keep")
    gs.cli("run", "chains", check=True)
    original.wait_for_console(r"^GS-READY", after=before)  # it hears the power button now
    original.shutdown()
    base = original.disks["vda"].path.with_name("vda-base.qcow2")
    other = guest_factory("sharer", start=False)
    top = other.disks["vda"].path
    top.unlink()
    _qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    files = {p: p.read_bytes() for p in original.directory.glob("*.qcow2")}

    proc = gs.cli("restore", original.name, "1", "--overwrite", "--yes")

    assert proc.returncode == 9, proc.stderr
    assert f"{base} is also the backing file of disk vda of guest" in proc.stderr
    assert "restore as a new guest" in proc.stderr
    assert {p: p.read_bytes() for p in original.directory.glob("*.qcow2")} == files


def test_overlay_in_stop_short_is_written_flat_by_qemu(
    gs: GS, guest_factory: GuestFactory, workdir: Path
) -> None:
    original, _in_base = _chained_guest(guest_factory)
    gs.archive = workdir / f"archive-{original.name}"  # where QEMU may write (not 0700 tmp)
    gs.archive.mkdir(mode=0o700)
    gs.job("short", [original], mode="stop-short")

    gs.cli("run", "short", check=True)

    assert original.is_running()
    (version,) = gs.versions(original)
    assert version.manifest.mode == "stop-short"
    gs.cli("verify", original.name, "1", check=True)
    vdb = version.path / "vdb.qcow2"
    assert len(_chain(vdb)) == 1  # standalone: QEMU wrote the whole chain's data
    assert read_first_line(vdb, "qcow2") == BASE_LINE


def test_keep_in_stop_short_is_refused_before_the_guest_stops(
    gs: GS, guest_factory: GuestFactory
) -> None:
    original, _in_base = _chained_guest(guest_factory)
    before = original.console_size()
    gs.job("short", [original], mode="stop-short", chain="keep")

    proc = gs.cli("run", "short")

    assert proc.returncode == 5, proc.stderr
    assert "chain = keep needs mode stop" in proc.stderr
    assert original.is_running()
    assert "GS-POWEROFF" not in original.console_text(before)
    assert gs.versions(original) == [] and gs.partials() == []
