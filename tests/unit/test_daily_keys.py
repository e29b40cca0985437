"""The jobs.toml keys of issue 15: guests = "all" with exclude, mail_to, ionice, bwlimit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomli_w

from guestsafe.engine.api import parse_bwlimit, resolve_guests, uncovered_guests
from guestsafe.engine.errors import JobConfigError
from guestsafe.engine.jobs.jobs_file import load_jobs, save_jobs
from guestsafe.engine.jobs.model import Job
from guestsafe.engine.jobs.validation import validate_job
from guestsafe.engine.modes import IoClass
from guestsafe.engine.sizes import byte_rate, parse_byte_rate

MiB = 1024 * 1024
DEST = "/srv/backup"


def _load(tmp_path: Path, **table: Any) -> Job:
    path = tmp_path / "jobs.toml"
    path.write_text(tomli_w.dumps({"jobs": {"nightly": {"destination": DEST} | table}}))
    [job] = load_jobs(path)
    return job


def _refused(tmp_path: Path, **table: Any) -> list[tuple[str, str]]:
    path = tmp_path / "jobs.toml"
    path.write_text(tomli_w.dumps({"jobs": {"nightly": {"destination": DEST} | table}}))
    with pytest.raises(JobConfigError) as info:
        load_jobs(path)
    return [(p.field, p.message) for p in info.value.problems]


def test_defaults(tmp_path: Path) -> None:
    job = _load(tmp_path, guests=["web1"])
    assert (job.all_guests, job.exclude, job.mail_to) == (False, [], [])
    assert job.ionice == IoClass.IDLE and job.bwlimit is None


def test_all_guests_with_exclude_loads_and_round_trips(tmp_path: Path) -> None:
    job = _load(
        tmp_path,
        guests="all",
        exclude=["scratch-*", "test?"],
        mail_to="ops@example.org",
        ionice="best-effort",
        bwlimit="100 MiB/s",
    )
    assert job.all_guests and job.guests == [] and job.exclude == ["scratch-*", "test?"]
    assert job.mail_to == ["ops@example.org"] and job.ionice == IoClass.BEST_EFFORT
    assert job.bwlimit == 100 * MiB
    path = tmp_path / "saved.toml"
    save_jobs(path, [job])
    text = path.read_text()
    assert 'guests = "all"' in text and 'bwlimit = "100 MiB/s"' in text
    assert 'ionice = "best-effort"' in text and 'mail_to = [\n    "ops@example.org",' in text
    assert load_jobs(path) == [job]


def test_bwlimit_as_bytes_per_second_and_zero(tmp_path: Path) -> None:
    assert _load(tmp_path, guests=["a"], bwlimit=50 * MiB).bwlimit == 50 * MiB
    assert _load(tmp_path, guests=["a"], bwlimit=0).bwlimit is None
    assert _load(tmp_path, guests=["a"], bwlimit="0").bwlimit is None


@pytest.mark.parametrize(
    ("table", "field", "fragment"),
    [
        ({"guests": ["a"], "exclude": ["b*"]}, "exclude", 'only with guests = "all"'),
        ({"guests": "all", "exclude": "b*"}, "exclude", "list of name patterns"),
        ({"guests": "all", "exclude": [""]}, "exclude", "not a name pattern"),
        ({"guests": "some"}, "guests", 'or "all"'),
        ({"guests": ["a"], "mail_to": "not an address"}, "mail_to", "not a plain mail address"),
        ({"guests": ["a"], "mail_to": ["-oQ/x@y"]}, "mail_to", "not a plain mail address"),
        ({"guests": ["a"], "ionice": "realtime"}, "ionice", "idle, best-effort"),
        ({"guests": ["a"], "bwlimit": "fast"}, "bwlimit", 'like "100 MiB/s"'),
        ({"guests": ["a"], "bwlimit": "100 B/s"}, "bwlimit", "at least 1 MiB/s"),
        ({"guests": ["a"], "bwlimit": -5}, "bwlimit", "at least 1 MiB/s"),
        ({"guests": ["a"], "bwlimit": True}, "bwlimit", "must be a rate"),
    ],
)
def test_bad_values_are_named(
    tmp_path: Path, table: dict[str, Any], field: str, fragment: str
) -> None:
    [(named, message)] = _refused(tmp_path, **table)
    assert named == field and fragment in message


def test_all_guests_beside_listed_names_is_refused() -> None:
    job = Job("nightly", ["web1"], Path(DEST), all_guests=True)
    [problem] = validate_job(job)
    assert problem.field == "guests" and "list no guest names" in problem.message


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100 MiB/s", 100 * MiB),
        ("100MiB/s", 100 * MiB),
        ("1.5 GiB/s", 3 * 512 * MiB),
        ("20M", 20 * MiB),
        ("500 KB/s", 500_000),
        ("2 MB/s", 2_000_000),
        ("1048576", MiB),
    ],
)
def test_parse_byte_rate(text: str, rate: int) -> None:
    assert parse_byte_rate(text) == rate
    assert parse_byte_rate(byte_rate(rate)) == rate


def test_parse_bwlimit_for_the_console() -> None:
    assert parse_bwlimit("64 MiB/s") == 64 * MiB
    assert parse_bwlimit("") is None and parse_bwlimit("0") is None and parse_bwlimit(0) is None
    with pytest.raises(JobConfigError) as info:
        parse_bwlimit("lots")
    [problem] = info.value.problems
    assert problem.field == "bwlimit" and "'lots'" in problem.message


# --- which guests a job covers -----------------------------------------------

HOST = ["db1", "scratch-1", "scratch-2", "web1", "web2"]


def test_listed_guests_resolve_to_themselves() -> None:
    job = Job("a", ["web1", "gone"], Path(DEST))
    assert resolve_guests(job, HOST) == ["web1", "gone"]  # a missing one fails its run


def test_all_guests_less_the_excluded() -> None:
    job = Job("a", [], Path(DEST), all_guests=True, exclude=["scratch-*", "web?"])
    assert resolve_guests(job, HOST) == ["db1"]
    assert resolve_guests(job, [*HOST, "new"]) == ["db1", "new"]  # defined later, included
    assert resolve_guests(Job("b", [], Path(DEST), all_guests=True), HOST) == HOST


def test_uncovered_guests_leave_out_the_deliberately_excluded() -> None:
    listed = Job("a", ["web1"], Path(DEST))
    assert uncovered_guests([listed], HOST) == ["db1", "scratch-1", "scratch-2", "web2"]
    everything = Job("b", [], Path(DEST), all_guests=True, exclude=["scratch-*"])
    assert uncovered_guests([listed, everything], HOST) == []
    assert uncovered_guests([], HOST) == HOST
