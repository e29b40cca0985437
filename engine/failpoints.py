"""Failpoints: named places where a test can make the engine fail or die.

``GUESTSAFE_FAILPOINTS="copy.chunk=kill,commit.before-rename=hang"`` arms them.
Actions:

- ``kill``: SIGKILL this process, as a crash or an OOM kill would.
- ``hang``: print ``FAILPOINT <name> hang`` to stderr and sleep, so a test can
  kill the process at a known moment.
- ``slow``: sleep one second each time, so a test can act mid-copy.
- ``raise``: raise ``OSError(EIO)`` as a failing disk would.
- ``enospc``: raise ``OSError(ENOSPC)`` as a full disk would.

An unset variable costs one dictionary lookup per call.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time

ENV = "GUESTSAFE_FAILPOINTS"


def _armed() -> dict[str, str]:
    spec = os.environ.get(ENV, "")
    points: dict[str, str] = {}
    for item in spec.split(","):
        name, _, action = item.strip().partition("=")
        if name:
            points[name] = action or "raise"
    return points


def hit(name: str) -> None:
    """Run the action armed for ``name``, if any."""
    if ENV not in os.environ:
        return
    action = _armed().get(name)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "hang":
        print(f"FAILPOINT {name} hang", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    elif action == "slow":
        time.sleep(1.0)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
    else:
        raise OSError(errno.EIO, f"failpoint {name}", name)
