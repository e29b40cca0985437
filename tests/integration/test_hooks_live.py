"""Hooks around real backups of real TCG guests under qemu:///system."""

from __future__ import annotations

import email
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rig import TestGuest
from rig.gs import GS
from rig.host import LIBVIRT_URI

from guestsafe.engine.jobs.model import HOOK_PHASES, Hooks

pytestmark = pytest.mark.integration

# Records its phase, every GUESTSAFE_ variable and the guest's state as libvirt
# sees it, then exits with the status given as its second argument.
RECORDER = f"""#!/usr/bin/python3
import json, os, subprocess, sys
record = {{k: v for k, v in os.environ.items() if k.startswith("GUESTSAFE_")}}
guest = record.get("GUESTSAFE_GUEST")
if guest:
    record["state"] = subprocess.run(
        ["virsh", "-c", "{LIBVIRT_URI}", "domstate", guest], capture_output=True, text=True
    ).stdout.strip()
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(record) + "\\n")
print("recorded", record["GUESTSAFE_PHASE"])
sys.exit(int(sys.argv[2]))
"""


class Recorder:
    """A hook program in a root-owned 0755 directory, and what it recorded."""

    def __init__(self, tmp_path: Path) -> None:
        directory = tmp_path / "hooks"
        directory.mkdir(mode=0o755)
        directory.chmod(0o755)
        self.program = directory / "record"
        self.program.write_text(RECORDER)
        self.program.chmod(0o755)
        self.log = tmp_path / "phases.jsonl"

    def hooks(self, failing: dict[str, int] | None = None, **only: bool) -> Hooks:
        """Every phase records; ``failing`` maps phases to their exit status."""
        failing = failing or {}
        phases = [p for p in HOOK_PHASES if not only or only.get(p.replace("-", "_"))]
        argv = {p: [str(self.program), str(self.log), str(failing.get(p, 0))] for p in phases}
        return Hooks(argv, timeout=60)

    def records(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def phases(self) -> list[str]:
        return [r["GUESTSAFE_PHASE"] for r in self.records()]


@pytest.fixture
def recorder(tmp_path: Path) -> Recorder:
    return Recorder(tmp_path)


def _powered_off_since(guest: TestGuest, offset: int) -> bool:
    return "GS-POWEROFF" in guest.console_text(offset)


def test_phase_order_and_environment(
    gs: GS, shared_guest: Callable[..., TestGuest], recorder: Recorder
) -> None:
    guest = shared_guest("hooks")
    gs.job("hooked", [guest], hooks=recorder.hooks())
    offset = guest.console_size()

    result = gs.engine.run_job("hooked")

    assert result.ok, result.outcomes
    assert guest.is_running()
    guest.wait_for_console(r"^GS-READY", timeout=60, after=offset)  # as the next test wants it
    [version] = gs.versions(guest)
    records = {r["GUESTSAFE_PHASE"]: r for r in recorder.records()}
    assert recorder.phases() == [
        "job-start",
        "pre-stop",
        "post-stop",
        "pre-start",
        "post-start",
        "backup-end",
        "job-end",
    ]
    for phase, record in records.items():
        assert record["GUESTSAFE_JOB"] == "hooked"
        assert record["GUESTSAFE_MODE"] == "stop"
        assert record["GUESTSAFE_STATUS"] == "ok"
        assert record["GUESTSAFE_GUESTS"] == guest.name
        own = phase not in ("job-start", "job-end")
        assert record["GUESTSAFE_GUEST"] == (guest.name if own else "")
    states = {p: records[p]["state"] for p in records if "state" in records[p]}
    assert states == {
        "pre-stop": "running",
        "post-stop": "shut off",
        "pre-start": "shut off",
        "post-start": "running",
        "backup-end": "running",
    }
    paths = {p: records[p]["GUESTSAFE_VERSION_PATH"] for p in records}
    assert paths["pre-stop"] == paths["post-stop"] == paths["job-start"] == ""
    assert Path(paths["pre-start"]).name == ".partial-1" == Path(paths["post-start"]).name
    assert paths["backup-end"] == str(version.path)
    # Their output is in the run's log, under the guest it belongs to.
    log = result.log_path.read_text()
    assert f"INFO {guest.name} hook post-start: recorded post-start" in log
    assert "INFO - hook job-end: recorded job-end" in log


def test_failing_pre_stop_leaves_the_guest_running_without_a_version(
    gs: GS, shared_guest: Callable[..., TestGuest], recorder: Recorder, tmp_path: Path
) -> None:
    guest = shared_guest("hooks")
    offset = guest.console_size()
    sendmail = _sendmail_stand_in(tmp_path)
    gs.engine.paths.config_file.parent.mkdir(parents=True, exist_ok=True)
    gs.engine.paths.config_file.write_text(
        f'[notify]\nmail_to = "ops@example.org"\nsendmail = "{sendmail}"\n'
    )
    gs.job("veto", [guest], hooks=recorder.hooks({"pre-stop": 1}))

    result = gs.engine.run_job("veto")

    assert not result.ok
    message = result.outcomes[0].message
    assert message.startswith("failed: backup vetoed: hook pre-stop")
    assert "exited with status 1; the guest was not stopped" in message
    assert guest.is_running() and not _powered_off_since(guest, offset)
    assert gs.versions(guest) == [] and gs.partials() == []
    assert recorder.phases() == ["job-start", "pre-stop", "backup-abort", "job-end"]
    abort, end = recorder.records()[2:]
    assert abort["GUESTSAFE_STATUS"] == "failed" and "vetoed" in abort["GUESTSAFE_ERROR"]
    assert end["GUESTSAFE_STATUS"] == "failed"
    # The failure was mailed, and saying so went to the run's log.
    mail = email.message_from_bytes((tmp_path / "mail.msg").read_bytes())
    assert mail["Subject"].startswith("guestsafe: job veto FAILED on ")
    assert "notify: ok: mail sent to ops@example.org" in result.log_path.read_text()


def test_failing_job_start_stops_no_guest(
    gs: GS, shared_guest: Callable[..., TestGuest], recorder: Recorder
) -> None:
    guest = shared_guest("hooks")
    offset = guest.console_size()
    gs.job("jobveto", [guest], hooks=recorder.hooks({"job-start": 3}))

    result = gs.engine.run_job("jobveto")

    assert not result.ok
    assert "hook job-start" in result.outcomes[0].message
    assert "no guest was stopped" in result.outcomes[0].message
    assert guest.is_running() and not _powered_off_since(guest, offset)
    assert list(gs.archive.iterdir()) == []  # the archive was not even opened
    assert recorder.phases() == ["job-start", "job-end"]


def test_failing_post_start_keeps_the_guest_running_and_the_version(
    gs: GS, shared_guest: Callable[..., TestGuest], recorder: Recorder
) -> None:
    guest = shared_guest("hooks")
    gs.job("thaw", [guest], hooks=recorder.hooks({"post-start": 1}))
    offset = guest.console_size()

    result = gs.engine.run_job("thaw")

    assert not result.ok
    [outcome] = result.outcomes
    assert outcome.message.startswith("failed: hook post-start (")
    assert "guest is running, version 1 committed" in outcome.message
    assert outcome.version == 1 and outcome.downtime is not None
    assert guest.is_running()
    guest.wait_for_console(r"^GS-READY", timeout=60, after=offset)  # as the next test wants it
    [version] = gs.versions(guest)
    assert version.verified is True
    phases = recorder.phases()
    assert phases[-2:] == ["backup-abort", "job-end"] and "backup-end" not in phases
    last = gs.engine.last_results()["thaw"]
    assert not last.ok and "hook post-start" in last.summary[0]


def test_world_writable_hook_refuses_the_job(
    gs: GS, shared_guest: Callable[..., TestGuest], recorder: Recorder
) -> None:
    guest = shared_guest("hooks")
    offset = guest.console_size()
    recorder.program.chmod(0o777)
    gs.job("open", [guest], hooks=recorder.hooks(pre_stop=True, job_start=True))

    proc = gs.cli("run", "open")

    assert proc.returncode == 11, proc.stderr
    expected = (
        f"job open refused: hooks.job-start: {recorder.program} is writable by group or "
        f"others (mode 0777); chmod go-w {recorder.program}"
    )
    assert expected in proc.stderr
    assert guest.is_running() and not _powered_off_since(guest, offset)
    assert list(gs.archive.iterdir()) == []
    assert recorder.phases() == []  # not even job-start ran


def _sendmail_stand_in(tmp_path: Path) -> Path:
    directory = tmp_path / "sbin"
    directory.mkdir(mode=0o755)
    path = directory / "sendmail"
    path.write_text(f"#!/bin/sh\ncat > {tmp_path / 'mail.msg'}\n")
    path.chmod(0o755)
    return path
