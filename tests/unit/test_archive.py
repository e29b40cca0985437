"""The archive: commit, listing, numbering, verify, retention and recovery."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from guestsafe.engine.archive.manifest import DiskRecord, Manifest
from guestsafe.engine.archive.names import encode_guest_name
from guestsafe.engine.archive.partial import PartialVersion
from guestsafe.engine.archive.store import MARKER, Archive
from guestsafe.engine.archive.versions import VersionInfo
from guestsafe.engine.errors import ArchiveError, NotFoundError, VerifyError
from guestsafe.engine.events import Progress

UUID = "6f2d8d1e-5a3c-4b59-9d61-1a2b3c4d5e6f"
XML = "<domain type='qemu'><name>web</name><graphics passwd='secret'/></domain>\n"


def digest(data: bytes) -> str:
    return str(blake3.blake3(data).hexdigest())


def record(target: str, file: str, data: bytes) -> DiskRecord:
    return DiskRecord(
        target=target,
        source=f"/var/lib/libvirt/images/{file}",
        format=file.rsplit(".", 1)[-1],
        virtual_size=len(data),
        allocated_size=len(data),
        file=file,
        blake3=digest(data),
    )


def manifest_for(guest: str, disks: list[DiskRecord], nvram: DiskRecord | None = None) -> Manifest:
    return Manifest(
        format=1,
        guest=guest,
        uuid=UUID,
        host="hv1",
        mode="stop",
        started="2025-03-01T02:00:00+00:00",
        finished="2025-03-01T02:03:00+00:00",
        downtime=12.5,
        tool_version="0.1.0",
        disks=disks,
        nvram=nvram,
        notes=[],
    )


def fill(partial: PartialVersion, files: dict[str, bytes]) -> Manifest:
    partial.write_domain_xml(XML)
    records = []
    for name, data in files.items():
        partial.file_path(name).write_bytes(data)
        records.append(record(name.split(".")[0], name, data))
    disks = [r for r in records if r.target != "nvram"]
    nvram = next((r for r in records if r.target == "nvram"), None)
    return manifest_for(partial.guest, disks, nvram)


def backup(
    archive: Archive, guest: str = "web", files: dict[str, bytes] | None = None
) -> VersionInfo:
    partial = archive.begin(guest)
    files = files or {"vda.qcow2": os.urandom(5000), "vdb.raw": b"\0" * 4096 + b"x"}
    return partial.commit(fill(partial, files))


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    return Archive.open(tmp_path / "backup", create=True)


@pytest.fixture
def failpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    yield monkeypatch


def numbers(archive: Archive, guest: str = "web") -> list[int]:
    return [v.number for v in archive.versions(guest)]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- opening -----------------------------------------------------------------


def test_create_writes_the_marker(tmp_path: Path) -> None:
    root = tmp_path / "new" / "backup"
    archive = Archive.open(root, create=True)
    marker = json.loads((root / MARKER).read_text())
    assert marker["format"] == 1
    assert marker["archive_id"] == archive.archive_id == str(uuid.UUID(archive.archive_id))
    assert mode(root) == 0o700 and mode(root / MARKER) == 0o600
    again = Archive.open(root, expected_id=archive.archive_id)
    assert again.archive_id == archive.archive_id
    assert Archive.open(root, create=True).archive_id == archive.archive_id


def test_a_folder_without_marker_is_not_an_archive(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="not a guestsafe archive"):
        Archive.open(tmp_path)
    with pytest.raises(ArchiveError, match="does not exist"):
        Archive.open(tmp_path / "missing")


def test_another_archive_id_is_refused_naming_both(archive: Archive) -> None:
    other = str(uuid.uuid4())
    with pytest.raises(ArchiveError) as caught:
        Archive.open(archive.root, expected_id=other)
    assert archive.archive_id in str(caught.value) and other in str(caught.value)


def test_expected_id_never_creates_an_archive(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="expected archive"):
        Archive.open(tmp_path, create=True, expected_id=str(uuid.uuid4()))
    assert not (tmp_path / MARKER).exists()


def test_newer_archive_format_is_refused(archive: Archive) -> None:
    marker = archive.root / MARKER
    data = json.loads(marker.read_text())
    marker.write_text(json.dumps({**data, "format": 2}))
    with pytest.raises(ArchiveError, match="format 2, newer"):
        Archive.open(archive.root)


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "[]",
        '{"format": 1, "archive_id": "x", "created": "2025-01-01T00:00:00+00:00"}',
        f'{{"format": 1, "archive_id": "{UUID}"}}',
        f'{{"format": true, "archive_id": "{UUID}", "created": ""}}',
        f'{{"format": 1, "archive_id": "{UUID}", "created": "", "extra": 1}}',
    ],
)
def test_a_damaged_marker_is_refused(tmp_path: Path, text: str) -> None:
    (tmp_path / MARKER).write_text(text)
    with pytest.raises(ArchiveError, match=MARKER):
        Archive.open(tmp_path, create=True)
    assert (tmp_path / MARKER).read_text() == text  # never overwritten


# --- begin, commit, list -----------------------------------------------------


def test_commit_and_list(archive: Archive) -> None:
    first = backup(archive)
    second = backup(archive, files={"vda.qcow2": b"abc", "nvram.fd": b"\1" * 128})
    assert [first.number, second.number] == [1, 2]
    listed = archive.versions()
    assert listed == [first, second]
    assert archive.guests() == ["web"]
    assert archive.latest("web") == second
    assert archive.version("web", 1) == first
    assert second.manifest.nvram is not None and second.manifest.nvram.size == 128
    assert second.date == "2025-03-01T02:03:00+00:00" and second.mode == "stop"
    assert second.verified is None
    assert second.size >= 3 + 128
    assert second.path == archive.root / "web" / "2"


def test_committed_files_and_folders_are_private(archive: Archive) -> None:
    os.umask(0)
    try:
        version = backup(archive)
    finally:
        os.umask(0o022)
    assert mode(version.path.parent) == 0o700
    assert mode(version.path) == 0o700
    for name in ("domain.xml", "manifest.json", "B3SUMS"):
        assert mode(version.path / name) == 0o600, name
    assert (version.path / "domain.xml").read_text() == XML


def test_b3sums_checks_a_version_without_guestsafe(archive: Archive) -> None:
    version = backup(archive, files={"vda.qcow2": b"disk", "nvram.fd": b"vars"})
    lines = (version.path / "B3SUMS").read_text().splitlines()
    assert lines == [
        f"{digest(b'disk')}  vda.qcow2",
        f"{digest(b'vars')}  nvram.fd",
        f"{digest(XML.encode())}  domain.xml",
    ]
    if shutil.which("b3sum") is None:
        if os.environ.get("CI"):
            pytest.fail("b3sum is not installed (apt-get install b3sum)")
        pytest.skip("b3sum is not installed")
    subprocess.run(["b3sum", "--check", "B3SUMS"], cwd=version.path, check=True)


def test_partial_is_never_listed(archive: Archive) -> None:
    backup(archive)
    partial = archive.begin("web")
    fill(partial, {"vda.qcow2": b"x"})
    assert numbers(archive) == [1]
    assert partial.path.name == ".partial-2"
    assert mode(partial.path) == 0o700
    assert any(".partial-2" in p for p in archive.problems())
    with pytest.raises(NotFoundError):
        archive.version("web", 2)


def test_missing_version_names_guest_and_existing_versions(archive: Archive) -> None:
    backup(archive)
    backup(archive)
    with pytest.raises(NotFoundError) as caught:
        archive.version("web", 7)
    assert str(caught.value) == (f"guest web has no version 7 in {archive.root} (versions: 1, 2)")
    with pytest.raises(NotFoundError, match=r"no version 1 .*versions: none"):
        archive.version("db", 1)
    assert archive.versions("db") == [] and archive.latest("db") is None


def test_commit_refuses_incomplete_versions(archive: Archive) -> None:
    partial = archive.begin("web")
    m = fill(partial, {"vda.qcow2": b"abc"})
    with pytest.raises(ArchiveError, match=r"version 1 of web: vdb.raw is missing"):
        partial.commit(manifest_for("web", [*m.disks, record("vdb", "vdb.raw", b"")]))
    with pytest.raises(ArchiveError, match="manifest is of guest db"):
        partial.commit(manifest_for("db", m.disks))
    with pytest.raises(ArchiveError, match="is 3 bytes, the manifest says 4"):
        partial.commit(manifest_for("web", [DiskRecord(**{**vars(m.disks[0]), "size": 4})]))
    partial.file_path("stray.img").write_bytes(b"?")
    with pytest.raises(ArchiveError, match=r"does not list: stray.img"):
        partial.commit(m)
    partial.file_path("stray.img").unlink()
    (partial.path / "domain.xml").unlink()
    with pytest.raises(ArchiveError, match=r"domain.xml is missing"):
        partial.commit(m)
    partial.write_domain_xml(XML)
    version = partial.commit(m)
    assert version.number == 1
    with pytest.raises(ArchiveError, match="already committed"):
        partial.commit(m)
    partial.discard()  # a no-op once committed
    assert numbers(archive) == [1]


def test_commit_refuses_a_symlinked_disk_file(archive: Archive, tmp_path: Path) -> None:
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"abc")
    partial = archive.begin("web")
    m = fill(partial, {"vda.qcow2": b"abc"})
    partial.file_path("vda.qcow2").unlink()
    partial.file_path("vda.qcow2").symlink_to(outside)
    with pytest.raises(ArchiveError, match=r"vda.qcow2 is a symlink"):
        partial.commit(m)


@pytest.mark.parametrize(
    "name", ["../x", "/etc/passwd", "a/b", ".hidden", "manifest.json", "domain.xml", ""]
)
def test_file_path_takes_plain_names_only(archive: Archive, name: str) -> None:
    partial = archive.begin("web")
    with pytest.raises(ArchiveError, match="not a plain disk file name"):
        partial.file_path(name)
    assert partial.file_path("vda.qcow2") == partial.path / "vda.qcow2"


HOSTILE = [
    "..",
    ".",
    "-rf",
    "$(touch x)",
    "a/b",
    "\x1b[31mred",
    "[b]x[/b]",
    "Grüße",
    "\ud800",
    "guestsafe-archive.json",
    "x" * 300,
]


@pytest.mark.parametrize("guest", HOSTILE)
def test_hostile_guest_names_stay_inside_the_archive(archive: Archive, guest: str) -> None:
    version = backup(archive, guest, {"vda.qcow2": b"abc"})
    assert version.path.parent.parent == archive.root
    assert version.path.parent.name == encode_guest_name(guest)
    assert archive.guests() == [guest]
    assert archive.versions() == [version]
    assert archive.verify(guest)[0].ok
    assert sorted(p.name for p in archive.root.iterdir()) == sorted(
        [MARKER, encode_guest_name(guest)]
    )


def test_long_guest_name_is_found_again_without_guest_name_file(archive: Archive) -> None:
    guest = "vm-" + "ü" * 200
    version = backup(archive, guest)
    folder = version.path.parent
    assert (folder / "guest-name").read_bytes() == guest.encode()
    (folder / "guest-name").unlink()
    assert archive.guests() == [guest]  # read back from the manifests
    assert backup(archive, guest).number == 2
    assert (folder / "guest-name").exists()


def test_a_guest_name_file_that_disagrees_is_refused(archive: Archive) -> None:
    guest = "x" * 300
    folder = backup(archive, guest).path.parent
    (folder / "guest-name").write_text("y" * 300)
    with pytest.raises(ArchiveError, match="belongs to another guest"):
        archive.begin(guest)


def test_symlinked_guest_folder_is_refused(archive: Archive, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (archive.root / "web").symlink_to(elsewhere)
    with pytest.raises(ArchiveError, match="is a symlink"):
        archive.begin("web")
    assert archive.versions() == []
    assert any("symlink" in p for p in archive.problems())
    assert list(elsewhere.iterdir()) == []


def test_foreign_folders_in_the_root_are_ignored(archive: Archive) -> None:
    (archive.root / "lost+found").mkdir()
    (archive.root / "notes.txt").write_text("mine")
    backup(archive)
    assert archive.guests() == ["web"]
    assert archive.problems() == []
    archive.recover()
    assert (archive.root / "lost+found").is_dir() and (archive.root / "notes.txt").exists()


def test_begin_refuses_a_root_that_lost_its_marker(archive: Archive) -> None:
    (archive.root / MARKER).unlink()  # as after the device was unmounted
    with pytest.raises(ArchiveError, match="was the device unmounted"):
        archive.begin("web")
    assert list(archive.root.iterdir()) == []


# --- numbering ---------------------------------------------------------------


def test_numbers_are_never_reused_after_a_discarded_partial(archive: Archive) -> None:
    backup(archive)
    partial = archive.begin("web")
    partial.discard()
    assert not partial.path.exists()
    partial.discard()  # twice is fine
    assert backup(archive).number == 3


def test_numbers_are_never_reused_after_retention(archive: Archive) -> None:
    backup(archive)
    backup(archive)
    assert archive.apply_retention("web", 1) == [1]  # the newest-but-one
    assert backup(archive).number == 3
    shutil.rmtree(archive.root / "web" / "3")  # even the newest, removed by hand
    assert backup(archive).number == 4


def test_a_damaged_counter_falls_back_to_the_folders(archive: Archive) -> None:
    backup(archive)
    backup(archive)
    (archive.root / "web" / "last-version").write_text("garbage")
    assert backup(archive).number == 3


def test_numbers_skip_leftover_partials(archive: Archive) -> None:
    backup(archive)
    (archive.root / "web" / "last-version").unlink()
    (archive.root / "web" / ".partial-5").mkdir()
    assert archive.begin("web").number == 6


# --- verify ------------------------------------------------------------------


def test_verify_passes_and_records_it(archive: Archive) -> None:
    version = backup(archive)
    seen: list[Progress] = []
    reports = archive.verify("web", 1, progress=seen.append)
    assert [(r.guest, r.number, r.ok, r.problems) for r in reports] == [("web", 1, True, [])]
    reports[0].raise_if_failed()
    record_ = json.loads((version.path / "verified.json").read_text())
    assert record_["ok"] is True and record_["problems"] == []
    assert mode(version.path / "verified.json") == 0o600
    assert archive.version("web", 1).verified is True
    assert seen and seen[-1].done == seen[-1].total
    assert seen[-1].guest == "web"


def test_verify_progress_counts_sparse_files_smoothly(archive: Archive) -> None:
    partial = archive.begin("web")
    m = fill(partial, {"vda.qcow2": b"a"})
    with partial.file_path("vdb.raw").open("wb") as f:
        f.seek(64 * 2**20)
        f.write(b"tail")
    data = b"\0" * (64 * 2**20) + b"tail"
    partial.commit(manifest_for("web", [*m.disks, record("vdb", "vdb.raw", data)]))
    seen: list[Progress] = []
    reports = archive.verify("web", progress=seen.append)
    assert reports[0].ok
    total = 1 + len(data) + len(XML)  # every file hashed, domain.xml too
    done = [p.done for p in seen]
    assert done == sorted(done) and done[-1] == total
    assert {p.total for p in seen} == {total}
    # The hole is skipped, not read, yet progress moves through it in proportion.
    assert any(0 < d < total for d in done)


def test_a_fifo_in_place_of_the_manifest_does_not_hang(archive: Archive) -> None:
    version = backup(archive)
    (version.path / "manifest.json").unlink()
    os.mkfifo(version.path / "manifest.json")
    assert archive.versions() == []
    assert any("manifest.json" in p for p in archive.problems())
    (report,) = archive.verify("web")
    assert report.problems[0].startswith("manifest.json: unreadable")


def test_verify_catches_a_flipped_byte(archive: Archive) -> None:
    backup(archive)
    version = backup(archive)
    disk = version.path / "vda.qcow2"
    data = bytearray(disk.read_bytes())
    data[1234] ^= 0x01
    disk.write_bytes(bytes(data))
    reports = archive.verify("web")
    assert [r.ok for r in reports] == [True, False]
    bad = reports[1]
    assert bad.number == 2 and len(bad.problems) == 1
    expected = version.manifest.disks[0].blake3
    assert bad.problems[0] == (
        f"vda.qcow2: blake3 mismatch (expected {expected[:16]}.., got {digest(bytes(data))[:16]}..)"
    )
    with pytest.raises(VerifyError, match=r"version 2 of web failed verification: vda.qcow2"):
        bad.raise_if_failed()
    assert archive.version("web", 2).verified is False
    assert json.loads((version.path / "verified.json").read_text())["problems"] == bad.problems


def test_verify_catches_truncated_and_missing_files(archive: Archive) -> None:
    version = backup(archive, files={"vda.qcow2": b"abcd", "vdb.raw": b"x", "nvram.fd": b"n" * 12})
    with (version.path / "nvram.fd").open("r+b") as f:
        f.truncate(10)
    (version.path / "vdb.raw").unlink()
    (version.path / "vda.qcow2").write_bytes(b"abcd")  # same content, still fine
    (report,) = archive.verify("web", 1)
    assert report.problems == ["vdb.raw: missing", "nvram.fd: size 10 != 12"]


def test_verify_refuses_symlinks_and_strays(archive: Archive, tmp_path: Path) -> None:
    version = backup(archive, files={"vda.qcow2": b"abc"})
    copy = tmp_path / "copy.qcow2"
    copy.write_bytes(b"abc")  # same content: only the link itself is wrong
    (version.path / "vda.qcow2").unlink()
    (version.path / "vda.qcow2").symlink_to(copy)
    (version.path / "notes.txt").write_text("?")
    (version.path / "sub").mkdir()
    os.mkfifo(version.path / "pipe")
    (report,) = archive.verify("web", 1)
    assert not report.ok
    assert report.problems == [
        "notes.txt: unexpected file",
        "pipe is a special file",
        "sub is a directory",
        "vda.qcow2 is a symlink",
    ]


def test_verify_catches_damaged_domain_xml_and_b3sums(archive: Archive) -> None:
    version = backup(archive, files={"vda.qcow2": b"abc"})
    (version.path / "domain.xml").write_text(XML.replace("web", "bad"))
    (version.path / "B3SUMS").write_text("")
    problems = archive.verify("web", 1)[0].problems
    assert problems[0] == "B3SUMS: does not match manifest.json"
    assert problems[1].startswith("domain.xml: blake3 mismatch")


def test_a_manifest_naming_dotdot_fails_verify_and_is_not_listed(
    archive: Archive, tmp_path: Path
) -> None:
    backup(archive)
    version = backup(archive)
    (tmp_path / "backup" / "secret").write_bytes(b"abc")
    path = version.path / "manifest.json"
    path.write_text(path.read_text().replace('"vdb.raw"', '"../secret"'))
    (report_1, report_2) = archive.verify("web")
    assert report_1.ok and not report_2.ok
    assert "names an unsafe file '../secret'" in report_2.problems[0]
    assert "version 2" in report_2.problems[0]
    assert numbers(archive) == [1]
    assert any("unsafe file" in p for p in archive.problems())
    with pytest.raises(ArchiveError, match="unsafe file"):
        archive.version("web", 2)


def test_verify_of_unknown_targets(archive: Archive) -> None:
    backup(archive)
    with pytest.raises(NotFoundError, match=r"no version 9 .*versions: 1"):
        archive.verify("web", 9)
    with pytest.raises(NotFoundError, match="guest db has no versions"):
        archive.verify("db")
    with pytest.raises(ArchiveError, match="needs a guest"):
        archive.verify(None, 1)


def test_verify_everything_covers_every_guest(archive: Archive) -> None:
    backup(archive, "web")
    backup(archive, "db")
    assert [(r.guest, r.number) for r in archive.verify()] == [("db", 1), ("web", 1)]


# --- retention ---------------------------------------------------------------


def test_retention_keeps_the_newest(archive: Archive) -> None:
    for _ in range(3):
        backup(archive)
    assert archive.apply_retention("web", 2) == [1]
    assert numbers(archive) == [2, 3]
    assert sorted(os.listdir(archive.root / "web")) == ["2", "3", "last-version"]
    assert archive.apply_retention("web", 2) == []
    with pytest.raises(ArchiveError, match="at least 1"):
        archive.apply_retention("web", 0)
    assert archive.apply_retention("nobody", 1) == []


def test_retention_never_deletes_the_last_verified_version(archive: Archive) -> None:
    for _ in range(4):
        backup(archive)
    archive.verify("web", 1)
    archive.verify("web", 2)
    flipped = archive.root / "web" / "3" / "vdb.raw"
    flipped.write_bytes(b"\0" * 4096 + b"y")
    assert not archive.verify("web", 3)[0].ok  # a failed verification protects nothing
    assert archive.apply_retention("web", 1) == [1, 3]
    assert numbers(archive) == [2, 4]


def test_retention_never_deletes_the_newest_even_if_verified_older(archive: Archive) -> None:
    backup(archive)
    backup(archive)
    archive.verify("web", 1)
    assert archive.apply_retention("web", 1) == []
    assert numbers(archive) == [1, 2]


def test_retention_does_not_follow_symlinks(archive: Archive, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    first = backup(archive)
    backup(archive)
    (first.path / "link").symlink_to(outside)
    (first.path / "file-link").symlink_to(outside / "precious")
    assert archive.apply_retention("web", 1) == [1]
    assert (outside / "precious").read_text() == "keep me"


def test_retention_interrupted_before_delete(
    archive: Archive, failpoint: pytest.MonkeyPatch
) -> None:
    for _ in range(3):
        backup(archive)
    failpoint.setenv("GUESTSAFE_FAILPOINTS", "retention.before-delete=raise")
    with pytest.raises(OSError, match=r"retention.before-delete"):
        archive.apply_retention("web", 1)
    failpoint.delenv("GUESTSAFE_FAILPOINTS")
    assert numbers(archive) == [2, 3]  # the rename is the deletion
    assert (archive.root / "web" / ".deleting-1").is_dir()
    assert archive.recover() == [archive.root / "web" / ".deleting-1"]
    assert archive.apply_retention("web", 1) == [2]


# --- commit interrupted, recovery --------------------------------------------


@pytest.mark.parametrize("point", ["commit.before-manifest", "commit.before-rename"])
def test_interrupted_commit_leaves_older_versions_intact(
    archive: Archive, failpoint: pytest.MonkeyPatch, point: str
) -> None:
    old = backup(archive)
    partial = archive.begin("web")
    m = fill(partial, {"vda.qcow2": b"new"})
    failpoint.setenv("GUESTSAFE_FAILPOINTS", f"{point}=raise")
    with pytest.raises(OSError, match=point):
        partial.commit(m)
    failpoint.delenv("GUESTSAFE_FAILPOINTS")
    assert archive.versions() == [old]
    assert archive.verify("web")[0].ok
    assert partial.path.is_dir()
    assert archive.recover() == [partial.path]
    assert archive.versions("web") == [archive.version("web", 1)]
    assert backup(archive).number == 3


def test_failure_after_rename_keeps_the_version(
    archive: Archive, failpoint: pytest.MonkeyPatch
) -> None:
    partial = archive.begin("web")
    m = fill(partial, {"vda.qcow2": b"new"})
    failpoint.setenv("GUESTSAFE_FAILPOINTS", "commit.after-rename=raise")
    with pytest.raises(OSError):
        partial.commit(m)
    partial.discard()  # what a runner does on any error: must not touch the version
    assert numbers(archive) == [1]


def test_recover_removes_partials_deleting_and_temporary_files(archive: Archive) -> None:
    version = backup(archive)
    guest_dir = version.path.parent
    leftovers = [
        guest_dir / ".partial-7",
        guest_dir / ".deleting-3",
        guest_dir / ".tmp-0123abcd-last-version",
        version.path / ".tmp-0123abcd-verified.json",
        archive.root / ".tmp-0123abcd-guestsafe-archive.json",
    ]
    leftovers[0].mkdir()
    (leftovers[0] / "vda.qcow2").write_bytes(b"half")
    leftovers[1].mkdir()
    for path in leftovers[2:]:
        path.write_bytes(b"")
    (guest_dir / ".partial-x").mkdir()  # not a name guestsafe makes: left alone
    assert archive.recover() == sorted(leftovers)
    assert all(not p.exists() for p in leftovers)
    assert (guest_dir / ".partial-x").is_dir()
    assert archive.versions() == [version]
    assert archive.verify()[0].ok
    assert archive.recover() == []


def test_recover_unlinks_a_symlinked_partial_without_following(
    archive: Archive, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    backup(archive)
    (archive.root / "web" / ".partial-9").symlink_to(outside)
    assert archive.recover() == [archive.root / "web" / ".partial-9"]
    assert (outside / "precious").read_text() == "keep me"
