"""``guestsafe files`` and ``guestsafe extract``: a version's files, read-only."""

from __future__ import annotations

import argparse
import stat
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from guestsafe.engine.api import Engine, Entry, Filesystem, byte_size, escape, split_path

from .host_options import HOST_HELP
from .printing import ConsoleReporter

PATH_HELP = "DEVICE:/PATH inside the version, e.g. /dev/sda1:/etc (without it: the filesystems)"


def add_parsers(sub: Any) -> None:
    files = sub.add_parser("files", help="list a folder of a version's filesystems (read-only)")
    files.add_argument("guest")
    files.add_argument("version", type=int)
    files.add_argument("path", nargs="?", help=PATH_HELP)
    files.add_argument("--dest", type=Path, help="archive directory")
    files.add_argument("--host", metavar="NAME", help=HOST_HELP)
    extract = sub.add_parser("extract", help="copy files or folders out of a version")
    extract.add_argument("guest")
    extract.add_argument("version", type=int)
    extract.add_argument("path", help="DEVICE:/PATH inside the version, e.g. /dev/sda1:/etc")
    extract.add_argument("target", type=Path, metavar="DEST", help="folder to copy it into")
    extract.add_argument("--force", action="store_true", help="replace files DEST already has")
    extract.add_argument("--dest", type=Path, help="archive directory")
    extract.add_argument("--host", metavar="NAME", help=HOST_HELP)


def cmd_files(engine: Engine, args: argparse.Namespace, reporter: ConsoleReporter) -> int:
    if args.path is not None:
        split_path(args.path)  # a bad path is refused before the appliance starts
    archive = engine.find_archive(args.guest, args.dest, host=args.host)
    series = engine.series(archive, args.guest, args.host)
    with engine.version_files(archive, series, args.version) as files:
        if args.path is None:
            _print_filesystems(files.filesystems)
        else:
            for entry in files.listdir(args.path):
                print(entry_line(entry))
    return 0


def _print_filesystems(filesystems: list[Filesystem]) -> None:
    if not filesystems:
        print("no filesystem found in this version")
    for fs in filesystems:
        label = f"  label {escape(fs.label)}" if fs.label else ""
        print(f"{fs.device}:/  {fs.fstype}  {byte_size(fs.size)}{label}")


def entry_line(entry: Entry) -> str:
    """``-rw-r--r--  1.2 KiB  2025-01-06 02:00  hosts``, names escaped."""
    when = datetime.fromtimestamp(entry.mtime_ns / 1e9).strftime("%Y-%m-%d %H:%M")
    name = escape(entry.name) + ("/" if entry.kind == "dir" else "")
    if entry.kind == "link":
        name += f" -> {escape(entry.target)}"
    return f"{stat.filemode(entry.mode)}  {byte_size(entry.size):>10}  {when}  {name}"


def cmd_extract(engine: Engine, args: argparse.Namespace, reporter: ConsoleReporter) -> int:
    split_path(args.path)
    archive = engine.find_archive(args.guest, args.dest, host=args.host)
    series = engine.series(archive, args.guest, args.host)
    with engine.version_files(archive, series, args.version) as files:
        result = files.extract(args.path, args.target, force=args.force, cancel=threading.Event())
    for name in result.skipped:
        print(f"skipped (not a file, folder or link): {escape(name)}", file=sys.stderr)
    print(f"extracted {result.files} files, {byte_size(result.bytes)} into {args.target}")
    return 0
