"""Issue 12, cases 1, 2 and 3: restore over the original of a real guest.

The rig's guests keep a counter on vda and print it at boot, so a boot after a
crash shows which data the guest has: the version's, or its own newer one.
"""

from __future__ import annotations

import signal

import libvirt
import pytest
from rig import DiskSpec, GuestFactory, MiB, TestGuest
from rig.gs import BOOT, GS, fill_random, shutdown_counter, wait_counted_past, wait_stderr

pytestmark = pytest.mark.integration

TWO_DISKS = (DiskSpec("vda", "qcow2", 64 * MiB), DiskSpec("vdb", "raw", 16 * MiB))


def _backed_up_then_counted_on(gs: GS, guest: TestGuest) -> tuple[int, int]:
    """Version 1 of the running guest, then more counting and a shutdown: both counters."""
    before = guest.console_size()
    gs.job("over", [guest])
    assert gs.engine.run_job("over").ok
    backed_up = shutdown_counter(guest, before)
    return backed_up, _count_on_and_shut_down(guest, backed_up, before)


def _count_on_and_shut_down(guest: TestGuest, above: int, after: int) -> int:
    """Let the guest's latest boot (after console offset ``after``) count past ``above``."""
    if not guest.is_running():
        after = guest.start()
    wait_counted_past(guest, above, after)
    offset = guest.console_size()
    guest.shutdown()
    newer = shutdown_counter(guest, offset)
    assert newer > above
    return newer


def _boot_counter(guest: TestGuest) -> tuple[int, int]:
    """Start the guest: the counter it boots with, and the console offset of this boot."""
    offset = guest.start()
    match = guest.wait_for_console(BOOT, timeout=60, after=offset)
    return int(match.group(1)), offset


def _leftovers(guest: TestGuest) -> list[str]:
    names = {d.path.name for d in guest.disks.values()}
    return sorted(
        p.name for p in guest.directory.iterdir() if any(n in p.name and p.name != n for n in names)
    )


# Each step a SIGKILL can hit, and whether recovery must finish the restore there.
STEPS = [
    ("copy.chunk", False),
    ("restore-over.copied", False),
    ("restore-over.swap", True),
    ("restore-over.linked", True),
    ("restore-over.swapped", True),
    ("restore-over.define", True),
    ("restore-over.cleanup", True),
]


def test_case_02_sigkill_at_each_step_then_any_command_then_a_boot_shows_whole_data(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("overkill", disks=TWO_DISKS)
    backed_up, current = _backed_up_then_counted_on(gs, guest)
    for point, restored in STEPS:
        proc = gs.popen(
            "restore", guest.name, "1", "--overwrite", "--yes",
            extra_env={"GUESTSAFE_FAILPOINTS": f"{point}=kill"},
        )  # fmt: skip
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == -signal.SIGKILL, (point, err)

        listed = gs.cli("list", guest.name)  # any command recovers first

        assert listed.returncode == 0, (point, listed.stderr)
        assert "recovered" in listed.stderr, (point, listed.stderr)
        assert _leftovers(guest) == [], point
        expected = backed_up if restored else current
        booted, offset = _boot_counter(guest)
        assert booted == expected, point
        current = _count_on_and_shut_down(guest, expected, offset)


def test_case_01_a_disk_another_guest_shares_is_refused_naming_it(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("shared", disks=TWO_DISKS, start=False)
    other = guest_factory("sharer", start=False)
    gs.job("over", [guest])
    assert gs.engine.run_job("over").ok
    vdb = guest.disks["vdb"].path
    disk = (
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        f"<source file='{vdb}'/><target dev='vdc' bus='virtio'/><shareable/></disk>"
    )
    other.dom.attachDeviceFlags(disk, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    before = vdb.stat().st_mtime_ns

    proc = gs.cli("restore", guest.name, "1", "--overwrite", "--yes")

    assert proc.returncode == 9, proc.stderr
    assert f"{vdb} is also used by guest '{other.name}'" in proc.stderr
    assert vdb.stat().st_mtime_ns == before and _leftovers(guest) == []


def test_case_03_a_start_during_the_copy_cancels_the_restore(
    gs: GS, guest_factory: GuestFactory
) -> None:
    disks = (DiskSpec("vda", "qcow2", 64 * MiB), DiskSpec("vdb", "raw", 48 * MiB))
    guest = guest_factory("overstart", disks=disks, start=False)
    fill_random(guest.disks["vdb"].path, 48 * MiB)  # a copy of several chunks
    guest.start()
    _backed_up, current = _backed_up_then_counted_on(gs, guest)

    proc = gs.popen(
        "restore", guest.name, "1", "--overwrite", "--yes",
        extra_env={"GUESTSAFE_FAILPOINTS": "copy.chunk=slow"},
    )  # fmt: skip
    wait_stderr(proc, "restoring vdb")
    offset = guest.start(wait_ready=False)
    _, err = proc.communicate(timeout=180)

    assert proc.returncode == 9, err
    assert "was started during the restore" in err
    match = guest.wait_for_console(BOOT, timeout=60, after=offset)
    assert int(match.group(1)) == current  # it booted its own disks, untouched
    assert _leftovers(guest) == []


def test_case_03_a_managed_save_image_is_refused_and_discarded_with_force(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("oversave", disks=TWO_DISKS)
    backed_up, _current = _backed_up_then_counted_on(gs, guest)
    guest.start()
    guest.dom.managedSave(0)
    assert guest.dom.hasManagedSaveImage(0)

    refused = gs.cli("restore", guest.name, "1", "--overwrite", "--yes")

    assert refused.returncode == 9, refused.stderr
    assert "saved memory image" in refused.stderr and "--force" in refused.stderr
    assert guest.dom.hasManagedSaveImage(0)

    forced = gs.cli("restore", guest.name, "1", "--overwrite", "--yes", "--force")

    assert forced.returncode == 0, forced.stderr
    assert not guest.dom.hasManagedSaveImage(0)
    assert _boot_counter(guest)[0] == backed_up  # a fresh boot of the version, not a resume
