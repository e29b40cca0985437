"""Item 5 on real TCG guests: a second stop-short backup reads only what changed.

The archive is a loop-mounted XFS with reflink, so each version starts as a clone
of the one before. Each doubt about the checkpoint chain gives a full read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from rig import GuestFactory, TestGuest, read_disk_counter
from rig.gs import BOOT, GS, shutdown_counter
from rig.scratch_fs import scratch_fs

from guestsafe.engine.archive.space import space_of

pytestmark = pytest.mark.integration


@pytest.fixture
def xgs(gs: GS, workdir: Path) -> Iterator[GS]:
    """gs with its archive on a fresh XFS (reflink) that QEMU can reach."""
    with scratch_fs(workdir, "xfs", 1024 * 1024 * 1024) as root:
        root.chmod(0o755)
        archive = root / "archive"
        archive.mkdir(mode=0o700)
        gs.archive = archive
        yield gs


def _run(gs: GS, job: str) -> str:
    result = gs.engine.run_job(job)
    assert result.ok, result.outcomes
    return result.log_path.read_text()


def test_second_stop_short_backup_is_incremental_and_restores_to_a_booting_clone(
    xgs: GS, guest_factory: GuestFactory, workdir: Path
) -> None:
    guest = guest_factory("incr")
    xgs.job("incr", [guest], mode="stop-short")
    first_log = _run(xgs, "incr")
    assert "reading every block: no earlier version" in first_log
    before = guest.console_size()
    second_run = xgs.engine.run_job("incr")
    assert second_run.ok, second_run.outcomes
    second_log = second_run.log_path.read_text()
    at_shutdown = shutdown_counter(guest, before)

    first, second = xgs.versions(guest)
    assert first.manifest.checkpoint is not None and first.manifest.checkpoint.based_on is None
    record = second.manifest.checkpoint
    assert record is not None
    assert (record.based_on, record.previous) == (first.manifest.checkpoint.name, first.number)
    assert "QEMU writes only what changed since checkpoint" in second_log
    assert second.verified is True
    assert read_disk_counter(second.path / "vda.qcow2", "qcow2") == at_shutdown > 0
    # The second version shares the first's unchanged clusters on the device.
    space = space_of([first.path, second.path])
    assert space.unique[second.path] < second.size / 2
    # The run counts as copied what QEMU wrote into the clone, not the whole file.
    assert 0 < second_run.outcomes[0].bytes_copied <= space.unique[second.path]
    # Only the newest checkpoint stays with the guest.
    assert [c.getName() for c in guest.dom.listAllCheckpoints(0)] == [record.name]

    clone = guest.name + "-clone"
    target = workdir / "clone-disks"
    target.mkdir()
    guest_factory.adopt(clone, target)
    archive = xgs.engine.archive(xgs.archive)
    plan = xgs.engine.plan_restore(archive, guest.name, second.number, clone, target_dir=target)
    xgs.engine.restore(plan, start=True)
    xml = xgs.engine.hv.xml(clone, inactive=False)
    source = ET.fromstring(xml).find("./devices/serial/source")
    assert source is not None
    from test_modes import _wait_console  # the same console wait as the other mode tests

    match = _wait_console(Path(source.get("path", "")), BOOT)
    assert int(match.group(1)) == at_shutdown


def test_a_deleted_checkpoint_or_a_replaced_disk_means_a_full_read(
    xgs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("incrdoubt")
    xgs.job("incrdoubt", [guest], mode="stop-short")
    _run(xgs, "incrdoubt")
    [first] = xgs.versions(guest)
    assert first.manifest.checkpoint is not None
    guest.dom.checkpointLookupByName(first.manifest.checkpoint.name, 0).delete(0)

    log = _run(xgs, "incrdoubt")
    assert "reading every block: libvirt has no checkpoint" in log
    second = xgs.versions(guest)[-1]
    assert second.manifest.checkpoint is not None
    assert second.manifest.checkpoint.based_on is None
    # A checkpoint begun by a run that then failed is a later one: a full read too.
    guest.dom.checkpointCreateXML(
        "<domaincheckpoint><name>guestsafe-stray</name></domaincheckpoint>", 0
    )
    log = _run(xgs, "incrdoubt")
    assert "is not the guest's latest" in log
    assert xgs.versions(guest)[-1].manifest.checkpoint.based_on is None  # type: ignore[union-attr]
    with pytest.raises(libvirt.libvirtError):
        guest.dom.checkpointLookupByName("guestsafe-stray", 0)  # dropped after the backup


def _run_then_ready(gs: GS, job: str, guest: TestGuest) -> str:
    """One run, then the guest booted again (a shutdown request before that is lost)."""
    offset = guest.console_size()
    log = _run(gs, job)
    guest.wait_for_console(r"^GS-READY", timeout=180, after=offset)
    return log


def _qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def test_an_incremental_version_is_a_standalone_qcow2_file(
    xgs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("incrfile")
    xgs.job("incrfile", [guest], mode="stop-short")
    _run(xgs, "incrfile")
    _run(xgs, "incrfile")
    second = xgs.versions(guest)[-1]
    assert second.manifest.checkpoint is not None and second.manifest.checkpoint.based_on
    info = json.loads(_qemu_img("info", "--output=json", str(second.path / "vda.qcow2")))
    assert "backing-filename" not in info  # QEMU's runtime backing never reached the header
    _qemu_img("check", str(second.path / "vda.qcow2"))


def test_a_replaced_disk_a_disabled_bitmap_or_an_unverified_version_means_a_full_read(
    xgs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("incrfile2")
    disk = guest.disks["vda"].path
    xgs.job("incrfile2", [guest], mode="stop-short")
    _run_then_ready(xgs, "incrfile2", guest)

    # The disk file replaced by a copy (as a restore by hand would), the guest off.
    guest.shutdown(timeout=120)
    copy = disk.with_suffix(".copy")
    shutil.copy2(disk, copy)
    os.replace(copy, disk)
    guest.start()
    log = _run_then_ready(xgs, "incrfile2", guest)
    assert "restored or replaced since" in log

    # A bitmap disabled outside guestsafe (it missed writes since).
    guest.shutdown(timeout=120)
    name = xgs.versions(guest)[-1].manifest.checkpoint.name  # type: ignore[union-attr]
    _qemu_img("bitmap", "--disable", str(disk), name)
    guest.start()
    log = _run_then_ready(xgs, "incrfile2", guest)
    assert "holds no intact bitmap" in log
    assert xgs.versions(guest)[-1].manifest.checkpoint.based_on is None  # type: ignore[union-attr]

    # A job that does not verify: its versions are never a base.
    xgs.job("incrfile2", [guest], mode="stop-short", verify=False)
    _run_then_ready(xgs, "incrfile2", guest)
    log = _run(xgs, "incrfile2")
    assert "is not verified" in log


def test_a_second_snapshot_backup_is_incremental_too(xgs: GS, guest_factory: GuestFactory) -> None:
    guest = guest_factory("incrsnap")
    xgs.job("incrsnap", [guest], mode="snapshot")
    _run(xgs, "incrsnap")
    log = _run(xgs, "incrsnap")
    first, second = xgs.versions(guest)
    assert "QEMU writes only what changed since checkpoint" in log
    assert second.manifest.checkpoint is not None
    assert second.manifest.checkpoint.based_on == first.manifest.checkpoint.name  # type: ignore[union-attr]
    assert second.verified is True and guest.is_running()
    assert read_disk_counter(second.path / "vda.qcow2", "qcow2") > 0


def test_without_reflink_no_checkpoint_is_begun_and_every_block_is_read(
    gs: GS, guest_factory: GuestFactory, workdir: Path
) -> None:
    with scratch_fs(workdir, "ext4", 512 * 1024 * 1024) as root:
        root.chmod(0o755)
        gs.archive = root / "archive"
        gs.archive.mkdir(mode=0o700)
        guest = guest_factory("incrext4")
        gs.job("incrext4", [guest], mode="stop-short")
        _run_then_ready(gs, "incrext4", guest)
        log = _run(gs, "incrext4")
        assert "reading every block: the destination has no reflink" in log
        assert all(v.manifest.checkpoint is None for v in gs.versions(guest))
        assert guest.dom.listAllCheckpoints(0) == []
        for version in gs.versions(guest):
            assert read_disk_counter(version.path / "vda.qcow2", "qcow2") > 0
