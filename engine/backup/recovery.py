"""After a crash: finish what a dead runner left, from its journal entries.

Every guestsafe command runs ``recover()`` first. It acts on an entry whose
process is gone, or that its runner left behind on purpose (``detached``: a
guest still frozen, a restart that failed, a shutdown request still in flight),
and only while it holds the guest's lock, so never beside a backup or restore
of that guest. The guest is the one with the entry's UUID, whatever it is
called now. For each entry it stops a push backup job still writing into the
partial, thaws the guest's filesystems, removes the partial, and puts the power
state back:

- A guest the entry says was shut off before the job is left alone.
- A guest still running while the entry's phase is ``shutdown`` may be acting
  on the dead runner's request: recovery waits for it (up to the job's shutdown
  timeout from the request, at most ``SHUTDOWN_WAIT_CAP``). One that keeps
  running keeps its entry until ``settle_by`` (the job's timeout plus
  ``LATE_POWEROFF_MARGIN``), so a late power-off is still undone by the next
  command; after that it has settled, and the entry goes.
- Any other running guest: nothing to do; the entry goes.
- A guest paused by the runner (``backup-begin``: started paused for a push
  backup) is resumed.
- A shut-off guest is started again only when guestsafe stopped it and nothing
  has touched it since, which here means all of:

  1. the entry records guestsafe's shutdown request (or its seeing the guest
     off);
  2. libvirt's shut-off reason is a shutdown, a power-off (``destroyed``: our
     ``force``) or unknown (libvirtd restarted), not a save, crash, failure,
     migration or snapshot revert, and there is no managed-save image;
  3. the inactive domain XML is the one the run read in preflight (it was not
     redefined);
  4. no disk file changed since guestsafe saw the guest off (a guest started
     meanwhile writes to its disks, and so does a restore);
  5. guestsafe stopped it no more than ``AUTO_START_WINDOW`` ago: a guest that
     has stayed off longer may have been left off on purpose.

  Otherwise recovery says once (the entry remembers it told) what it found and
  that ``guestsafe recover --start`` starts the guest, and keeps the entry.
  ``--start`` starts it whatever the rule says, and finishes the entry.

An entry whose guest cannot be started again stays, so the next command tries
again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import libvirt

from guestsafe.engine import events, locks
from guestsafe.engine.backup.journal import (
    Journal,
    JournalEntry,
    config_digest,
    newest_mtime_ns,
    remove_partial,
)
from guestsafe.engine.backup.phases import PUSH_LEFTOVER_PHASES, Phase
from guestsafe.engine.devices import mounts
from guestsafe.engine.errors import GuestsafeError, HypervisorError, LockBusy
from guestsafe.engine.events import Reporter
from guestsafe.engine.hypervisor import push_jobs
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import PAUSED, RUNNING, SHUTOFF, parse_domain_xml
from guestsafe.engine.hypervisor.volumes import resolve_volumes
from guestsafe.engine.paths import Paths

# A guest guestsafe stopped longer ago than this is not started without --start.
AUTO_START_WINDOW = 6 * 3600.0
# The longest recovery waits for a guest still acting on a dead runner's request.
SHUTDOWN_WAIT_CAP = 120.0
# libvirt's shut-off reasons that guestsafe's own shutdown (or force) leaves.
_OUR_SHUTOFF_REASONS = {
    libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN: "unknown",
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shut down",
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "powered off",
}
_OTHER_SHUTOFF_REASONS = {
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "it crashed",
    libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: "it was migrated away",
    libvirt.VIR_DOMAIN_SHUTOFF_SAVED: "its state was saved",
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "it failed to start",
    libvirt.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: "a snapshot was reverted",
}
_PAUSED_BY_US = (Phase.BACKUP_BEGIN, Phase.RESTART_FAILED)

Log = Callable[[str], None]


class _Hv(Protocol):
    """What recovery asks of a hypervisor connection (Hypervisor, or a test's fake)."""

    @property
    def connection(self) -> Any: ...

    def start(self, name: str, *, paused: bool = False, attempts: int = 5) -> None: ...

    def resume(self, name: str) -> None: ...

    def wait_state(self, name: str, state: str, timeout: float) -> bool: ...


Connect = Callable[[str], AbstractContextManager[_Hv]]


def recover(
    paths: Paths,
    reporter: Reporter = events.null_reporter,
    *,
    start: bool = False,
    connect: Connect = Hypervisor,
    uri: str | None = None,
) -> list[str]:
    """Finish what dead runners left; the guests put back as they were, by name.

    ``start``: start a shut-off guest of an entry even where the rule above
    says recovery may not (``guestsafe recover --start``). ``uri``: only the
    entries of the host that URI reaches (``guestsafe recover --host NAME``).
    """
    mounts.recover_mounts(paths.state_dir, reporter)
    journal = Journal(paths.state_dir)
    connect = _once_per_host(connect)
    done: list[str] = []
    for entry in pending(paths, uri):
        log = _guest_log(reporter, entry.guest)
        try:
            lock = locks.acquire(
                paths.state_dir, locks.guest_key(entry.guest_uuid), "recovery after a crash"
            )
        except LockBusy:
            continue  # a run or restore has the guest now: never beside it
        with lock:
            if _recover_entry(journal, entry, log, start, connect):
                done.append(entry.guest)
    return done


def _once_per_host(connect: Connect) -> Connect:
    """``connect``, failing at once for a URI that did not answer earlier in this pass.

    A host that is off costs each command's recovery one connect timeout, not one
    per guest it left to recover.
    """
    failed: dict[str, str] = {}

    def attempt(uri: str) -> AbstractContextManager[_Hv]:
        if uri in failed:
            raise HypervisorError(failed[uri])
        try:
            return connect(uri)
        except GuestsafeError as exc:
            failed[uri] = exc.message
            raise

    return attempt


def pending(paths: Paths, uri: str | None = None) -> list[JournalEntry]:
    """The entries recovery acts on (of the host ``uri`` reaches, if given).

    An entry names the URI its run used; a host's entries are the ones naming its URI.
    """
    entries = Journal(paths.state_dir).orphans()
    return [e for e in entries if uri is None or e.uri == uri]


def _guest_log(reporter: Reporter, guest: str) -> Log:
    def log(message: str) -> None:
        events.info(reporter, message, guest)

    return log


def _recover_entry(
    journal: Journal, entry: JournalEntry, log: Log, force: bool, connect: Connect
) -> bool:
    """True when the entry is finished and removed."""
    try:
        with connect(entry.uri) as hv:
            if not recover_leftover(entry, log, hv):
                return False  # still frozen: the entry stays, the next command retries
            remove_partial(entry.partial, log)
            if entry.was_state != RUNNING:
                journal.remove(entry)
                return True
            finished = _settle_power(hv, journal, entry, log, force)
    except GuestsafeError as exc:
        log(f"recovery could not restart the guest: {exc}")
        return False
    if finished:
        journal.remove(entry)
    return finished


def _lookup(hv: _Hv, entry: JournalEntry) -> libvirt.virDomain | None:
    try:
        return hv.connection.lookupByUUIDString(entry.guest_uuid)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise GuestsafeError(f"cannot look up guest {entry.guest!r}: {exc}") from exc


def _settle_power(hv: _Hv, journal: Journal, entry: JournalEntry, log: Log, force: bool) -> bool:
    """Put the guest's power state back; True when nothing is left to do."""
    dom = _lookup(hv, entry)
    if dom is None and entry.transient_xml is not None:
        return _create_if_ours(hv, journal, entry, log, force)
    if dom is None:
        log(f"guest {entry.guest} (UUID {entry.guest_uuid}) is no longer defined: nothing to start")
        return True
    name = str(dom.name())
    state = _state(dom)
    if state != SHUTOFF and _request_may_act(entry):
        state = _wait_for_shutdown(hv, dom, entry, log)
    if state == SHUTOFF:
        return _start_if_ours(hv, journal, entry, dom, log, force)
    if state == PAUSED and (entry.phase in _PAUSED_BY_US or force):
        hv.resume(name)
        log("recovered: guest resumed after an interrupted backup")
        return True
    if state == RUNNING:
        if force or not _still_settling(entry):
            return True
        _tell_once(
            journal,
            entry,
            log,
            "guest is running, but may still act on the interrupted run's shutdown request; "
            "if it powers off before "
            f"{_when(entry.settle_by)}, the next guestsafe command starts it again",
        )
        return False
    _tell_once(
        journal,
        entry,
        log,
        f"recovery left guest {name} as it is ({state}); 'guestsafe recover --start' "
        "would resume or start it",
    )
    return False


def _start_if_ours(
    hv: _Hv,
    journal: Journal,
    entry: JournalEntry,
    dom: libvirt.virDomain,
    log: Log,
    force: bool,
) -> bool:
    name = str(dom.name())
    problem = None if force else touched_since(entry, dom)
    if problem is None:
        hv.start(name)
        log("recovered: guest started again after an interrupted backup")
        return True
    _tell_once(
        journal,
        entry,
        log,
        f"recovery did not start guest {name}, which an interrupted backup had shut down: "
        f"{problem}; 'guestsafe recover --start' would start it",
    )
    return False


def _create_if_ours(hv: _Hv, journal: Journal, entry: JournalEntry, log: Log, force: bool) -> bool:
    """A transient guest the dead runner shut down is gone: create it again from its XML."""
    assert entry.transient_xml is not None
    problem = None if force else transient_touched_since(entry)
    if problem is None:
        try:
            hv.connection.createXML(entry.transient_xml, 0)
        except libvirt.libvirtError as exc:
            raise GuestsafeError(
                f"cannot create transient guest {entry.guest!r} again from its XML: {exc}"
            ) from exc
        log("recovered: transient guest created again from its XML after an interrupted backup")
        return True
    _tell_once(
        journal,
        entry,
        log,
        f"recovery did not create transient guest {entry.guest} again, which an interrupted "
        f"backup had shut down: {problem}; 'guestsafe recover --start' would create it",
    )
    return False


def transient_touched_since(entry: JournalEntry, now: float | None = None) -> str | None:
    """The rule for a shut-off guest, as far as a guest libvirt no longer knows allows."""
    now = time.time() if now is None else now
    since = entry.off_at or entry.shutdown_requested
    if since is None:
        return "the interrupted run had not shut it down"
    if now - since > AUTO_START_WINDOW:
        return (
            f"it has been off since {_when(since)}, more than {AUTO_START_WINDOW / 3600:g} h: "
            "it may have been left off on purpose"
        )
    assert entry.transient_xml is not None
    copied = parse_domain_xml(entry.transient_xml).disks
    newest = newest_mtime_ns([d.source for d in copied if d.backs_up and d.source])
    if entry.disks_mtime_ns is not None and newest is not None and newest > entry.disks_mtime_ns:
        return "its disk files changed since guestsafe shut it down (used or restored since)"
    return None


def touched_since(
    entry: JournalEntry, dom: libvirt.virDomain, now: float | None = None
) -> str | None:
    """Why a shut-off guest may not be guestsafe's to start (the rule above); None if it is."""
    now = time.time() if now is None else now
    since = entry.off_at or entry.shutdown_requested
    if since is None:
        return "the interrupted run had not shut it down"
    _state_code, reason = dom.state()
    if reason not in _OUR_SHUTOFF_REASONS:
        return _OTHER_SHUTOFF_REASONS.get(reason, f"libvirt gives shut-off reason {reason}")
    if dom.hasManagedSaveImage(0):
        return "it has a managed-save image"
    xml = str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))
    if entry.config_digest is not None and config_digest(xml) != entry.config_digest:
        return "its definition changed since (redefined)"
    if now - since > AUTO_START_WINDOW:
        return (
            f"it has been off since {_when(since)}, more than {AUTO_START_WINDOW / 3600:g} h: "
            "it may have been left off on purpose"
        )
    info = parse_domain_xml(xml)
    if any(d.kind == "volume" for d in info.disks):
        info = resolve_volumes(dom.connect(), info)  # a volume's file too
    disks = [d.source for d in info.disks if d.backs_up and d.source]
    newest = newest_mtime_ns(disks)
    if entry.disks_mtime_ns is not None and newest is not None and newest > entry.disks_mtime_ns:
        return "its disk files changed since guestsafe shut it down (started or restored since)"
    return None


def _request_may_act(entry: JournalEntry) -> bool:
    """The dead runner asked for a shutdown and never saw the guest go off."""
    return (
        entry.phase == Phase.SHUTDOWN
        and entry.shutdown_requested is not None
        and (entry.off_at is None)
    )


def _still_settling(entry: JournalEntry) -> bool:
    return _request_may_act(entry) and entry.settle_by is not None and time.time() < entry.settle_by


def _wait_for_shutdown(hv: _Hv, dom: libvirt.virDomain, entry: JournalEntry, log: Log) -> str:
    """Wait, bounded, for a guest that may be shutting down on the dead runner's request."""
    deadline = entry.shutdown_deadline or 0.0
    wait = min(deadline - time.time(), SHUTDOWN_WAIT_CAP)
    name = str(dom.name())
    if wait > 0:
        log(f"waiting up to {wait:.0f} s for guest {name} to finish the shutdown it was asked for")
        hv.wait_state(name, SHUTOFF, wait)
    return _state(dom)


def _state(dom: libvirt.virDomain) -> str:
    code, _reason = dom.state()
    if code == libvirt.VIR_DOMAIN_SHUTOFF:
        return SHUTOFF
    if code == libvirt.VIR_DOMAIN_PAUSED:
        return PAUSED
    if code in (
        libvirt.VIR_DOMAIN_RUNNING,
        libvirt.VIR_DOMAIN_BLOCKED,
        libvirt.VIR_DOMAIN_SHUTDOWN,
    ):
        return RUNNING
    return {
        libvirt.VIR_DOMAIN_CRASHED: "crashed",
        libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
    }.get(code, "in an unknown state")


def _tell_once(journal: Journal, entry: JournalEntry, log: Log, message: str) -> None:
    if entry.told:
        return
    log(message)
    entry.told = True
    journal.write(entry)


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch or 0.0))


def recover_leftover(entry: JournalEntry, log: Log, hv: _Hv) -> bool:
    """After a crash in a push phase: thaw the guest, stop a job still writing.

    Runs before the partial is removed, so QEMU is not left writing into it.
    Only a job whose targets lie in the entry's partial is aborted. False when
    the guest's filesystems may still be frozen: the entry stays.
    """
    if entry.phase not in PUSH_LEFTOVER_PHASES:
        return True
    try:
        dom = _lookup(hv, entry)
        if dom is None:
            return True
        may_be_frozen = entry.phase in (Phase.FREEZE, Phase.BACKUP_BEGIN)
        if may_be_frozen and dom.isActive():
            agent = push_jobs.agent_connected(str(dom.XMLDesc(0)))
            problem = push_jobs.thaw(dom, 3 if agent else 1)
            if problem is not None and agent:
                log(
                    f"recovery could not thaw the filesystems of guest {entry.guest}: {problem}; "
                    f"run 'virsh domfsthaw {dom.name()}' now (the next command tries again)"
                )
                return False
            if problem is None:
                log("recovered: guest filesystems thawed")
        if entry.partial and push_jobs.writes_into(dom, Path(entry.partial)):
            stopped = push_jobs.abort(hv.connection, dom, None)
            log(
                "recovered: stopped the push backup of the interrupted run"
                if stopped
                else "recovery could not stop the push backup of the interrupted run"
            )
    except (GuestsafeError, libvirt.libvirtError) as exc:
        log(f"recovery could not look for a leftover push backup: {exc}")
    return True
