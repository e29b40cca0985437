"""Swapping restored files in over the originals, and back out: each step safe to repeat.

The same functions serve the restore itself and the recovery after a crash,
so each looks at what is on disk rather than at what it was told was done.
An original is linked to its ``.replaced-`` name before the copy is renamed
over it, so the path never stands empty and the original is never copied.
"""

from __future__ import annotations

import contextlib
import os
import stat
from datetime import datetime
from pathlib import Path

from guestsafe.engine import failpoints
from guestsafe.engine.fsutil import fsync_dir
from guestsafe.engine.restore.files import free_path
from guestsafe.engine.restore.swap_journal import FileSwap

TEMP_MARK = ".guestsafe-restore-"
REPLACED_MARK = ".replaced-"


def plan_swap(path: Path, now: datetime) -> FileSwap:
    """Names for one file's copy and for the file it replaces, both beside it.

    A block device gets neither: it is written in place (see block_targets).
    """
    if _is_block_device(path):
        return FileSwap(str(path), str(path), "", True, in_place=True)
    temp = free_path(path.with_name(f"{TEMP_MARK}{path.name[:180]}"))
    replaced = free_path(path.with_name(f"{path.name}{REPLACED_MARK}{now:%Y%m%d-%H%M}"))
    return FileSwap(str(path), str(temp), str(replaced), path.exists())


def _is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def swap_in(swap: FileSwap) -> None:
    """Put the complete copy in place; the original stays as the replaced file."""
    if swap.in_place:
        return  # written in place already
    path, temp, replaced = Path(swap.path), Path(swap.temp), Path(swap.replaced)
    if not temp.exists():
        return  # swapped already
    if swap.had_original and not replaced.exists() and path.exists():
        _keep_as(path, replaced)
        failpoints.hit("restore-over.linked")
    os.rename(temp, path)
    fsync_dir(path.parent)


def _keep_as(path: Path, replaced: Path) -> None:
    try:
        os.link(path, replaced)  # the path stays whole; rename replaces it atomically
    except OSError:
        os.rename(path, replaced)  # a filesystem without hard links: recovery covers the gap
    fsync_dir(path.parent)


def discard_copy(swap: FileSwap) -> None:
    """Before the swap: remove the copy; the original was never touched."""
    if swap.in_place:
        return  # the device itself: never removed
    Path(swap.temp).unlink(missing_ok=True)
    _undo_link(swap)
    fsync_dir(Path(swap.path).parent)


def put_back(swap: FileSwap) -> None:
    """Undo this file's swap, whichever step it reached: the original at its path again."""
    if swap.in_place:
        return  # a device written in place cannot be put back; it keeps the version
    path, temp, replaced = Path(swap.path), Path(swap.temp), Path(swap.replaced)
    if temp.exists():
        discard_copy(swap)
        if not path.exists() and replaced.exists():
            os.rename(replaced, path)
    elif replaced.exists():
        os.rename(replaced, path)  # atomically over the restored copy
    elif not swap.had_original:
        path.unlink(missing_ok=True)
    fsync_dir(path.parent)


def drop_replaced(swap: FileSwap) -> None:
    """After success: delete the replaced file (it is not kept)."""
    if swap.in_place:
        return
    Path(swap.replaced).unlink(missing_ok=True)
    fsync_dir(Path(swap.path).parent)


def _undo_link(swap: FileSwap) -> None:
    """Remove a replaced-name link that still points at the untouched original."""
    path, replaced = Path(swap.path), Path(swap.replaced)
    with contextlib.suppress(FileNotFoundError):
        if os.path.samefile(path, replaced):
            replaced.unlink()
