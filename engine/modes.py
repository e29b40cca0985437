"""Backup modes and how a version made in each is labelled for people.

``snapshot`` versions are crash-consistent: the guest kept running while its
disks were read, as if its power had been pulled at that moment. Every list of
versions says so, because a torn database is exactly what guestsafe exists to
avoid.
"""

from __future__ import annotations

STOP = "stop"
STOP_SHORT = "stop-short"
SNAPSHOT = "snapshot"

CRASH_CONSISTENT = "crash-consistent"

# The manifest note every snapshot version carries.
SNAPSHOT_NOTE = (
    "crash-consistent: copied from the running guest, as if its power had been cut at "
    "that moment; databases and journals may need recovery after a restore"
)

_LABELS = {SNAPSHOT: f"{SNAPSHOT} ({CRASH_CONSISTENT})"}


def label(mode: str) -> str:
    """The mode as lists show it: ``snapshot (crash-consistent)``, others unchanged."""
    return _LABELS.get(mode, mode)


def short_label(mode: str) -> str:
    """For narrow columns: a snapshot version shows as ``crash-consistent``."""
    return CRASH_CONSISTENT if mode == SNAPSHOT else mode


def is_crash_consistent(mode: str) -> bool:
    return mode == SNAPSHOT
