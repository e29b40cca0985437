"""stop-short and snapshot: push backups of real TCG guests under qemu:///system."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from guestsafe.engine.manifest import Manifest
from rig import DiskSpec, GuestFactory, MiB, read_disk_counter, read_first_line
from rig.gs import BOOT, GS, shutdown_counter

pytestmark = pytest.mark.integration


@pytest.fixture
def pgs(gs: GS, workdir: Path) -> GS:
    """gs with its archive where QEMU can reach it: pytest's own tmp dirs are 0700."""
    archive = workdir / "archive"
    archive.mkdir(mode=0o700)
    gs.archive = archive
    return gs


def _acl_users(path: Path) -> list[str]:
    """Named-user ACL entries of ``path`` (``user:64055:--x``)."""
    out = subprocess.run(
        ["getfacl", "--omit-header", "--numeric", "--absolute-names", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if re.match(r"user:\d+:", line)]


def test_stop_short_backs_up_the_clean_state_with_the_guest_back_before_the_copy(
    pgs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory(
        "short",
        disks=(DiskSpec("vda", "qcow2", 64 * MiB), DiskSpec("vdb", "raw", 64 * MiB)),
        vdb_text="raw disk of a stop-short guest",
    )
    before = guest.console_size()
    pgs.job("short", [guest], mode="stop-short")

    result = pgs.engine.run_job("short")

    assert result.ok, result.outcomes
    assert guest.is_running()
    [version] = pgs.versions(guest)
    manifest: Manifest = version.manifest
    assert manifest.mode == "stop-short" and version.verified is True
    assert manifest.downtime is not None and 0 < manifest.downtime < 60
    at_shutdown = shutdown_counter(guest, before)
    assert read_disk_counter(version.path / "vda.qcow2", "qcow2") == at_shutdown > 0
    assert read_first_line(version.path / "vdb.raw", "raw") == "raw disk of a stop-short guest"
    # The guest ran again before QEMU's copy was done, and the log says how long it was down.
    log = result.log_path.read_text()
    assert log.index("guest is running again") < log.index("QEMU copied the disks")
    assert re.search(rf"downtime {manifest.downtime:.1f} s", log)
    # QEMU's files are ordinary archive files: root's, 0600, no ACL; raw holes stay holes.
    for name in ("vda.qcow2", "vdb.raw"):
        st = (version.path / name).stat()
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600), name
    assert (version.path / "vdb.raw").stat().st_blocks * 512 <= 4 * MiB
    for folder in (pgs.archive, version.path.parent, version.path):
        assert _acl_users(folder) == [], folder
    assert {d.file for d in manifest.disks} == {"vda.qcow2", "vdb.raw"}
    proc = pgs.cli("verify", guest.name, "--dest", str(pgs.archive))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stop_short_version_restores_to_a_clone_booting_with_the_counter_at_shutdown(
    pgs: GS, guest_factory: GuestFactory, workdir: Path
) -> None:
    guest = guest_factory("shortrest")
    before = guest.console_size()
    pgs.job("sr", [guest], mode="stop-short")
    assert pgs.engine.run_job("sr").ok
    at_shutdown = shutdown_counter(guest, before)
    clone = guest.name + "-clone"
    target = workdir / "clone-disks"
    target.mkdir()
    guest_factory.adopt(clone, target)

    archive = pgs.engine.archive(pgs.archive)
    plan = pgs.engine.plan_restore(archive, guest.name, 1, clone, target_dir=target)
    pgs.engine.restore(plan, start=True)

    console = Path(_console_of(pgs, clone))
    match = _wait_console(console, BOOT)
    assert int(match.group(1)) == at_shutdown > 0


def _console_of(gs: GS, name: str) -> str:
    import xml.etree.ElementTree as ET

    xml = gs.engine.hv.xml(name, inactive=False)
    source = ET.fromstring(xml).find("./devices/serial/source")
    assert source is not None
    return source.get("path", "")


def _wait_console(path: Path, pattern: re.Pattern[str], timeout: float = 60) -> re.Match[str]:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        match = pattern.search(text)
        if match:
            return match
        time.sleep(0.2)
    raise AssertionError(f"no {pattern.pattern} on {path}")
