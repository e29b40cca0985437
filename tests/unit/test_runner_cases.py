"""Issue 12 against the runner's fake hypervisor: exit codes (22), lock order (17),
busy guests (16) and libvirt errors (18)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
import test_runner_phases as phases

from guestsafe.engine import locks
from guestsafe.engine.backup import runner
from guestsafe.engine.devices import preflight
from guestsafe.engine.devices.mountinfo import MountEntry
from guestsafe.engine.errors import HypervisorError, RunFailed
from guestsafe.engine.hypervisor import disk_files
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import PAUSED, RUNNING
from guestsafe.engine.jobs import timers
from guestsafe.engine.jobs.model import Job, Schedule
from guestsafe.engine.jobs.timers import UnitSettings
from guestsafe.engine.sizes import SPACE_MARGIN
from guestsafe.tui.cli import build_parser

Rig = phases.Rig
MiB = phases.MiB


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def _exit_code_of(rig: Rig, result: phases.RunResult) -> int:
    with pytest.raises(RunFailed) as raised:
        result.raise_for_failure()
    assert raised.value.exit_code == result.exit_code
    return result.exit_code


# --- case 22: the most specific cause --------------------------------------------------


def test_case_22_a_cancelled_run_exits_130(rig: Rig) -> None:
    rig.add_guest("web1")
    cancel = threading.Event()
    cancel.set()

    result = rig.run(rig.job(["web1"]), cancel=cancel)

    assert _exit_code_of(rig, result) == 130


def test_case_22_a_refused_destination_exits_5(rig: Rig) -> None:
    rig.add_guest("web1")
    rig.archive.rmdir()

    result = rig.run(rig.job(["web1"]))

    assert _exit_code_of(rig, result) == 5


def test_case_22_a_guest_that_cannot_start_exits_4(rig: Rig) -> None:
    rig.add_guest("web1")
    rig.hv.refuse_start.add("web1")

    assert _exit_code_of(rig, rig.run(rig.job(["web1"]))) == 4


def test_case_22_mixed_causes_exit_with_the_highest_priority(rig: Rig) -> None:
    rig.add_guest("web1")
    rig.hv.refuse_start.add("web1")  # 4, hypervisor
    rig.add_guest("web2", state=PAUSED)  # 5, refused before anything stopped
    rig.add_guest("web3")  # fine

    result = rig.run(rig.job(["web1", "web2", "web3"]))

    assert [o.ok for o in result.outcomes] == [False, False, True]
    assert _exit_code_of(rig, result) == 5


def test_case_22_a_hook_failure_exits_11_and_success_0(rig: Rig) -> None:
    rig.add_guest("web1")
    assert rig.run(rig.job(["web1"])).exit_code == 0
    hooks = phases.Hooks({"post-start": rig.hook("post-start", exit_code=3)})

    result = rig.run(rig.job(["web1"], hooks=hooks))

    assert _exit_code_of(rig, result) == 11


# --- case 17: group jobs take their guest locks in one order ---------------------------

UUID_A = "00000000-0000-4000-8000-00000000000a"
UUID_B = "00000000-0000-4000-8000-00000000000b"


def _two_guests(rig: Rig) -> None:
    for name, uuid in (("beta", UUID_B), ("alpha", UUID_A)):
        rig.add_guest(name)
        rig.hv.guests[name].uuid = uuid


def _slow_guest_locks(monkeypatch: pytest.MonkeyPatch, taken: list[str]) -> None:
    """Each guest lock is held a moment before the next is asked for: a deadlock shows."""
    acquire = locks.acquire

    def slow(state_dir: Path, key: str, purpose: str, *, wait: float = 0.0) -> locks.Lock:
        lock = acquire(state_dir, key, purpose, wait=wait)
        if key.startswith("guest:"):
            taken.append(key)
            time.sleep(0.5)
        return lock

    monkeypatch.setattr(locks, "acquire", slow)


def test_case_17_group_jobs_lock_their_guests_in_one_canonical_order(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    _two_guests(rig)
    taken: list[str] = []
    _slow_guest_locks(monkeypatch, taken)
    other = rig.root / "archive2"
    other.mkdir(mode=0o700)
    forward = rig.job(["beta", "alpha"], group=True, lock_wait=20)
    backward = Job("weekly", ["alpha", "beta"], other, group=True, lock_wait=20)
    results: dict[str, phases.RunResult] = {}

    def run(job: Job) -> None:
        results[job.name] = rig.run(job)

    threads = [threading.Thread(target=run, args=(job,)) for job in (forward, backward)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert all(r.ok for r in results.values()), results
    assert time.monotonic() - started < 15  # nobody waited out lock_wait
    assert taken == [f"guest:{UUID_A}", f"guest:{UUID_B}"] * 2  # alpha's UUID first, always


# --- case 16: a person hears at once that a guest is busy; timers wait ------------------


def _hold_guest(rig: Rig, name: str) -> locks.Lock:
    key = locks.guest_key(rig.hv.guests[name].uuid)
    return locks.acquire(rig.paths.state_dir, key, "restore to web1-test")


def test_case_16_an_interactive_run_reports_a_busy_guest_at_once(rig: Rig) -> None:
    rig.add_guest("web1")
    rig.paths.ensure()
    job = rig.job(["web1"], lock_wait=30)

    with _hold_guest(rig, "web1"):
        started = time.monotonic()
        result = runner.run_job(job, rig._hv(), rig.paths, rig.report, interactive=True)
        waited = time.monotonic() - started

    assert waited < 5
    message = result.outcomes[0].message
    assert f"busy: guest web1 held by PID {os.getpid()} on " in message, message
    assert "(restore to web1-test); try again once it is free ('guestsafe run --wait'" in message
    assert result.exit_code == 5 and rig.calls() == []


def test_case_16_a_timer_run_waits_for_a_busy_guest(rig: Rig) -> None:
    rig.add_guest("web1")
    rig.paths.ensure()
    job = rig.job(["web1"], lock_wait=2)

    with _hold_guest(rig, "web1"):
        started = time.monotonic()
        result = rig.run(job)  # run-due and Engine.run_job's default: not interactive
        waited = time.monotonic() - started

    assert waited >= 2 and "gave up after 2 s" in result.outcomes[0].message


def test_case_16_the_cli_and_the_timers_choose_the_policy(tmp_path: Path) -> None:
    assert build_parser().parse_args(["run", "nightly"]).wait is False
    assert build_parser().parse_args(["run", "nightly", "--wait"]).wait is True
    settings = UnitSettings(timers.find_program(), tmp_path / "jobs.toml", "qemu:///system")
    job = Job("nightly", ["web1"], Path("/srv/backup"), schedule=Schedule("02:00"))
    service = timers.render_units(job, settings)["guestsafe-nightly.service"]
    [exec_line] = [line for line in service.splitlines() if line.startswith("ExecStart=")]
    assert exec_line.endswith('"run" "nightly" "--wait"')


# --- case 18: a libvirt error fails its guest only, and names it --------------------------


class _FlakyDomain:
    """A real test-driver domain whose shutdown and isActive fail as libvirt can."""

    def __init__(self, dom: Any) -> None:
        self._dom = dom

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dom, name)

    def shutdown(self) -> None:
        raise libvirt.libvirtError("Guest agent is not responding")

    def createWithFlags(self, flags: int) -> None:
        raise libvirt.libvirtError("internal error: process exited while connecting to monitor")

    def isActive(self) -> int:
        raise libvirt.libvirtError("Cannot recv data: Connection reset by peer")


@pytest.fixture
def flaky_hv(monkeypatch: pytest.MonkeyPatch) -> Iterator[Hypervisor]:
    """libvirt's own test driver, with guest 'test' failing the way a real one can."""
    hv = Hypervisor("test:///default")
    lookup = hv._domain
    monkeypatch.setattr(hv, "_domain", lambda name: _FlakyDomain(lookup(name)))
    try:
        yield hv
    finally:
        hv.close()


def test_case_18_the_hypervisor_names_the_guest_in_every_libvirt_error(
    flaky_hv: Hypervisor,
) -> None:
    with pytest.raises(HypervisorError, match=r"^cannot ask guest 'test' to shut down: Guest"):
        flaky_hv.shutdown("test", timeout=1)
    with pytest.raises(HypervisorError, match=r"^guest 'test': Cannot recv data"):
        flaky_hv.start("test")
    with pytest.raises(HypervisorError, match=r"^guest 'test': Cannot recv data"):
        flaky_hv.destroy("test")


class _RawErrorHypervisor(phases.FakeHypervisor):
    """A hypervisor that lets libvirt's own error out, as connection.py once did."""

    def shutdown(self, name: str, **options: Any) -> phases.ShutdownResult:
        if name == "web1":
            raise libvirt.libvirtError("Requested operation is not valid: domain is not running")
        return super().shutdown(name, **options)


@pytest.mark.parametrize("group", [False, True])
def test_case_18_a_libvirt_error_fails_its_guest_and_the_next_guest_still_runs(
    rig: Rig, group: bool
) -> None:
    rig.hv = _RawErrorHypervisor(rig.timeline)
    rig.add_guest("web1")
    rig.add_guest("web2")

    result = rig.run(rig.job(["web1", "web2"], group=group))

    first, second = result.outcomes
    assert not first.ok
    assert "guest 'web1', during shutdown: Requested operation is not valid" in first.message
    assert rig.hv.state("web1") == RUNNING and rig.hv.state("web2") == RUNNING
    if group:  # the group stops before anything is stopped
        assert not second.ok and rig.calls() == []  # web2 was never stopped
    else:
        assert second.ok, second.message
        assert rig.versions("web2") == [1]
    assert result.exit_code == 4


# --- case 19: no holes on FAT and exFAT, so the full size must fit ----------------------


def _filesystem(monkeypatch: pytest.MonkeyPatch, fstype: str, free: int) -> None:
    def mount_of(path: str) -> MountEntry:
        return MountEntry(1, 1, "/", "/", frozenset(), fstype, "/dev/sdz1")

    monkeypatch.setattr(preflight, "mount_containing", mount_of, raising=False)
    monkeypatch.setattr(disk_files, "free_space", lambda _directory: free)


@pytest.mark.parametrize(("fstype", "fits"), [("exfat", False), ("vfat", False), ("ext4", True)])
def test_case_19_the_free_space_check_counts_the_full_size_where_there_are_no_holes(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, fstype: str, fits: bool
) -> None:
    disk = rig.add_guest("web1", size=8 * MiB)  # half data, half hole
    allocated = disk.stat().st_blocks * 512
    assert allocated <= 5 * MiB
    _filesystem(monkeypatch, fstype, free=SPACE_MARGIN + allocated + MiB)  # < the full 8 MiB

    result = rig.run(rig.job(["web1"]))

    assert result.ok is fits, result.outcomes[0].message
    if not fits:
        assert "need 72.0 MiB on " in result.outcomes[0].message
        assert rig.calls() == [] and result.exit_code == 5  # refused before the stop


def test_case_19_a_share_of_unknown_kind_is_probed(tmp_path: Path) -> None:
    assert preflight._probe_holes(tmp_path) is True  # tmp_path keeps holes
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
