"""Which host each guest of a run lives on, and which hosts cannot be reached.

A job names its hosts (``host``, ``hosts``; this machine when it names none). Each
is connected to at the start of the run: a host that answers gets its guests
(those the job lists that it defines, or for ``guests = "all"`` its persistent
ones), and one that does not fails its own guests alone, each with the reason.
Guests of different hosts are different series in the archive, even when they
share a name (``archive/names.py``, ``series_name``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from guestsafe.engine.archive.names import series_name
from guestsafe.engine.errors import GuestsafeError, HostUnreachable, PreflightError
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.hosts import HostRegistry
from guestsafe.engine.jobs.coverage import resolve_guests
from guestsafe.engine.jobs.model import Job, job_hosts


@dataclass
class HostGuests:
    """The guests of one host a run backs up, on that host's connection."""

    host: str
    hv: Hypervisor
    guests: list[str]


@dataclass
class Unreached:
    """A guest the run cannot back up because its host did not answer."""

    series: str
    error: GuestsafeError


@dataclass
class HostPlan:
    targets: list[HostGuests] = field(default_factory=list)
    unreached: list[Unreached] = field(default_factory=list)
    # Hosts that did not answer and whose guests are unknown (guests = "all").
    problems: list[str] = field(default_factory=list)

    def guest_names(self) -> list[str]:
        """Every guest of the run by name, each once, for hooks and device checks."""
        names = [g for t in self.targets for g in t.guests] + [u.series for u in self.unreached]
        return list(dict.fromkeys(names))


def plan_hosts(job: Job, registry: HostRegistry) -> HostPlan:
    """Where each of ``job``'s guests is backed up from, host by host."""
    hosts = job_hosts(job)
    plan = HostPlan()
    reached: list[tuple[str, Hypervisor]] = []
    failures: dict[str, HostUnreachable] = {}
    for host in hosts:
        try:
            reached.append((host, registry.get(host)))
        except HostUnreachable as exc:
            failures[host] = exc
    if job.all_guests:
        _all_guests(job, reached, failures, plan)
    else:
        _listed_guests(job, hosts, reached, failures, plan)
    return plan


def _all_guests(
    job: Job,
    reached: list[tuple[str, Hypervisor]],
    failures: dict[str, HostUnreachable],
    plan: HostPlan,
) -> None:
    for host, hv in reached:
        persistent = [g.name for g in hv.guests() if g.persistent]
        guests = resolve_guests(job, persistent)
        if guests:
            plan.targets.append(HostGuests(host, hv, guests))
    plan.problems += [f"{exc.message}; its guests were not backed up" for exc in failures.values()]
    if not plan.targets and not failures:
        patterns = f" outside exclude {', '.join(job.exclude)}" if job.exclude else ""
        where = ", ".join(hv.uri for _host, hv in reached)
        raise PreflightError(
            f'guests = "all" found no persistent guest{patterns} on {where}; nothing was backed up'
        )


def _listed_guests(
    job: Job,
    hosts: list[str],
    reached: list[tuple[str, Hypervisor]],
    failures: dict[str, HostUnreachable],
    plan: HostPlan,
) -> None:
    if len(hosts) == 1:
        # One host: every guest is its own, found or not (preflight names a missing one).
        if reached:
            plan.targets.append(HostGuests(hosts[0], reached[0][1], list(job.guests)))
        else:
            error = failures[hosts[0]]
            plan.unreached += [Unreached(series_name(g, hosts[0]), error) for g in job.guests]
        return
    by_host: dict[str, list[str]] = {host: [] for host, _hv in reached}
    for guest in job.guests:
        owners = [host for host, hv in reached if hv.exists(guest)]
        for host in owners:
            by_host[host].append(guest)
        if owners:
            continue
        if failures:
            # Defined on no host that answered: it may live on one that did not.
            down = "; ".join(exc.message for exc in failures.values())
            error = HostUnreachable(f"guest {guest!r} is on no host that answered ({down})")
            plan.unreached.append(Unreached(guest, error))
        elif reached:
            by_host[reached[0][0]].append(guest)  # its preflight says it is defined nowhere
    plan.targets += [HostGuests(h, hv, by_host[h]) for h, hv in reached if by_host[h]]
    # Its guests that share a name with one found elsewhere are unknown: say so.
    plan.problems += [f"{exc.message}; its guests were not backed up" for exc in failures.values()]
