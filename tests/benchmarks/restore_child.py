"""Run one guestsafe restore in its own process, so the parent can read its peak RSS.

Usage: ``restore_child.py [--wait] URI HOME ARCHIVE GUEST VERSION NEW_NAME TARGET_DIR``.
Restores version VERSION of GUEST from ARCHIVE as a new guest NEW_NAME with its
disks in TARGET_DIR (not started), the way ``guestsafe restore`` does: plan,
copy every file with its BLAKE3 checked against the manifest, define. Prints
one line of JSON: the bytes restored and the seconds the call itself took.

With ``--wait`` it connects to libvirt, prints ``ready``, and starts when a line
arrives on stdin (the protocol of ``copier_child.py``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from guestsafe.engine.api import Engine
from guestsafe.engine.paths import Paths


def main(argv: list[str]) -> int:
    wait = argv[:1] == ["--wait"]
    args = argv[1:] if wait else argv
    if len(args) != 7:
        print(__doc__, file=sys.stderr)
        return 2
    uri, home, archive, guest, version, new_name, target = args
    paths = Paths(
        Path(home) / "jobs.toml", Path(home) / "state", Path(home) / "log", Path(home) / "cache"
    )
    engine = Engine(uri=uri, paths=paths)
    assert engine.hv is not None  # connected before the clock starts, as a console is
    if wait:
        print("ready", flush=True)
        sys.stdin.readline()
    start = time.perf_counter()
    plan = engine.plan_restore(
        engine.archive(Path(archive)), guest, int(version), new_name, target_dir=Path(target)
    )
    result = engine.restore(plan)
    seconds = time.perf_counter() - start
    restored = sum(path.stat().st_blocks * 512 for path in result.disk_paths)
    print(json.dumps({"seconds": seconds, "allocated_bytes": restored, "name": result.name}))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
