"""Retention by calendar: which rules keep which version (restic's ``forget`` rules).

Pure functions, so the dry run can show the same answer the prune acts on.
Each calendar rule keeps the newest good version of each of the last N days,
ISO weeks, months or years that have a good version, counting back from the
newest; ``last`` keeps the newest N good versions. A version kept by several
rules is kept once and names them all (FORMAT.md, section 11).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo

RULES = ("last", "daily", "weekly", "monthly", "yearly")
NEWEST = "newest"  # the newest version is never deleted
VERIFIED = "verified"  # nor the newest one whose last verification passed
BAD = "bad, kept"  # a bad version awaiting enough good versions newer than it


@dataclass(frozen=True)
class RetentionPolicy:
    """How many versions each rule keeps; 0 turns a rule off."""

    last: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def count(self, rule: str) -> int:
        return int(getattr(self, rule))


def describe_policy(policy: RetentionPolicy) -> str:
    """``keep 3`` for a plain count, as logs said before; else the rules set."""
    rules = [rule for rule in RULES if policy.count(rule)]
    if rules == ["last"]:
        return f"keep {policy.last}"
    return ", ".join(f"keep_{rule} {policy.count(rule)}" for rule in rules)


@dataclass(frozen=True)
class Candidate:
    """One version as retention sees it."""

    number: int
    started: datetime | None  # bucketed by its local calendar date; None: unreadable (bad)
    good: bool
    verified: bool = False  # its last verification passed


def _bucket(rule: str, when: datetime, number: int) -> object:
    """The key of a version's bucket for ``rule``; ``last`` gives each its own."""
    if rule == "last":
        return number
    if rule == "daily":
        return when.date()
    if rule == "weekly":
        return when.isocalendar()[:2]  # ISO year and week, as restic
    if rule == "monthly":
        return (when.year, when.month)
    return when.year


def keep_reasons(
    versions: Sequence[Candidate], policy: RetentionPolicy, tz: tzinfo | None = None
) -> dict[int, list[str]]:
    """Per version number, the rules that keep it; an empty list: it would go.

    ``tz`` is the calendar's zone (None: the host's local time).
    """
    found = sorted(versions, key=lambda v: v.number, reverse=True)
    reasons: dict[int, list[str]] = {v.number: [] for v in found}
    good = [v for v in found if v.good]
    for rule in RULES:
        for number in _kept_by(rule, policy.count(rule), good, tz):
            reasons[number].append(rule)
    if found:
        reasons[found[0].number].append(NEWEST)
    verified = [v for v in good if v.verified]
    if verified:
        reasons[verified[0].number].append(VERIFIED)
    for v in found:
        if not v.good and _bad_stays(v.number, good, policy):
            reasons[v.number].append(BAD)
    return reasons


def _kept_by(rule: str, count: int, good: Sequence[Candidate], tz: tzinfo | None) -> list[int]:
    # Newest first, so the first version met in a bucket is that bucket's newest.
    kept: list[int] = []
    last: object = None
    for v in good:
        if len(kept) >= count:
            break
        # A good version's manifest reads, so it has a start; min only satisfies typing.
        when = v.started.astimezone(tz) if v.started else datetime.min
        key = _bucket(rule, when, v.number)
        if key != last:
            kept.append(v.number)
            last = key
    return kept


def _bad_stays(number: int, good: Sequence[Candidate], policy: RetentionPolicy) -> bool:
    # A bad version may be the operator's only clue; it stays until max(last, 1)
    # good versions are newer than it, as it did under ``keep = N``.
    return sum(1 for v in good if v.number > number) < max(policy.last, 1)
