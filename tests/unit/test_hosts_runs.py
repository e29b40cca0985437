"""Issue 16, hosts: per-host connections and runs where one host does not answer."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import cast

import pytest
import test_runner_phases as phases

from guestsafe.engine.archive.store import Archive
from guestsafe.engine.backup import runner
from guestsafe.engine.backup.host_plan import plan_hosts
from guestsafe.engine.errors import HostUnreachable, HypervisorError, NotFoundError
from guestsafe.engine.hypervisor.connection import Hypervisor, uri_is_remote
from guestsafe.engine.hypervisor.domain_xml import GuestInfo
from guestsafe.engine.hypervisor.hosts import LOCAL_HOST, HostRegistry, HostState
from guestsafe.engine.hypervisor.remote_disks import is_remote
from guestsafe.engine.jobs.model import Job

REFUSED = "cannot connect to qemu+ssh://root@node2/system: Connection refused"
NODE2_URI = "qemu+ssh://root@node2/system"


class HostFake(phases.FakeHypervisor):
    """The runner's fake hypervisor, one per host, with what host planning asks."""

    def __init__(self, timeline: list[tuple[str, str]], uri: str) -> None:
        super().__init__(timeline)
        self.uri = uri
        self.closed = False

    def exists(self, name: str) -> bool:
        return name in self.guests

    def close(self) -> None:
        self.closed = True


class Opener:
    """Opens node2 (a fake) when it is up, and fails as libvirt does when it is down."""

    def __init__(self, node2: HostFake) -> None:
        self.node2 = node2
        self.down = False
        self.opened: list[str] = []

    def __call__(self, uri: str, _connect_timeout: float) -> Hypervisor:
        self.opened.append(uri)
        if self.down:
            raise HypervisorError(REFUSED)
        return cast(Hypervisor, self.node2)


@pytest.fixture
def rig(tmp_path: Path) -> phases.Rig:
    rig = phases.Rig(tmp_path)
    rig.hv = HostFake(rig.timeline, rig.hv.uri)  # this machine, asked as the others are
    return rig


def _node2(rig: phases.Rig, uri: str = "test:///node2-fake") -> tuple[HostFake, Opener]:
    node2 = HostFake(rig.timeline, uri)
    return node2, Opener(node2)


def _registry(rig: phases.Rig, opener: Opener) -> HostRegistry:
    return HostRegistry(rig.hv.uri, {"node2": NODE2_URI}, local=lambda: rig._hv(), opener=opener)


def _add(rig: phases.Rig, hv: HostFake, name: str) -> None:
    """Guest ``name`` on ``hv``, its disk made by the rig (the rig adds it locally first)."""
    rig.add_guest(f"{name}-tmp")
    guest = rig.hv.guests.pop(f"{name}-tmp")
    guest.name = name
    hv.guests[name] = guest


def test_connections_open_lazily_and_keep_their_state(rig: phases.Rig) -> None:
    node2, opener = _node2(rig)
    registry = _registry(rig, opener)
    assert registry.names() == [LOCAL_HOST, "node2"]
    assert registry.status("node2").state == HostState.NOT_TRIED and not opener.opened
    opener.down = True
    with pytest.raises(HostUnreachable, match=r"'node2' is unreachable: .*Connection refused"):
        registry.get("node2")
    status = registry.status("node2")
    assert status.state == HostState.UNREACHABLE and "Connection refused" in (status.reason or "")
    assert "unreachable" in status.describe() and NODE2_URI in status.describe()
    opener.down = False  # the host came back: the next request reaches it
    assert registry.get("node2") is node2
    assert registry.status("node2").state == HostState.CONNECTED
    assert registry.get("node2") is node2 and len(opener.opened) == 2  # kept open
    assert registry.get(LOCAL_HOST) is rig._hv()
    with pytest.raises(NotFoundError, match="'node9' is not defined"):
        registry.get("node9")
    registry.configure({"node2": "qemu+ssh://root@elsewhere/system"})  # moved: reconnect
    assert node2.closed and registry.status("node2").state == HostState.NOT_TRIED
    registry.get("node2")
    registry.close()
    assert not cast(HostFake, rig.hv).closed  # the local one belongs to the engine


def test_two_hosts_guests_of_one_name_are_backed_up_as_two_series(rig: phases.Rig) -> None:
    node2, opener = _node2(rig)
    rig.add_guest("web1")
    _add(rig, node2, "web1")
    job = rig.job(["web1"], hosts=[LOCAL_HOST, "node2"])

    result = runner.run_job(job, rig._hv(), rig.paths, rig.report, hosts=_registry(rig, opener))

    assert result.ok, [o.message for o in result.outcomes]
    assert sorted(o.guest for o in result.outcomes) == ["node2/web1", "web1"]
    archive = Archive.open(rig.archive)
    assert archive.guests() == ["node2/web1", "web1"]
    local, remote = archive.version("web1", 1), archive.version("node2/web1", 1)
    assert local.manifest.host_name is None and remote.manifest.host_name == "node2"
    assert local.manifest.uuid == rig.hv.guests["web1"].uuid
    assert remote.manifest.uuid == node2.guests["web1"].uuid != local.manifest.uuid
    # Each host's own guest was stopped and started, on its own connection.
    assert rig.calls().count(("shutdown", "web1")) == 2
    assert [g.state for g in (rig.hv.guests["web1"], node2.guests["web1"])] == ["running"] * 2


def test_an_unreachable_host_fails_its_own_guests_alone(rig: phases.Rig) -> None:
    _node2_fake, opener = _node2(rig)
    opener.down = True
    rig.add_guest("web1")
    job = rig.job(["web1", "db1"], hosts=[LOCAL_HOST, "node2"])

    result = runner.run_job(job, rig._hv(), rig.paths, rig.report, hosts=_registry(rig, opener))

    outcomes = {o.guest: o for o in result.outcomes}
    assert outcomes["web1"].ok and rig.versions("web1") == [1]
    assert not outcomes["db1"].ok and "Connection refused" in outcomes["db1"].message
    assert any("'node2' is unreachable" in p for p in result.problems)
    assert not result.ok
    log = result.log_path.read_text()
    assert "db1" in log and "Connection refused" in log


def test_a_job_of_one_unreachable_host_touches_nothing(rig: phases.Rig) -> None:
    _node2_fake, opener = _node2(rig)
    opener.down = True
    rig.add_guest("web1")  # a local guest of the same name is not this job's
    job = rig.job(["web1"], hosts=["node2"])

    result = runner.run_job(job, rig._hv(), rig.paths, rig.report, hosts=_registry(rig, opener))

    (outcome,) = result.outcomes
    assert outcome.guest == "node2/web1" and not outcome.ok
    assert "unreachable" in outcome.message and "nothing was done" in outcome.message
    assert rig.calls() == [] and not rig.archive.joinpath("web1").exists()


def test_all_guests_means_each_reachable_hosts_and_names_the_unreachable_one() -> None:
    local = _Listed("test:///local", ["web1", "scratch1"])
    node1 = _Listed("test:///node1", ["db1"])
    opened = {"test:///node1": node1}

    def opener(uri: str, _connect_timeout: float) -> Hypervisor:
        if uri not in opened:
            raise HypervisorError(REFUSED)
        return cast(Hypervisor, opened[uri])

    registry = HostRegistry(
        local.uri,
        {"node1": "test:///node1", "node2": NODE2_URI},
        local=lambda: cast(Hypervisor, local),
        opener=opener,
    )
    job = Job("all", [], Path("/srv/b"), all_guests=True, exclude=["scratch*"])
    job.hosts = [LOCAL_HOST, "node1", "node2"]

    plan = plan_hosts(job, registry)

    assert [(t.host, t.guests) for t in plan.targets] == [("local", ["web1"]), ("node1", ["db1"])]
    assert len(plan.problems) == 1 and "'node2' is unreachable" in plan.problems[0]
    assert plan.guest_names() == ["web1", "db1"]


class _Listed:
    """A host answering the listing calls host planning makes."""

    def __init__(self, uri: str, names: list[str]) -> None:
        self.uri = uri
        self.names = names

    def guests(self) -> list[GuestInfo]:
        return [GuestInfo(n, str(uuid.uuid4()), "running", True, []) for n in self.names]

    def exists(self, name: str) -> bool:
        return name in self.names


@pytest.mark.parametrize(
    ("uri", "remote"),
    [
        ("qemu:///system", False),
        ("qemu+unix:///system", False),
        ("test:///default", False),
        ("qemu+ssh://root@node2/system", True),
        ("qemu+tls://node2/system", True),
        ("qemu://node2/system", True),
        ("qemu+ssh://root@127.0.0.1:1/system", True),
    ],
)
def test_which_uris_reach_another_machine(uri: str, remote: bool) -> None:
    assert uri_is_remote(uri) is remote
    assert is_remote(cast(Hypervisor, type("H", (), {"uri": uri})())) is remote
