"""Run one copier call in its own process, so the parent can read its peak RSS.

Usage: ``copier_child.py [--wait] copy SRC DST [BWLIMIT]``,
``copier_child.py [--wait] hash PATH``, or
``copier_child.py [--wait] download URI VOLUME-PATH DST`` (a volume streamed over
libvirt's connection, as a remote backup reads it; connected before ``ready``).
``BWLIMIT``: bytes per second, paced as a job's ``bwlimit`` (in the idle I/O class).
Prints one line of JSON: the result and the seconds the call itself took.

With ``--wait`` it imports everything, prints ``ready``, and starts only when a
line arrives on stdin. The parent then times the copy the way the engine runs
it (in a process that is already up), not the interpreter's start.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import libvirt

from guestsafe.engine.copier import copy_file, hash_file
from guestsafe.engine.hypervisor.volume_streams import download_volume
from guestsafe.engine.throttle import HostPacer


def main(argv: list[str]) -> int:
    wait = argv[:1] == ["--wait"]
    argv = argv[1:] if wait else argv
    download = _connect(argv) if argv[:1] == ["download"] and len(argv) == 4 else None
    if wait:
        print("ready", flush=True)
        sys.stdin.readline()
    start = time.perf_counter()
    if argv[:1] == ["copy"] and len(argv) in (3, 4):
        pace = HostPacer("idle", int(argv[3])) if len(argv) == 4 else None
        result = copy_file(Path(argv[1]), Path(argv[2]), pace=pace)
        out = {"blake3": result.blake3, "data_bytes": result.data_bytes,
               "cloned": result.cloned}
    elif download is not None:
        conn, vol = download
        length = int(vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2])
        result = download_volume(conn, vol, Path(argv[3]), length=length, total=vol.info()[2])
        out = {"blake3": result.blake3, "data_bytes": result.data_bytes, "cloned": False}
    elif argv[:1] == ["hash"] and len(argv) == 2:
        out = {"blake3": hash_file(Path(argv[1]))}
    else:
        print(__doc__, file=sys.stderr)
        return 2
    out["seconds"] = time.perf_counter() - start
    print(json.dumps(out))
    return 0


def _connect(argv: list[str]) -> tuple[libvirt.virConnect, libvirt.virStorageVol]:
    conn = libvirt.open(argv[1])
    return conn, conn.storageVolLookupByPath(argv[2])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
