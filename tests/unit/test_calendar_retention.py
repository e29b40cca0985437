"""Retention by calendar against restic's rules as its documentation states them.

The reference below is written from the documentation, not from the code: for
each rule, group the good versions by their local day, ISO week, month or year,
take the newest N groups that hold a version, and keep the newest version of
each. ``last`` keeps the newest N good versions. Slow and plain on purpose.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from guestsafe.engine.archive.calendar_retention import (
    BAD,
    NEWEST,
    VERIFIED,
    Candidate,
    RetentionPolicy,
    keep_reasons,
)

ZURICH = ZoneInfo("Europe/Zurich")


def generated_versions(seed: int, count: int = 1900) -> list[Candidate]:
    """One version every 7 to 20 hours from late 2023: three year ends, six DST changes."""
    rng = random.Random(seed)
    when = datetime(2023, 10, 20, 1, 30, tzinfo=UTC)
    versions = []
    for number in range(1, count + 1):
        # Elapsed time is added in UTC: aware arithmetic in a zone is wall-clock time.
        when += timedelta(hours=rng.randint(7, 20), minutes=rng.randint(0, 59))
        versions.append(Candidate(number, when.astimezone(ZURICH), good=True))
    return versions


def reference_bucket(rule: str, when: datetime, number: int) -> object:
    local = when.astimezone(ZURICH)
    if rule == "last":
        return number
    if rule == "daily":
        return (local.year, local.month, local.day)
    if rule == "weekly":
        iso = local.isocalendar()
        return (iso.year, iso.week)
    if rule == "monthly":
        return (local.year, local.month)
    return local.year


def reference(versions: list[Candidate], policy: RetentionPolicy) -> dict[int, set[str]]:
    kept: dict[int, set[str]] = {v.number: set() for v in versions}
    good = [v for v in versions if v.good]
    for rule in ("last", "daily", "weekly", "monthly", "yearly"):
        groups: dict[object, list[Candidate]] = {}
        for v in good:
            assert v.started is not None
            groups.setdefault(reference_bucket(rule, v.started, v.number), []).append(v)
        newest_first = sorted(groups.values(), key=lambda g: max(v.number for v in g))[::-1]
        for group in newest_first[: getattr(policy, rule)]:
            kept[max(v.number for v in group)].add(rule)
    return kept


POLICIES = [
    RetentionPolicy(last=1),
    RetentionPolicy(last=5),
    RetentionPolicy(daily=7),
    RetentionPolicy(daily=400),
    RetentionPolicy(weekly=4),
    RetentionPolicy(weekly=60),
    RetentionPolicy(monthly=6),
    RetentionPolicy(monthly=40),
    RetentionPolicy(yearly=2),
    RetentionPolicy(yearly=10),
    RetentionPolicy(last=3, daily=7, weekly=4, monthly=12, yearly=3),
    RetentionPolicy(daily=14, monthly=6),
    RetentionPolicy(last=2, weekly=52),
    RetentionPolicy(daily=1, weekly=1, monthly=1, yearly=1),
    RetentionPolicy(last=400, yearly=1),
]


def rules_only(reasons: dict[int, list[str]]) -> dict[int, set[str]]:
    return {n: set(why) - {NEWEST, VERIFIED, BAD} for n, why in reasons.items()}


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_rules_agree_with_the_reference(seed: int, policy: RetentionPolicy) -> None:
    versions = generated_versions(seed)
    got = keep_reasons(versions, policy, ZURICH)
    assert rules_only(got) == reference(versions, policy)
    assert NEWEST in got[versions[-1].number]


def test_generated_dates_cross_dst_changes_and_year_ends() -> None:
    versions = generated_versions(1)
    offsets = {v.started.utcoffset() for v in versions if v.started}
    years = {v.started.year for v in versions if v.started}
    assert offsets == {timedelta(hours=1), timedelta(hours=2)}
    assert years == {2023, 2024, 2025, 2026}


def test_weeks_are_iso_weeks_across_a_year_end() -> None:
    # Mon 2024-12-30 and Thu 2025-01-02 are both ISO week 1 of 2025.
    dates = [datetime(2024, 12, 29, 12), datetime(2024, 12, 30, 12), datetime(2025, 1, 2, 12)]
    versions = [Candidate(n, d.replace(tzinfo=ZURICH), True) for n, d in enumerate(dates, 1)]
    got = rules_only(keep_reasons(versions, RetentionPolicy(weekly=2), ZURICH))
    assert got == {1: {"weekly"}, 2: set(), 3: {"weekly"}}


def test_days_are_local_days_not_utc_days() -> None:
    # 23:30 and 00:30 in Zurich are one UTC day apart from what they look like.
    late = datetime(2025, 6, 1, 23, 30, tzinfo=ZURICH)
    early = datetime(2025, 6, 2, 0, 30, tzinfo=ZURICH)
    versions = [Candidate(1, late, True), Candidate(2, early, True)]
    got = rules_only(keep_reasons(versions, RetentionPolicy(daily=2), ZURICH))
    assert got == {1: {"daily"}, 2: {"daily"}}


def daily(number: int, good: bool = True, verified: bool = False) -> Candidate:
    when = datetime(2025, 3, 1, 2, tzinfo=ZURICH) + timedelta(days=number)
    return Candidate(number, when, good, verified)


def test_bad_versions_never_count_toward_a_calendar_rule() -> None:
    # v4 failed: daily = 2 keeps v5 and v3, the newest good versions of two days,
    # and the failed v4 waits for a good version newer than it (it has one: v5).
    versions = [daily(1), daily(2), daily(3), daily(4, good=False), daily(5)]
    got = keep_reasons(versions, RetentionPolicy(daily=2), ZURICH)
    assert got == {1: [], 2: [], 3: ["daily"], 4: [], 5: ["daily", NEWEST]}


def test_a_bad_version_stays_until_keep_last_good_versions_are_newer() -> None:
    versions = [daily(1), daily(2, good=False), daily(3), daily(4)]
    got = keep_reasons(versions, RetentionPolicy(last=2, monthly=1), ZURICH)
    assert got[2] == []  # v3 and v4 are newer and good
    got = keep_reasons(versions, RetentionPolicy(last=3, monthly=1), ZURICH)
    assert got[2] == [BAD]


def test_a_bad_newest_version_is_kept_and_does_not_take_a_bucket() -> None:
    versions = [daily(1), daily(2), daily(3, good=False)]
    got = keep_reasons(versions, RetentionPolicy(daily=1), ZURICH)
    assert got == {1: [], 2: ["daily"], 3: [NEWEST, BAD]}


def test_the_newest_verified_version_is_kept_beyond_the_rules() -> None:
    versions = [daily(1, verified=True), daily(2), daily(3)]
    got = keep_reasons(versions, RetentionPolicy(daily=1), ZURICH)
    assert got == {1: [VERIFIED], 2: [], 3: ["daily", NEWEST]}
