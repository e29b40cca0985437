"""Issue 12, cases 8 and 19, against real guests and a real exFAT filesystem.

The fake-driven halves of these cases are in the unit tests; here the parts are real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from rig import DiskSpec, GuestFactory, MiB, require
from rig.gs import BOOT, GS, shutdown_counter
from rig.loopdisk import LoopDisks, Part, make_loop_disks

from guestsafe.engine.archive.store import MARKER
from guestsafe.engine.backup.journal import Journal
from guestsafe.engine.hypervisor import disk_files
from guestsafe.engine.locks import ARCHIVE_LOCK_FILE
from guestsafe.engine.sizes import SPACE_MARGIN, byte_size

pytestmark = pytest.mark.integration


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[LoopDisks]:
    yield from make_loop_disks(tmp_path)


def test_case_08_a_guest_powering_off_after_the_grace_is_started_by_the_next_command(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("lateoff", ignore_acpi=True)
    gs.job("lateoff", [guest], shutdown_timeout=5, on_timeout="abort")

    run = gs.cli("run", "lateoff")

    # The run's own watch (min(30 s, the timeout)) is over: the run has returned.
    assert run.returncode != 0, run.stderr
    assert "did not shut down within 5 s" in run.stderr, run.stderr
    assert guest.is_running(), run.stderr
    [entry] = Journal(gs.home / "state").entries()
    assert entry.phase == "shutdown" and entry.off_at is None  # kept for a late power-off

    # The guest acts on the request late, and stays off.
    guest.dom.destroy()
    guest.wait_until_state(libvirt.VIR_DOMAIN_SHUTOFF)
    counter = guest.read_counter()
    assert counter > 0
    offset = guest.console_size()

    listed = gs.cli("list", "--dest", str(gs.archive), check=True)

    # guestsafe, not the test, brought it back, and its counter carries on.
    assert guest.is_running(), listed.stderr
    assert "started again" in listed.stderr
    booted = guest.wait_for_console(BOOT, timeout=180, after=offset)
    assert int(booted.group(1)) >= counter
    guest.wait_for_console(r"^GS-READY", timeout=180, after=offset)
    assert Journal(gs.home / "state").entries() == []


def _exfat_mount(node: str, target: Path) -> None:
    options = f"rw,nosuid,nodev,noexec,uid={os.geteuid()},gid={os.getegid()},dmask=0077,fmask=0177"
    subprocess.run(
        ["mount", "-t", "exfat-fuse", "-o", options, "--", node, str(target)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_case_19_a_sparse_disk_too_big_for_an_exfat_destination_is_refused_before_the_stop(
    gs: GS, guest_factory: GuestFactory, disks: LoopDisks, tmp_path: Path
) -> None:
    require(
        shutil.which("mount.exfat-fuse") or os.path.exists("/sbin/mount.exfat-fuse"),
        "exfat-fuse (mount.exfat-fuse) is not installed",
    )
    part = disks(Part("exfat", 200, "GSEXSMALL")).partitions[0]
    dest = tmp_path / "exfatdest"
    dest.mkdir(mode=0o700)
    _exfat_mount(part.node, dest)
    try:
        disk_size = 256 * MiB
        guest = guest_factory("exfull", disks=(DiskSpec("vda", "raw", disk_size),))
        [vda] = guest.disk_paths
        st = os.stat(vda)
        assert st.st_size == disk_size
        free = disk_files.free_space(dest)
        # Smaller than the disk's full size, larger than what it holds (and the margin).
        assert st.st_blocks * 512 + SPACE_MARGIN < free < disk_size, (st.st_blocks, free)
        domain_id = guest.dom.ID()
        before = _tree(dest)
        gs.job("exfull", [guest], destination=dest)

        result = gs.cli("run", "exfull")

        assert result.returncode == 5, result.stderr  # refused before anything stopped
        need = f"need {byte_size(disk_size + SPACE_MARGIN)} on {dest}"
        assert need in result.stderr, result.stderr
        assert guest.is_running() and guest.dom.ID() == domain_id  # never stopped
        # Nothing of the guest was written: the job opened the archive (its marker and
        # lock file, both tiny) before the refusal, and nothing else.
        assert set(_tree(dest)) - set(before) <= {MARKER, ARCHIVE_LOCK_FILE}, _tree(dest)
        # The free space the refusal names is what is left with those two in place.
        assert f"{byte_size(disk_files.free_space(dest))} free" in result.stderr, result.stderr
        assert Journal(gs.home / "state").entries() == []
        # Its counter kept running through the refused run.
        offset = guest.console_size()
        guest.shutdown(timeout=120)
        assert shutdown_counter(guest, offset) > 0
    finally:
        subprocess.run(["umount", str(dest)], check=False, capture_output=True, timeout=60)
