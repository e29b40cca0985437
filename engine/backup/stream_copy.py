"""Mode stop on a remote host: each disk's storage volume streamed over libvirt's connection.

The guest is off for the whole copy, as in ``cold_copy.ColdCopy``; the bytes
come from ``virStorageVolDownload`` (sparse) instead of the local filesystem.
A connection lost mid-stream fails the copy (nothing is committed); before the
runner puts the guest back as it was, ``settle`` waits a while for the
connection to come back, and if it does not, the journal entry stays for
``guestsafe recover``.
"""

from __future__ import annotations

import threading
import time

import libvirt

from guestsafe.engine.archive.manifest import DiskRecord
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.backup.cold_copy import AnyEvent, start_again
from guestsafe.engine.backup.guest_run import GuestRun, begin_partial, check_still_off
from guestsafe.engine.backup.phases import Phase
from guestsafe.engine.errors import (
    Cancelled,
    CopyError,
    GuestsafeError,
    HypervisorError,
    PreflightError,
    naming,
)
from guestsafe.engine.hypervisor import disk_files
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import RUNNING, GuestInfo
from guestsafe.engine.hypervisor.remote_disks import (
    RemoteDisk,
    check_remote_extras,
    check_remote_mode,
    remote_disks,
)
from guestsafe.engine.hypervisor.volume_streams import download_volume
from guestsafe.engine.modes import Mode
from guestsafe.engine.sizes import byte_rate
from guestsafe.engine.throttle import HostPacer

# How long settle waits for a dropped connection to come back before leaving the
# guest's restart to ``guestsafe recover``.
RECONNECT_WAIT = 60.0
RECONNECT_PAUSE = 2.0


def remote_strategy(
    run: GuestRun, hv: Hypervisor, archive: Archive, pace: HostPacer | None = None
) -> StreamCopy:
    """The copy of a remote guest, after every refusal that must come before the stop."""
    info = run.info
    assert info is not None
    check_remote_mode(info, run.mode, hv.uri)
    if run.mode != Mode.STOP:  # a shut-off guest: check_remote_mode let it through
        wanted, run.mode = run.mode, Mode.STOP
        run.note(f"guest is shut off: copied as it is (consistent), without a {wanted} backup")
    check_remote_extras(info, hv.uri)
    if hv.has_managed_save(run.name):
        raise PreflightError(
            f"guest {run.name!r} has a managed-save image; start it and shut it down, or "
            f"discard the image ('virsh managedsave-remove {run.name}')"
        )
    run.skip_media()
    disks = remote_disks(hv.connection, info, run.copied_disks())
    return StreamCopy(run, hv, archive, disks, pace)


class StreamCopy:
    """Streams a stopped remote guest's volumes into a new partial version."""

    stops_guest = True

    def __init__(
        self,
        run: GuestRun,
        hv: Hypervisor,
        archive: Archive,
        disks: list[RemoteDisk],
        pace: HostPacer | None = None,
    ) -> None:
        self.run = run
        self.pace = pace
        self.hv = hv
        self.archive = archive
        self.disks = disks
        self._cancel: threading.Event = run.cancel

    def space_needed(self, info: GuestInfo) -> int:
        return sum(d.allocation for d in self.disks)

    def prepare(self) -> None:
        """Nothing to do before the shutdown."""

    def copy(self) -> None:
        run = self.run
        begin_partial(run, self.archive, self.hv, Phase.COPY)
        with self.hv.watch_started(run.name) as started:
            self._cancel = AnyEvent(run.cancel, started)
            try:
                for remote in self.disks:
                    run.records.append(self._copy_disk(remote))
                    check_still_off(self.hv, run)
            except CopyError as exc:
                self._why_stopped(exc)
                raise

    def _why_stopped(self, exc: CopyError) -> None:
        """A start during the copy is named as such; a lost connection keeps its own message."""
        try:
            check_still_off(self.hv, self.run)
        except HypervisorError:
            return
        if isinstance(exc, Cancelled) and not self.run.cancel.is_set():
            raise CopyError(
                f"guest {self.run.name!r} was started during the copy; the copy was discarded"
            ) from exc

    def _copy_disk(self, remote: RemoteDisk) -> DiskRecord:
        run, disk = self.run, remote.disk
        assert run.partial is not None and disk.source is not None
        file_name = disk_files.archive_file_name(disk.target, disk.format)
        dst = run.partial.file_path(file_name)
        run.say_info(
            f"streaming {disk.target} (volume {remote.volume} of pool {remote.pool} "
            f"on {self.hv.uri}){_pace_note(self.pace)}"
        )
        conn = self.hv.connection
        try:
            vol = conn.storageVolLookupByPath(disk.source)
        except libvirt.libvirtError as exc:
            raise CopyError(f"volume {disk.source} is gone from {self.hv.uri}: {exc}") from exc
        result = download_volume(
            conn,
            vol,
            dst,
            length=remote.length,
            total=remote.allocation,
            progress=run.copy_progress(disk.target),
            cancel=self._cancel,
            pace=self.pace,
        )
        if self.pace is not None and self.pace.refused is not None:
            run.warn(f"the archive's writes ran in the default I/O class: {self.pace.refused}")
        run.bytes_copied += result.data_bytes
        with naming("reading the copy", dst):
            virtual_size = disk_files.virtual_size(dst, disk.format)
            allocated = dst.stat().st_blocks * 512
        return DiskRecord(
            target=disk.target,
            source=disk.source,
            format=disk.format or "raw",
            virtual_size=virtual_size,
            allocated_size=allocated,
            file=file_name,
            blake3=result.blake3,
            source_kind="block" if disk.kind == "block" else "file",
            pool=remote.pool,
            volume=remote.volume,
            chunks=run.partial.write_chunk_table(file_name, result.chunks),
        )

    def start(self) -> GuestsafeError | None:
        return start_again(self.hv, self.run)

    def finish(self) -> list[DiskRecord]:
        return []  # every record was made in copy

    def settle(self) -> None:
        """Wait for a dropped connection, so the runner can start the guest again."""
        if self.run.was_state != RUNNING:
            return
        wait = self.hv.reconnect_wait  # [hosts.NAME] reconnect_wait; 0: no wait at all
        deadline = time.monotonic() + (RECONNECT_WAIT if wait is None else wait)
        warned = False
        while True:
            try:
                self.hv.state(self.run.name)  # reconnects when the connection dropped
                return
            except HypervisorError as exc:
                if time.monotonic() >= deadline:
                    self.run.warn(f"{self.hv.uri} is still unreachable: {exc.message}")
                    return
                if not warned:
                    self.run.warn(f"lost the connection to {self.hv.uri}; waiting for it")
                    warned = True
            time.sleep(RECONNECT_PAUSE)

    def still_frozen(self) -> bool:
        return False  # nothing is frozen in a cold copy


def _pace_note(pace: HostPacer | None) -> str:
    """The cap, and where ``ionice`` applies: the remote host's reads are libvirtd's."""
    if pace is None:
        return ""
    cap = f", at most {byte_rate(pace.rate)}" if pace.rate else ""
    return (
        f"{cap}; I/O class {pace.io_class} for the archive's writes only "
        "(the volume is read on its host by libvirtd, in libvirtd's class)"
    )
