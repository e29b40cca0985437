"""Which jobs back up each guest, as ``guestsafe guests`` and the Guests tab say it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from guestsafe.engine.api import (
    LOCAL_HOST,
    GuestInfo,
    Job,
    job_hosts,
    jobs_covering,
    uncovered_guests,
)

NO_BACKUP = "NONE (no backup)"


@dataclass(frozen=True)
class Coverage:
    """One guest's jobs: ``label`` for a column, ``first`` the job its disk plan follows."""

    label: str
    first: Job | None
    uncovered: bool


def coverage(
    jobs: Sequence[Job], guests: Sequence[GuestInfo], host: str = LOCAL_HOST
) -> dict[str, Coverage]:
    """Per guest name (of ``host``): the jobs that back it up, or why none does."""
    jobs = [job for job in jobs if host in job_hosts(job)]  # another host's web1 is not this
    persistent = [g.name for g in guests if g.persistent]
    # "all" takes persistent guests only; a transient one is covered only where listed.
    covering = jobs_covering(jobs, persistent)
    missing = set(uncovered_guests(jobs, persistent))
    by_name = {job.name: job for job in jobs}
    result: dict[str, Coverage] = {}
    for guest in guests:
        if guest.persistent:
            names = covering.get(guest.name, [])
            label = NO_BACKUP if guest.name in missing else ",".join(names) or "- (excluded)"
        else:
            names = [j.name for j in jobs if not j.all_guests and guest.name in j.guests]
            label = ",".join(names) or "- (transient)"
        first = by_name[names[0]] if names else None
        result[guest.name] = Coverage(label, first, guest.name in missing)
    return result
