"""Issue 15: the job form's all guests, exclude, mail to, I/O class and bandwidth limit.

The widget-free model (tui/model/job_form.py): what the fields make of a job,
where each problem lands, and the line saying whom an all-guests job covers.
The Pilot tests of the same fields are in test_form_daily_keys_console.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from guestsafe.engine.jobs.model import Job
from guestsafe.engine.modes import IoClass
from guestsafe.tui.model.job_form import (
    FIELDS,
    JobFormValues,
    by_field,
    check_job,
    coverage_hint,
)

pytestmark = pytest.mark.tui

MIB = 1024 * 1024
KNOWN = ["web1", "db1", "scratch-a", "scratch-b"]


def form(tmp_path: Path, **changes: object) -> JobFormValues:
    base = JobFormValues(name="daily", guests="web1", destination=str(tmp_path))
    return replace(base, **changes)  # type: ignore[arg-type]


def test_all_guests_with_exclude_mail_ionice_and_bwlimit_make_the_job(tmp_path: Path) -> None:
    values = form(
        tmp_path,
        all_guests=True,
        exclude="scratch-*, test-?",
        mail_to="ops@example.org, boss@example.org",
        ionice="best-effort",
        bwlimit="100 MiB/s",
    )
    job, problems = check_job(values, existing=[], known_guests=KNOWN)
    assert problems == []
    # The guest list is disabled with all guests ticked: its text is not the job's.
    assert (job.all_guests, job.guests, job.exclude) == (True, [], ["scratch-*", "test-?"])
    assert job.mail_to == ["ops@example.org", "boss@example.org"]
    assert (job.ionice, job.bwlimit) == (IoClass.BEST_EFFORT, 100 * MIB)


def test_exclude_is_ignored_while_the_guests_are_listed(tmp_path: Path) -> None:
    job, problems = check_job(form(tmp_path, exclude="scratch-*"), existing=[], known_guests=KNOWN)
    assert problems == []
    assert (job.all_guests, job.guests, job.exclude) == (False, ["web1"], [])


def test_empty_fields_mean_the_defaults(tmp_path: Path) -> None:
    job, problems = check_job(form(tmp_path), existing=[], known_guests=KNOWN)
    assert problems == []
    assert (job.mail_to, job.ionice, job.bwlimit) == ([], IoClass.IDLE, None)


def test_an_all_guests_job_round_trips_through_the_form(tmp_path: Path) -> None:
    job = Job(
        "j",
        [],
        tmp_path,
        all_guests=True,
        exclude=["scratch-*", "my vm?"],
        mail_to=["ops@example.org"],
        ionice=IoClass.BEST_EFFORT,
        bwlimit=50 * MIB,
    )
    values = JobFormValues.from_job(job)
    assert (values.exclude, values.bwlimit, values.ionice) == (
        "scratch-*, my vm?",
        "50 MiB/s",
        "best-effort",
    )
    again, problems = check_job(values, existing=[], known_guests=None, base=job)
    assert problems == []
    assert again == job


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"bwlimit": "fast"}, "bwlimit", 'bwlimit must be a rate like "100 MiB/s"'),
        ({"bwlimit": "100 B/s"}, "bwlimit", "at least 1 MiB/s"),
        ({"mail_to": "ops@example.org, not an address"}, "mail_to", "'not'"),
        ({"ionice": "realtime"}, "ionice", "idle, best-effort"),
        ({"all_guests": True, "exclude": "web\x01"}, "exclude", "not a name pattern"),
    ],
)
def test_each_new_problem_lands_at_its_field(
    tmp_path: Path, changes: dict[str, object], field: str, words: str
) -> None:
    _job, problems = check_job(form(tmp_path, **changes), existing=[], known_guests=KNOWN)
    assert field in FIELDS
    messages = by_field(problems)
    assert list(messages) == [field], problems
    assert words in messages[field]


def test_a_bad_bwlimit_reports_once(tmp_path: Path) -> None:
    _job, problems = check_job(form(tmp_path, bwlimit="fast"), existing=[], known_guests=None)
    assert [p.field for p in problems] == ["bwlimit"]


def test_all_guests_needs_no_defined_guest_name(tmp_path: Path) -> None:
    # The guest field's text (a guest since removed) does not count once it is disabled.
    values = form(tmp_path, all_guests=True, guests="ghost")
    _job, problems = check_job(values, existing=[], known_guests=KNOWN)
    assert problems == []


def test_the_coverage_line_names_the_covered_and_the_excluded(tmp_path: Path) -> None:
    values = form(tmp_path, all_guests=True, exclude="scratch-*")
    hint = coverage_hint(values, KNOWN)
    assert hint == "covers now: web1, db1; excluded: scratch-a, scratch-b"


def test_the_coverage_line_names_a_pattern_that_matches_no_guest(tmp_path: Path) -> None:
    values = form(tmp_path, all_guests=True, exclude="scratch-* test-*")
    hint = coverage_hint(values, KNOWN)
    covered = "covers now: web1, db1, scratch-a, scratch-b"
    assert hint == f"{covered}; 'scratch-* test-*' matches no guest"


def test_the_coverage_line_says_when_every_guest_is_excluded(tmp_path: Path) -> None:
    values = form(tmp_path, all_guests=True, exclude="*")
    assert coverage_hint(values, KNOWN).startswith("covers now: no guest; excluded: web1")
