"""Backup modes, the shutdown-timeout policy, and how a version's mode is labelled.

``snapshot`` versions are crash-consistent: the guest kept running while its
disks were read, as if its power had been pulled at that moment. Every list of
versions says so, because a torn database is exactly what guestsafe exists to
avoid.

``Mode`` is the one list of modes: the jobs file, the manifest and the CLI all
spell a mode as its value.
"""

from __future__ import annotations

from enum import StrEnum


class Mode(StrEnum):
    """How a guest is backed up; the value is the spelling in jobs.toml and manifest.json."""

    STOP = "stop"
    STOP_SHORT = "stop-short"
    SNAPSHOT = "snapshot"


class OnTimeout(StrEnum):
    """What a run does with a guest that ignores its shutdown request (``on_timeout``)."""

    ABORT = "abort"  # leave the guest running and make no backup of it
    FORCE = "force"  # power it off


class IoClass(StrEnum):
    """The I/O scheduling class the copier's threads run in (``ionice``).

    ``idle`` gets the disk only when no one else wants it, so the guests left
    running keep their latency while a backup copies; ``best-effort`` competes
    like any other process (at the default level 4). Schedulers that ignore
    I/O priorities (none, mq-deadline for the most part) treat both alike.
    """

    IDLE = "idle"
    BEST_EFFORT = "best-effort"


class ChainMode(StrEnum):
    """How a disk on a qcow2 backing chain is kept (``chain`` in jobs.toml).

    ``flatten`` writes one standalone qcow2 holding the data of every layer;
    ``keep`` archives every file of the chain, their backing names rewritten to
    the names inside the version, so the version folder alone is bootable.
    """

    FLATTEN = "flatten"
    KEEP = "keep"


# Module-level names kept for callers that spell modes as ``modes.STOP``.
STOP = Mode.STOP
STOP_SHORT = Mode.STOP_SHORT
SNAPSHOT = Mode.SNAPSHOT

CRASH_CONSISTENT = "crash-consistent"

# The manifest note every snapshot version carries.
SNAPSHOT_NOTE = (
    "crash-consistent: copied from the running guest, as if its power had been cut at "
    "that moment; databases and journals may need recovery after a restore"
)

_LABELS: dict[str, str] = {Mode.SNAPSHOT: f"{Mode.SNAPSHOT} ({CRASH_CONSISTENT})"}


_VALUES = frozenset(m.value for m in Mode)


def parse_mode(value: object) -> Mode | None:
    """The mode spelled ``value``, or None if it is not one."""
    return Mode(value) if isinstance(value, str) and value in _VALUES else None


def label(mode: str) -> str:
    """The mode as lists show it: ``snapshot (crash-consistent)``, others unchanged."""
    return _LABELS.get(mode, mode)


def short_label(mode: str) -> str:
    """For narrow columns: a snapshot version shows as ``crash-consistent``."""
    return CRASH_CONSISTENT if mode == Mode.SNAPSHOT else mode


def is_crash_consistent(mode: str) -> bool:
    return mode == Mode.SNAPSHOT
