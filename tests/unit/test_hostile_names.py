"""Issue 7, case 11: hostile guest names, end to end on libvirt's test driver.

Every name libvirt accepts is backed up by a real run (real disk files), listed,
verified and restored, through the Engine and the CLI. Archive paths stay under
the destination, no shell ever sees a name, and what the CLI and the run log
print is one printable line per line. Names libvirt refuses (ANSI escapes,
"[b]x[/b]" with its '/') are put into an archive directly: an archive on a USB
disk may come from anywhere.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax import saxutils

import blake3
import libvirt
import pytest
from rig.testnode import (
    HOSTILE_NAMES,
    DriverNode,
    NodeGuest,
    node_engine,
    run_cli,
    save_job,
    write_node,
)

from guestsafe.engine.api import Engine
from guestsafe.engine.archive.manifest import DiskRecord, Manifest
from guestsafe.engine.archive.names import encode_guest_name, libvirt_accepts
from guestsafe.engine.archive.store import Archive
from guestsafe.engine.backup.runlog import RunLog, escape, parse_line
from guestsafe.engine.events import GuestOutcome, LogLine, PhaseChanged, Progress
from guestsafe.engine.jobs.model import Job
from guestsafe.engine.jobs.validation import validate_job
from guestsafe.tui.cli import ConsoleReporter

# Names libvirt cannot hold, found in archives all the same.
ARCHIVE_ONLY_NAMES = ("\x1b[31mred\x1b[0m\x1b]0;title\x07", "[b]x[/b]", "a/b", "cr\rlf\n")
SAFE_DIR = re.compile(r"[A-Za-z0-9_%][A-Za-z0-9_.%~-]*")
# Where a `$(touch x)` or `touch y` that reached a shell would leave its files.
SHELL_TRACES = ("x", "y", "z")


@dataclass
class Hostile:
    node: DriverNode
    home: Path
    dest: Path
    cwd: Path
    engine: Engine
    names: list[str]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(self.node, self.home, *args, cwd=self.cwd)


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hostile]:
    names = list(HOSTILE_NAMES)
    guests = [NodeGuest(n, macs=[f"52:54:00:66:00:{i:02x}"]) for i, n in enumerate(names)]
    node = write_node(tmp_path / "node", guests)
    dest = tmp_path / "archive"
    dest.mkdir(mode=0o700)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    engine = node_engine(node, tmp_path / "home")
    try:
        yield Hostile(node, tmp_path / "home", dest, cwd, engine, names)
    finally:
        engine.close()


def _printable_lines(text: str) -> bool:
    return all(line.isprintable() for line in text.split("\n"))


def _no_shell_traces(*places: Path) -> list[Path]:
    return [place / name for place in places for name in SHELL_TRACES if (place / name).exists()]


def test_hostile_names_are_backed_up_without_any_shell(
    hostile: Hostile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    places = (hostile.cwd, tmp_path, hostile.node.root, Path("/tmp"), Path("/"))
    already = _no_shell_traces(*places)
    record = tmp_path / "hook-saw"
    script = (
        "import os, sys\n"
        "with open(sys.argv[1], 'a', encoding='utf-8', errors='surrogateescape') as f:\n"
        "    f.write(repr(os.environ['GUESTSAFE_GUEST']) + '\\n')\n"
    )
    job = save_job(hostile.engine, "hostile", hostile.names, hostile.dest, keep=2)
    job.hooks["pre-stop"] = [sys.executable, "-c", script, str(record)]
    hostile.engine.save_job(job)
    spawned: list[tuple[Any, Any]] = []
    real_popen = subprocess.Popen

    class SpyPopen(real_popen):  # type: ignore[misc, valid-type]
        def __init__(self, args: Any, *rest: Any, **kw: Any) -> None:
            spawned.append((args, kw.get("shell", False)))
            super().__init__(args, *rest, **kw)

    monkeypatch.setattr(subprocess, "Popen", SpyPopen)
    monkeypatch.setattr(os, "system", lambda *_: pytest.fail("os.system was called"))

    result = hostile.engine.run_job("hostile")

    assert result.ok, [o.message for o in result.outcomes if not o.ok]
    assert [o.guest for o in result.outcomes] == hostile.names
    # Hooks got each name as data, verbatim; nothing ran through a shell.
    assert record.read_text(encoding="utf-8", errors="surrogateescape").splitlines() == [
        repr(n) for n in hostile.names
    ]
    assert spawned and all(shell is False for _args, shell in spawned)
    assert all(Path(str(args[0])).name not in ("sh", "bash", "dash") for args, _ in spawned)
    assert _no_shell_traces(*places) == already
    # Every guest is running again and has version 1, in its own folder.
    assert all(g.state == "running" for g in hostile.engine.guests())
    versions = hostile.engine.versions(hostile.dest)
    assert sorted(v.guest for v in versions) == sorted(hostile.names)
    root = hostile.dest.resolve()
    for v in versions:
        assert v.path.parent.parent == root and v.path.name == "1"
        assert v.path.parent.name == encode_guest_name(v.guest)
    for path in hostile.dest.rglob("*"):
        assert path.resolve().is_relative_to(root)
        assert not path.is_symlink()
        if path.is_dir() and path.parent == hostile.dest:
            assert SAFE_DIR.fullmatch(path.name), path.name
            assert not path.name.startswith(("-", "."))
    # The run log: one line per event, printable, each guest field one word.
    for line in result.log_path.read_text(encoding="utf-8").splitlines():
        parsed = parse_line(line)
        assert parsed is not None and line.isprintable(), line
    log = result.log_path.read_text(encoding="utf-8")
    for name in hostile.names:
        assert escape(name).replace(" ", "\\x20") in log


def test_cli_runs_lists_verifies_and_restores_hostile_names(hostile: Hostile) -> None:
    save_job(hostile.engine, "hostile", hostile.names, hostile.dest, keep=2)

    run = hostile.cli("run", "hostile")
    assert run.returncode == 0, run.stderr
    assert _printable_lines(run.stdout) and _printable_lines(run.stderr)
    listing = hostile.cli("list", "--dest", str(hostile.dest))
    assert listing.returncode == 0 and listing.stderr == "", listing.stderr
    assert _printable_lines(listing.stdout)
    for name in hostile.names:
        assert escape(name) in listing.stdout
    verify = hostile.cli("verify", "--dest", str(hostile.dest))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert _printable_lines(verify.stdout)
    assert sum(": FAILED" in line for line in verify.stdout.splitlines()) == 0
    assert verify.stdout.count("version 1: ok") == len(hostile.names)

    disks = hostile.node.root / "disks"
    before = set(disks.iterdir())
    clones = {"..": "..-copy", "-rf": "-rf-copy", "$(touch x)": "$(touch x)-copy"}
    clones |= {"\u202eevil.exe": "\u202eevil-copy", "x" * 300: "y" * 300, "tab\there": "t\tc"}
    for guest, clone in clones.items():
        # "--": names starting with "-" are names, not options.
        proc = hostile.cli("restore", "--dest", str(hostile.dest), "--", guest, "1", clone)
        assert proc.returncode == 0, proc.stderr
        assert _printable_lines(proc.stdout) and _printable_lines(proc.stderr)
        assert f"restored {escape(clone)} (uuid" in proc.stdout
    made = set(disks.iterdir()) - before
    assert len(made) == len(clones)
    for path in made:  # next to the originals, named after the encoded clone name
        assert path.parent == disks and SAFE_DIR.fullmatch(path.name), path.name
    assert _no_shell_traces(hostile.cwd, hostile.node.root, Path("/")) == []


def test_a_clone_name_libvirt_refuses_is_refused_before_copying(hostile: Hostile) -> None:
    save_job(hostile.engine, "one", [".."], hostile.dest)
    assert hostile.engine.run_job("one").ok
    disks = set((hostile.node.root / "disks").iterdir())

    proc = hostile.cli("restore", "..", "1", "[b]x[/b]", "--dest", str(hostile.dest))

    assert proc.returncode == 9
    assert "holds '/' or a control character" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert set((hostile.node.root / "disks").iterdir()) == disks


def _commit_version(archive: Archive, guest: str) -> None:
    """A complete version of ``guest`` written with the archive API alone."""
    partial = archive.begin(guest)
    partial.write_domain_xml(
        "<domain type='test'><name>imported</name><memory>65536</memory>"
        "<os><type>hvm</type></os></domain>\n"
    )
    data = b"disk bytes\n" * 100
    partial.file_path("vda.raw").write_bytes(data)
    digest = str(blake3.blake3(data).hexdigest())
    rec = DiskRecord("vda", "/var/lib/libvirt/images/vda.raw", "raw", 1100, 4096, "vda.raw", digest)
    manifest = Manifest(
        1,
        guest,
        "6f2d8d1e-5a3c-4b59-9d61-1a2b3c4d5e6f",
        "elsewhere",
        "stop",
        "2025-03-01T02:00:00+00:00",
        "2025-03-01T02:03:00+00:00",
        1.0,
        "0.1.0",
        [rec],
        None,
    )
    partial.commit(manifest)


def test_names_libvirt_refuses_are_escaped_when_found_in_an_archive(hostile: Hostile) -> None:
    archive = Archive.open(hostile.dest, create=True)
    for name in ARCHIVE_ONLY_NAMES:
        _commit_version(archive, name)
    assert sorted(archive.guests()) == sorted(ARCHIVE_ONLY_NAMES)
    assert sorted(p.name for p in hostile.dest.iterdir()) == sorted(
        [encode_guest_name(n) for n in ARCHIVE_ONLY_NAMES] + ["guestsafe-archive.json"]
    )

    for args in (["list", "--dest", str(hostile.dest)], ["verify", "--dest", str(hostile.dest)]):
        proc = hostile.cli(*args)
        assert proc.returncode == 0, proc.stderr
        assert "\x1b" not in proc.stdout + proc.stderr and "\r" not in proc.stdout
        assert _printable_lines(proc.stdout), proc.stdout
        assert "\\x1b[31mred\\x1b[0m\\x1b]0;title\\x07" in proc.stdout
        assert "[b]x[/b]" in proc.stdout and "a/b" in proc.stdout and "cr\\rlf\\n" in proc.stdout
    # Restoring one as a clone (a name libvirt takes) works like any other version.
    target = hostile.node.root / "imported"
    proc = hostile.cli(
        "restore",
        "[b]x[/b]",
        "1",
        "imported",
        "--dest",
        str(hostile.dest),
        "--target-dir",
        str(target),
    )
    assert proc.returncode == 0, proc.stderr
    assert _printable_lines(proc.stderr)
    assert [p.name for p in target.iterdir()] == ["imported-vda.raw"]


@pytest.mark.parametrize("name", [*HOSTILE_NAMES, *ARCHIVE_ONLY_NAMES])
def test_console_reporter_and_run_log_escape_every_name(tmp_path: Path, name: str) -> None:
    out = io.StringIO()
    reporter = ConsoleReporter(out)
    log = RunLog(tmp_path / "run.log", reporter)
    message = f"copying {name} \x1b[2J\r\n"
    for event in (
        LogLine(logging.WARNING, message, name),
        PhaseChanged(name, "copy"),
        Progress(name, "vda", 1, 1),
        GuestOutcome(name, True, 1, 0.0, 0, 0.0, f"ok: {name}"),
    ):
        log(event)
    log.close()

    printed = out.getvalue()
    assert _printable_lines(printed.rstrip("\n")), printed
    assert printed.count("\n") == 3 and escape(name) in printed
    lines = (tmp_path / "run.log").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4
    for line in lines:
        parsed = parse_line(line)
        assert parsed is not None and line.isprintable()
        assert parsed.guest == escape(name).replace(" ", "\\x20")


def test_guestsafe_accepts_exactly_the_names_libvirt_accepts(tmp_path: Path) -> None:
    """Job validation and the clone-name check agree with the test driver itself,
    but for blank names."""
    node = write_node(tmp_path, [])
    conn = libvirt.open(node.uri)
    libvirt.registerErrorHandler(lambda *_: None, None)
    try:
        for name in (*HOSTILE_NAMES, *ARCHIVE_ONLY_NAMES, "nl\nx", "nul\x00x", "ctl\x01x", "   "):
            xml = (
                f"<domain type='test'><name>{saxutils.escape(name)}</name>"
                "<memory>65536</memory><os><type>hvm</type></os></domain>"
            )
            try:
                conn.defineXML(xml)
                accepted = True
            except (libvirt.libvirtError, ValueError):
                accepted = False
            if not name.strip():
                # libvirt takes a blank name; in a guests list it is a typo, so refused.
                assert accepted and not libvirt_accepts(name)
                continue
            assert libvirt_accepts(name) == accepted, name
            job = Job("j", [name], tmp_path)
            assert (validate_job(job) == []) == accepted, name
    finally:
        libvirt.registerErrorHandler(None, None)
        conn.close()
