"""The StrEnums that stand for the choices in jobs.toml, manifest.json and the CLI.

Their values are the spellings the files and the command line have always used, so
a file written before the enums reads the same and one written now reads the same
with an older guestsafe.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from guestsafe.engine.archive.manifest import DiskRecord, Manifest
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.errors import JobConfigError
from guestsafe.engine.jobs.jobs_file import load_jobs, save_jobs
from guestsafe.engine.jobs.model import (
    HOOK_PHASES,
    MODES,
    ON_TIMEOUT,
    WEEKDAYS,
    HookPhase,
    Job,
    Weekday,
    as_choice,
)
from guestsafe.engine.jobs.timers import TimerState
from guestsafe.engine.jobs.validation import validate_job
from guestsafe.engine.modes import Mode, OnTimeout, label, parse_mode
from guestsafe.engine.notify import Delivery, delivery_of
from guestsafe.engine.restore.plan import KEEP, NEW, MacChoice


def test_the_spellings_are_the_files_and_the_clis() -> None:
    assert [m.value for m in Mode] == ["stop", "stop-short", "snapshot"]
    assert [t.value for t in OnTimeout] == ["abort", "force"]
    assert [m.value for m in MacChoice] == ["keep", "new"] and (KEEP, NEW) == ("keep", "new")
    assert [s.value for s in TimerState] == ["manual", "installed", "outdated", "missing"]
    assert [d.value for d in Delivery] == ["ok", "failed"]
    assert [w.value for w in Weekday] == ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    assert HOOK_PHASES[0] == HookPhase.JOB_START == "job-start"
    assert HOOK_PHASES[-1] == HookPhase.JOB_END == "job-end"
    assert (tuple(Mode), tuple(OnTimeout), tuple(Weekday)) == (MODES, ON_TIMEOUT, WEEKDAYS)


def test_parse_mode_takes_only_a_known_spelling() -> None:
    assert parse_mode("stop-short") is Mode.STOP_SHORT
    assert parse_mode("STOP") is None and parse_mode(3) is None and parse_mode(None) is None
    assert label(Mode.SNAPSHOT) == "snapshot (crash-consistent)"


def test_a_loaded_job_holds_members_and_saves_the_same_spelling(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(
        '[jobs.n]\nguests = ["web1"]\ndestination = "/srv"\n'
        'mode = "snapshot"\non_timeout = "force"\n'
    )
    [job] = load_jobs(path)
    assert job.mode is Mode.SNAPSHOT and job.on_timeout is OnTimeout.FORCE
    save_jobs(path, [job])
    text = path.read_text()
    assert 'mode = "snapshot"' in text and 'on_timeout = "force"' in text
    assert load_jobs(path) == [job]


def test_an_unknown_spelling_still_reaches_validation(tmp_path: Path) -> None:
    assert as_choice(Mode, "stop") is Mode.STOP
    assert as_choice(Mode, "freeze") == "freeze" and as_choice(Mode, 7) == 7
    path = tmp_path / "jobs.toml"
    path.write_text('[jobs.n]\nguests = ["web1"]\ndestination = "/srv"\nmode = "freeze"\n')
    with pytest.raises(JobConfigError, match="mode must be one of stop, stop-short, snapshot"):
        load_jobs(path)
    job = Job("n", ["web1"], Path("/srv"), on_timeout=as_choice(OnTimeout, "later"))
    [problem] = validate_job(job)
    assert problem.field == "on_timeout" and "'later'" in problem.message


def test_a_manifest_reads_its_mode_as_a_member_and_writes_the_spelling(tmp_path: Path) -> None:
    archive = Archive.open(tmp_path / "backup", create=True)
    partial = archive.begin("web")
    partial.write_domain_xml("<domain><name>web</name></domain>")
    partial.file_path("vda.qcow2").write_bytes(os.urandom(100))
    disk = DiskRecord("vda", "/img/vda.qcow2", "qcow2", 100, 100, "vda.qcow2", "0" * 64)
    stamp = "2025-03-01T02:00:00+00:00"
    manifest = Manifest(
        1,
        "web",
        "6f2d8d1e-5a3c-4b59-9d61-1a2b3c4d5e6f",
        "hv1",
        Mode.STOP,
        stamp,
        stamp,
        None,
        "0.1.0",
        [disk],
        None,
    )
    version = partial.commit(manifest)
    assert version.mode is Mode.STOP and version.manifest.mode is Mode.STOP
    data = json.loads((version.path / "manifest.json").read_text())
    assert data["mode"] == "stop"


def test_delivery_of_a_sending_line() -> None:
    assert delivery_of("ok: mail sent to a@b") is Delivery.OK
    assert delivery_of("failed: webhook http://x: refused") is Delivery.FAILED
