"""Cold backups of real TCG guests under qemu:///system."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import blake3
import pytest
from rig import DiskSpec, MiB, read_disk_counter, read_first_line
from rig.gs import GS, shutdown_counter

from guestsafe.engine.archive.manifest import Manifest

pytestmark = pytest.mark.integration


def chunk_lines(path: Path) -> list[str]:
    """The chunk table of ``path`` computed here: b3sum of each 4 MiB, ``hole`` for zeros."""
    lines = []
    with path.open("rb") as f:
        while piece := f.read(4 * MiB):
            zero = piece.count(0) == len(piece)
            lines.append("hole" if zero else blake3.blake3(piece).hexdigest())
    return lines


def test_running_guest_is_stopped_copied_and_running_again(gs: GS, guest_factory) -> None:
    guest = guest_factory("run")
    before = guest.console_size()
    gs.job("nightly", [guest])

    result = gs.engine.run_job("nightly")

    assert result.ok, result.outcomes
    assert guest.is_running()
    [version] = gs.versions(guest)
    assert version.number == 1 and version.verified is True
    backed_up = read_disk_counter(version.path / "vda.qcow2", "qcow2")
    assert backed_up == shutdown_counter(guest, before) > 0
    manifest: Manifest = version.manifest
    assert manifest.mode == "stop" and manifest.downtime is not None and manifest.downtime > 0
    assert (version.path / "domain.xml").stat().st_mode & 0o777 == 0o600
    # The guest boots from the disk it had: its counter goes on from the backed-up value.
    match = guest.wait_for_console(r"GS-BOOT counter=(\d+)", timeout=60, after=before)
    assert int(match.group(1)) == backed_up


def test_shut_off_guest_is_backed_up_and_stays_off(gs: GS, guest_factory) -> None:
    guest = guest_factory("off", start=False, vdb_text=None)
    gs.job("cold", [guest])

    result = gs.engine.run_job("cold")

    assert result.ok, result.outcomes
    assert not guest.is_running()
    [version] = gs.versions(guest)
    assert version.manifest.downtime is None


def test_qcow2_and_raw_disks_keep_their_formats(gs: GS, guest_factory) -> None:
    guest = guest_factory(
        "two",
        disks=(DiskSpec("vda", "raw", 32 * MiB), DiskSpec("vdb", "qcow2", 32 * MiB)),
        vdb_text="second disk says hello",
        start=False,
    )
    gs.job("two", [guest])

    assert gs.engine.run_job("two").ok

    [version] = gs.versions(guest)
    files = {d.target: d.file for d in version.manifest.disks}
    assert files == {"vda": "vda.raw", "vdb": "vdb.qcow2"}
    info = subprocess.run(
        ["qemu-img", "info", str(version.path / "vdb.qcow2")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.search(r"file format: qcow2", info)
    assert read_first_line(version.path / "vdb.qcow2", "qcow2") == "second disk says hello"
    # Holes stay holes: the raw copy allocates no more than the original.
    assert (version.path / "vda.raw").stat().st_blocks <= guest.disks["vda"].path.stat().st_blocks
    # Format 3: each disk's chunk table lies beside it, matches its bytes, is in B3SUMS.
    assert version.manifest.format == 3 and version.verified is True
    for disk in version.manifest.disks:
        assert disk.chunks is not None
        table = (version.path / disk.chunks.file).read_text().splitlines()
        assert table == chunk_lines(version.path / disk.file)
    check = ["b3sum", "--check", "B3SUMS"]
    subprocess.run(check, cwd=version.path, check=True, capture_output=True)


def test_retention_keeps_two_of_three_runs(gs: GS, guest_factory) -> None:
    guest = guest_factory("keep", start=False)
    gs.job("keep2", [guest], keep=2)

    for _ in range(3):
        assert gs.engine.run_job("keep2").ok

    assert [v.number for v in gs.versions(guest)] == [2, 3]


def test_verify_names_the_flipped_file_and_version(gs: GS, guest_factory) -> None:
    guest = guest_factory("flip", start=False, disks=(DiskSpec("vda", "raw", 16 * MiB),))
    gs.job("flip", [guest])
    assert gs.engine.run_job("flip").ok
    [version] = gs.versions(guest)
    target = version.path / "vda.raw"
    with target.open("r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x01]))

    proc = gs.cli("verify", guest.name, "--dest", str(gs.archive))

    assert proc.returncode == 8, proc.stderr
    assert f"version {version.number}" in proc.stdout
    assert "vda.raw" in proc.stdout


def test_guest_ignoring_acpi_under_abort_keeps_running_without_a_version(
    gs: GS, guest_factory
) -> None:
    guest = guest_factory("deaf", ignore_acpi=True)
    gs.job("deaf", [guest], shutdown_timeout=4, on_timeout="abort")

    result = gs.engine.run_job("deaf")

    assert not result.ok
    assert "did not shut down" in result.outcomes[0].message
    assert guest.is_running()
    assert gs.versions(guest) == [] and gs.partials() == []


def test_guest_ignoring_acpi_under_force_is_powered_off_and_backed_up(
    gs: GS, guest_factory
) -> None:
    guest = guest_factory("deafforce", ignore_acpi=True)
    gs.job("deafforce", [guest], shutdown_timeout=4, on_timeout="force")

    result = gs.engine.run_job("deafforce")

    assert result.ok, result.outcomes
    assert guest.is_running()
    [version] = gs.versions(guest)
    assert any("powered off" in note for note in version.manifest.notes)
    assert "WARNING" in result.log_path.read_text()


def test_group_stops_in_order_and_starts_in_reverse(gs: GS, guest_factory) -> None:
    first = guest_factory("grpa")
    second = guest_factory("grpb")
    gs.job("group", [first, second], group=True)

    result = gs.engine.run_job("group")

    assert result.ok, result.outcomes
    assert first.is_running() and second.is_running()
    phases = re.findall(r" PHASE (\S+) (\S+)", result.log_path.read_text())
    order = [(g, p) for g, p in phases if p in ("shutdown", "copy", "start")]
    a, b = first.name, second.name
    assert order == [
        (a, "shutdown"),
        (b, "shutdown"),
        (a, "copy"),
        (b, "copy"),
        (b, "start"),
        (a, "start"),
    ]


def test_overlay_whose_base_is_gone_is_refused_before_the_guest_stops(
    gs: GS, guest_factory
) -> None:
    # Overlays are saved with their chain (test_chains_live.py); one whose backing
    # file cannot be opened any more (deleted while QEMU holds it) cannot be.
    guest = guest_factory("overlay", start=False)
    vda = guest.disks["vda"].path
    base = vda.with_name("base.qcow2")
    vda.rename(base)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(vda)],
        check=True,
    )
    guest.start()
    base.unlink()
    gs.job("overlay", [guest])

    result = gs.engine.run_job("overlay")

    assert not result.ok
    assert "backing chain" in result.outcomes[0].message
    assert "missing or moved" in result.outcomes[0].message
    assert guest.is_running()
    assert gs.versions(guest) == []
