"""Issue 12, recovery and power state, against real guests and a real loop device.

The fake-driven halves of these cases are in tests/unit/test_recovery_cases.py.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from rig import GuestFactory
from rig.gs import GS, wait_stderr
from rig.loopdisk import LoopDisks, Part, make_loop_disks, mount_points

from guestsafe.engine.backup.journal import Journal

pytestmark = pytest.mark.integration


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[LoopDisks]:
    yield from make_loop_disks(tmp_path)


def test_case_12_recover_unmounts_the_device_a_killed_run_left_mounted(
    gs: GS, guest_factory: GuestFactory, disks: LoopDisks
) -> None:
    part = disks(Part("ext4", 128, "gsrecmount")).partitions[0]
    guest = guest_factory("recmount", start=False)  # off: its power state is not the point
    gs.job("recmount", [guest], device=part.spec)

    proc = gs.popen("run", "recmount", extra_env={"GUESTSAFE_FAILPOINTS": "copy.chunk=kill"})
    proc.wait(timeout=180)
    assert proc.returncode == -signal.SIGKILL
    assert mount_points(part.node) == [str(gs.archive)]  # the dead run left it mounted

    recovered = gs.cli("recover", check=True)

    assert not mount_points(part.node), recovered.stderr
    assert f"unmounted {part.node}" in recovered.stderr
    assert not guest.is_running()  # it was off before the job, and stays so
    assert not list((gs.home / "state" / "mounts").glob("*.json"))


def test_case_21_sigterm_in_the_shutdown_wait_ends_the_run_within_seconds(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("cancelwait", ignore_acpi=True)
    gs.job("cancelwait", [guest], shutdown_timeout=300, on_timeout="abort")
    dom_id = guest.dom.ID()

    proc = gs.popen("run", "cancelwait")
    wait_stderr(proc, "shutting down (timeout 300 s")
    time.sleep(2)  # well inside the wait
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)

    assert time.monotonic() - t0 < 15, err
    assert "cancelled during the shutdown wait" in err
    assert guest.is_running() and guest.dom.ID() == dom_id  # never went down
    logs = sorted((gs.home / "log").rglob("*.log"))
    assert "cancelled during the shutdown wait" in logs[-1].read_text()


def test_case_9_recover_waits_for_a_guest_the_dead_run_was_shutting_down(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("recwait")
    gs.job("recwait", [guest], shutdown_timeout=120)

    proc = gs.popen("run", "recwait", extra_env={"GUESTSAFE_FAILPOINTS": "shutdown.requested=kill"})
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    [entry] = Journal(gs.home / "state").entries()
    assert entry.phase == "shutdown"  # killed with the request in flight

    recovered = gs.cli("recover", check=True)

    assert guest.is_running(), recovered.stderr
    assert Journal(gs.home / "state").entries() == []
    # It stays up: nothing of the dead run powers it off later.
    time.sleep(5)
    assert guest.is_running()


def test_case_7_a_redefined_guest_is_left_off_said_once_and_started_on_request(
    gs: GS, guest_factory: GuestFactory
) -> None:
    guest = guest_factory("recdef")
    gs.job("recdef", [guest])
    proc = gs.popen("run", "recdef", extra_env={"GUESTSAFE_FAILPOINTS": "copy.chunk=kill"})
    proc.wait(timeout=180)
    assert proc.returncode == -signal.SIGKILL
    assert not guest.is_running()
    # The administrator redefines the guest before any guestsafe command runs.
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    xml = guest.dom.XMLDesc(flags)
    changed = xml.replace("</name>", "</name><description>kept off</description>", 1)
    guest.dom.connect().defineXML(changed)

    first = gs.cli("list", "--dest", str(gs.archive), check=True)
    second = gs.cli("list", "--dest", str(gs.archive), check=True)

    assert not guest.is_running()
    assert "redefined" in first.stderr and "guestsafe recover --start" in first.stderr
    assert "recover --start" not in second.stderr  # said once
    assert gs.partials() == []

    started = gs.cli("recover", "--start", check=True)

    assert guest.is_running(), started.stderr
    assert "started again" in started.stderr
    assert Journal(gs.home / "state").entries() == []
