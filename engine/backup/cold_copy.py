"""Mode stop, and any guest that was shut off: guestsafe copies the files itself.

The guest is off for the whole copy (or was off before the job). Someone
starting it meanwhile makes the copy worthless, so libvirt's start event
cancels the copy at once.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

from guestsafe.engine.archive.manifest import DiskRecord
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.backup import chain_copy
from guestsafe.engine.backup.guest_run import GuestRun, begin_partial, check_still_off
from guestsafe.engine.backup.phases import Phase
from guestsafe.engine.backup.shared_base import copy_shared
from guestsafe.engine.backup.shared_copy import SharedResult
from guestsafe.engine.backup.tpm_copy import copy_tpm_state
from guestsafe.engine.copier import CopyResult, copy_file
from guestsafe.engine.errors import Cancelled, CopyError, GuestsafeError, naming
from guestsafe.engine.hypervisor import chains, disk_files
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import GuestInfo
from guestsafe.engine.modes import ChainMode
from guestsafe.engine.sizes import byte_rate
from guestsafe.engine.throttle import HostPacer


class AnyEvent(threading.Event):
    """Set when it, or any of the events it watches, is set (for the copier's cancel)."""

    def __init__(self, *events: threading.Event) -> None:
        super().__init__()
        self._events = events

    def is_set(self) -> bool:
        return super().is_set() or any(e.is_set() for e in self._events)


class ColdCopy:
    """Copies a stopped guest's disks and NVRAM into a new partial version."""

    stops_guest = True

    def __init__(
        self,
        run: GuestRun,
        hv: Hypervisor,
        archive: Archive,
        pace: HostPacer | None = None,
        *,
        chain: ChainMode = ChainMode.FLATTEN,
    ) -> None:
        self.run = run
        self.chain = chain  # how a disk on a backing chain is kept
        self.hv = hv
        self.archive = archive
        self.pace = pace  # the job's ionice and bwlimit
        self._cancel: threading.Event = run.cancel

    def space_needed(self, info: GuestInfo) -> int:
        # A chain's backing files are copied (keep) or read into the flat copy (flatten).
        return disk_files.allocated_total(info) + chains.backing_allocated(info)

    def prepare(self) -> None:
        """Nothing to do before the shutdown."""

    def copy(self) -> None:
        run = self.run
        begin_partial(run, self.archive, self.hv, Phase.COPY)
        with self.hv.watch_started(run.name) as started:
            self._cancel = AnyEvent(run.cancel, started)
            try:
                self._copy_disks()
            except CopyError as exc:
                check_still_off(self.hv, run)
                if isinstance(exc, Cancelled) and not run.cancel.is_set():
                    # The start event stopped the copy, not the operator.
                    raise CopyError(
                        f"guest {run.name!r} was started during the copy; the copy was discarded"
                    ) from exc
                raise

    def _copy_disks(self) -> None:
        info = self.run.info
        assert info is not None
        self.run.skip_media()
        for disk in self.run.copied_disks():
            layers = chain_copy.chain_of(disk)
            if layers is not None:
                record = chain_copy.copy_chain(self.run, disk, layers, self.chain, self._cancel)
                check_still_off(self.hv, self.run)
            else:
                record = self._copy_disk(disk.target, disk.source, disk.format)
                kind = "block" if disk.kind == "block" else record.source_kind
                record = replace(record, source_kind=kind, pool=disk.pool, volume=disk.volume)
            self.run.records.append(record)
        if info.nvram:
            self.run.records.append(self._copy_disk("nvram", info.nvram, "fd"))
        self.run.tpm = copy_tpm_state(self.run, self._cancel)
        check_still_off(self.hv, self.run)

    def _copy_disk(self, target: str, source: str | None, fmt: str | None) -> DiskRecord:
        assert source is not None
        record = copy_disk_file(self.run, target, source, fmt, self._cancel, self.pace)
        check_still_off(self.hv, self.run)
        return record

    def start(self) -> GuestsafeError | None:
        return start_again(self.hv, self.run)

    def finish(self) -> list[DiskRecord]:
        return []  # every record was made in copy

    def settle(self) -> None:
        """Nothing of this copy outlives it: the copier removes what it left half-done."""

    def still_frozen(self) -> bool:
        return False  # nothing is frozen in a cold copy


def start_again(hv: Hypervisor, run: GuestRun) -> GuestsafeError | None:
    """Start the guest after a copy made while it was off.

    A failure here must not cost the finished copy: returned, not raised.
    """
    try:
        hv.start(run.name)
    except GuestsafeError as exc:
        return exc
    run.running_again()
    run.say_info(f"guest is running again (downtime {run.downtime or 0:.1f} s)")
    return None


def copy_disk_file(
    run: GuestRun,
    target: str,
    source: str,
    fmt: str | None,
    cancel: threading.Event,
    pace: HostPacer | None = None,
) -> DiskRecord:
    """Copy one disk file into the partial version with guestsafe's copier."""
    assert run.partial is not None
    file_name = disk_files.archive_file_name(target, fmt)
    dst = run.partial.file_path(file_name)
    result: CopyResult | SharedResult | None = copy_shared(
        run, target, Path(source), fmt or "raw", dst, cancel, pace
    )
    if result is None:
        run.say_info(f"copying {target} ({source}){_pace_note(pace)}")
        result = copy_file(
            Path(source), dst, progress=run.copy_progress(target), cancel=cancel, pace=pace
        )
    if pace is not None and pace.refused is not None:
        run.warn(f"the copy ran in the default I/O class: {pace.refused}")
        pace.refused = None  # said once per disk at most
    run.bytes_copied += result.data_bytes
    with naming("reading the copy", dst):
        virtual_size = disk_files.virtual_size(dst, fmt)
        allocated = dst.stat().st_blocks * 512
    return DiskRecord(
        target=target,
        source=source,
        format=fmt or "raw",
        virtual_size=virtual_size,
        allocated_size=allocated,
        file=file_name,
        blake3=result.blake3,
        chunks=run.partial.write_chunk_table(file_name, result.chunks),
    )


def _pace_note(pace: HostPacer | None) -> str:
    if pace is None:
        return ""
    cap = f", at most {byte_rate(pace.rate)}" if pace.rate else ""
    return f", I/O class {pace.io_class}{cap}"
