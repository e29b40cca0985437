"""Which guests a job backs up, and which guests no job does.

A job names its guests, or says ``guests = "all"``: every persistent guest of
the hypervisor when the run starts, less those an ``exclude`` pattern matches.
Patterns are shell globs (``fnmatch``, case-sensitive, as guest names are):
``scratch-*``, ``test-?``, ``[ab]*``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from guestsafe.engine.archive.names import series_name, split_series
from guestsafe.engine.jobs.model import Job, job_hosts


def excluded(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def resolve_guests(job: Job, guest_names: Sequence[str]) -> list[str]:
    """The guests ``job`` covers among ``guest_names`` (the persistent guests, in order).

    A job that lists its guests covers exactly those, defined or not (a missing
    one fails its run, as it should); an all-guests job covers each of
    ``guest_names`` that no ``exclude`` pattern matches.
    """
    if not job.all_guests:
        return list(job.guests)
    return [name for name in guest_names if not excluded(name, job.exclude)]


def uncovered_guests(jobs: Iterable[Job], guest_names: Sequence[str]) -> list[str]:
    """The guests of ``guest_names`` no job backs up nor deliberately leaves out.

    A guest an all-guests job's ``exclude`` matches was left out on purpose and
    is not listed; every other guest no job covers is: one created since the
    jobs were written, say. In the order of ``guest_names``.
    """
    jobs = list(jobs)
    covering = jobs_covering(jobs, guest_names)
    return [
        name
        for name in guest_names
        if not covering[name] and not any(j.all_guests and excluded(name, j.exclude) for j in jobs)
    ]


def jobs_covering(jobs: Iterable[Job], guest_names: Sequence[str]) -> dict[str, list[str]]:
    """Per guest of ``guest_names``, the names of the jobs that back it up."""
    covering: dict[str, list[str]] = {name: [] for name in guest_names}
    for job in jobs:
        for name in resolve_guests(job, guest_names):
            if name in covering:
                covering[name].append(job.name)
    return covering


def job_series(job: Job, archived: Sequence[str]) -> list[str]:
    """The archive series ``job``'s retention looks after, among ``archived`` ones.

    Its guests of each of its hosts (``node2/web1`` for web1 of node2, archive/names.py);
    for ``guests = "all"``, the archived series of its hosts that no exclude matches.
    """
    hosts = job_hosts(job)
    if not job.all_guests:
        return [series_name(guest, host) for host in hosts for guest in job.guests]
    return [
        series
        for series in archived
        if split_series(series)[0] in hosts
        and not excluded(split_series(series)[1], job.exclude)
    ]
