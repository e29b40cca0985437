"""After a crash during a restore over the original: finish it or undo it, whichever is safe.

Every guestsafe command runs this first (``Engine.recover``). For each restore
journal entry whose process is gone, under the guest's lock:

- phase ``copy``: a copy may be incomplete, the originals are untouched, so
  the copies are removed and the guest has its disks as before;
- phase ``swap`` or ``define``: every copy was complete and fsynced, so the
  swap is finished and the version's definition put in place;
- phase ``cleanup``: the replaced files not kept are deleted.

A guest that was started meanwhile is not touched: the entry stays, and the
operator is told.
"""

from __future__ import annotations

from collections.abc import Callable

from guestsafe.engine import events, locks
from guestsafe.engine.errors import GuestsafeError, LockBusy
from guestsafe.engine.events import Reporter
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.paths import Paths
from guestsafe.engine.restore import swap
from guestsafe.engine.restore.over_checks import check_shut_off
from guestsafe.engine.restore.over_original import finish_cleanup, half_written_message
from guestsafe.engine.restore.swap_journal import RestoreEntry, RestoreJournal, SwapPhase

Connect = Callable[[str], Hypervisor]


def recover_restores(
    paths: Paths, reporter: Reporter = events.null_reporter, connect: Connect = Hypervisor
) -> list[str]:
    """Finish or undo the restores over the original that a dead process left."""
    journal = RestoreJournal(paths.state_dir)
    done: list[str] = []
    for entry in journal.orphans():
        try:
            with locks.acquire(paths.state_dir, f"guest:{entry.guest_uuid}", "recovery"):
                _recover(entry, connect, reporter)
        except LockBusy:
            continue  # someone works on this guest now; the next command looks again
        except (GuestsafeError, OSError) as exc:
            events.warn(
                reporter,
                f"recovery could not finish the interrupted restore over {entry.guest!r}: "
                f"{exc}; the next guestsafe command tries again",
                entry.guest,
            )
            continue
        journal.remove(entry)
        done.append(entry.guest)
    return done


def _recover(entry: RestoreEntry, connect: Connect, reporter: Reporter) -> None:
    if entry.phase == SwapPhase.COPY:
        for planned in entry.files:
            swap.discard_copy(planned)
        half_written = [p.path for p in entry.files if p.writing]
        for device in half_written:  # written in place: nothing to undo it with
            events.warn(reporter, half_written_message(entry, device), entry.guest)
        if half_written:
            return
        events.info(
            reporter,
            f"recovered: the interrupted restore of version {entry.number} was undone; "
            "the guest's disks are as they were",
            entry.guest,
        )
        return
    if entry.phase in (SwapPhase.SWAP, SwapPhase.DEFINE):
        with connect(entry.uri) as hv:
            check_shut_off(hv, entry.guest)  # a started guest is left alone
            for planned in entry.files:
                swap.swap_in(planned)
            hv.define(entry.new_xml)
    finish_cleanup(entry)
    events.info(
        reporter,
        f"recovered: finished the interrupted restore of version {entry.number} over the guest",
        entry.guest,
    )
