"""Unattended runs against real guests: run-due, timers from the CLI, busy guests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rig import GuestFactory, require
from rig.gs import GS

from guestsafe.engine import locks
from guestsafe.engine.jobs import schedule, timers
from guestsafe.engine.jobs.model import Hooks, Job, Schedule

pytestmark = pytest.mark.integration


def _scheduled_job(gs: GS, name: str, guest: str, minutes_ago: int) -> Job:
    """A job whose time came ``minutes_ago`` minutes ago, last run the day before."""
    now = datetime.now(UTC)
    local = (now - timedelta(minutes=minutes_ago)).astimezone(schedule.local_zone())
    job = Job(name, [guest], gs.archive, schedule=Schedule(local.strftime("%H:%M")), lock_wait=0)
    gs.engine.save_job(job)
    schedule.write_state(gs.engine.paths.state_dir, job, now - timedelta(days=1))
    return job


def test_run_due_runs_a_due_job_once_and_only_once(gs: GS, guest_factory: GuestFactory) -> None:
    guest = guest_factory("due", start=False)
    _scheduled_job(gs, "due", guest.name, minutes_ago=2)
    gs.job("manual", [guest])  # no time: never run by run-due

    first = gs.cli("run-due")
    second = gs.cli("run-due")

    assert first.returncode == 0, first.stderr
    assert re.fullmatch(r"job due \(due \d{4}-\d\d-\d\d \d\d:\d\d \S+\): ok\n", first.stdout)
    assert f"{guest.name}: ok: version 1" in first.stderr
    assert second.returncode == 0 and second.stdout == "" and second.stderr == ""
    assert [v.number for v in gs.versions(guest)] == [1]
    assert list(gs.engine.last_results()) == ["due"]


def test_run_due_is_quiet_for_a_job_not_due(gs: GS, guest_factory: GuestFactory) -> None:
    guest = guest_factory("notdue", start=False)
    job = _scheduled_job(gs, "notdue", guest.name, minutes_ago=2)
    # The last run started after the scheduled time: nothing is due.
    schedule.write_state(gs.engine.paths.state_dir, job, datetime.now(UTC))

    proc = gs.cli("run-due")

    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert not (gs.archive / "guestsafe-archive.json").exists()


HOLD = """#!/bin/sh
echo $$ > "$1"
exec sleep 120
"""


def test_busy_guest_waits_then_names_the_holder_and_a_killed_holder_blocks_nothing(
    gs: GS, guest_factory: GuestFactory, tmp_path: Path
) -> None:
    guest = guest_factory("busy")
    hooks_dir = tmp_path / "hooks"
    hooks_dir.mkdir(mode=0o755)
    hold = hooks_dir / "hold"
    hold.write_text(HOLD)
    hold.chmod(0o755)
    marker = tmp_path / "holding"
    gs.job("first", [guest], hooks=Hooks({"pre-stop": [str(hold), str(marker)]}, timeout=300))
    other = tmp_path / "other-archive"
    other.mkdir(mode=0o700)
    gs.engine.save_job(Job("second", [guest.name], other, lock_wait=3))
    gs.engine.save_job(Job("third", [guest.name], other, lock_wait=0))

    runner = gs.popen("run", "first")
    try:
        _wait_for(marker, runner)  # in pre-stop: it holds the guest's lock
        started = time.monotonic()
        result = gs.engine.run_job("second")
        waited = time.monotonic() - started
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        hook_pid = int(marker.read_text()) if marker.exists() else None
        if hook_pid:
            os.kill(hook_pid, signal.SIGKILL)

    assert not result.ok
    message = result.outcomes[0].message
    pattern = (
        rf"failed: busy: guest {re.escape(guest.name)} held by PID {runner.pid} on "
        rf"{re.escape(socket.gethostname())} since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d "
        r"\(backup of job first\); gave up after 3 s; "
    )
    assert re.match(pattern, message), message
    assert 3 <= waited < 30
    assert f"guest {guest.name} is busy (held by PID {runner.pid}" in result.log_path.read_text()
    # The SIGKILLed runner left its record in the lock file, but no lock.
    key = locks.guest_key(guest.dom.UUIDString())
    assert locks.lock_path(gs.engine.paths.state_dir, key).read_text()
    assert locks.holder(gs.engine.paths.state_dir, key) is None

    proc = gs.cli("run", "third")

    assert proc.returncode == 0, proc.stderr
    assert guest.is_running()
    assert [v.number for v in gs.engine.versions(other, guest.name)] == [1]


def test_busy_destination_waits_then_names_the_holder(gs: GS, guest_factory: GuestFactory) -> None:
    guest = guest_factory("dest", start=False)
    gs.job("dest", [guest], lock_wait=1)
    key = locks.destination_key(gs.archive)

    with locks.acquire(gs.engine.paths.state_dir, key, "restore in the console"):
        result = gs.engine.run_job("dest")

    assert not result.ok
    message = result.outcomes[0].message
    assert f"busy: destination {gs.archive} held by PID {os.getpid()} on " in message
    assert "(restore in the console); gave up after 1 s" in message
    assert gs.engine.run_job("dest").ok  # free again


def _wait_for(marker: Path, runner: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (marker.exists() and marker.read_text().strip()):
        if runner.poll() is not None:
            raise AssertionError(f"runner ended early: {runner.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError("the first runner never reached pre-stop")
        time.sleep(0.1)


def test_cli_installs_timers_systemd_accepts_and_edits_follow(
    gs: GS, guest_factory: GuestFactory, tmp_path: Path
) -> None:
    analyze = shutil.which("systemd-analyze")
    require(analyze, "systemd-analyze is not installed")
    guest = guest_factory("timer", start=False)
    unit_dir = tmp_path / "units"
    env = {timers.UNIT_DIR_ENV: str(unit_dir)}
    gs.engine.save_job(Job("nightly", [guest.name], gs.archive, schedule=Schedule("02:00")))

    proc = gs.cli("schedule", "install", extra_env=env, check=True)

    assert f"wrote {unit_dir}/guestsafe-nightly.timer" in proc.stdout
    assert "systemd was not reloaded" in proc.stdout
    units = [unit_dir / "guestsafe-nightly.timer", unit_dir / "guestsafe-nightly.service"]
    watch = [unit_dir / "guestsafe_timers.path", unit_dir / "guestsafe_timers.service"]
    verify = subprocess.run(
        [str(analyze), "verify", *map(str, units + watch)], capture_output=True, text=True
    )
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    service = units[1].read_text()
    assert f'"--config" "{gs.engine.paths.config_file}" "run" "nightly"' in service
    listing = gs.cli("jobs", extra_env=env, check=True).stdout
    assert re.search(r"nightly .* 02:00 +\w{3} \d{4}-\d\d-\d\d 02:00 \S+ +-", listing), listing

    # An edit from the console or the CLI follows into the installed timer.
    engine = gs.engine
    engine.unit_dir = unit_dir
    engine.save_job(
        Job("nightly", [guest.name], gs.archive, schedule=Schedule("03:30", ["sat", "sun"]))
    )
    assert "OnCalendar=Sat,Sun *-*-* 03:30:00" in units[0].read_text()
    assert engine.timer_states() == {"nightly": "installed"}

    proc = gs.cli("schedule", "remove", extra_env=env, check=True)
    assert not any(p.exists() for p in units + watch)
    assert "(timer missing)" in gs.cli("jobs", extra_env=env, check=True).stdout
