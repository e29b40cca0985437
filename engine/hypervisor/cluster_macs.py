"""MACs in use on every host that answers: a clone on node2 clashes with node1's original.

Guests of several hosts often share one network (a bridge over the same LAN), so a
restored clone that keeps a MAC used on another host breaks DHCP leases and ARP as
surely as one on its own host. A guest of another host is named with its host
("web1 on node1"); one of the target host by its name alone, as before hosts existed.
"""

from __future__ import annotations

from collections.abc import Sequence

from guestsafe.engine.hypervisor.connection import Hypervisor


def mac_owners_across(target: str, hosts: Sequence[tuple[str, Hypervisor]]) -> dict[str, list[str]]:
    """Every MAC of every defined guest of ``hosts``, mapped to all its owners.

    ``target`` is the host the clone is defined on: its guests come first and bare.
    A host listed twice (one libvirt reached under two names) is read once.
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
    return owners
