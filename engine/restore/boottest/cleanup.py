"""Recovery of restore tests that died: remove their clones.

A restore test holds its lock (``run.lock_key``) from before the clone's boot
record is written until the clone is gone. A record marked ``restore_test``
whose lock nobody holds is therefore a test that died (a crash, a kill, a power
cut): its clone, overlays and record are removed as ``boot --discard`` would.
A test still running elsewhere holds its lock and is left alone.
"""

from __future__ import annotations

from collections.abc import Callable

from guestsafe.engine import events
from guestsafe.engine.archive.in_use import abandoned_records
from guestsafe.engine.errors import GuestsafeError
from guestsafe.engine.events import Reporter
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.paths import Paths
from guestsafe.engine.restore.boottest.run import lock_key
from guestsafe.engine.restore.instant_boot import discard_clone


def recover_restore_tests(
    paths: Paths, hv: Callable[[], Hypervisor], reporter: Reporter = events.null_reporter
) -> list[str]:
    """Remove the clones of dead restore tests; what was done, in words."""
    done: list[str] = []
    dead = abandoned_records(
        paths.state_dir, lambda r: r.restore_test, lock_key, "removing the restore test clone"
    )
    for record in dead:
        try:
            lines = discard_clone(record.clone, hv(), paths)
        except GuestsafeError as exc:
            events.warn(reporter, f"restore test clone {record.clone}: {exc.message}")
            continue
        for line in lines:
            events.info(reporter, f"recovery of a restore test: {line}", record.clone)
        done += lines
    return done
