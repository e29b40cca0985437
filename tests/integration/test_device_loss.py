"""Fault case 4: the backup disk goes away in the middle of the copy.

This kernel has no device-mapper, so a dm-error swap is not available; the
loop device is shrunk to a fraction of its size under the mounted filesystem
instead (`truncate` of its image, then `losetup -c`), and every later write to
it fails with EIO, as writes to a pulled USB disk do.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rig import DiskSpec, GuestFactory, MiB
from rig.gs import GS, fill_random
from rig.loopdisk import LoopDisks, Part, make_loop_disks, mount_points

from guestsafe.engine.backup.results import RunResult
from guestsafe.engine.events import Event, LogLine

pytestmark = pytest.mark.integration


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[LoopDisks]:
    yield from make_loop_disks(tmp_path)


def test_device_vanishing_mid_copy_restarts_the_guest_and_the_next_run_works(
    gs: GS, guest_factory: GuestFactory, disks: LoopDisks, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = disks(Part("ext4", 384, "gsloss"))
    part = disk.partitions[0]
    guest = guest_factory(
        "loss",
        disks=(DiskSpec("vda", "qcow2", 64 * MiB), DiskSpec("vdb", "raw", 96 * MiB)),
        start=False,
    )
    fill_random(guest.disks["vdb"].path, 96 * MiB)
    guest.start()
    gs.job("usb", [guest], device=part.spec)
    offset = guest.console_size()
    assert gs.engine.run_job("usb").ok
    guest.wait_for_console(r"^GS-READY", timeout=60, after=offset)
    pristine = disk.image.with_name("pristine.img")
    shutil.copyfile(disk.image, pristine)  # the disk as it is unplugged, for the re-plug

    monkeypatch.setenv("GUESTSAFE_FAILPOINTS", "copy.chunk=slow")
    copying = threading.Event()
    results: list[RunResult] = []

    def reporter(event: Event) -> None:
        if isinstance(event, LogLine) and "copying vdb" in event.message:
            copying.set()

    began = time.monotonic()
    worker = threading.Thread(target=lambda: results.append(gs.engine.run_job("usb", reporter)))
    worker.start()
    assert copying.wait(120)
    with disk.image.open("r+b") as f:
        f.truncate(8 * MiB)
    subprocess.run(["losetup", "-c", disk.loop], check=True)
    worker.join(180)

    assert not worker.is_alive(), "the run hangs on the vanished device"
    assert time.monotonic() - began < 180
    [result] = results
    assert not result.ok
    assert guest.is_running()
    assert not mount_points(part.node), "the vanished device is still mounted"

    # Plugged in again (the same disk), the next run works and the old version is there.
    monkeypatch.delenv("GUESTSAFE_FAILPOINTS")
    disk.detach()
    shutil.copyfile(pristine, disk.image)
    disk.attach()
    offset = guest.console_size()
    again = gs.engine.run_job("usb")
    assert again.ok, again.outcomes
    assert guest.is_running()
    with gs.engine.device_archive(part.spec) as archive:
        numbers = [v.number for v in archive.versions(guest.name)]
        assert numbers[0] == 1 and numbers[-1] >= 2
        assert all(r.ok for r in archive.verify(guest.name))
