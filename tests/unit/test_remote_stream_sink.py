"""The sparse stream writer and sender (volume_streams.py) and the remote checks
(remote_disks.py), against fake libvirt streams made from real sparse files."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import blake3
import libvirt
import pytest

from guestsafe.engine.archive.chunks import table_bytes
from guestsafe.engine.backup import stream_copy
from guestsafe.engine.backup.guest_run import GuestRun
from guestsafe.engine.backup.remote_plan import plan_remote_disks
from guestsafe.engine.backup.stream_copy import StreamCopy
from guestsafe.engine.copier import copy_file
from guestsafe.engine.errors import Cancelled, CopyError, HypervisorError, PreflightError
from guestsafe.engine.hypervisor import volume_streams
from guestsafe.engine.hypervisor.connection import uri_is_remote
from guestsafe.engine.hypervisor.domain_xml import DiskInfo, GuestInfo, GuestState
from guestsafe.engine.hypervisor.remote_disks import check_remote_mode, remote_disks
from guestsafe.engine.hypervisor.volume_streams import (
    SparseSink,
    download_volume,
    receive,
    upload_volume,
)
from guestsafe.engine.modes import Mode
from guestsafe.engine.throttle import HostPacer, TokenBucket

MiB = 1024 * 1024


def _sparse_file(path: Path, pieces: list[tuple[int, int]], size: int) -> Path:
    """A file of ``size`` bytes holding random data at (offset, length) pieces, holes elsewhere."""
    with path.open("wb") as f:
        f.truncate(size)
        for offset, length in pieces:
            f.seek(offset)
            f.write(os.urandom(length))
    return path


def _sections(path: Path) -> list[tuple[str, int, int]]:
    """("data" | "hole", offset, length) of a file, as libvirt's sparse stream sends them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out, pos = [], 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                start = size
            if start > pos:
                out.append(("hole", pos, start - pos))
            if start >= size:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append(("data", start, end - start))
            pos = end
        return out
    finally:
        os.close(fd)


class FakeDownloadStream:
    """recvFlags/recvHole over a real file's sections; fails after ``fail_after`` bytes."""

    def __init__(self, path: Path, fail_after: int | None = None, packet: int = 256 * 1024):
        self.data = path.read_bytes()
        self.sections = _sections(path)
        self.fail_after = fail_after
        self.packet = packet
        self.sent = 0
        self.holes_sent = 0
        self.finished = self.aborted = False

    def recvFlags(self, nbytes: int, flags: int = 0) -> bytes | int:
        assert flags == libvirt.VIR_STREAM_RECV_STOP_AT_HOLE
        if not self.sections:
            return b""
        kind, offset, length = self.sections[0]
        if kind == "hole":
            return -3
        if self.fail_after is not None and self.sent >= self.fail_after:
            raise libvirt.libvirtError("Cannot recv data: Connection reset by peer")
        step = min(nbytes, self.packet, length)
        chunk = self.data[offset : offset + step]
        self.sections[0] = (kind, offset + step, length - step)
        if step == length:
            self.sections.pop(0)
        self.sent += step
        return chunk

    def recvHole(self, flags: int = 0) -> int:
        kind, _offset, length = self.sections.pop(0)
        assert kind == "hole"
        self.holes_sent += length
        return length

    def finish(self) -> None:
        self.finished = True

    def abort(self) -> None:
        self.aborted = True


class FakeVolume:
    def __init__(self) -> None:
        self.flags: int | None = None

    def name(self) -> str:
        return "vdb.raw"

    def download(self, stream: object, offset: int, length: int, flags: int) -> None:
        self.flags = flags

    def upload(self, stream: object, offset: int, length: int, flags: int) -> None:
        self.flags = flags


class FakeConn:
    def __init__(self, stream: object) -> None:
        self.stream = stream

    def newStream(self, flags: int) -> object:
        return self.stream

    def getURI(self) -> str:
        return "qemu+ssh://root@node2/system"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    # Data, a large hole, two close pieces, and a trailing hole.
    pieces = [(0, 1 * MiB + 123), (9 * MiB, 3 * MiB), (12 * MiB + 4096 * 3, 70_000)]
    return _sparse_file(tmp_path / "src.raw", pieces, 40 * MiB)


def test_holes_in_holes_out_and_the_digest_equals_a_local_copy(
    source: Path, tmp_path: Path
) -> None:
    stream = FakeDownloadStream(source)
    dst = tmp_path / "streamed.raw"
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        sink = SparseSink(fd)
        receive(stream, sink)  # type: ignore[arg-type]
        digest = sink.finish()
    finally:
        os.close(fd)

    local = copy_file(source, tmp_path / "local.raw")
    assert digest == local.blake3 == blake3.blake3(source.read_bytes()).hexdigest()
    assert dst.read_bytes() == source.read_bytes()
    assert dst.stat().st_size == source.stat().st_size
    assert stream.holes_sent > 20 * MiB  # the holes crossed as holes
    data = sum(length for kind, _, length in _sections(source) if kind == "data")
    assert sink.data_bytes == data
    # Holes landed as holes: the copy allocates about what the source does.
    assert dst.stat().st_blocks * 512 <= source.stat().st_blocks * 512 + 64 * 1024


def test_download_volume_asks_for_a_sparse_stream_and_reports_progress(
    source: Path, tmp_path: Path
) -> None:
    stream, vol = FakeDownloadStream(source), FakeVolume()
    seen: list[tuple[int, int]] = []
    total = source.stat().st_blocks * 512

    result = download_volume(
        FakeConn(stream),  # type: ignore[arg-type]
        vol,  # type: ignore[arg-type]
        tmp_path / "vdb.raw",
        length=source.stat().st_size,
        total=total,
        progress=lambda done, of: seen.append((done, of)),
    )

    assert vol.flags == libvirt.VIR_STORAGE_VOL_DOWNLOAD_SPARSE_STREAM
    assert stream.finished and not stream.aborted
    assert result.blake3 == blake3.blake3(source.read_bytes()).hexdigest()
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert (tmp_path / "vdb.raw").stat().st_mode & 0o777 == 0o600


def test_a_connection_lost_mid_stream_fails_the_copy_and_leaves_no_file(
    source: Path, tmp_path: Path
) -> None:
    stream = FakeDownloadStream(source, fail_after=2 * MiB)
    dst = tmp_path / "vdb.raw"

    with pytest.raises(CopyError, match="Connection reset by peer"):
        download_volume(
            FakeConn(stream),  # type: ignore[arg-type]
            FakeVolume(),  # type: ignore[arg-type]
            dst,
            length=source.stat().st_size,
            total=1,
        )

    assert stream.aborted and not dst.exists()


def test_a_stream_that_ends_short_is_refused(source: Path, tmp_path: Path) -> None:
    stream = FakeDownloadStream(source)
    dst = tmp_path / "vdb.raw"
    with pytest.raises(CopyError, match="changed during the copy"):
        download_volume(
            FakeConn(stream),  # type: ignore[arg-type]
            FakeVolume(),  # type: ignore[arg-type]
            dst,
            length=source.stat().st_size + 4096,
            total=1,
        )
    assert not dst.exists()


def test_a_cancel_stops_the_stream(source: Path, tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        download_volume(
            FakeConn(FakeDownloadStream(source)),  # type: ignore[arg-type]
            FakeVolume(),  # type: ignore[arg-type]
            tmp_path / "vdb.raw",
            length=source.stat().st_size,
            total=1,
            cancel=cancel,
        )
    assert not (tmp_path / "vdb.raw").exists()


def test_the_sink_keeps_memory_and_page_cache_bounded(tmp_path: Path, monkeypatch) -> None:
    """Written ranges are handed to writeback every FLUSH bytes, not kept to the end."""
    flushed: list[tuple[int, int, int]] = []
    monkeypatch.setattr(
        volume_streams,
        "_sync_file_range",
        lambda fd, off, n, flags: flushed.append((off, n, flags)),
    )
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        sink = SparseSink(fd)
        chunk = os.urandom(256 * 1024)
        for _ in range(4 * volume_streams.FLUSH // len(chunk)):
            sink.data(chunk)
        sink.finish()
    finally:
        os.close(fd)
    assert len([f for f in flushed if f[2] == volume_streams._SFR_WRITE]) == 4


class FakeUploadStream:
    def __init__(self) -> None:
        self.pieces: list[tuple[str, bytes | int]] = []
        self.finished = False

    def send(self, data: bytes) -> int:
        self.pieces.append(("data", data))
        return len(data)

    def sendHole(self, length: int, flags: int = 0) -> int:
        self.pieces.append(("hole", length))
        return 0

    def finish(self) -> None:
        self.finished = True

    def abort(self) -> None:
        raise AssertionError("not aborted")


def test_upload_sends_holes_as_holes_and_hashes_what_was_sent(source: Path) -> None:
    stream, vol = FakeUploadStream(), FakeVolume()

    digest = upload_volume(FakeConn(stream), vol, source)  # type: ignore[arg-type]

    assert vol.flags == libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM and stream.finished
    rebuilt = bytearray()
    for kind, piece in stream.pieces:
        rebuilt += piece if kind == "data" else bytes(piece)  # type: ignore[arg-type]
    assert bytes(rebuilt) == source.read_bytes()
    assert digest == blake3.blake3(source.read_bytes()).hexdigest()
    holes = sum(p for k, p in stream.pieces if k == "hole")  # type: ignore[misc]
    assert holes > 20 * MiB


def test_the_stream_makes_the_local_copiers_chunk_table(source: Path, tmp_path: Path) -> None:
    result = download_volume(
        FakeConn(FakeDownloadStream(source)),  # type: ignore[arg-type]
        FakeVolume(),  # type: ignore[arg-type]
        tmp_path / "vdb.raw",
        length=source.stat().st_size,
        total=source.stat().st_blocks * 512,
    )

    local = copy_file(source, tmp_path / "local.raw")
    assert result.chunks is not None and local.chunks is not None
    assert table_bytes(result.chunks) == table_bytes(local.chunks)
    assert result.blake3 == local.blake3


class RecordingPacer:
    """A Pacer that holds nothing back and remembers what it was told."""

    def __init__(self) -> None:
        self.paced = 0
        self.threads: list[str] = []

    def thread_started(self) -> None:
        self.threads.append(threading.current_thread().name)

    def wrote(self, nbytes: int, stop: threading.Event) -> None:
        self.paced += nbytes


def _strict_pacer(rate: int) -> HostPacer:
    pace = HostPacer("best-effort", rate)
    pace.bucket = TokenBucket(rate, burst=0)  # no head start: the time is all pacing
    return pace


def test_bwlimit_paces_the_download_and_ionice_only_the_local_writer(
    source: Path, tmp_path: Path
) -> None:
    data = sum(length for kind, _, length in _sections(source) if kind == "data")
    recording = RecordingPacer()
    download_volume(
        FakeConn(FakeDownloadStream(source)),  # type: ignore[arg-type]
        FakeVolume(),  # type: ignore[arg-type]
        tmp_path / "a.raw",
        length=source.stat().st_size,
        total=data,
        pace=recording,
    )
    assert recording.paced == data
    assert recording.threads == ["stream-writer"]  # not the caller's thread

    rate = 8 * MiB  # the source's ~4.1 MiB of data take about half a second
    started = time.monotonic()
    download_volume(
        FakeConn(FakeDownloadStream(source)),  # type: ignore[arg-type]
        FakeVolume(),  # type: ignore[arg-type]
        tmp_path / "b.raw",
        length=source.stat().st_size,
        total=data,
        pace=_strict_pacer(rate),
    )
    assert time.monotonic() - started >= 0.9 * (data - volume_streams.PACKET) / rate


def test_bwlimit_paces_the_upload(source: Path) -> None:
    data = sum(length for kind, _, length in _sections(source) if kind == "data")
    recording = RecordingPacer()
    upload_volume(FakeConn(FakeUploadStream()), FakeVolume(), source, pace=recording)  # type: ignore[arg-type]
    assert recording.paced == data and recording.threads == []

    rate = 8 * MiB
    started = time.monotonic()
    upload_volume(FakeConn(FakeUploadStream()), FakeVolume(), source, pace=_strict_pacer(rate))  # type: ignore[arg-type]
    assert time.monotonic() - started >= 0.9 * (data - volume_streams.SEND) / rate


@pytest.mark.parametrize(
    ("uri", "remote"),
    [
        ("qemu:///system", False),
        ("qemu+unix:///system", False),
        ("test:///default", False),
        ("qemu+ssh://root@node2/system", True),
        ("qemu+ssh://root@127.0.0.1:2222/system?keyfile=/k", True),
        ("qemu+tls://node2/system", True),
        ("qemu://node2/system", True),
        ("qemu+libssh://node2/system", True),
    ],
)
def test_uri_is_remote(uri: str, remote: bool) -> None:
    assert uri_is_remote(uri) is remote


def _guest(state: str = "running") -> GuestInfo:
    disk = DiskInfo("vda", "/srv/vms/web1.qcow2", "file", "disk", "qcow2", False, False)
    return GuestInfo("web1", "u", GuestState(state), True, disks=[disk])


@pytest.mark.parametrize("mode", ["stop-short", "snapshot"])
def test_push_modes_are_refused_for_a_running_remote_guest(mode: str) -> None:
    with pytest.raises(PreflightError, match=f"mode {mode} has QEMU write"):
        check_remote_mode(_guest(), mode, "qemu+ssh://node2/system")
    check_remote_mode(_guest(), "stop", "qemu+ssh://node2/system")
    check_remote_mode(_guest("shutoff"), mode, "qemu+ssh://node2/system")


class PoolConn:
    """A host whose only pool covers /var/lib/libvirt/images."""

    def getURI(self) -> str:
        return "qemu+ssh://root@node2/system"

    def storageVolLookupByPath(self, path: str) -> object:
        raise libvirt.libvirtError("Storage volume not found")

    def listAllStoragePools(self, flags: int) -> list[object]:
        return [_Pool()]


class _Pool:
    def XMLDesc(self, flags: int) -> str:
        return "<pool><target><path>/var/lib/libvirt/images</path></target></pool>"

    def name(self) -> str:
        return "default"

    def isActive(self) -> bool:
        return False


def test_a_disk_no_pool_holds_names_the_pool_that_would() -> None:
    info = _guest()
    with pytest.raises(PreflightError, match="define a dir pool for /srv/vms"):
        remote_disks(PoolConn(), info, info.disks)  # type: ignore[arg-type]


def test_a_disk_in_a_stopped_pool_says_start_it() -> None:
    disk = DiskInfo("vda", "/var/lib/libvirt/images/a.qcow2", "file", "disk", "qcow2", False, False)
    info = _guest()
    with pytest.raises(PreflightError, match="virsh pool-start default"):
        remote_disks(PoolConn(), info, [disk])  # type: ignore[arg-type]


class FlakyHv:
    """A remote host that answers again after ``down`` failed calls."""

    uri = "qemu+ssh://root@node2/system"

    def __init__(self, down: int, reconnect_wait: float | None = None) -> None:
        self.down = down
        self.calls = 0
        self.reconnect_wait = reconnect_wait  # [hosts.NAME] reconnect_wait

    def state(self, name: str) -> str:
        self.calls += 1
        if self.calls <= self.down:
            raise HypervisorError("cannot connect to qemu+ssh://root@node2/system")
        return "shutoff"


def _stream_copy(hv: FlakyHv) -> tuple[StreamCopy, list[str]]:
    said: list[str] = []
    run = GuestRun("web1", Mode.STOP, threading.Event(), say=lambda _lvl, text: said.append(text))
    run.was_state = "running"
    return StreamCopy(run, hv, None, []), said  # type: ignore[arg-type]


def test_settle_waits_for_the_connection_to_come_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_copy, "RECONNECT_PAUSE", 0.0)
    hv = FlakyHv(down=3)
    copy, said = _stream_copy(hv)

    copy.settle()

    assert hv.calls == 4
    assert any("waiting for it" in line for line in said)
    assert not any("still unreachable" in line for line in said)


def test_settle_gives_up_after_the_reconnect_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_copy, "RECONNECT_PAUSE", 0.0)
    monkeypatch.setattr(stream_copy, "RECONNECT_WAIT", 0.05)
    copy, said = _stream_copy(FlakyHv(down=10**9))

    copy.settle()  # returns: the runner's restart then fails and the journal keeps it

    assert any("still unreachable" in line for line in said)


def test_settle_waits_as_long_as_the_hosts_reconnect_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stream_copy, "RECONNECT_PAUSE", 0.01)
    monkeypatch.setattr(stream_copy, "RECONNECT_WAIT", 3600.0)  # never reached below
    hv = FlakyHv(down=10**9, reconnect_wait=0.05)
    copy, said = _stream_copy(hv)

    started = time.monotonic()
    copy.settle()

    assert time.monotonic() - started < 5 and hv.calls >= 2
    assert any("still unreachable" in line for line in said)
    none = FlakyHv(down=10**9, reconnect_wait=0)  # 0: no wait, one try
    copy, said = _stream_copy(none)
    copy.settle()
    assert none.calls == 1 and any("still unreachable" in line for line in said)


def test_the_remote_plan_refuses_what_preflight_refuses() -> None:
    info = _guest()
    cdrom = DiskInfo("sda", "/srv/iso/x.iso", "file", "cdrom", "raw", True, False)
    info = replace(info, disks=[*info.disks, cdrom], nvram="/var/lib/libvirt/qemu/nvram/w.fd")
    conn = PoolConn()

    plans = {p.target: p for p in plan_remote_disks(conn, info, Mode.STOP, False)}  # type: ignore[arg-type]

    assert plans["vda"].refused and "define a dir pool for /srv/vms" in (plans["vda"].reason or "")
    assert plans["sda"].action == "record"
    assert plans["nvram"].refused and "NVRAM" in (plans["nvram"].reason or "")
    short = plan_remote_disks(conn, info, Mode.STOP_SHORT, False)  # type: ignore[arg-type]
    assert "mode stop-short has QEMU write" in (short[0].reason or "")
