"""Issue 16, hosts: a clone restored to one host clashes with MACs used on any other."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from logging import WARNING
from pathlib import Path
from typing import cast

import pytest
import test_restoring as restoring

from guestsafe.engine import events
from guestsafe.engine.errors import HypervisorError, RemoteDisksUnsupported, RestoreError
from guestsafe.engine.hypervisor.cluster_macs import (
    mac_census,
    mac_owners_across,
    unchecked_warning,
)
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import parse_domain_xml
from guestsafe.engine.hypervisor.hosts import HostRegistry
from guestsafe.engine.restore import volume_upload
from guestsafe.engine.restore.clone import restore_clone
from guestsafe.engine.restore.plan import KEEP, NEW, RestorePlan, choose_macs, plan_restore
from guestsafe.tui.cli import _say_macs

Setup = restoring.Setup
FakeHypervisor = restoring.FakeHypervisor


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return restoring.build(tmp_path)  # guest "web" is defined on setup.hv, host node1


def _hosts(setup: Setup, node2: FakeHypervisor) -> list[tuple[str, Hypervisor]]:
    return [("node1", cast(Hypervisor, setup.hv)), ("node2", cast(Hypervisor, node2))]


def _plan_on_node2(
    setup: Setup, node2: FakeHypervisor, macs_now: Callable[[], Mapping[str, list[str]]]
) -> RestorePlan:
    """Version ``web`` planned as ``web-copy`` on node2, its MACs read by ``macs_now``."""
    return plan_restore(
        setup.archive,
        "web",
        setup.version.number,
        "web-copy",
        cast(Hypervisor, node2),
        target_dir=setup.root / "restored",
        macs_in_use=macs_now,
        host="node2",
    )


def test_owners_of_other_hosts_are_named_with_their_host() -> None:
    node1 = FakeHypervisor(guests={"web": _xml("web", "52:54:00:00:00:01")})
    node2 = FakeHypervisor(guests={"db": _xml("db", "52:54:00:00:00:01")})
    hosts = [("node1", cast(Hypervisor, node1)), ("node2", cast(Hypervisor, node2))]

    owners = mac_owners_across("node2", hosts)

    # The target host's guests first and bare, the others' with their host.
    assert owners == {"52:54:00:00:00:01": ["db", "web on node1"]}
    # One libvirt reached under two names is read once.
    assert mac_owners_across("node1", [*hosts, ("again", hosts[0][1])]) == {
        "52:54:00:00:00:01": ["web", "db on node2"]
    }


def test_a_clone_planned_on_node2_clashes_with_the_original_on_node1(setup: Setup) -> None:
    node2 = FakeHypervisor()
    plan = plan_restore(
        setup.archive,
        "web",
        setup.version.number,
        "web",  # the same name is free on node2
        cast(Hypervisor, node2),
        target_dir=setup.root / "node2-images",
        macs_in_use=lambda: mac_owners_across("node2", _hosts(setup, node2)),
        host="node2",
    )
    assert plan.host == "node2"
    assert [(i.mac, i.clash_with) for i in plan.interfaces] == [
        (restoring.MAC_WEB, "web on node1"),
        (restoring.MAC_OTHER, "web on node1"),
    ]
    # Without the other hosts, node2 alone sees no clash: the check must span them.
    alone = plan_restore(
        setup.archive,
        "web",
        setup.version.number,
        "web",
        cast(Hypervisor, node2),
        target_dir=setup.root / "alone",
    )
    assert not alone.clashes


def test_the_clone_is_defined_on_the_target_host_with_macs_no_host_uses(setup: Setup) -> None:
    node2 = FakeHypervisor()
    macs_now = lambda: mac_owners_across("node2", _hosts(setup, node2))  # noqa: E731
    plan = _plan_on_node2(setup, node2, macs_now)

    result = restore_clone(
        plan, cast(Hypervisor, node2), setup.paths, mac_policy=NEW, macs_in_use=macs_now
    )

    assert list(node2.guests) == ["web-copy"] and list(setup.hv.guests) == ["web"]
    info = parse_domain_xml(node2.guests["web-copy"])
    in_use_elsewhere = set(setup.hv.mac_owners())
    assert info.macs == result.macs and not set(info.macs) & in_use_elsewhere


def test_a_mac_taken_on_another_host_after_planning_is_refused(setup: Setup) -> None:
    node2 = FakeHypervisor()
    node3 = FakeHypervisor()
    hosts = [*_hosts(setup, node2), ("node3", cast(Hypervisor, node3))]
    macs_now = lambda: mac_owners_across("node2", hosts)  # noqa: E731
    plan = _plan_on_node2(setup, node2, macs_now)
    # Meanwhile a guest on node3 took the first MAC (its clash on node1 was accepted).
    node3.guests["late"] = _xml("late", restoring.MAC_WEB)

    with pytest.raises(RestoreError, match="late on node3"):
        restore_clone(
            plan, cast(Hypervisor, node2), setup.paths, mac_policy=KEEP, macs_in_use=macs_now
        )
    assert not node2.guests


def test_restoring_onto_a_remote_connection_waits_for_the_transport(setup: Setup) -> None:
    remote = FakeHypervisor(uri="qemu+ssh://root@node2/system")
    plan = plan_restore(
        setup.archive,
        "web",
        setup.version.number,
        "web-copy",
        cast(Hypervisor, remote),
        target_dir=setup.root / "restored",
    )
    with pytest.raises(RemoteDisksUnsupported, match="not supported yet"):
        restore_clone(plan, cast(Hypervisor, remote), setup.paths)
    assert not remote.guests and not (setup.root / "restored").exists()


def _xml(name: str, mac: str) -> str:
    return (
        f"<domain type='kvm'><name>{name}</name><devices><interface type='network'>"
        f"<mac address='{mac}'/><source network='default'/></interface></devices></domain>"
    )


# --- every host in the registry, the silent ones named ---------------------------------


def _registry(setup: Setup, node2: FakeHypervisor) -> HostRegistry:
    """local (setup.hv, defining web), node2 and node3, which never answers."""

    def opener(uri: str, _connect_timeout: float) -> Hypervisor:
        if uri == "fake://node2":
            return cast(Hypervisor, node2)
        raise HypervisorError(f"cannot connect to {uri}: Connection refused")

    registry = HostRegistry("test:///fake", local=lambda: cast(Hypervisor, setup.hv), opener=opener)
    registry.configure({"node2": "fake://node2", "node3": "fake://node3"})
    return registry


def test_the_census_reads_every_host_and_names_the_one_that_did_not_answer(
    setup: Setup,
) -> None:
    node2 = FakeHypervisor(guests={"db": _xml("db", restoring.MAC_WEB)})

    owners = mac_census("node2", _registry(setup, node2))

    assert owners[restoring.MAC_WEB] == ["db", "web on local"]
    assert owners.unreachable == ["node3: cannot connect to fake://node3: Connection refused"]
    warning = unchecked_warning(owners.unreachable)
    assert warning is not None and "node3" in warning and "Connection refused" in warning
    assert unchecked_warning([]) is None


def test_a_restore_with_a_silent_host_warns_and_names_it(setup: Setup) -> None:
    node2 = FakeHypervisor()
    registry = _registry(setup, node2)
    macs_now = lambda: mac_census("node2", registry)  # noqa: E731
    plan = _plan_on_node2(setup, node2, macs_now)
    assert plan.macs_unchecked == ["node3: cannot connect to fake://node3: Connection refused"]
    assert [i.clash_with for i in plan.interfaces] == ["web on local", "web on local"]
    said: list[events.Event] = []

    result = restore_clone(
        plan, cast(Hypervisor, node2), setup.paths, macs_in_use=macs_now, reporter=said.append
    )

    warned = [e.message for e in said if isinstance(e, events.LogLine) and e.level == WARNING]
    assert len(warned) == 1 and "node3" in warned[0] and warned[0] in result.warnings
    assert not set(result.macs) & set(setup.hv.mac_owners())


def test_new_macs_for_every_interface_while_the_original_may_be_on_a_silent_host(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    """No reachable host uses web's MACs, but node3 did not answer: web may run there."""
    setup.hv.guests.pop("web")
    node2 = FakeHypervisor()
    macs_now = lambda: mac_census("node2", _registry(setup, node2))  # noqa: E731
    plan = _plan_on_node2(setup, node2, macs_now)
    assert plan.clashes == [] and plan.macs_unchecked
    assert [i.index for i in plan.to_settle] == [0, 1]
    assert choose_macs(plan, KEEP, None) == [restoring.MAC_WEB, restoring.MAC_OTHER]

    _say_macs(plan, NEW)
    result = restore_clone(plan, cast(Hypervisor, node2), setup.paths, macs_in_use=macs_now)

    assert not set(result.macs) & {restoring.MAC_WEB, restoring.MAC_OTHER}
    assert result.macs == [i.new_mac for i in plan.interfaces]
    said = capsys.readouterr().err.splitlines()
    assert said == [
        f"interface {i.index}: MAC {i.mac} could not be checked on every host "
        f"(the original may run there); using {i.new_mac}"
        for i in plan.interfaces
    ]


def test_a_restore_by_upload_checks_the_macs_of_every_host(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The remote path's last check before define spans the hosts, not its target alone."""
    import libvirt

    conn = libvirt.open("test:///default")  # its storage pool takes the volumes
    node2 = FakeHypervisor(uri="qemu+ssh://root@node2/system")
    node2.connection = conn  # type: ignore[attr-defined]
    node3 = FakeHypervisor()
    hosts = [*_hosts(setup, node2), ("node3", cast(Hypervisor, node3))]
    macs_now = lambda: mac_owners_across("node2", hosts)  # noqa: E731
    plan = _no_nvram(
        plan_restore(
            setup.archive,
            "web",
            setup.version.number,
            "web-copy",
            cast(Hypervisor, node2),
            target_dir=setup.root / "restored",
            macs_in_use=macs_now,
            host="node2",
        )
    )
    by_file = {rec.file: rec.blake3 for rec in setup.version.manifest.disks}
    monkeypatch.setattr(
        volume_upload,
        "upload_volume",
        lambda _conn, _vol, src, **_kw: by_file[Path(src).name],
    )
    node3.guests["late"] = _xml("late", restoring.MAC_WEB)  # taken after planning
    before = {v.name() for v in conn.storagePoolLookupByName("default-pool").listAllVolumes()}

    with pytest.raises(RestoreError, match="late on node3"):
        volume_upload.restore_clone_remote(
            plan,
            cast(Hypervisor, node2),
            setup.paths,
            target_pool="default-pool",
            mac_policy=KEEP,
            macs_in_use=macs_now,
        )
    assert not node2.guests
    after = {v.name() for v in conn.storagePoolLookupByName("default-pool").listAllVolumes()}
    assert after == before  # the uploaded volumes are deleted again

    result = volume_upload.restore_clone_remote(
        plan,
        cast(Hypervisor, node2),
        setup.paths,
        target_pool="default-pool",
        macs_in_use=macs_now,
    )
    assert list(node2.guests) == ["web-copy"]
    in_use_elsewhere = set(setup.hv.mac_owners()) | set(node3.mac_owners())
    assert not set(result.macs) & in_use_elsewhere


def _no_nvram(plan: RestorePlan) -> RestorePlan:
    """The plan of a version without UEFI variables, which a remote host takes."""
    manifest = replace(plan.version.manifest, nvram=None)
    return replace(plan, version=replace(plan.version, manifest=manifest), nvram=None)
