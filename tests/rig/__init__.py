"""Real-guest test rig for guestsafe's integration tests (never shipped in the wheel).

Import it as ``rig`` (pytest's ``pythonpath`` setting puts tests/ on the path):

    from rig import DiskSpec, MiB, make_guest
"""

from __future__ import annotations

from .assets import GuestAssets, build_guest_assets
from .disks import DiskFormat, DiskSpec, MiB, read_disk_counter, read_first_line
from .errors import RigError
from .factory import GuestFactory, sweep_orphans
from .guest import GuestDisk, TestGuest, make_guest, state_name, unique_name
from .host import LIBVIRT_URI, in_ci, libvirt_problem, make_traversable, require

__all__ = [
    "LIBVIRT_URI",
    "DiskFormat",
    "DiskSpec",
    "GuestAssets",
    "GuestDisk",
    "GuestFactory",
    "MiB",
    "RigError",
    "TestGuest",
    "build_guest_assets",
    "in_ci",
    "libvirt_problem",
    "make_guest",
    "make_traversable",
    "read_disk_counter",
    "read_first_line",
    "require",
    "state_name",
    "sweep_orphans",
    "unique_name",
]
