"""Issue 7, case 13: permissions, on libvirt's test driver with real disk files.

guestsafe's own directories and every archive folder are 0700 and every file it
writes is 0600, whatever the umask; a destination someone else could write to is
refused before any guest stops; a console password in the domain XML reaches the
version's 0600 domain.xml and nothing else. The same password check against a
real guest is in tests/integration/test_hostile.py.
"""

from __future__ import annotations

import os
import stat
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from rig.testnode import DriverNode, NodeGuest, node_engine, run_cli, save_job, write_node

from guestsafe.engine.api import Engine

PASSWORD = "s3cret-Console-Pw"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _setup(tmp_path: Path, running: bool = True) -> tuple[DriverNode, Engine, Path]:
    vnc = ET.Element("graphics", {"type": "vnc", "port": "-1", "passwd": PASSWORD})
    guests = [NodeGuest("web", running=running, macs=["52:54:00:64:00:01"], extra_devices=[vnc])]
    node = write_node(tmp_path / "node", guests)
    dest = tmp_path / "archive"
    dest.mkdir(mode=0o700)
    dest.chmod(0o700)
    return node, node_engine(node, tmp_path / "home"), dest


@pytest.mark.parametrize("mask", [0o000, 0o002, 0o022])
def test_everything_guestsafe_creates_is_private_whatever_the_umask(
    tmp_path: Path, umask: None, mask: int
) -> None:
    os.umask(mask)
    _node, engine, dest = _setup(tmp_path)
    home = tmp_path / "home"
    try:
        save_job(engine, "nightly", ["web"], dest)
        assert engine.run_job("nightly").ok
        assert engine.verify(dest)[0].ok
    finally:
        engine.close()

    made = [home, *home.rglob("*"), *dest.rglob("*")]
    dirs = [p for p in made if p.is_dir()]
    files = [p for p in made if not p.is_dir()]
    assert {home / d for d in ("config", "state", "log", "cache")} <= set(dirs)
    assert {p: _mode(p) for p in dirs} == {p: 0o700 for p in dirs}
    assert {p: _mode(p) for p in files} == {p: 0o600 for p in files}
    assert any(p.name == "domain.xml" for p in files)
    assert any(p.suffix == ".log" for p in files)


def _refused(node: DriverNode, engine: Engine, dest: Path, reason: str) -> None:
    """The run fails before the guest stops, saying ``reason``, through Engine and CLI."""
    save_job(engine, "nightly", ["web"], dest)
    result = engine.run_job("nightly")
    assert not result.ok
    assert reason in result.outcomes[0].message
    assert engine.hv.state("web") == "running"  # never stopped
    assert "PHASE web shutdown" not in result.log_path.read_text()
    assert sorted(os.listdir(dest)) == []  # not even an archive marker

    proc = run_cli(node, engine.paths.config_file.parent.parent, "run", "nightly")
    assert proc.returncode == 5  # case 22: refused before anything stopped
    assert reason in proc.stderr
    assert sorted(os.listdir(dest)) == []


def test_a_destination_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    node, engine, dest = _setup(tmp_path)
    os.chown(dest, 65534, 65534)
    try:
        _refused(node, engine, dest, f"destination {dest} belongs to uid 65534")
    finally:
        engine.close()


@pytest.mark.parametrize("mode", [0o770, 0o720, 0o707, 0o777, 0o1777])
def test_a_destination_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    node, engine, dest = _setup(tmp_path)
    dest.chmod(mode)
    try:
        _refused(node, engine, dest, f"is writable by group or others (mode {mode:04o})")
    finally:
        engine.close()


def test_a_private_destination_of_ours_is_accepted(tmp_path: Path) -> None:
    _node, engine, dest = _setup(tmp_path)
    dest.chmod(0o750)  # group may read: the folders inside stay 0700 anyway
    try:
        save_job(engine, "nightly", ["web"], dest)
        assert engine.run_job("nightly").ok
    finally:
        engine.close()


def test_a_console_password_reaches_domain_xml_and_nothing_else(tmp_path: Path) -> None:
    node, engine, dest = _setup(tmp_path)
    home = tmp_path / "home"
    try:
        save_job(engine, "nightly", ["web"], dest)
    finally:
        engine.close()
    outputs = []
    for args in (
        ["run", "nightly"],
        ["list"],
        ["verify"],
        ["jobs"],
        ["guests"],
        ["restore", "web", "1", "web-clone", "--target-dir", str(tmp_path / "clone")],
    ):
        proc = run_cli(node, home, *args)
        assert proc.returncode == 0, (args, proc.stderr)
        outputs.append(proc.stdout + proc.stderr)
    assert not [out for out in outputs if PASSWORD in out]

    [xml] = list(dest.rglob("domain.xml"))
    assert PASSWORD in xml.read_text() and _mode(xml) == 0o600
    holders = [
        p
        for p in [*home.rglob("*"), *dest.rglob("*"), *(tmp_path / "clone").rglob("*")]
        if p.is_file() and PASSWORD.encode() in p.read_bytes()
    ]
    assert holders == [xml]
