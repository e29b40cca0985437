"""Issue 12, cases 1, 2, 3 and 23: restore over the original, on libvirt's test driver.

Real disk files and real guestsafe processes (the CLI), a test-driver hypervisor.
The boots that show which data a real guest has after a crash are in
tests/integration/test_restore_over_original_live.py.
"""

from __future__ import annotations

import signal
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import blake3
import pytest
from rig.testnode import DriverNode, NodeGuest, node_engine, run_cli, save_job, write_node

from guestsafe.engine import locks
from guestsafe.engine.api import Engine
from guestsafe.engine.errors import Cancelled, LockBusy, RestoreError
from guestsafe.engine.events import Event, PhaseChanged
from guestsafe.engine.restore.swap_journal import RestoreJournal

if TYPE_CHECKING:
    from guestsafe.engine.api import OverwriteNotice

GUEST = "web"
NEWER = b"written after the backup, newer than any version\n" * 512


@dataclass
class Setup:
    node: DriverNode
    home: Path
    engine: Engine
    disks: list[Path]
    backed_up: dict[Path, str]  # digest of each disk in version 1
    current: dict[Path, str]  # digest of each disk now, with newer data
    files_before: set[Path]  # every file in the disks' folder before the restore

    def cli(self, *args: str) -> tuple[int, str, str]:
        proc = run_cli(self.node, self.home, *args)
        return proc.returncode, proc.stdout, proc.stderr

    def digests(self) -> dict[Path, str]:
        return {p: _digest(p) for p in self.disks}

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.disks[0].parent.iterdir() if p not in self.files_before)


def _digest(path: Path) -> str:
    return str(blake3.blake3(path.read_bytes()).hexdigest())


def _build(tmp_path: Path, *others: NodeGuest) -> Setup:
    node = write_node(
        tmp_path / "node", [NodeGuest(GUEST, running=False, disk_mib=(4, 2)), *others]
    )
    _fix_uuids(node)
    engine = node_engine(node, tmp_path / "home")
    dest = tmp_path / "archive"
    dest.mkdir(mode=0o700)
    save_job(engine, "nightly", [GUEST], dest)
    assert engine.run_job("nightly").ok
    disks = node.disks[GUEST]
    backed_up = {p: _digest(p) for p in disks}
    for path in disks:
        with path.open("r+b") as f:
            f.write(NEWER)
    current = {p: _digest(p) for p in disks}
    assert current != backed_up
    before = set(disks[0].parent.iterdir())
    return Setup(node, tmp_path / "home", engine, disks, backed_up, current, before)


def _fix_uuids(node: DriverNode) -> None:
    """The test driver makes up a UUID per connection unless the node file gives one."""
    tree = ET.parse(node.file)
    for dom in tree.getroot().findall("domain"):
        ET.SubElement(dom, "uuid").text = str(uuid.uuid4())
    tree.write(node.file)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = _build(tmp_path)
    yield s
    s.engine.close()


def _shared_disk(path: Path, target: str = "vdb") -> ET.Element:
    disk = ET.Element("disk", {"type": "file", "device": "disk"})
    ET.SubElement(disk, "driver", {"name": "qemu", "type": "raw"})
    ET.SubElement(disk, "source", {"file": str(path)})
    ET.SubElement(disk, "target", {"dev": target, "bus": "virtio"})
    ET.SubElement(disk, "shareable")
    return disk


def _restore_over(s: Setup, **kw: object) -> object:
    archive = s.engine.find_archive(GUEST)
    return s.engine.restore_over(archive, GUEST, 1, **kw)  # type: ignore[arg-type]


# --- case 1: a path another guest uses --------------------------------------------


def test_case_01_a_disk_another_guest_shares_is_refused_naming_it(tmp_path: Path) -> None:
    shared = tmp_path / "node" / "disks" / "g0-vda.raw"  # web's vda, as write_node names it
    other = NodeGuest("db", running=True, disk_mib=(1,), extra_devices=[_shared_disk(shared)])
    s = _build(tmp_path, other)
    try:
        code, _out, err = s.cli("restore", GUEST, "1", "--overwrite", "--yes")
    finally:
        s.engine.close()
    assert code == 9, err
    assert f"{shared} is also used by guest 'db'" in err
    assert len(err.strip().splitlines()) == 1
    assert s.digests() == s.current and s.leftovers() == []


def test_case_01_a_guest_defined_later_on_the_same_file_is_refused(setup: Setup) -> None:
    vdb = setup.disks[1]
    xml = (
        "<domain type='test'><name>later</name><memory unit='MiB'>64</memory>"
        "<os><type>hvm</type></os><devices>"
        f"<disk type='file' device='disk'><source file='{vdb}'/><target dev='vda'/></disk>"
        "</devices></domain>"
    )
    setup.engine.hv.define(xml)
    with pytest.raises(RestoreError, match=f"{vdb} is also used by guest 'later'"):
        _restore_over(setup, confirm=lambda notice: True)
    assert setup.digests() == setup.current and setup.leftovers() == []


# --- case 2: crash-safe --------------------------------------------------------------

# Each named point, and whether the restore must count as done after recovery.
CRASH_POINTS = [
    ("copy.chunk", False),  # mid-copy: a partial temporary copy
    ("restore-over.copied", False),  # the first disk copied, the second not
    ("restore-over.swap", True),  # every copy complete, nothing swapped
    ("restore-over.linked", True),  # the first original linked aside, not yet replaced
    ("restore-over.swapped", True),  # the first disk swapped in, the second not
    ("restore-over.define", True),  # every disk swapped, not yet defined
    ("restore-over.cleanup", True),  # defined, the replaced files not yet deleted
]


@pytest.mark.parametrize(("point", "restored"), CRASH_POINTS)
def test_case_02_sigkill_at_each_step_then_any_command_leaves_one_whole_state(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, point: str, restored: bool
) -> None:
    monkeypatch.setenv("GUESTSAFE_FAILPOINTS", f"{point}=kill")
    code, _out, err = setup.cli("restore", GUEST, "1", "--overwrite", "--yes")
    assert code == -signal.SIGKILL, err
    monkeypatch.delenv("GUESTSAFE_FAILPOINTS")

    code, _out, err = setup.cli("jobs")  # any command recovers first

    assert code == 0, err
    assert "recovered" in err
    assert setup.digests() == (setup.backed_up if restored else setup.current)
    assert setup.leftovers() == []  # no copy, no replaced file, nothing aside
    assert RestoreJournal(setup.home / "state").entries() == []
    assert locks.holder(setup.home / "state", "guest:" + _uuid(setup)) is None


def _uuid(s: Setup) -> str:
    return s.engine.hv.guest(GUEST).uuid


def test_case_02_the_original_is_whole_while_the_copy_is_written(setup: Setup) -> None:
    seen: list[dict[Path, str]] = []

    def watch(event: Event) -> None:
        if isinstance(event, PhaseChanged) and event.phase == "swap":
            seen.append(setup.digests())

    _restore_over(setup, reporter=watch)
    assert seen == [setup.current]  # every copy complete, every original untouched
    assert setup.digests() == setup.backed_up


# --- case 3: lock, start from outside, managed save ----------------------------------


def test_case_03_the_guest_lock_is_taken_before_the_state_check(setup: Setup) -> None:
    key = f"guest:{_uuid(setup)}"
    setup.engine.hv.start(GUEST)  # running: the old code said so, without the lock
    with (
        locks.acquire(setup.home / "state", key, "backup of web"),
        pytest.raises(LockBusy, match="backup of web"),
    ):
        _restore_over(setup)
    assert setup.digests() == setup.current


def test_case_03_a_start_from_outside_during_the_copy_cancels_it(setup: Setup) -> None:
    def start_during_copy(event: Event) -> None:
        if isinstance(event, PhaseChanged) and event.phase == "copy":
            setup.engine.hv.start(GUEST)

    with pytest.raises(RestoreError, match="was started during the restore"):
        _restore_over(setup, reporter=start_during_copy)
    assert setup.digests() == setup.current and setup.leftovers() == []


def _managed_save(s: Setup) -> None:
    dom = s.engine.hv.connection.lookupByName(GUEST)
    dom.create()
    dom.managedSave(0)
    assert dom.hasManagedSaveImage(0)


def test_case_03_a_guest_with_a_managed_save_image_is_refused(setup: Setup) -> None:
    _managed_save(setup)
    with pytest.raises(RestoreError, match=r"saved memory image .*--force"):
        _restore_over(setup)
    assert setup.digests() == setup.current
    assert setup.engine.hv.has_managed_save(GUEST)


def test_case_03_force_discards_the_managed_save_image(setup: Setup) -> None:
    _managed_save(setup)
    _restore_over(setup, force=True)
    assert setup.digests() == setup.backed_up
    assert not setup.engine.hv.has_managed_save(GUEST)


# --- case 23: ask first, say truthfully what happens to the replaced disks ------------


def test_case_23_without_a_terminal_and_without_yes_nothing_is_changed(setup: Setup) -> None:
    code, _out, err = setup.cli("restore", GUEST, "1", "--overwrite")
    assert code == 9, err
    assert "no terminal to ask on; nothing was changed (add --yes" in err
    assert len(err.strip().splitlines()) == 1
    assert setup.digests() == setup.current and setup.leftovers() == []


def test_case_23_a_no_answer_changes_nothing(setup: Setup) -> None:
    asked: list[OverwriteNotice] = []

    def decline(notice: OverwriteNotice) -> bool:
        asked.append(notice)
        return False

    with pytest.raises(Cancelled, match="not confirmed; nothing was changed"):
        _restore_over(setup, confirm=decline)
    [notice] = asked
    text = "\n".join(notice.lines())
    assert all(
        f"{p}: replaced; the current file is deleted after success" in text for p in setup.disks
    )
    assert "kept" not in text and "aside" not in text
    assert setup.digests() == setup.current and setup.leftovers() == []


def test_case_23_yes_deletes_the_replaced_disks_and_says_so(setup: Setup) -> None:
    code, out, err = setup.cli("restore", GUEST, "1", "--overwrite", "--yes")
    assert code == 0, err
    assert "aside" not in out + err and "kept" not in out + err
    assert all(f"deleted the replaced {p}" in out + err for p in setup.disks)
    assert setup.digests() == setup.backed_up and setup.leftovers() == []


def test_case_23_keep_replaced_keeps_them_dated_beside_the_original(setup: Setup) -> None:
    code, out, err = setup.cli("restore", GUEST, "1", "--overwrite", "--yes", "--keep-replaced")
    assert code == 0, err
    assert setup.digests() == setup.backed_up
    kept = setup.leftovers()
    assert len(kept) == 2
    for path in setup.disks:
        [name] = [k for k in kept if k.startswith(path.name + ".replaced-")]
        assert len(name) == len(path.name + ".replaced-20261202-1503")
        assert _digest(path.parent / name) == setup.current[path]
        assert f"kept the replaced {path} as {path.parent / name}" in out + err


@pytest.mark.parametrize("point", ["restore-over.swapped", "restore-over.define"])
def test_case_02_a_failure_during_the_swap_puts_every_original_back(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    monkeypatch.setenv("GUESTSAFE_FAILPOINTS", f"{point}=raise")
    code, _out, err = setup.cli("restore", GUEST, "1", "--overwrite", "--yes")
    assert code == 6, err
    assert "put back as it was" in err
    assert setup.digests() == setup.current and setup.leftovers() == []
    assert RestoreJournal(setup.home / "state").entries() == []
