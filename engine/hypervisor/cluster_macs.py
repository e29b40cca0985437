"""MACs in use on every host that answers: a clone on node2 clashes with node1's original.

Guests of several hosts often share one network (a bridge over the same LAN), so a
restored clone that keeps a MAC used on another host breaks DHCP leases and ARP as
surely as one on its own host. A guest of another host is named with its host
("web1 on node1"); one of the target host by its name alone, as before hosts existed.
A host that does not answer cannot be checked: it is named, never silently skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.hosts import HostRegistry


class MacOwners(dict[str, list[str]]):
    """MAC -> the guests using it, plus the hosts whose MACs could not be read."""

    def __init__(self, owners: dict[str, list[str]], unreachable: Iterable[str] = ()) -> None:
        super().__init__(owners)
        # "node3: <libvirt's reason>", one per host that did not answer.
        self.unreachable: list[str] = list(unreachable)


def mac_owners_across(
    target: str, hosts: Sequence[tuple[str, Hypervisor]], unreachable: Iterable[str] = ()
) -> MacOwners:
    """Every MAC of every defined guest of ``hosts``, mapped to all its owners.

    ``target`` is the host the clone is defined on: its guests come first and bare.
    A host listed twice (one libvirt reached under two names) is read once.
    ``unreachable`` names the hosts that could not be asked, carried along.
    """
    ordered = sorted(hosts, key=lambda pair: pair[0] != target)
    owners: dict[str, list[str]] = {}
    seen: set[int] = set()
    for host, hv in ordered:
        if id(hv) in seen:
            continue
        seen.add(id(hv))
        for mac, guests in hv.mac_owners().items():
            names = owners.setdefault(mac, [])
            names += [g if host == target else f"{g} on {host}" for g in guests]
    return MacOwners(owners, unreachable)


def unreachable_hosts(owners: Mapping[str, list[str]]) -> list[str]:
    """The hosts a MAC reading could not ask (none for one host's own ``mac_owners``)."""
    return list(owners.unreachable) if isinstance(owners, MacOwners) else []


def mac_census(target: str, registry: HostRegistry) -> MacOwners:
    """The MACs of every host ``registry`` knows, each tried now; the silent ones named."""
    answered: list[tuple[str, Hypervisor]] = []
    silent: list[str] = []
    for name in registry.names():
        hv = registry.try_get(name)
        if hv is not None:
            answered.append((name, hv))
        else:
            silent.append(f"{name}: {registry.status(name).reason or 'unreachable'}")
    return mac_owners_across(target, answered, silent)


def unchecked_warning(unreachable: Sequence[str]) -> str | None:
    """The warning for hosts whose MACs were not checked, or None if every host answered."""
    if not unreachable:
        return None
    return (
        f"MACs not checked on {len(unreachable)} unreachable host(s) ({'; '.join(unreachable)}): "
        "a guest there may use the clone's MACs; check before the clone joins their network"
    )
