"""How a guest's disks get into the archive: the steps the runner calls.

``cold_copy.ColdCopy`` (mode stop, and any guest that was shut off) copies the
files itself while the guest is off. ``push_copy.PushCopy`` (stop-short and
snapshot) has QEMU copy them. The phase machine (``guest_backup.py``) calls
the steps in its phases, in this order, and ``settle`` whatever happened::

    preflight  space_needed
    stop       prepare, then the shutdown unless stops_guest is False
    copy       copy
    start      start (only for a guest it stopped)
    commit     finish, then the runner writes the manifest
    always     settle
"""

from __future__ import annotations

from typing import Protocol

from guestsafe.engine.archive.manifest import DiskRecord
from guestsafe.engine.errors import GuestsafeError
from guestsafe.engine.hypervisor.domain_xml import GuestInfo


class CopyStrategy(Protocol):
    @property
    def stops_guest(self) -> bool:
        """False when the guest keeps running throughout (snapshot)."""
        ...

    def space_needed(self, info: GuestInfo) -> int:
        """Bytes the copy may take at its peak on the destination."""
        ...

    def prepare(self) -> None:
        """Anything before the downtime (stop: nothing)."""
        ...

    def copy(self) -> None:
        """While the guest is off (or frozen): the partial's files, or QEMU's job begun."""
        ...

    def start(self) -> GuestsafeError | None:
        """Start the guest again.

        Returns a failure that leaves the finished copy worth keeping (the runner
        still commits it); raises one that leaves no copy to keep.
        """
        ...

    def finish(self) -> list[DiskRecord]:
        """Before the commit: the records of disks copied since ``copy`` returned."""
        ...

    def settle(self) -> None:
        """Whatever happened, before the partial is removed: nothing left writing into it."""
        ...

    def still_frozen(self) -> bool:
        """After settle: the guest's filesystems could not be thawed (recovery retries)."""
        ...
