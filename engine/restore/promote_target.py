"""``promote --target-dir DIR``: where a promoted clone's disks go, checked first.

The directory must exist and be a directory, must not lie inside the archive the
clone was booted from (retention and recovery own every folder there), and must
have room for each disk flattened: at most every layer's allocated bytes, the
overlay's and its backing files', which is what is asked for.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from guestsafe.engine.archive.in_use import BootRecord
from guestsafe.engine.archive.names import printable
from guestsafe.engine.errors import RestoreError
from guestsafe.engine.hypervisor.block_jobs import backing_files
from guestsafe.engine.sizes import byte_size


def check_target_dir(target_dir: Path, record: BootRecord, xml: str) -> dict[str, Path]:
    """Per disk target, the new file in ``target_dir``; RestoreError naming the problem."""
    where = printable(str(target_dir))
    if not target_dir.exists():
        raise RestoreError(f"--target-dir {where} does not exist; nothing was changed")
    if not target_dir.is_dir():
        raise RestoreError(f"--target-dir {where} is not a directory; nothing was changed")
    real, archive = os.path.realpath(target_dir), os.path.realpath(record.archive)
    if real == archive or real.startswith(archive.rstrip(os.sep) + os.sep):
        raise RestoreError(
            f"--target-dir {where} lies inside the archive {printable(archive)}; "
            "a guest's disks never go there (choose a directory outside it)"
        )
    targets = {t: target_dir / Path(overlay).name for t, overlay in record.overlays.items()}
    for dest in targets.values():
        if dest.exists():
            raise RestoreError(f"{printable(str(dest))} exists; promote never overwrites a file")
    needed = sum(
        _chain_bytes(overlay, backing_files(xml, t)) for t, overlay in record.overlays.items()
    )
    free = shutil.disk_usage(target_dir).free
    if needed > free:
        raise RestoreError(
            f"--target-dir {where} has {byte_size(free)} free; the disks need up to "
            f"{byte_size(needed)} flattened; nothing was changed"
        )
    return targets


def _chain_bytes(overlay: str, backing: list[str]) -> int:
    total = 0
    for path in [overlay, *backing]:
        try:
            total += os.stat(path).st_blocks * 512
        except OSError:
            continue  # a layer not on a file (a device): counted by its top, no better guess
    return total
