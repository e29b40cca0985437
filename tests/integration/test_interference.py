"""Other hands on the same guest while guestsafe works on it."""

from __future__ import annotations

import os
import threading

import pytest
from rig import DiskSpec, GuestFactory, MiB
from rig.gs import GS, fill_random

from guestsafe.engine import locks
from guestsafe.engine.backup.results import RunResult
from guestsafe.engine.errors import LockBusy

pytestmark = pytest.mark.integration


def test_guest_started_from_outside_during_the_copy_discards_it(
    gs: GS, guest_factory: GuestFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest = guest_factory(
        "outside", disks=(DiskSpec("vda", "qcow2", 64 * MiB), DiskSpec("vdb", "raw", 96 * MiB))
    )
    guest.shutdown()
    fill_random(guest.disks["vdb"].path, 96 * MiB)
    guest.start()
    gs.job("outside", [guest])
    monkeypatch.setenv("GUESTSAFE_FAILPOINTS", "copy.chunk=slow")
    copying = threading.Event()
    results: list[RunResult] = []

    def reporter(event: object) -> None:
        if getattr(event, "phase", None) == "copy":
            copying.set()

    worker = threading.Thread(target=lambda: results.append(gs.engine.run_job("outside", reporter)))
    worker.start()
    assert copying.wait(120)
    guest.dom.create()  # an operator's `virsh start` in the middle of the copy
    worker.join(120)

    [result] = results
    assert not result.ok
    assert "started by someone else" in result.outcomes[0].message
    assert guest.is_running()
    assert gs.versions(guest) == [] and gs.partials() == []


def test_second_runner_on_the_same_guest_fails_fast_naming_the_holder(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("twice", start=False)
    gs.job("twice", [guest], lock_wait=0)
    key = f"guest:{guest.dom.UUIDString()}"

    with locks.acquire(gs.engine.paths.state_dir, key, "restore of web1 in the console"):
        result = gs.engine.run_job("twice")

    assert not result.ok
    message = result.outcomes[0].message
    assert f"PID {os.getpid()}" in message and "restore of web1 in the console" in message
    assert gs.versions(guest) == []


def test_restore_while_a_backup_holds_the_guest_fails_fast(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("rb", start=False)
    gs.job("rb", [guest])
    assert gs.engine.run_job("rb").ok
    key = f"guest:{guest.dom.UUIDString()}"
    archive = gs.engine.archive(gs.archive)
    plan = gs.engine.plan_restore(archive, guest.name, 1, guest.name + "-r")

    with (
        locks.acquire(gs.engine.paths.state_dir, key, "backup of job rb"),
        pytest.raises(LockBusy, match="backup of job rb"),
    ):
        gs.engine.restore(plan)
    assert not gs.engine.hv.exists(guest.name + "-r")
