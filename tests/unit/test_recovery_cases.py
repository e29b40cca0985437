"""Issue 12, recovery and power state: cases 7-13 and 21 that fakes can hold.

The real-guest halves are in tests/integration/test_recovery_cases_live.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest
from rig import require
from unit.test_pushbackup import AGENT_XML, AgentDomain, _snapshot_push
from unit.test_runner_phases import Rig

from guestsafe.engine import locks
from guestsafe.engine.backup import guest_backup, recovery
from guestsafe.engine.backup.guest_backup import GuestBackup
from guestsafe.engine.backup.journal import Journal, JournalEntry, config_digest
from guestsafe.engine.backup.phases import Phase
from guestsafe.engine.errors import Cancelled, HypervisorError, ShutdownTimeout
from guestsafe.engine.hypervisor.connection import Hypervisor, _LifecycleBoard
from guestsafe.engine.hypervisor.domain_xml import RUNNING, SHUTOFF, parse_domain_xml
from guestsafe.engine.jobs import timers
from guestsafe.engine.jobs.model import Job, Schedule
from guestsafe.engine.jobs.timers import UnitSettings, install_timers
from guestsafe.engine.paths import Paths

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


# --- case 13: the service's stop path ---------------------------------------------------


def _settings(tmp_path: Path) -> UnitSettings:
    return UnitSettings(timers.find_program(), tmp_path / "jobs.toml", "qemu:///system")


def test_case_13_service_stops_by_cancelling_and_recovers_after(tmp_path: Path) -> None:
    require(SYSTEMD_ANALYZE, "systemd-analyze is not installed")
    assert SYSTEMD_ANALYZE is not None
    job = Job("nightly", ["web1"], Path("/srv/backup"), schedule=Schedule("02:00", []))
    job.shutdown_timeout = 300
    unit_dir = tmp_path / "units"
    install_timers([job], _settings(tmp_path), unit_dir, reload=False)
    timer, service = timers.unit_names(job.name)
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit_dir / timer), str(unit_dir / service)],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "info"},
    )
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    lines = (unit_dir / service).read_text().splitlines()
    # SIGTERM to guestsafe alone: its handler cancels and starts the guest again.
    assert "KillMode=mixed" in lines and "KillSignal=SIGTERM" in lines
    [stop] = [line for line in lines if line.startswith("TimeoutStopSec=")]
    # Long enough for the cancelled run's hooks and a restart, never the 90 s default.
    assert int(stop.split("=")[1]) >= 4 * job.hooks.timeout + 120
    [post] = [line for line in lines if line.startswith("ExecStopPost=")]
    assert post.endswith('"recover"') and str(timers.find_program()) in post
    assert '"--config"' in post


# --- fakes: a libvirt domain and connection as recovery reads them ----------------------


class FakeDom:
    """A libvirt domain as recovery asks it: state and reason, XML, managed save, thaw."""

    def __init__(self, name: str, uid: str, xml: str, code: int, reason: int = 1) -> None:
        self._name, self.uid, self.xml = name, uid, xml
        self.code, self.reason = code, reason
        self.managed_save = False
        self.thaw_fails = False
        self.thaws = 0
        # Set by wait_state: the state the guest reaches while recovery waits.
        self.goes_to: tuple[int, int] | None = None

    def name(self) -> str:
        return self._name

    def state(self) -> tuple[int, int]:
        return self.code, self.reason

    def isActive(self) -> bool:
        return self.code != libvirt.VIR_DOMAIN_SHUTOFF

    def hasManagedSaveImage(self, _flags: int) -> bool:
        return self.managed_save

    def XMLDesc(self, _flags: int) -> str:
        return self.xml

    def fsThaw(self, _mounts: object, _flags: int) -> int:
        self.thaws += 1
        if self.thaw_fails:
            raise libvirt.libvirtError("agent went away")
        return 1

    def jobInfo(self) -> list[int]:
        return [libvirt.VIR_DOMAIN_JOB_NONE]


class FakeConn:
    def __init__(self) -> None:
        self.doms: dict[str, FakeDom] = {}

    def lookupByUUIDString(self, uid: str) -> FakeDom:
        if uid not in self.doms:
            error = libvirt.libvirtError("no domain")
            error.err = (libvirt.VIR_ERR_NO_DOMAIN, 0, "no domain", 0, "", "", "", 0, 0)
            raise error
        return self.doms[uid]


class FakeRecoveryHv:
    """What recovery asks of Hypervisor; its calls land in ``calls``."""

    def __init__(self) -> None:
        self.connection = FakeConn()
        self.calls: list[tuple[str, str]] = []
        self.waited: list[float] = []

    def __enter__(self) -> FakeRecoveryHv:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def _by_name(self, name: str) -> FakeDom:
        [dom] = [d for d in self.connection.doms.values() if d.name() == name]
        return dom

    def start(self, name: str, *, paused: bool = False, attempts: int = 5) -> None:
        self.calls.append(("start", name))
        self._by_name(name).code = libvirt.VIR_DOMAIN_RUNNING

    def resume(self, name: str) -> None:
        self.calls.append(("resume", name))
        self._by_name(name).code = libvirt.VIR_DOMAIN_RUNNING

    def wait_state(self, name: str, state: str, timeout: float) -> bool:
        self.waited.append(timeout)
        dom = self._by_name(name)
        if dom.goes_to is not None:
            dom.code, dom.reason = dom.goes_to
        return dom.code == libvirt.VIR_DOMAIN_SHUTOFF


def _domain_xml(name: str, uid: str, disk: Path) -> str:
    return (
        f"<domain type='kvm'><name>{name}</name><uuid>{uid}</uuid><devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        f"<source file='{disk}'/><target dev='vda'/></disk></devices></domain>"
    )


@dataclass
class Site:
    """A state dir with journal entries, and a fake libvirt holding the guests."""

    root: Path
    hv: FakeRecoveryHv = field(default_factory=FakeRecoveryHv)
    said: list[str] = field(default_factory=list)

    @property
    def paths(self) -> Paths:
        home = self.root / "home"
        return Paths(home / "jobs.toml", home / "state", home / "log", home / "cache")

    @property
    def journal(self) -> Journal:
        return Journal(self.paths.state_dir)

    def guest(self, name: str = "web1", code: int = libvirt.VIR_DOMAIN_SHUTOFF) -> FakeDom:
        uid = str(uuid.uuid4())
        disk = self.root / f"{name}-{uid}.raw"
        disk.write_bytes(b"disk")
        dom = FakeDom(name, uid, _domain_xml(name, uid, disk), code)
        self.hv.connection.doms[uid] = dom
        return dom

    def entry(self, dom: FakeDom, phase: Phase, **fields: Any) -> JournalEntry:
        """The entry a runner that stopped ``dom`` and then died leaves."""
        now = time.time()
        disk = Path(parse_domain_xml(dom.xml).disks[0].source or "")
        entry = JournalEntry("nightly", dom.name(), dom.uid, "test:///fake", RUNNING, str(phase))
        entry.pid, entry.pid_start = 2**22 + 7, "gone"  # a process that is not there
        entry.config_digest = config_digest(dom.xml)
        entry.shutdown_requested = now - 60
        entry.shutdown_deadline = now + 240
        entry.settle_by = now + 2040
        entry.off_at = now - 50
        entry.disks_mtime_ns = disk.stat().st_mtime_ns
        for key, value in fields.items():
            setattr(entry, key, value)
        self.journal.write(entry)
        return entry

    def recover(self, *, start: bool = False) -> list[str]:
        def report(event: object) -> None:
            self.said.append(str(getattr(event, "text", event)))

        return recovery.recover(self.paths, report, start=start, connect=lambda _uri: self.hv)

    def phases(self) -> list[str]:
        return [e.phase for e in self.journal.entries()]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


# --- case 7: recovery starts only what it stopped, untouched since ----------------------


def test_case_7_recover_starts_an_untouched_guest_it_stopped(site: Site) -> None:
    dom = site.guest()
    site.entry(dom, Phase.COPY)

    assert site.recover() == ["web1"]

    assert site.hv.calls == [("start", "web1")]
    assert site.journal.entries() == []


@pytest.mark.parametrize(
    ("touch", "why"),
    [
        ("redefined", "definition changed"),
        ("started since", "disk files changed"),
        ("days later", "left off on purpose"),
        ("managed save", "managed-save image"),
        ("crashed", "crashed"),
    ],
)
def test_case_7_recover_leaves_a_touched_guest_off_and_says_so_once(
    site: Site, touch: str, why: str
) -> None:
    dom = site.guest()
    entry = site.entry(dom, Phase.RESTART_FAILED)
    if touch == "redefined":
        dom.xml = dom.xml.replace("<devices>", "<memory>2048</memory><devices>")
    elif touch == "started since":
        disk = Path(parse_domain_xml(dom.xml).disks[0].source or "")
        os.utime(disk, ns=(entry.disks_mtime_ns or 0, (entry.disks_mtime_ns or 0) + 10**9))
    elif touch == "days later":
        entry.off_at = entry.shutdown_requested = time.time() - 3 * 86400
        site.journal.write(entry)
    elif touch == "managed save":
        dom.managed_save = True
    else:
        dom.reason = libvirt.VIR_DOMAIN_SHUTOFF_CRASHED

    assert site.recover() == []
    assert site.hv.calls == []
    [told] = [line for line in site.said if "recover --start" in line]
    assert why in told
    assert site.phases() == ["restart-failed"]  # kept, and it remembers it told

    site.said.clear()
    assert site.recover() == [] and site.said == [] and site.hv.calls == []

    assert site.recover(start=True) == ["web1"]
    assert site.hv.calls == [("start", "web1")] and site.journal.entries() == []


def test_case_7_recover_finds_the_guest_by_uuid_not_by_name(site: Site) -> None:
    ours = site.guest("web1")
    site.entry(ours, Phase.COPY)
    ours._name = "web1-renamed"
    site.guest("web1")  # another guest, defined later under the old name

    site.recover()

    assert site.hv.calls == [("start", "web1-renamed")]


def test_case_7_recover_waits_for_no_lock_and_acts_only_when_it_has_it(site: Site) -> None:
    dom = site.guest()
    site.entry(dom, Phase.COPY)
    key = locks.guest_key(dom.uid)

    with locks.acquire(site.paths.state_dir, key, "restore to web1"):
        assert site.recover() == []
        assert site.hv.calls == [] and site.phases() == ["copy"]

    assert site.recover() == ["web1"]


def test_case_7_recover_start_is_a_subcommand_option() -> None:
    from guestsafe.tui import cli

    args = cli.build_parser().parse_args(["recover", "--start"])

    assert args.command == "recover" and args.start is True


# --- cases 8 and 9: a shutdown request the dead runner never saw acted on ----------------


def test_case_8_late_poweroff_entry_stays_until_settled_and_recover_finishes_it(
    site: Site,
) -> None:
    dom = site.guest(code=libvirt.VIR_DOMAIN_RUNNING)
    now = time.time()
    # The runner gave up at the timeout ("abort"), left the entry and exited.
    site.entry(
        dom,
        Phase.SHUTDOWN,
        off_at=None,
        disks_mtime_ns=None,
        shutdown_deadline=now - 1,
        settle_by=now + 1800,
        detached=True,
    )

    assert site.recover() == []  # still running: it may yet act on the request
    assert site.phases() == ["shutdown"] and site.hv.calls == []

    dom.code, dom.reason = libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN
    assert site.recover() == ["web1"]  # it powered off late: started again
    assert site.hv.calls == [("start", "web1")] and site.journal.entries() == []


def test_case_8_a_guest_running_past_settle_by_has_settled(site: Site) -> None:
    dom = site.guest(code=libvirt.VIR_DOMAIN_RUNNING)
    now = time.time()
    site.entry(
        dom,
        Phase.SHUTDOWN,
        off_at=None,
        shutdown_deadline=now - 1900,
        settle_by=now - 100,
        detached=True,
    )

    assert site.recover() == ["web1"]
    assert site.hv.calls == [] and site.journal.entries() == []


def test_case_8_the_runner_keeps_the_entry_after_an_abort_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path)
    rig.add_guest("web1")
    monkeypatch.setattr(guest_backup, "LATE_POWEROFF_GRACE", 0.0)

    def ignore(name: str, **_kw: object) -> None:
        raise ShutdownTimeout(f"guest {name!r} did not shut down within 5 s")

    monkeypatch.setattr(rig.hv, "shutdown", ignore)

    result = rig.run(rig.job(["web1"], shutdown_timeout=5))

    assert not result.ok and rig.hv.state("web1") == RUNNING
    [entry] = Journal(rig.paths.state_dir).entries()
    assert entry.phase == "shutdown" and entry.detached and entry.off_at is None
    assert entry.settle_by is not None and entry.settle_by > time.time() + 5


def test_case_9_recover_waits_for_a_guest_still_shutting_down(site: Site) -> None:
    dom = site.guest(code=libvirt.VIR_DOMAIN_RUNNING)
    # SIGKILL between the shutdown request and the power-off.
    site.entry(dom, Phase.SHUTDOWN, off_at=None, disks_mtime_ns=None)
    dom.goes_to = (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN)

    assert site.recover() == ["web1"]

    assert site.hv.waited and 0 < site.hv.waited[0] <= recovery.SHUTDOWN_WAIT_CAP
    assert site.hv.calls == [("start", "web1")]  # it went off while we waited: started
    assert dom.code == libvirt.VIR_DOMAIN_RUNNING and site.journal.entries() == []


# --- case 10: a thaw that fails ---------------------------------------------------------


def test_case_10_a_failed_thaw_keeps_the_entry_and_recover_retries_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path)
    rig.add_guest("web1")
    ctx = rig.context(rig.job(["web1"]), threading.Event())
    backup = GuestBackup(ctx, "web1")
    backup.preflight()  # the journal entry; the snapshot's push copy comes next
    dom = AgentDomain(thaw_fails=True)
    push, _owner = _snapshot_push(monkeypatch, AGENT_XML, dom)
    backup.strategy = push
    with pytest.raises(HypervisorError):
        push._snapshot()

    backup.settle()

    assert dom.calls.count("thaw") >= 4  # three in the run, more in settle
    assert backup.error is not None and "virsh domfsthaw web1" in backup.error.message
    [entry] = Journal(rig.paths.state_dir).entries()
    assert entry.phase == "freeze" and entry.detached

    # The next command's recovery thaws it, or keeps the entry and says how.
    (tmp_path / "site").mkdir()
    site = Site(tmp_path / "site")
    fake = site.guest(code=libvirt.VIR_DOMAIN_RUNNING)
    fake.xml = fake.xml.replace(
        "</devices>", AGENT_XML.split("<devices>")[1].split("</devices>")[0] + "</devices>"
    )
    fake.thaw_fails = True
    site.entry(fake, Phase.FREEZE, detached=True)
    assert site.recover() == [] and site.phases() == ["freeze"]
    assert any("virsh domfsthaw web1" in line for line in site.said)
    fake.thaw_fails = False
    assert site.recover() == ["web1"] and site.journal.entries() == []


# --- case 11: a failed restart is retried at once ---------------------------------------


def test_case_11_a_failed_restart_is_retried_before_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path)
    rig.add_guest("web1")
    monkeypatch.setattr(guest_backup.time, "sleep", lambda _s: None)
    refusals = [2]
    real_start = rig.hv.start

    def flaky_start(name: str, *, paused: bool = False, attempts: int = 5) -> None:
        if refusals[0] > 0:
            refusals[0] -= 1
            rig.timeline.append(("start refused", name))
            raise HypervisorError(f"cannot start guest {name!r}: Permission denied")
        real_start(name, paused=paused, attempts=attempts)

    monkeypatch.setattr(rig.hv, "start", flaky_start)

    result = rig.run(rig.job(["web1"]))

    assert result.ok, result.outcomes
    commit = rig.timeline.index(("phase commit", "web1"))
    assert ("start", "web1") in rig.timeline[:commit]  # running again before the commit
    assert rig.timeline[:commit].count(("start refused", "web1")) == 2
    assert rig.versions("web1") == [1]


# --- case 21: cancel during the shutdown wait --------------------------------------------


class IgnoringDom:
    """A running guest that ignores every ACPI request."""

    def __init__(self) -> None:
        self.requests = 0

    def shutdown(self) -> None:
        self.requests += 1

    def state(self) -> tuple[int, int]:
        return libvirt.VIR_DOMAIN_RUNNING, 1

    def UUIDString(self) -> str:
        return "6f1c9f36-0000-4000-8000-000000000021"


def test_case_21_the_shutdown_wait_ends_within_seconds_of_a_cancel() -> None:
    hv = object.__new__(Hypervisor)
    hv._board = _LifecycleBoard()
    dom = IgnoringDom()
    monkey_domain = {"web1": dom}
    hv._domain = monkey_domain.__getitem__  # type: ignore[method-assign]
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    t0 = time.monotonic()

    with pytest.raises(Cancelled, match="cancelled during the shutdown wait"):
        hv.shutdown("web1", timeout=300, cancel=cancel)

    assert time.monotonic() - t0 < 3.0 and dom.requests >= 1


def test_case_21_a_cancel_in_the_shutdown_wait_leaves_the_guest_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path)
    rig.add_guest("web1")
    cancel = threading.Event()

    def cancelled(name: str, **kw: Any) -> None:
        assert kw["cancel"] is cancel  # the wait watches the run's cancel
        cancel.set()
        raise Cancelled("run cancelled during the shutdown wait (after 1 s)")

    monkeypatch.setattr(rig.hv, "shutdown", cancelled)

    result = rig.run(rig.job(["web1"]), cancel=cancel)

    assert not result.ok and rig.hv.state("web1") == RUNNING
    assert ("start", "web1") not in rig.calls()  # it never went down
    assert "cancelled during the shutdown wait" in result.log_path.read_text()
    # The ACPI request may still be acted on: recovery starts it if it powers off.
    [entry] = Journal(rig.paths.state_dir).entries()
    assert entry.phase == "shutdown" and entry.detached


def test_case_21_a_guest_that_went_down_before_the_cancel_is_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path)
    rig.add_guest("web1")
    cancel = threading.Event()

    def acted_then_cancelled(name: str, **_kw: Any) -> None:
        rig.hv.guests[name].state = SHUTOFF  # it acted on the request meanwhile
        cancel.set()
        raise Cancelled("run cancelled during the shutdown wait (after 3 s)")

    monkeypatch.setattr(rig.hv, "shutdown", acted_then_cancelled)

    result = rig.run(rig.job(["web1"]), cancel=cancel)

    assert not result.ok and rig.hv.state("web1") == RUNNING
    assert ("start", "web1") in rig.calls()
    assert Journal(rig.paths.state_dir).entries() == []  # settled: nothing left in flight
