"""After a crash: finish what a dead runner left, from its journal entries.

Every guestsafe command runs ``recover()`` first. For each entry whose process
is gone it stops a push backup job still writing into the partial, removes
the partial, and starts (or resumes) a guest the runner had stopped. An entry
whose guest cannot be started again stays, so the next command tries again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import libvirt

from guestsafe.engine import events
from guestsafe.engine.backup.journal import Journal, JournalEntry, remove_partial
from guestsafe.engine.backup.phases import PUSH_LEFTOVER_PHASES, Phase
from guestsafe.engine.errors import GuestsafeError
from guestsafe.engine.events import Reporter
from guestsafe.engine.hypervisor import push_jobs
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import PAUSED, RUNNING, SHUTOFF
from guestsafe.engine.paths import Paths


def recover(paths: Paths, reporter: Reporter = events.null_reporter) -> list[str]:
    """Finish what dead runners left: restart guests they stopped, drop partials."""
    journal = Journal(paths.state_dir)
    done: list[str] = []
    for entry in journal.orphans():
        log = lambda m, g=entry.guest: events.info(reporter, m, g)  # noqa: E731
        recover_leftover(entry, log)  # a push backup job must not outlive its partial
        remove_partial(entry.partial, log)
        if entry.was_state == RUNNING and not _restart(entry, log):
            continue  # keep the entry: the next command tries again
        journal.remove(entry)
        done.append(entry.guest)
    return done


def _restart(entry: JournalEntry, log: Callable[[str], None]) -> bool:
    try:
        with Hypervisor(entry.uri) as hv:
            state = hv.state(entry.guest)
            if state == SHUTOFF:
                hv.start(entry.guest)
                log("recovered: guest started again after an interrupted backup")
            elif state == PAUSED:
                hv.resume(entry.guest)
                log("recovered: guest resumed after an interrupted backup")
    except GuestsafeError as exc:
        log(f"recovery could not restart the guest: {exc}")
        return False
    return True


def recover_leftover(entry: JournalEntry, log: Callable[[str], None]) -> None:
    """After a crash in a push phase: thaw the guest, stop a job still writing.

    Runs before the partial is removed, so QEMU is not left writing into it.
    Only a job whose targets lie in the entry's partial is aborted.
    """
    if entry.phase not in PUSH_LEFTOVER_PHASES or not entry.partial:
        return
    try:
        with Hypervisor(entry.uri) as hv:
            dom = hv.connection.lookupByName(entry.guest)
            may_be_frozen = entry.phase in (Phase.FREEZE, Phase.BACKUP_BEGIN)
            if may_be_frozen and push_jobs.thaw(dom, 1) is None:
                log("recovered: guest filesystems thawed")
            if push_jobs.writes_into(dom, Path(entry.partial)):
                stopped = push_jobs.abort(hv.connection, dom, None)
                log(
                    "recovered: stopped the push backup of the interrupted run"
                    if stopped
                    else "recovery could not stop the push backup of the interrupted run"
                )
    except (GuestsafeError, libvirt.libvirtError) as exc:
        log(f"recovery could not look for a leftover push backup: {exc}")
