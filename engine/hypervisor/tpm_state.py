"""Where swtpm keeps an emulated TPM's state on the host, and which files it is.

libvirt (qemu:///system) runs one swtpm per guest with an emulated TPM and keeps
its state in ``/var/lib/libvirt/swtpm/<uuid>/tpm2/`` (``tpm1.2/`` for TPM 1.2):
``tpm2-00.permall`` and a ``.lock`` swtpm holds while it runs. A domain may name
another directory with ``<backend><source type='dir' path=...>``. The state is
consistent only while swtpm is not running, that is while the guest is off.
A transient guest's state is deleted by libvirt when the guest stops.
"""

from __future__ import annotations

from pathlib import Path

from guestsafe.engine.hypervisor.domain_xml import TpmInfo

SWTPM_STATE_ROOT = Path("/var/lib/libvirt/swtpm")


def state_dir(uuid: str, tpm: TpmInfo, root: Path = SWTPM_STATE_ROOT) -> Path:
    """The directory holding this TPM's state files."""
    if tpm.source_dir:
        return Path(tpm.source_dir)
    return root / uuid / ("tpm1.2" if tpm.version == "1.2" else "tpm2")


def state_files(directory: Path) -> list[Path]:
    """The state files to keep: regular files, not swtpm's hidden ``.lock``."""
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.iterdir()
        if not p.name.startswith(".") and p.is_file() and not p.is_symlink()
    )


def archive_file_name(state_file: str) -> str:
    """``tpm2-00.permall`` is kept in a version as ``tpm-tpm2-00.permall``."""
    return f"tpm-{state_file}"


def record_target(state_file: str) -> str:
    return f"tpm:{state_file}"
