"""The emulated TPM's state into the version, while the guest is off.

Both copy strategies call ``copy_tpm_state`` at the point where the guest is
off (stop: during the copy; stop-short: before the paused start). Snapshot
mode refuses guests with an emulated TPM in preflight: swtpm rewrites its
state while the guest runs, so no copy of it could match the disks.
"""

from __future__ import annotations

import threading
from pathlib import Path

from guestsafe.engine.archive.manifest import DiskRecord, TpmRecord
from guestsafe.engine.backup.guest_run import GuestRun
from guestsafe.engine.copier import copy_file
from guestsafe.engine.errors import naming
from guestsafe.engine.hypervisor import tpm_state


def copy_tpm_state(run: GuestRun, cancel: threading.Event) -> TpmRecord | None:
    """Copy every state file of the guest's emulated TPM into the partial version."""
    info = run.info
    assert info is not None and run.partial is not None
    tpm = info.emulated_tpm
    if tpm is None:
        return None
    directory = tpm_state.state_dir(info.uuid, tpm)
    with naming("reading the TPM state in", directory):
        files = tpm_state.state_files(directory)
    if not files:
        run.note(f"TPM state not found in {directory} (the TPM was never started): none kept")
    records = [_copy_one(run, path, cancel) for path in files]
    return TpmRecord(tpm.model, tpm.version, str(directory), records)


def _copy_one(run: GuestRun, source: Path, cancel: threading.Event) -> DiskRecord:
    assert run.partial is not None
    name = tpm_state.archive_file_name(source.name)
    dst = run.partial.file_path(name)
    target = tpm_state.record_target(source.name)
    run.say_info(f"copying TPM state {source.name} ({source})")
    result = copy_file(source, dst, progress=run.copy_progress(target), cancel=cancel)
    run.bytes_copied += result.data_bytes
    with naming("reading the copy", dst):
        st = dst.stat()
    return DiskRecord(
        target, str(source), "swtpm", st.st_size, st.st_blocks * 512, name, result.blake3
    )
