"""Restore tests, the verdicts: a clone this host cannot make is "could not run", not a
failed version; and ``guestsafe run`` exits 9 when a backup went well but its restore
test did not pass (issue #14, item 3)."""

from __future__ import annotations

import argparse
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from guestsafe.engine.archive.restore_record import RestoreTest
from guestsafe.engine.backup.results import RunResult
from guestsafe.engine.errors import RestoreError
from guestsafe.engine.events import GuestOutcome
from guestsafe.engine.jobs.schedule import DueRun
from guestsafe.engine.restore.boottest import run
from guestsafe.engine.restore.boottest.run import TestSettings, describe
from guestsafe.tui import cli


class _Plan:
    new_name = "web-restore-test"
    version = None


def test_a_clone_this_host_cannot_start_is_an_error_not_a_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise RestoreError("cannot create /srv/backup/web-restore-test-vda.qcow2: read-only")

    monkeypatch.setattr(run, "boot_clone", refuse)
    plan: Any = _Plan()
    outcome, screenshot = run._boot_and_watch(
        plan,
        None,
        None,
        TestSettings(),
        lambda event: None,
        None,  # type: ignore[arg-type]
    )
    assert not outcome.ok and outcome.error and screenshot is None
    assert outcome.problem == (
        "the clone could not be started: "
        "cannot create /srv/backup/web-restore-test-vda.qcow2: read-only"
    )


def test_describe_tells_a_test_that_could_not_run_from_a_failed_one() -> None:
    error = RestoreTest(False, "x", None, None, "the clone could not be started: no", error=True)
    failed = RestoreTest(False, "x", None, None, "the clone went off before a sign of life")
    assert describe(error) == (
        "could not run (not the version's fault): the clone could not be started: no"
    )
    assert describe(failed) == "FAILED: the clone went off before a sign of life"


class _Engine:
    def __init__(self, tests_failed: list[str]) -> None:
        self.tests_failed = tests_failed

    def run_job(self, name: str, reporter: object, **kwargs: object) -> RunResult:
        ok = GuestOutcome("web1", True, 7, 1.0, 1 << 20, 3.0, "backup ok")
        return RunResult(name, Path("/var/log/x.log"), [ok], restore_tests_failed=self.tests_failed)


@pytest.mark.parametrize("failed", [[], ["restore test of web1 version 7: FAILED: went off"]])
def test_run_exits_9_when_the_backup_went_well_but_its_restore_test_did_not(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], failed: list[str]
) -> None:
    monkeypatch.setattr(cli, "cancel_on_signals", threading.Event)  # no handlers in pytest
    args = argparse.Namespace(job="nightly", wait=False)
    engine: Any = _Engine(failed)

    code = cli.cmd_run(engine, args, None)  # type: ignore[arg-type]

    err = capsys.readouterr().err
    if failed:
        assert code == 9 == RestoreError.exit_code
        assert f"guestsafe: {failed[0]}" in err.splitlines()
    else:
        assert code == 0 and "restore test" not in err


DUE = datetime(2026, 12, 4, 2, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("runs", "code"),
    [
        ([DueRun("a", DUE, True)], 0),
        ([DueRun("a", DUE, True, ("web1 version 3: restore test FAILED",))], 9),
        ([DueRun("a", DUE, False), DueRun("b", DUE, True, ("web1: FAILED",))], 11),
    ],
)
def test_run_due_passes_a_failed_restore_test_on_to_cron(
    capsys: pytest.CaptureFixture[str], runs: list[DueRun], code: int
) -> None:
    class _DueEngine:
        def run_due(self, reporter: object) -> list[DueRun]:
            return runs

    assert cli.cmd_run_due(_DueEngine(), argparse.Namespace(), None) == code  # type: ignore[arg-type]

    out, err = capsys.readouterr()
    for run_ in runs:
        for line in run_.restore_tests_failed:
            assert f"guestsafe: {line}" in err.splitlines()
            assert "restore test did not pass" in out
