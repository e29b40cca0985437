"""The job form's prune preview: which versions each retention rule keeps, and which go.

Like Proxmox's prune simulator, the preview answers as the numbers change. It
asks the engine's own ``keep_reasons`` (the rules the prune acts on), over the
job's versions in its archive, or, while there are none yet, over a made-up
series of one version a day, so the operator sees what the rules mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

from guestsafe.engine.api import Candidate, RetentionPolicy, keep_reasons

SIMULATED_DAYS = 400
# Rules as the form names them, in the form's order.
RULE_LABELS = {
    "last": "last",
    "daily": "daily",
    "weekly": "weekly",
    "monthly": "monthly",
    "yearly": "yearly",
}
# A rule's line stops naming versions at this width and counts the rest, so
# it fits the form's hint column at 80 columns.
LINE_WIDTH = 52
# Each rule's line names its versions by the bucket it keeps them for.
RULE_DATES = {
    "last": "%m-%d",
    "daily": "%m-%d",
    "weekly": "%m-%d",
    "monthly": "%Y-%m",
    "yearly": "%Y",
}


@dataclass(frozen=True)
class GuestHistory:
    """One guest's versions as retention sees them, newest first."""

    guest: str
    versions: list[Candidate]


def policy_of(counts: dict[str, str]) -> RetentionPolicy | None:
    """The policy the form's fields give (``keep``, ``keep_daily``...); None if one is no number."""
    numbers: dict[str, int] = {}
    for rule in RULE_LABELS:
        text = counts.get("keep" if rule == "last" else f"keep_{rule}", "0").strip() or "0"
        if not text.isdigit():
            return None
        numbers[rule] = int(text)
    return RetentionPolicy(**numbers)


def simulated_series(now: datetime, days: int = SIMULATED_DAYS) -> list[Candidate]:
    """One good version a day, at ``now``'s time of day, for the last ``days`` days."""
    return [
        Candidate(number=days - back, started=now - timedelta(days=back), good=True)
        for back in range(days)
    ]


def preview_lines(
    histories: Sequence[GuestHistory],
    policy: RetentionPolicy | None,
    now: datetime,
    tz: tzinfo | None = None,
) -> list[str]:
    """What the preview shows, line by line."""
    if policy is None:
        return ["Prune preview: the keep fields must be whole numbers."]
    if not any(policy.count(rule) for rule in RULE_LABELS):
        return ["Prune preview: every rule is 0; set keep last to 1 or more."]
    real = [h for h in histories if h.versions]
    if not real:
        series = simulated_series(now)
        lines = [f"Prune preview over {SIMULATED_DAYS} simulated days (none yet):"]
        return lines + _guest_lines(series, policy, tz, simulated=True)
    lines = ["Prune preview over the versions in the archive:"]
    for history in real:
        lines.append(f"{history.guest}:")
        lines += _guest_lines(history.versions, policy, tz, simulated=False)
    return lines


def _guest_lines(
    versions: Sequence[Candidate], policy: RetentionPolicy, tz: tzinfo | None, *, simulated: bool
) -> list[str]:
    reasons = keep_reasons(versions, policy, tz)
    by_number = {v.number: v for v in versions}
    kept = [n for n, why in reasons.items() if why]
    gone = [n for n, why in reasons.items() if not why]
    lines = [f"  keeps {len(kept)} of {len(versions)}, {len(gone)} would go"]
    for rule, label in RULE_LABELS.items():
        count = policy.count(rule)
        if not count:
            continue
        chosen = [n for n, why in reasons.items() if rule in why]
        names = [_name(by_number[n], tz, simulated, rule) for n in chosen]
        lines.append(_rule_line(f"  {label:<7} {count:>3}:", names))
    extra = [n for n in kept if not set(reasons[n]) & set(RULE_LABELS)]
    if extra:
        also = ", ".join(
            f"{_name(by_number[n], tz, simulated)} ({', '.join(reasons[n])})" for n in extra
        )
        lines.append(f"  also kept: {also}")
    if gone and not simulated:
        lines.append("  would go: " + " ".join(_name(by_number[n], tz, False) for n in gone))
    return lines


def _rule_line(head: str, names: list[str]) -> str:
    """``head`` and as many names as fit ``LINE_WIDTH``, then how many more."""
    line = head
    for index, name in enumerate(names):
        rest = len(names) - index
        tail = f" +{rest - 1}" if rest > 1 else ""
        if len(line) + 1 + len(name) + len(tail) > LINE_WIDTH:
            return f"{line} +{rest}"
        line += " " + name
    return line


def _name(version: Candidate, tz: tzinfo | None, simulated: bool, rule: str = "daily") -> str:
    """A simulated version by its date; a real one by its number and date."""
    if version.started is None:
        return f"#{version.number}"
    when = version.started.astimezone(tz).strftime(RULE_DATES[rule])
    return when if simulated else f"#{version.number}:{when}"
