"""``guestsafe prune --dry-run`` on a real archive in a temporary folder."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from test_archive import fill

from guestsafe.engine import locks
from guestsafe.engine.archive.calendar_retention import RetentionPolicy
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.errors import LockBusy
from guestsafe.tui.cli import main

STARTS = [
    "2025-03-01T12:00:00+00:00",
    "2025-03-02T08:00:00+00:00",
    "2025-03-02T12:00:00+00:00",
    "2025-03-03T12:00:00+00:00",
]


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The dry run shows and buckets by local dates; pin the zone the test reads.
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, utc: None) -> Path:
    archive = Archive.open(tmp_path / "backup", create=True)
    for started in STARTS:
        partial = archive.begin("web")
        manifest = fill(partial, {"vda.raw": b"disk"})
        partial.commit(dataclasses.replace(manifest, started=started, finished=started))
    # Version 2 failed its verification: bad, it never fills a day.
    folder = next(p for p in (tmp_path / "backup").iterdir() if (p / "2").is_dir())
    (folder / "2" / "verified.json").write_text(json.dumps({"ok": False}))
    jobs = {"guests": ["web", "db"], "destination": str(tmp_path / "backup"), "keep_daily": 2}
    config = tmp_path / "home" / "config"
    config.mkdir(parents=True)
    (config / "jobs.toml").write_text(tomli_w.dumps({"jobs": {"nightly": jobs}}))
    monkeypatch.setenv("GUESTSAFE_HOME", str(tmp_path / "home"))
    return tmp_path


def test_dry_run_shows_the_rules_per_version_and_deletes_nothing(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["prune", "--dry-run", "nightly"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == ["nightly:", "keep_daily", "2"]
    assert lines[2:] == [
        ["nightly", "web", "4", "2025-03-03", "Mon", "12:00", "daily,", "newest"],
        ["nightly", "web", "3", "2025-03-02", "Sun", "12:00", "daily"],
        ["nightly", "web", "2", "2025-03-02", "Sun", "08:00", "would", "go"],
        ["nightly", "web", "1", "2025-03-01", "Sat", "12:00", "would", "go"],
        ["nightly", "db", "-", "-", "no", "versions"],
    ]
    archive = Archive.open(home / "backup")
    assert [v.number for v in archive.versions("web")] == [1, 2, 3, 4]


def test_without_a_job_every_job_is_shown(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--dry-run"]) == 0
    assert "nightly: keep_daily 2" in capsys.readouterr().out


def _would_go(out: str) -> list[tuple[str, int]]:
    rows = [line.split() for line in out.splitlines()]
    return [(r[1], int(r[2])) for r in rows if r[-2:] == ["would", "go"]]


def test_prune_deletes_exactly_what_the_dry_run_listed(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["prune", "--dry-run", "nightly"]) == 0
    listed = _would_go(capsys.readouterr().out)
    assert listed == [("web", 2), ("web", 1)]
    assert main(["prune", "nightly"]) == 0
    out, err = capsys.readouterr()
    rows = [line.split() for line in out.splitlines()]
    assert [(r[1], int(r[2])) for r in rows if r[-1] == "deleted"] == listed
    assert out.splitlines()[-1] == "deleted 2 versions"
    assert "deleted version 1 of guest web" in err and "deleted version 2 of guest web" in err
    archive = Archive.open(home / "backup")
    assert [v.number for v in archive.versions("web")] == [3, 4]
    # Nothing more goes on a second run: the rules are met.
    assert main(["prune", "nightly"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "deleted 0 versions"
    assert main(["prune", "--dry-run", "nightly"]) == 0
    assert _would_go(capsys.readouterr().out) == []


def test_prune_waits_for_no_backup_and_deletes_nothing_beside_one(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = home / "home" / "state"
    key = locks.destination_key(home / "backup")
    with locks.acquire(state, key, "backup of job nightly"):
        assert main(["prune", "nightly"]) == LockBusy.exit_code
    assert "backup of job nightly" in capsys.readouterr().err
    with locks.archive_lock(home / "backup", "backup of job other").acquire():
        assert main(["prune", "nightly"]) == LockBusy.exit_code
    assert "backup of job other" in capsys.readouterr().err
    assert len(Archive.open(home / "backup").versions("web")) == 4


def test_a_guest_being_restored_keeps_its_versions(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = Archive.open(home / "backup")
    uuid = archive.versions("web")[0].manifest.uuid
    state = home / "home" / "state"
    with locks.acquire(state, locks.guest_key(uuid), "restore of web"):
        assert main(["prune", "nightly"]) == 0
    out, err = capsys.readouterr()
    assert "restore of web" in err and "its versions are kept" in err
    assert out.splitlines()[-1] == "deleted 0 versions"
    assert [line.split()[-2:] for line in out.splitlines()].count(["busy", "busy"]) == 0
    assert sum(line.endswith("kept: busy") for line in out.splitlines()) == 2
    assert len(archive.versions("web")) == 4


def test_an_unknown_job_is_not_found(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--dry-run", "weekly"]) == 3
    assert "weekly" in capsys.readouterr().err


def test_retention_deletes_what_the_dry_run_says_would_go(home: Path) -> None:
    archive = Archive.open(home / "backup")
    assert archive.apply_retention("web", RetentionPolicy(daily=2)) == [1, 2]
    assert [v.number for v in archive.versions("web")] == [3, 4]
