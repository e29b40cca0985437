"""When a job's restore test is due: ``restore_test = "never" | "weekly" | "always"``.

``always`` tests each new version right after its backup. ``weekly`` tests the new
version when no version of the guest in that archive was tested in the last seven
days (a failed test counts as tested: it is news already sent, and the next
backup's version is tested a week on, or at once by hand with test-restore).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.jobs.model import RestoreTestWhen

WEEK = timedelta(days=7)


def is_due(when: str, versions: Sequence[VersionInfo], now: datetime | None = None) -> bool:
    """Whether a backup that just made a version of a guest should test it."""
    if when == RestoreTestWhen.ALWAYS:
        return True
    if when != RestoreTestWhen.WEEKLY:
        return False
    moment = now or datetime.now(UTC)
    return not any(_tested_since(v, moment - WEEK) for v in versions)


def _tested_since(version: VersionInfo, since: datetime) -> bool:
    test = version.restore_test
    if test is None:
        return False
    try:
        at = datetime.fromisoformat(test.at)
    except ValueError:
        return False
    return (at if at.tzinfo else at.replace(tzinfo=UTC)) >= since
