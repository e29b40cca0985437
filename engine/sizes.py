"""Byte sizes as people read them, and the room a backup leaves free.

Every message and view that shows a size goes through ``byte_size``, so the CLI,
the console and the log spell sizes the same way (binary units: 1.5 GiB).
"""

from __future__ import annotations

import re

import humanize

# Room left free on the destination beyond the data itself, for the manifest,
# the domain XML and the filesystem's own metadata.
SPACE_MARGIN = 64 * 1024 * 1024


def byte_size(n: float) -> str:
    return str(humanize.naturalsize(n, binary=True))


_RATE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
}
_RATE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*(?:/\s*s)?\s*")


def parse_byte_rate(text: str) -> int:
    """Bytes per second in ``"100 MiB/s"``, ``"1.5 GiB/s"``, ``"500 KB/s"``, ``"20M"``.

    K, M, G and KiB, MiB, GiB are binary (1024); KB, MB, GB decimal (1000); a bare
    number is bytes per second. Raises ValueError for anything else.
    """
    match = _RATE.fullmatch(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _RATE_UNITS:
        raise ValueError(text)
    return int(float(match.group(1)) * _RATE_UNITS[unit])


def byte_rate(n: int) -> str:
    """``n`` bytes per second the way ``parse_byte_rate`` reads it back exactly."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n % size == 0:
            return f"{n // size} {unit}/s"
    return f"{n} B/s"
