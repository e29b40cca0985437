"""Byte sizes as people read them, and the room a backup leaves free.

Every message and view that shows a size goes through ``byte_size``, so the CLI,
the console and the log spell sizes the same way (binary units: 1.5 GiB).
"""

from __future__ import annotations

import humanize

# Room left free on the destination beyond the data itself, for the manifest,
# the domain XML and the filesystem's own metadata.
SPACE_MARGIN = 64 * 1024 * 1024


def byte_size(n: float) -> str:
    return str(humanize.naturalsize(n, binary=True))
