"""Issue 7, case 12: a malicious archive is refused with the reason, and deletion
never follows a symlink out of it.

Real backups of libvirt test-driver guests (real disk files), then the archive is
edited the way an attacker with write access to a USB disk could: unsafe file
names in a manifest, symlinks planted in and around version folders.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest
from rig.testnode import DriverNode, NodeGuest, node_engine, run_cli, save_job, write_node

from guestsafe.engine.api import Engine
from guestsafe.engine.backup.journal import Journal, JournalEntry
from guestsafe.engine.errors import ArchiveError, RestoreError

GUEST = "web"


@dataclass
class Setup:
    node: DriverNode
    home: Path
    dest: Path
    engine: Engine
    outside: Path  # a file outside the archive an attacker aims at
    outside_dir: Path

    def version_dir(self, number: int) -> Path:
        return self.dest / GUEST / str(number)

    def cli(self, *args: str) -> tuple[int, str, str]:
        proc = run_cli(self.node, self.home, *args)
        return proc.returncode, proc.stdout, proc.stderr


def _digest(path: Path) -> str:
    return str(blake3.blake3(path.read_bytes()).hexdigest())


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): _digest(p) for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    node = write_node(tmp_path / "node", [NodeGuest(GUEST, running=False, disk_mib=(4, 2))])
    dest = tmp_path / "archive"
    dest.mkdir(mode=0o700)
    engine = node_engine(node, tmp_path / "home")
    save_job(engine, "nightly", [GUEST], dest, keep=10)
    for _ in range(3):
        assert engine.run_job("nightly").ok
    outside = tmp_path / "outside.raw"
    outside.write_bytes(b"precious data outside the archive\n" * 100)
    outside_dir = tmp_path / "outside-dir"
    outside_dir.mkdir()
    (outside_dir / "keep.txt").write_text("keep me\n")
    try:
        yield Setup(node, tmp_path / "home", dest, engine, outside, outside_dir)
    finally:
        engine.close()


def _edit_manifest(setup: Setup, number: int, **changes: str) -> None:
    path = setup.version_dir(number) / "manifest.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        data["disks"][0][key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("bad", ["../../../outside.raw", "/etc/passwd", "sub/vda.raw", ".hidden"])
def test_unsafe_manifest_file_name_is_refused_with_the_reason(setup: Setup, bad: str) -> None:
    _edit_manifest(setup, 2, file=bad)
    outside_before = _digest(setup.outside)
    disks_before = _tree(setup.node.root / "disks")
    archive = setup.engine.archive(setup.dest)

    assert [v.number for v in archive.versions(GUEST)] == [1, 3]
    assert any("unsafe file" in p and "version 2" in p for p in archive.problems())
    with pytest.raises(ArchiveError, match="unsafe file") as info:
        setup.engine.plan_restore(archive, GUEST, 2, "clone")
    assert repr(bad) in info.value.message and "version 2" in info.value.message

    code, out, err = setup.cli("restore", GUEST, "2", "clone", "--dest", str(setup.dest))
    assert code == 7 and "unsafe file" in err and repr(bad) in err, err
    assert len(err.strip().splitlines()) == 1
    code, out, err = setup.cli("restore", GUEST, "2", "--overwrite", "--force")
    assert code == 7 and "unsafe file" in err, err
    code, out, err = setup.cli("verify", GUEST, "2", "--dest", str(setup.dest))
    assert code == 8 and "version 2: FAILED" in out and "unsafe file" in out, out
    code, out, err = setup.cli("list", "--dest", str(setup.dest))
    assert code == 0 and "unsafe file" in err and "version 2" in err, err

    assert _digest(setup.outside) == outside_before
    assert _tree(setup.node.root / "disks") == disks_before  # nothing restored anywhere


def test_a_symlinked_disk_file_is_refused_even_with_force(setup: Setup) -> None:
    vda = setup.version_dir(2) / "vda.raw"
    # Same bytes outside, so even the hash would match: only the link gives it away.
    shutil.copyfile(vda, setup.outside)
    vda.unlink()
    vda.symlink_to(setup.outside)
    outside_before = _digest(setup.outside)
    disks_before = _tree(setup.node.root / "disks")
    archive = setup.engine.archive(setup.dest)

    with pytest.raises(RestoreError, match="is a symlink to") as info:
        setup.engine.plan_restore(archive, GUEST, 2, "clone")
    assert str(setup.outside) in info.value.message and "vda.raw" in info.value.message

    for args in (["clone"], ["clone", "--force"], ["--overwrite", "--force"]):
        code, out, err = setup.cli("restore", GUEST, "2", *args, "--dest", str(setup.dest))
        assert code == 9, err
        assert "vda.raw of version 2 of web is a symlink to" in err, err
        assert "never follows links" in err
    code, out, err = setup.cli("verify", GUEST, "2", "--dest", str(setup.dest))
    assert code == 8 and "vda.raw is a symlink" in out, out
    assert _digest(setup.outside) == outside_before
    assert _tree(setup.node.root / "disks") == disks_before


def test_a_symlinked_domain_xml_is_refused(setup: Setup) -> None:
    xml = setup.version_dir(2) / "domain.xml"
    setup.outside.write_bytes(xml.read_bytes())
    xml.unlink()
    xml.symlink_to(setup.outside)

    code, out, err = setup.cli("restore", GUEST, "2", "clone", "--force")
    assert code == 9 and "domain.xml of version 2 of web is a symlink" in err, err
    code, out, err = setup.cli("verify", GUEST, "2", "--dest", str(setup.dest))
    assert code == 8 and "domain.xml is a symlink" in out, out


def test_a_symlinked_version_folder_is_refused(setup: Setup) -> None:
    folder = setup.version_dir(2)
    shutil.rmtree(setup.outside_dir)
    folder.rename(setup.outside_dir)  # a complete, valid version, but outside
    folder.symlink_to(setup.outside_dir)

    archive = setup.engine.archive(setup.dest)
    assert [v.number for v in archive.versions(GUEST)] == [1, 3]
    with pytest.raises(ArchiveError, match="is a symlink"):
        setup.engine.plan_restore(archive, GUEST, 2, "clone")
    code, out, err = setup.cli("restore", GUEST, "2", "clone", "--dest", str(setup.dest))
    assert code == 7 and "version 2 of web" in err and "is a symlink" in err, err
    code, out, err = setup.cli("verify", GUEST, "2", "--dest", str(setup.dest))
    assert code == 8 and "is a symlink" in out, out
    code, out, err = setup.cli("list", "--dest", str(setup.dest))
    assert "is a symlink" in err, err


def test_a_source_path_with_dotdot_is_refused_for_restore_over(setup: Setup) -> None:
    original = setup.node.disks[GUEST][0]
    before = _digest(original)
    _edit_manifest(setup, 2, source=str(original.parent / ".." / ".." / "outside.raw"))
    outside_before = _digest(setup.outside)

    code, _out, err = setup.cli("restore", GUEST, "2", "--overwrite", "--force")
    assert code == 9 and "not a plain absolute path" in err, err
    code, _out, err = setup.cli("restore", GUEST, "2", "clone", "--force")
    assert code == 9 and "not a plain absolute path" in err, err
    assert _digest(setup.outside) == outside_before
    assert _digest(original) == before
    # With a target directory of its own the clone needs no source path.
    target = setup.node.root / "restored"
    code, _out, err = setup.cli("restore", GUEST, "2", "clone", "--target-dir", str(target))
    assert code == 0, err
    assert [p.name for p in target.iterdir()] == ["clone-vda.raw", "clone-vdb.raw"]


def _plant_links(setup: Setup, folder: Path) -> None:
    """Symlinks to the outside file and folder, inside ``folder``."""
    (folder / "evil-file").symlink_to(setup.outside)
    (folder / "evil-dir").symlink_to(setup.outside_dir)


def test_retention_and_recovery_never_follow_symlinks(setup: Setup) -> None:
    guest_dir = setup.dest / GUEST
    outside_before = _digest(setup.outside)
    _plant_links(setup, setup.version_dir(1))
    _plant_links(setup, setup.version_dir(2))
    (setup.version_dir(3) / ".tmp-0123456789ab-manifest.json").symlink_to(setup.outside)
    (guest_dir / ".partial-20").symlink_to(setup.outside_dir)
    (guest_dir / ".deleting-21").symlink_to(setup.outside_dir)
    partial = guest_dir / ".partial-22"
    partial.mkdir(mode=0o700)
    _plant_links(setup, partial)
    deleting = guest_dir / ".deleting-23"
    deleting.mkdir(mode=0o700)
    _plant_links(setup, deleting)
    (setup.dest / ".tmp-0123456789ab-x").symlink_to(setup.outside)

    # A real run first clears what crashes left (the planted partial and
    # half-deleted folders, links and all), then retention with keep 1
    # deletes versions 1 to 3.
    save_job(setup.engine, "nightly", [GUEST], setup.dest, keep=1)
    result = setup.engine.run_job("nightly")
    assert result.ok, result.outcomes
    assert [v.number for v in setup.engine.versions(setup.dest, GUEST)] == [4]
    assert not (guest_dir / ".partial-20").is_symlink()
    assert not (guest_dir / ".deleting-21").is_symlink()

    # A dead runner's journal entry names the partial: `guestsafe recover` cleans up.
    info = setup.engine.hv.guest(GUEST)
    entry = JournalEntry("nightly", GUEST, info.uuid, setup.node.uri, "shutoff", "copy")
    entry.partial, entry.pid, entry.pid_start = str(partial), 0x7FFFFFFF, "gone"
    Journal(setup.engine.paths.state_dir).write(entry)
    code, _out, err = setup.cli("recover")
    assert code == 0, err
    assert not partial.exists() and not deleting.exists()
    # And the archive's own recovery, for what no journal names.
    (guest_dir / ".partial-20").symlink_to(setup.outside_dir)
    (guest_dir / ".deleting-21").symlink_to(setup.outside_dir)
    removed = setup.engine.archive(setup.dest).recover()
    assert guest_dir / ".partial-20" in removed and guest_dir / ".deleting-21" in removed

    assert setup.outside.read_bytes() and _digest(setup.outside) == outside_before
    assert (setup.outside_dir / "keep.txt").read_text() == "keep me\n"
    assert sorted(os.listdir(guest_dir)) == ["4", "last-version"]
    # case 15: the writers' lock lives in the archive root
    assert sorted(os.listdir(setup.dest)) == [".guestsafe-lock", "guestsafe-archive.json", GUEST]


def test_an_edited_domain_xml_needs_force(setup: Setup) -> None:
    xml = setup.version_dir(2) / "domain.xml"
    xml.write_text(xml.read_text().replace("<memory", "<!-- edited --><memory", 1))
    original = setup.node.disks[GUEST][0]
    before = _digest(original)
    expected = "domain.xml of web version 2 does not match its manifest (blake3 "

    for args in (["clone"], ["--overwrite"]):
        code, _out, err = setup.cli("restore", GUEST, "2", *args, "--dest", str(setup.dest))
        assert code == 8 and expected in err and "restore it anyway with --force" in err, err
    assert _digest(original) == before
    code, _out, err = setup.cli("restore", GUEST, "2", "clone", "--force")
    assert code == 0, err
    assert f"WARNING: {expected}" in err and "used anyway (--force)" in err


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"\xff\xfe<domain/>", "is not UTF-8 text"), (b"<domain><name>", "is not valid XML")],
)
def test_a_domain_xml_that_cannot_be_read_is_refused(
    setup: Setup, content: bytes, reason: str
) -> None:
    (setup.version_dir(2) / "domain.xml").write_bytes(content)

    code, _out, err = setup.cli("restore", GUEST, "2", "clone", "--force")

    assert code == 9 and f"domain.xml of version 2 of web {reason}" in err, err
    assert len(err.strip().splitlines()) == 1
