"""A transient guest the dead runner shut down is gone from libvirt: recover creates it again."""

from __future__ import annotations

import os
from pathlib import Path

import libvirt
from test_recovery_cases import FakeConn, FakeDom, Site, site  # noqa: F401  (the fixture)

from guestsafe.engine.backup.phases import Phase
from guestsafe.engine.hypervisor.domain_xml import parse_domain_xml


class CreatingConn(FakeConn):
    """libvirt's createXML: the guest exists again, running."""

    def __init__(self, doms: dict[str, FakeDom]) -> None:
        super().__init__()
        self.doms = doms
        self.created: list[str] = []

    def createXML(self, xml: str, _flags: int) -> FakeDom:
        info = parse_domain_xml(xml)
        dom = FakeDom(info.name, info.uuid, xml, libvirt.VIR_DOMAIN_RUNNING)
        self.doms[info.uuid] = dom
        self.created.append(info.name)
        return dom


def _gone_transient(site: Site) -> tuple[FakeDom, CreatingConn]:  # noqa: F811
    dom = site.guest()
    conn = CreatingConn(site.hv.connection.doms)
    site.hv.connection = conn
    site.entry(dom, Phase.RESTART_FAILED, transient_xml=dom.xml)
    del conn.doms[dom.uid]  # a transient guest that stopped is no longer known
    return dom, conn


def test_recover_creates_a_gone_transient_guest_again_from_the_journalled_xml(
    site: Site,  # noqa: F811
) -> None:
    dom, conn = _gone_transient(site)

    assert site.recover() == ["web1"]

    assert conn.created == ["web1"]
    assert conn.doms[dom.uid].code == libvirt.VIR_DOMAIN_RUNNING
    assert site.journal.entries() == []
    assert any("transient guest created again" in s for s in site.said)


def test_recover_leaves_a_transient_guest_whose_disk_changed_and_start_creates_it(
    site: Site,  # noqa: F811
) -> None:
    dom, conn = _gone_transient(site)
    disk = Path(parse_domain_xml(dom.xml).disks[0].source or "")
    [entry] = site.journal.entries()
    os.utime(disk, ns=(entry.disks_mtime_ns or 0, (entry.disks_mtime_ns or 0) + 10**9))

    assert site.recover() == []
    assert conn.created == [] and site.phases() == [Phase.RESTART_FAILED]
    assert any("recover --start' would create it" in s for s in site.said)

    assert site.recover(start=True) == ["web1"]
    assert conn.created == ["web1"] and site.journal.entries() == []
