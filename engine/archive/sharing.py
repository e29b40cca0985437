"""Whether versions on a destination will share their unchanged blocks, said in words.

On XFS (with reflink) and btrfs each new version starts as a reflink clone of the
previous one, so versions share what did not change; elsewhere (ext4, exFAT, NTFS)
each version is a full copy. Operators choose a backup disk once, so ``guestsafe
devices``, the job form and a destination's first run say which one they get.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from guestsafe.engine.archive.reflink import supports_reflink

# XFS superblock: magic at 0, sb_features_ro_compat (big-endian) at byte 212.
_XFS_MAGIC = b"XFSB"
_XFS_RO_COMPAT = struct.Struct(">I")
_XFS_RO_COMPAT_OFFSET = 212
_XFS_REFLINK = 0x4  # XFS_SB_FEAT_RO_COMPAT_REFLINK

SUGGESTION = "format a backup disk XFS or btrfs for versions that share unchanged blocks"


def directory_shares(directory: Path) -> bool | None:
    """Whether versions written into ``directory`` can share blocks; None: cannot tell.

    A probe file pair is made and removed, so the folder must be writable; a
    destination not made yet is judged by the folder it will be made in, and one
    further away (a path half typed into a form) is not judged at all.
    """
    for folder in (directory, directory.parent):
        if folder.is_dir():
            return supports_reflink(folder) if os.access(folder, os.W_OK | os.X_OK) else None
    return None


def device_shares(fstype: str, node: str) -> bool | None:
    """Whether a filesystem of ``fstype`` on ``node`` (not mounted) can share blocks.

    btrfs always can; XFS when made with reflink (the default since xfsprogs 5.1),
    read from its superblock; None when that cannot be read or the device is a
    locked LUKS container; every other type cannot.
    """
    if fstype == "btrfs":
        return True
    if fstype == "crypto_LUKS":
        return None  # locked: what is inside is not known until it is opened
    if fstype != "xfs":
        return False
    try:
        with open(node, "rb") as device:
            block = device.read(_XFS_RO_COMPAT_OFFSET + _XFS_RO_COMPAT.size)
    except OSError:
        return None
    if len(block) < _XFS_RO_COMPAT_OFFSET + _XFS_RO_COMPAT.size or block[:4] != _XFS_MAGIC:
        return None
    (ro_compat,) = _XFS_RO_COMPAT.unpack_from(block, _XFS_RO_COMPAT_OFFSET)
    return bool(ro_compat & _XFS_REFLINK)


def sharing_label(shares: bool | None) -> str:
    """A table cell: "shared", "full copies" or "?"."""
    return {True: "shared", False: "full copies", None: "?"}[shares]


def sharing_note(shares: bool | None, where: str) -> str:
    """A sentence for a log or a form: what versions on ``where`` will be, and the advice."""
    if shares is True:
        return f"versions on {where} share unchanged blocks (reflink): each stays a whole file"
    if shares is False:
        return f"versions on {where} are full copies (no reflink there); {SUGGESTION}"
    return f"cannot tell whether versions on {where} will share unchanged blocks; {SUGGESTION}"
