"""Push backups without libvirtd: the XML, reading the job, choosing the mode, files."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, cast

import blake3
import libvirt
import pytest

from guestsafe.engine import modes
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.backup import push_copy, push_files
from guestsafe.engine.backup.guest_run import GuestRun
from guestsafe.engine.backup.phases import Phase
from guestsafe.engine.errors import CopyError, HypervisorError, PreflightError
from guestsafe.engine.hypervisor import push_jobs, qemu_access
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import DiskInfo, GuestInfo
from guestsafe.engine.hypervisor.push_jobs import JobWatch, PushTarget
from guestsafe.engine.jobs.jobs_file import load_jobs, save_jobs
from guestsafe.engine.jobs.model import Job
from guestsafe.engine.jobs.validation import validate_job

MiB = 1024 * 1024

# --- the backup XML -------------------------------------------------------------


def test_backup_xml_names_every_disk_and_keeps_formats() -> None:
    targets = [
        PushTarget("vda", "/img/a.qcow2", "qcow2", Path("/a/g/.partial-3/vda.qcow2")),
        PushTarget("vdb", "/img/b.raw", "raw", Path("/a/g/.partial-3/vdb.raw")),
    ]

    root = ET.fromstring(push_jobs.backup_xml(targets, ["sda"]))

    assert root.tag == "domainbackup" and root.get("mode") == "push"
    disks = {d.get("name"): d for d in root.findall("./disks/disk")}
    assert disks["vda"].get("backup") == "yes"
    assert disks["vda"].find("target").get("file") == "/a/g/.partial-3/vda.qcow2"  # type: ignore[union-attr]
    assert disks["vda"].find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert disks["vdb"].find("driver").get("type") == "raw"  # type: ignore[union-attr]
    # Left out, libvirt would back it up next to the disk itself.
    assert disks["sda"].get("backup") == "no" and disks["sda"].find("target") is None


def test_version_text() -> None:
    assert push_jobs.version_text(9_000_000) == "9.0.0"
    assert push_jobs.version_text(6_010_002) == "6.10.2"


def test_agent_connected_reads_the_channel_state() -> None:
    def xml(state: str) -> str:
        return (
            "<domain><devices><channel type='unix'>"
            f"<target type='virtio' name='org.qemu.guest_agent.0' state='{state}'/>"
            "</channel></devices></domain>"
        )

    assert push_jobs.agent_connected(xml("connected"))
    assert not push_jobs.agent_connected(xml("disconnected"))
    assert not push_jobs.agent_connected("<domain><devices/></domain>")


# --- reading the job --------------------------------------------------------------


class FakeDomain:
    def __init__(self, current: dict[str, Any], completed: dict[str, Any] | None = None) -> None:
        self.current = current
        self.completed = completed
        self.active = True

    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        if flags & libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED:
            if self.completed is None:
                return {"type": libvirt.VIR_DOMAIN_JOB_NONE}
            return self.completed
        return self.current

    def isActive(self) -> bool:
        return self.active


class FakeConn:
    def domainEventRegisterAny(self, *_args: Any) -> int:
        return 1

    def domainEventDeregisterAny(self, _id: int) -> None:
        pass


RUNNING_JOB = {
    "type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED,
    "operation": push_jobs.BACKUP_OPERATION,
    "disk_processed": 10,
    "disk_total": 40,
}


def _watch(dom: FakeDomain) -> JobWatch:
    return JobWatch(FakeConn(), dom)


def test_running_job_reports_progress_and_no_outcome() -> None:
    seen: list[tuple[int, int]] = []
    watch = _watch(FakeDomain(RUNNING_JOB))

    assert watch.outcome(lambda done, total: seen.append((done, total))) is None
    assert seen == [(10, 40)]


def test_completion_event_decides() -> None:
    watch = _watch(FakeDomain(RUNNING_JOB))
    watch._on_job(None, None, {"operation": 9, "success": False, "errmsg": "No space"}, None)

    outcome = watch.outcome()

    assert outcome is not None and not outcome.ok and outcome.reason == "No space"


def test_events_of_other_jobs_are_ignored() -> None:
    watch = _watch(FakeDomain(RUNNING_JOB))
    migration = libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT
    watch._on_job(None, None, {"operation": migration, "success": True}, None)

    assert watch.completed is None


def test_lost_event_is_made_up_for_by_the_completed_stats() -> None:
    done = {"type": libvirt.VIR_DOMAIN_JOB_COMPLETED, "operation": push_jobs.BACKUP_OPERATION}
    watch = _watch(FakeDomain({"type": libvirt.VIR_DOMAIN_JOB_NONE}, done))

    outcome = watch.outcome()

    assert outcome is not None and outcome.ok


def test_a_stopped_guest_explains_a_silent_failure() -> None:
    dom = FakeDomain({"type": libvirt.VIR_DOMAIN_JOB_NONE})
    dom.active = False
    watch = _watch(dom)
    watch._on_job(None, None, {"operation": 9, "success": False}, None)

    outcome = watch.outcome()

    assert outcome is not None and outcome.guest_stopped and outcome.reason == "the guest stopped"


def test_targets_count_as_closed_once_their_block_jobs_end() -> None:
    watch = _watch(FakeDomain(RUNNING_JOB))
    backup = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP
    watch._on_block_job(None, None, "vdb", backup, libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED, None)
    # Another kind of block job on vda says nothing about the backup's target.
    pull = libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL
    watch._on_block_job(None, None, "vda", pull, libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED, None)

    assert not watch.wait_detached({"vda", "vdb"}, 0.01)

    watch._on_block_job(None, None, "vda", backup, libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED, None)
    assert watch.wait_detached({"vda", "vdb"}, 0.01)


# --- can it run, and which mode ----------------------------------------------------


CAPS_WITH_BACKUP = (
    "<domainCapabilities><features><backup supported='yes'/></features></domainCapabilities>"
)
CAPS_WITHOUT = "<domainCapabilities><features/></domainCapabilities>"
LIVE_XML = (
    "<domain type='kvm'><name>web1</name><os><type arch='x86_64' machine='pc-q35-7.2'>hvm"
    "</type></os><devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>"
)


class FakeLibvirtConn:
    def __init__(self, version: int, caps: str) -> None:
        self.version = version
        self.caps = caps
        self.asked: tuple[Any, ...] = ()

    def getLibVersion(self) -> int:
        return self.version

    def getVersion(self) -> int:
        return 7_002_000

    def getDomainCapabilities(self, *args: Any) -> str:
        self.asked = args
        return self.caps


class FakeHv:
    def __init__(self, conn: FakeLibvirtConn) -> None:
        self.connection = conn

    def xml(self, name: str, *, inactive: bool = True) -> str:
        return LIVE_XML


def _info(fmt: str = "qcow2") -> GuestInfo:
    disk = DiskInfo("vda", f"/img/web1.{fmt}", "file", "disk", fmt, False, False)
    return GuestInfo("web1", "0" * 8 + "-0000-0000-0000-" + "0" * 12, "running", True, [disk])


def test_push_backups_supported_when_the_domain_capabilities_say_so() -> None:
    conn = FakeLibvirtConn(9_000_000, CAPS_WITH_BACKUP)

    assert push_jobs.unsupported(FakeHv(conn), "web1", _info()) is None  # type: ignore[arg-type]
    # Asked for this guest's emulator, arch, machine and virtualization type.
    assert conn.asked == ("/usr/bin/qemu-system-x86_64", "x86_64", "pc-q35-7.2", "kvm", 0)


@pytest.mark.parametrize(
    ("version", "caps", "fmt", "expected"),
    [
        (5_010_000, CAPS_WITH_BACKUP, "qcow2", "libvirt 5.10.0 on this host is older than 6.0.0"),
        (9_000_000, CAPS_WITHOUT, "qcow2", "QEMU 7.2.0 under libvirt 9.0.0 offers no push"),
        (9_000_000, CAPS_WITH_BACKUP, "vmdk", "disk vda is vmdk"),
    ],
)
def test_push_backups_unsupported_says_why(
    version: int, caps: str, fmt: str, expected: str
) -> None:
    hv = FakeHv(FakeLibvirtConn(version, caps))

    problem = push_jobs.unsupported(hv, "web1", _info(fmt))  # type: ignore[arg-type]

    assert problem is not None and problem.startswith(expected)


class Said:
    """A GuestRun's ``say``, ``enter`` and ``progress``, recorded."""

    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []
        self.phases: list[Phase] = []

    def say(self, level: int, text: str) -> None:
        self.lines.append((level, text))

    def enter(self, phase: Phase, _partial: Path | None) -> None:
        self.phases.append(phase)

    def errors(self) -> list[str]:
        return [text for level, text in self.lines if level >= logging.ERROR]


def _run(mode: str, said: Said | None = None) -> GuestRun:
    said = said or Said()
    run = GuestRun("web1", mode, threading.Event(), said.say, enter=said.enter)
    run.info, run.was_state = _info(), "running"
    return run


# choose_push only hands these on to the PushCopy it makes; the tests that need
# a hypervisor give one of their own.
NO_HV = cast(Hypervisor, None)
NO_ARCHIVE = cast(Archive, None)


class _Choice:
    """A guest's run and its job, and what choose_push made of them."""

    def __init__(self, mode: str, **job: Any) -> None:
        self.job = Job("nightly", ["web1"], Path("/srv/backup"), mode=mode, **job)
        self.run = _run(mode)
        self.mode = mode

    @property
    def warnings(self) -> list[str]:
        return self.run.warnings

    def choose(self) -> push_copy.PushCopy | None:
        return push_copy.choose_push(self.run, self.job, NO_HV, NO_ARCHIVE)


def _backup(mode: str, **job: Any) -> _Choice:
    return _Choice(mode, **job)


def test_stop_jobs_get_no_push_backup() -> None:
    assert _backup("stop").choose() is None


def test_a_shut_off_guest_is_copied_cold_and_the_version_says_stop() -> None:
    backup = _backup("stop-short")
    backup.run.was_state = "shutoff"

    assert backup.choose() is None
    assert backup.run.mode == "stop" and "shut off" in backup.warnings[0]


def test_no_push_backups_refuses_or_falls_back_as_the_job_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    too_old = "libvirt 5.0.0 is older than 6.0.0"
    monkeypatch.setattr(push_jobs, "unsupported", lambda *_args: too_old)
    strict = _backup("snapshot")
    with pytest.raises(PreflightError, match="fallback_to_stop = true"):
        strict.choose()

    lenient = _backup("snapshot", fallback_to_stop=True)
    assert lenient.choose() is None
    assert lenient.run.mode == "stop" and "falling back to mode stop" in lenient.warnings[0]


def test_push_backup_chosen_where_it_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(push_jobs, "unsupported", lambda *_args: None)

    push = _backup("snapshot").choose()
    short = _backup("stop-short").choose()

    assert push is not None and push.live
    assert short is not None
    assert not short.live


def test_space_needed_counts_raw_disks_whole(tmp_path: Path) -> None:
    raw = tmp_path / "a.raw"
    with raw.open("wb") as f:
        f.truncate(64 * MiB)
    disk = DiskInfo("vda", str(raw), "file", "disk", "raw", False, False)
    info = GuestInfo("web1", "u", "running", True, [disk])

    # QEMU allocates a raw target's zeros until they are punched after the job.
    assert push_copy.space_needed(info) == 64 * MiB


# --- the job setting ------------------------------------------------------------------


def test_fallback_to_stop_round_trips_and_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    job = Job("nightly", ["web1"], Path("/srv/backup"), mode="stop-short", fallback_to_stop=True)
    save_jobs(path, [job])

    assert "fallback_to_stop = true" in path.read_text()
    assert load_jobs(path)[0].fallback_to_stop is True
    job.fallback_to_stop = "yes"  # type: ignore[assignment]
    assert [p.field for p in validate_job(job)] == ["fallback_to_stop"]


def test_snapshot_label_says_crash_consistent() -> None:
    assert modes.label("snapshot") == "snapshot (crash-consistent)"
    assert modes.short_label("snapshot") == "crash-consistent"
    assert modes.label("stop-short") == modes.short_label("stop-short") == "stop-short"


# --- QEMU's user and the files it wrote ----------------------------------------------------


def test_qemu_uid_from_the_dac_label() -> None:
    assert qemu_access._uid("+64055:+64055") == 64055
    assert qemu_access._uid("107:107") == 107
    assert qemu_access._uid("system_u:system_r:svirt_t:s0") is None


def _b3(path: Path) -> str:
    return str(blake3.blake3(path.read_bytes()).hexdigest())


def test_give_back_zeros_frees_zero_ranges_and_changes_no_byte(tmp_path: Path) -> None:
    path = tmp_path / "vdb.raw"
    with path.open("wb") as f:
        f.write(os.urandom(MiB))
        f.truncate(16 * MiB)
    # What QEMU does for a zero range of a raw target: allocated, reading as zeros.
    zero = subprocess.run(
        [
            "fallocate",
            "--zero-range",
            "--offset",
            str(2 * MiB),
            "--length",
            str(8 * MiB),
            str(path),
        ],
        capture_output=True,
        check=False,
    )
    if zero.returncode != 0 or path.stat().st_blocks * 512 < 8 * MiB:
        pytest.skip("this filesystem cannot make allocated zero ranges")
    digest = _b3(path)

    freed = push_files.give_back_zeros(path)

    assert freed >= 8 * MiB
    assert path.stat().st_blocks * 512 <= 2 * MiB
    assert path.stat().st_size == 16 * MiB and _b3(path) == digest


# --- snapshot: the guest agent's freeze around the begin ---------------------------------

AGENT_XML = (
    "<domain><devices><channel type='unix'><target type='virtio' "
    "name='org.qemu.guest_agent.0' state='connected'/></channel></devices></domain>"
)


class AgentDomain:
    def __init__(self, thaw_fails: bool = False) -> None:
        self.calls: list[str] = []
        self.thaw_fails = thaw_fails

    def fsFreeze(self, _mounts: object, _flags: int) -> int:
        self.calls.append("freeze")
        return 2

    def fsThaw(self, _mounts: object, _flags: int) -> int:
        self.calls.append("thaw")
        if self.thaw_fails:
            raise libvirt.libvirtError("agent went away")
        return 2


class XmlHv:
    def __init__(self, xml: str) -> None:
        self._xml = xml

    def xml(self, _name: str, *, inactive: bool = True) -> str:
        return self._xml


class SnapshotOwner:
    """What a snapshot's steps leave in the GuestRun, and what they said."""

    def __init__(self) -> None:
        self.said = Said()
        self.run = _run("snapshot", self.said)

    @property
    def downtime(self) -> float | None:
        return self.run.downtime

    @property
    def warnings(self) -> list[str]:
        return self.run.warnings

    @property
    def phases(self) -> list[Phase]:
        return self.said.phases

    @property
    def errors(self) -> list[str]:
        return self.said.errors()


def _snapshot_push(
    monkeypatch: pytest.MonkeyPatch, xml: str, dom: AgentDomain, begin_fails: bool = False
) -> tuple[push_copy.PushCopy, SnapshotOwner]:
    owner = SnapshotOwner()
    push = push_copy.PushCopy(owner.run, cast(Hypervisor, XmlHv(xml)), NO_ARCHIVE, live=True)

    def begin(_dom: object) -> None:
        dom.calls.append("begin")
        if begin_fails:
            raise CopyError("libvirt could not begin the push backup")

    monkeypatch.setattr(push, "_dom", lambda: dom)
    monkeypatch.setattr(push, "_begin", begin)
    monkeypatch.setattr(push_jobs.time, "sleep", lambda _s: None)
    return push, owner


def test_snapshot_freezes_only_around_the_begin(monkeypatch: pytest.MonkeyPatch) -> None:
    dom = AgentDomain()
    push, owner = _snapshot_push(monkeypatch, AGENT_XML, dom)

    push._snapshot()

    assert dom.calls == ["freeze", "begin", "thaw"]
    assert owner.downtime == 0.0 and "freeze" in owner.phases
    assert owner.warnings == [modes.SNAPSHOT_NOTE] and not push.frozen


def test_a_failed_begin_still_thaws(monkeypatch: pytest.MonkeyPatch) -> None:
    dom = AgentDomain()
    push, _owner = _snapshot_push(monkeypatch, AGENT_XML, dom, begin_fails=True)

    with pytest.raises(CopyError, match="could not begin"):
        push._snapshot()

    assert dom.calls == ["freeze", "begin", "thaw"] and not push.frozen


def test_a_failed_thaw_is_an_error_naming_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    dom = AgentDomain(thaw_fails=True)
    push, owner = _snapshot_push(monkeypatch, AGENT_XML, dom)

    with pytest.raises(HypervisorError, match="virsh domfsthaw web1"):
        push._snapshot()

    assert "agent went away" in owner.errors[0]
    assert dom.calls == ["freeze", "begin", "thaw", "thaw", "thaw"]  # tried three times
    assert push.frozen  # settle tries once more


def test_without_an_agent_nothing_is_frozen_and_the_version_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dom = AgentDomain()
    push, owner = _snapshot_push(monkeypatch, "<domain><devices/></domain>", dom)

    push._snapshot()

    assert dom.calls == ["begin"]
    assert any("no guest agent" in note for note in owner.warnings)
