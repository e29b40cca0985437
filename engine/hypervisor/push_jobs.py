"""libvirt push backups (virDomainBackupBegin): can they run, begin one, follow it.

In push mode QEMU itself writes a point-in-time copy of the chosen disks to
target files libvirt creates. The copy holds the disks as they were when the
job began, whatever the guest writes meanwhile (copy-before-write). The job
ends with a JOB_COMPLETED event carrying ``success`` and, on failure,
``errmsg``; libvirt also keeps those figures as the domain's completed-job
stats. A guest that stops ends the job too: QEMU is gone.

``JobWatch`` waits on those events. Like the hypervisor's shutdown wait, it
also re-reads the job now and then, because an event can be lost with a
connection.
"""

from __future__ import annotations

import contextlib
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import GuestInfo

# virDomainBackupBegin appeared in libvirt 6.0.0.
MIN_LIBVIRT = 6_000_000
# Formats a push target keeps; libvirt creates the target file in the format asked.
FORMATS = ("raw", "qcow2")
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
BACKUP_OPERATION = libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP
_BLOCK_JOB_ENDED = (
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED,
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED,
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED,
)

# How often a running job is re-read (progress, and events that went missing).
RECHECK_SECONDS = 1.0
# How long a job that libvirt no longer reports may stay without its event.
LOST_EVENT_GRACE = 5.0
# How long an aborted job may take to stop writing.
ABORT_WAIT = 30.0
# How long a job that failed without a reason waits for the guest's stop event.
STOP_EVENT_GRACE = 3.0


@dataclass(frozen=True)
class PushTarget:
    """One disk of a push backup: the guest's disk and the file QEMU writes it to."""

    target: str  # "vda"
    source: str
    fmt: str  # "raw" or "qcow2", the same as the source
    path: Path


@dataclass(frozen=True)
class JobOutcome:
    ok: bool
    reason: str = ""  # libvirt's errmsg, or why the job ended without one
    guest_stopped: bool = False
    reason_given: bool = True  # False: libvirt said nothing about why it failed


def version_text(number: int) -> str:
    """libvirt's version integer (9000000) as people write it (9.0.0)."""
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def message(exc: libvirt.libvirtError) -> str:
    return str(exc.get_error_message() or exc).strip()


# --- can push backups run here? ----------------------------------------------


def unsupported(hv: Hypervisor, name: str, info: GuestInfo) -> str | None:
    """Why a push backup of this guest cannot run on this host; None when it can.

    Three facts decide, each needed: the client library has the call; the daemon
    is libvirt 6.0 or later; and the daemon's domain capabilities for this
    guest's emulator, machine and virtualization type offer ``backup``. libvirt
    sets that flag only when the QEMU binary has what the job needs (blockdev
    and its backup job), so asking it beats guessing from QEMU's version.
    """
    if not hasattr(libvirt.virDomain, "backupBegin"):
        return f"this libvirt-python ({version_text(libvirt.getVersion())}) has no backupBegin"
    for disk in info.disks:
        fmt = disk.format or "raw"
        if disk.backs_up and fmt not in FORMATS:
            return f"disk {disk.target} is {fmt}, and push backups keep raw and qcow2 disks only"
    try:
        daemon = int(hv.connection.getLibVersion())
        if daemon < MIN_LIBVIRT:
            return (
                f"libvirt {version_text(daemon)} on this host is older than "
                f"{version_text(MIN_LIBVIRT)}"
            )
        return _capability_problem(hv.connection, hv.xml(name, inactive=False), daemon)
    except libvirt.libvirtError as exc:
        return f"libvirt cannot say whether push backups work here ({message(exc)})"


def _capability_problem(conn: libvirt.virConnect, xml: str, daemon: int) -> str | None:
    root = ET.fromstring(xml)
    os_type = root.find("./os/type")
    arch = os_type.get("arch") if os_type is not None else None
    machine = os_type.get("machine") if os_type is not None else None
    emulator = root.findtext("./devices/emulator") or None
    caps = conn.getDomainCapabilities(emulator, arch, machine, root.get("type"), 0)
    feature = ET.fromstring(caps).find("./features/backup")
    if feature is not None and feature.get("supported") == "yes":
        return None
    qemu = version_text(int(conn.getVersion()))
    return (
        f"QEMU {qemu} under libvirt {version_text(daemon)} offers no push backups "
        "(the domain capabilities do not list backup)"
    )


# --- the job -------------------------------------------------------------------


def backup_xml(
    targets: Sequence[PushTarget], other_disks: Sequence[str], incremental: str | None = None
) -> str:
    """The <domainbackup> of a push backup of ``targets``, full or since ``incremental``.

    Every other disk of the running guest is listed with backup='no': libvirt
    would otherwise back it up too, to a file it names next to the disk itself.
    An incremental backup has QEMU write only the clusters changed since that
    checkpoint into targets that exist already (VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL).
    """
    root = ET.Element("domainbackup", mode="push")
    if incremental is not None:
        ET.SubElement(root, "incremental").text = incremental
    disks = ET.SubElement(root, "disks")
    for target in targets:
        disk = ET.SubElement(disks, "disk", name=target.target, backup="yes", type="file")
        ET.SubElement(disk, "target", file=str(target.path))
        ET.SubElement(disk, "driver", type=target.fmt)
    for name in other_disks:
        ET.SubElement(disks, "disk", name=name, backup="no")
    return ET.tostring(root, encoding="unicode")


class JobWatch:
    """The backup job's completion and the guest's stop, as libvirt's events say.

    Register it before the job begins, so no event can slip by.
    """

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain) -> None:
        self._conn = conn
        self._dom = dom
        self._cond = threading.Condition()
        self.completed: dict[str, Any] | None = None
        self.stopped = False
        self.detached: set[str] = set()  # disks whose target QEMU has let go of
        self._ids = [
            conn.domainEventRegisterAny(
                dom, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_job, None
            ),
            conn.domainEventRegisterAny(
                dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
            ),
            conn.domainEventRegisterAny(
                dom, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job, None
            ),
        ]

    def _on_job(self, _conn: Any, _dom: Any, params: dict[str, Any], _opaque: Any) -> None:
        if params.get(libvirt.VIR_DOMAIN_JOB_OPERATION, BACKUP_OPERATION) != BACKUP_OPERATION:
            return
        with self._cond:
            self.completed = dict(params)
            self._cond.notify_all()

    def _on_block_job(
        self, _conn: Any, _dom: Any, disk: str, kind: int, status: int, _opaque: Any
    ) -> None:
        # libvirt reports a disk's backup block job ended after it detached the
        # target node, so QEMU has closed (and, for qcow2, finalised) the file.
        if kind == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP and status in _BLOCK_JOB_ENDED:
            with self._cond:
                self.detached.add(disk)
                self._cond.notify_all()

    def _on_lifecycle(self, _conn: Any, _dom: Any, event: int, _detail: int, _o: Any) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            with self._cond:
                self.stopped = True
                self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self._cond:
            if self.completed is None and not self.stopped:
                self._cond.wait(timeout)

    def wait_stopped(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.stopped, timeout)

    def wait_detached(self, disks: set[str], timeout: float) -> bool:
        """Wait for the block-job end of every disk in ``disks``; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: disks <= self.detached or self.stopped, timeout)

    def close(self) -> None:
        for callback_id in self._ids:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.domainEventDeregisterAny(callback_id)
        self._ids = []

    # --- reading the job ---------------------------------------------------

    def outcome(self, progress: Callable[[int, int], None] | None = None) -> JobOutcome | None:
        """How the job ended, or None while it runs (reporting its progress)."""
        if self.completed is not None:
            return self._judge(self.completed)
        current = self.current()
        if current is not None:
            if progress is not None:
                progress(
                    int(current.get(libvirt.VIR_DOMAIN_JOB_DISK_PROCESSED, 0)),
                    int(current.get(libvirt.VIR_DOMAIN_JOB_DISK_TOTAL, 0)),
                )
            return None
        # No job runs any more: the event is late or lost; libvirt kept the result.
        completed = self._completed_stats()
        return self._judge(completed) if completed is not None else None

    def current(self) -> dict[str, Any] | None:
        """The running backup job's stats; None when no backup job runs."""
        try:
            stats = self._dom.jobStats(0)
        except libvirt.libvirtError:
            return None  # a guest that is no longer running has no job
        if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
            return None
        if stats.get(libvirt.VIR_DOMAIN_JOB_OPERATION, BACKUP_OPERATION) != BACKUP_OPERATION:
            return None
        return dict(stats)

    def _completed_stats(self) -> dict[str, Any] | None:
        # KEEP_COMPLETED: reading must not take the result away from anyone else.
        flags = libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED
        try:
            stats = self._dom.jobStats(flags)
        except libvirt.libvirtError:
            return None
        if stats.get(libvirt.VIR_DOMAIN_JOB_OPERATION) != BACKUP_OPERATION:
            return None
        return dict(stats)

    def _judge(self, params: dict[str, Any]) -> JobOutcome:
        success = params.get(libvirt.VIR_DOMAIN_JOB_SUCCESS)
        if success is None:  # the stats of older daemons carry the type only
            success = params.get("type") == libvirt.VIR_DOMAIN_JOB_COMPLETED
        if success:
            return JobOutcome(True)
        stopped = self.stopped or not _active(self._dom)
        reason = str(params.get(libvirt.VIR_DOMAIN_JOB_ERRMSG) or "")
        if reason:
            return JobOutcome(False, reason, stopped)
        reason = "the guest stopped" if stopped else "libvirt gave no reason"
        return JobOutcome(False, reason, stopped, reason_given=False)

    def wait_outcome(
        self,
        cancel: threading.Event,
        progress: Callable[[int, int], None] | None = None,
        tick: Callable[[], None] = lambda: None,
    ) -> JobOutcome | None:
        """Block until the job ends; None when ``cancel`` was set first.

        ``tick`` runs once per round (the failpoint of tests).
        """
        lost_since: float | None = None
        while True:
            tick()
            done = self.outcome(progress)
            if done is not None and not done.ok and not done.reason_given:
                # A guest that stops ends the job before libvirt reports the stop.
                self.wait_stopped(STOP_EVENT_GRACE)
                done = self.outcome(progress)
            if done is not None:
                return done
            if cancel.is_set():
                return None
            if self.current() is None:
                # Neither running nor reported: give the event a moment, then give up.
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > LOST_EVENT_GRACE:
                    return JobOutcome(False, "libvirt no longer reports the backup job")
            self.wait(RECHECK_SECONDS)


def _active(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


def abort(conn: libvirt.virConnect, dom: libvirt.virDomain, watch: JobWatch | None) -> bool:
    """Abort the running backup job and wait until QEMU stops writing; False if it would not."""
    own = watch is None
    watch = watch or JobWatch(conn, dom)
    try:
        with contextlib.suppress(libvirt.libvirtError):  # it may have ended meanwhile
            dom.abortJob()
        deadline = time.monotonic() + ABORT_WAIT
        while watch.completed is None and not watch.stopped and watch.current() is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            watch.wait(min(remaining, 0.5))
        return True
    finally:
        if own:
            watch.close()


def writes_into(dom: libvirt.virDomain, folder: Path) -> bool:
    """Whether the guest's running backup job writes files inside ``folder``."""
    try:
        xml = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError:
        return False  # no backup job
    files = [t.get("file", "") for t in ET.fromstring(xml).findall("./disks/disk/target")]
    return any(Path(f).parent == folder for f in files if f)


# --- the guest agent -------------------------------------------------------------


def agent_connected(live_xml: str) -> bool:
    """Whether the running guest's agent channel is up (libvirt tracks its state)."""
    for target in ET.fromstring(live_xml).findall("./devices/channel/target"):
        if target.get("name") == GUEST_AGENT_CHANNEL:
            return target.get("state") == "connected"
    return False


def thaw(dom: libvirt.virDomain, attempts: int = 3) -> str | None:
    """Thaw the guest's filesystems; None on success, else libvirt's last complaint."""
    problem = None
    for attempt in range(attempts):
        try:
            dom.fsThaw(None, 0)
            return None
        except libvirt.libvirtError as exc:
            problem = message(exc)
        if attempt + 1 < attempts:
            time.sleep(1.0)  # an agent busy with the freeze may need a moment
    return problem
