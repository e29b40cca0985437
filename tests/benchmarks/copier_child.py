"""Run one copier call in its own process, so the parent can read its peak RSS.

Usage: ``copier_child.py [--wait] copy SRC DST [BWLIMIT]``,
``copier_child.py [--wait] hash PATH``, ``copier_child.py [--wait] verify PATH``,
``copier_child.py [--wait] backup SRC DST PREV``, or
``copier_child.py [--wait] download URI VOLUME-PATH DST`` (a volume streamed over
libvirt's connection, as a remote backup reads it; connected before ``ready``;
its chunk table in ``DST.chunks`` too), or ``copier_child.py [--wait] drain URI
VOLUME-PATH``: the same stream through the same receive loop into a sink that
neither writes nor hashes, the transport's own ceiling for the download.
``BWLIMIT``: bytes per second, paced as a job's ``bwlimit`` (in the idle I/O class).
``copy`` also writes the copy's chunk table to ``DST.chunks`` and its whole-file
digest to ``DST.b3``, as a backup writes them beside the disk (its manifest);
``verify`` checks ``PATH`` against ``PATH.chunks`` as ``guestsafe verify`` checks
a format-3 version's file.
``backup`` copies as a backup does when ``PREV`` (with ``PREV.chunks`` and
``PREV.b3``) is the previous version's file: a clone of it with only the changed
chunks written where the filesystem can reflink (``shared_copy``), else a full
``copy_file``. ``backup-one-pass`` is ``backup`` without ``PREV.b3``: the whole file
hashed as it is read, as before the previous digest was reused.
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

from guestsafe.engine.archive.chunks import (
    chunk_count,
    read_entries,
    table_bytes,
    table_file_name,
    verify_file,
)
from guestsafe.engine.backup.shared_copy import shared_copy
from guestsafe.engine.copier import TABLE_CHUNK, ChunkTable, copy_file, hash_file
from guestsafe.engine.hypervisor.volume_streams import SparseSink, download_volume, receive
from guestsafe.engine.throttle import HostPacer


def main(argv: list[str]) -> int:
    wait = argv[:1] == ["--wait"]
    argv = argv[1:] if wait else argv
    streamed = argv[:1] in (["download"], ["drain"]) and len(argv) == 3 + (argv[0] == "download")
    download = _connect(argv) if streamed else None
    if wait:
        print("ready", flush=True)
        sys.stdin.readline()
    start = time.perf_counter()
    if argv[:1] == ["copy"] and len(argv) in (3, 4):
        pace = HostPacer("idle", int(argv[3])) if len(argv) == 4 else None
        dst = Path(argv[2])
        result = copy_file(Path(argv[1]), dst, pace=pace)
        assert result.chunks is not None
        dst.with_name(table_file_name(dst.name)).write_bytes(table_bytes(result.chunks))
        _digest_file(dst).write_text(result.blake3)
        out = {"blake3": result.blake3, "data_bytes": result.data_bytes,
               "cloned": result.cloned}
    elif download is not None and argv[0] == "drain":
        conn, vol = download
        out = {"data_bytes": drain(conn, vol)}
    elif download is not None:
        conn, vol = download
        length = int(vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2])
        dst = Path(argv[3])
        result = download_volume(conn, vol, dst, length=length, total=vol.info()[2])
        assert result.chunks is not None
        dst.with_name(table_file_name(dst.name)).write_bytes(table_bytes(result.chunks))
        out = {"blake3": result.blake3, "data_bytes": result.data_bytes, "cloned": False}
    elif argv[:1] in (["backup"], ["backup-one-pass"]) and len(argv) == 4:
        out = backup(Path(argv[1]), Path(argv[2]), Path(argv[3]), argv[0] == "backup")
    elif argv[:1] == ["hash"] and len(argv) == 2:
        out = {"blake3": hash_file(Path(argv[1]))}
    elif argv[:1] == ["verify"] and len(argv) == 2:
        path = Path(argv[1])
        table = path.with_name(table_file_name(path.name))
        found = verify_file(path, path.name, table, TABLE_CHUNK)
        out = {"ok": not found.problems, "problems": found.problems}
    else:
        print(__doc__, file=sys.stderr)
        return 2
    out["seconds"] = time.perf_counter() - start
    print(json.dumps(out))
    return 0


class _Drain(SparseSink):
    """Counts what arrives, and does nothing else with it."""

    def __init__(self) -> None:
        self.data_bytes = 0

    def data(self, chunk: bytes) -> None:
        self.data_bytes += len(chunk)

    def hole(self, length: int) -> None:
        pass


def drain(conn: libvirt.virConnect, vol: libvirt.virStorageVol) -> int:
    stream = conn.newStream(0)
    vol.download(stream, 0, 0, libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM)
    sink = _Drain()
    receive(stream, sink)
    stream.finish()
    return sink.data_bytes


def _connect(argv: list[str]) -> tuple[libvirt.virConnect, libvirt.virStorageVol]:
    conn = libvirt.open(argv[1])
    return conn, conn.storageVolLookupByPath(argv[2])


def backup(src: Path, dst: Path, prev: Path, known: bool = True) -> dict[str, object]:
    size = prev.stat().st_size
    table_path = prev.with_name(table_file_name(prev.name))
    entries = read_entries(table_path, chunk_count(size, TABLE_CHUNK))
    table = ChunkTable(size, TABLE_CHUNK, b"".join(entries))
    digest = _digest_file(prev).read_text() if known else None
    shared = shared_copy(src, dst, prev, table, previous_blake3=digest)
    if shared is not None:
        chunks, out = shared.chunks, {"blake3": shared.blake3, "written": shared.written,
                                      "data_bytes": shared.data_bytes, "shared": True,
                                      "unchanged": shared.unchanged}
    else:
        result = copy_file(src, dst)
        assert result.chunks is not None
        chunks, out = result.chunks, {"blake3": result.blake3, "written": result.data_bytes,
                                      "data_bytes": result.data_bytes, "shared": False}
    dst.with_name(table_file_name(dst.name)).write_bytes(table_bytes(chunks))
    _digest_file(dst).write_text(str(out["blake3"]))
    return out


def _digest_file(disk: Path) -> Path:
    return disk.with_name(disk.name + ".b3")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
