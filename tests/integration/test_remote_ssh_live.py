"""A second host over ``qemu+ssh://`` (issue 16, transport): guestsafe runs as an
unprivileged user that cannot read the guests' disk files, so only libvirt's
storage-volume streams can reach them. The "remote" host is this machine's own
libvirtd behind a test sshd on 127.0.0.1 (key authentication, host key checked).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import blake3
import libvirt
import pytest
from rig import DiskSpec, GuestFactory, MiB, TestGuest, require, unique_name
from rig.errors import RigError
from rig.gs import boot_counter, fill_random, shutdown_counter
from rig.sshhost import RemoteUser, SshHost, make_remote_user, start_sshd

from guestsafe.engine.api import Engine
from guestsafe.engine.jobs.model import Job, Schedule
from guestsafe.engine.paths import Paths

pytestmark = pytest.mark.integration


@pytest.fixture
def remote(workdir: Path) -> Iterator[tuple[SshHost, RemoteUser]]:
    """The test sshd and the unprivileged user guestsafe runs as."""
    try:
        user = make_remote_user(workdir)
        host = start_sshd(workdir, user)
    except (RigError, OSError) as exc:
        require(False, f"cannot start the test sshd: {exc}")
        raise
    try:
        yield host, user
    finally:
        host.stop()


@pytest.fixture
def pooled(libvirt_conn: libvirt.virConnect) -> Iterator[list[libvirt.virStoragePool]]:
    """Pools made by the test, removed after its guests (fixture order: request it first)."""
    pools: list[libvirt.virStoragePool] = []
    yield pools
    for pool in pools:
        with contextlib.suppress(libvirt.libvirtError):
            pool.destroy()


def _into_pool(
    conn: libvirt.virConnect, guest: TestGuest, pools: list[libvirt.virStoragePool]
) -> Path:
    """Move the guest's disks into a new dir pool (file disks there), unreadable but to root."""
    directory = guest.directory / "pool"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    name = unique_name("pool")
    xml = f"<pool type='dir'><name>{name}</name><target><path>{directory}</path></target></pool>"
    pools.append(conn.storagePoolCreateXML(xml, 0))
    root = ET.fromstring(guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    for element in root.findall("./devices/disk"):
        source = element.find("source")
        assert source is not None
        old = Path(source.get("file", ""))
        new = directory / old.name
        old.rename(new)
        new.chmod(0o600)
        source.set("file", str(new))
    conn.defineXML(ET.tostring(root, encoding="unicode"))
    pools[-1].refresh(0)
    return directory


def _save_job(user: RemoteUser, guest: TestGuest, **options: object) -> None:
    """The job in the user's own jobs.toml, written as guestsafe would, then handed over."""
    home = user.gs_home
    paths = Paths(home / "config" / "jobs.toml", home / "state", home / "log", home / "cache")
    engine = Engine(uri="test:///default", paths=paths)
    try:
        options.setdefault("lock_wait", 0)
        job = Job("remote", [guest.name], user.archive, schedule=Schedule(None), **options)  # type: ignore[arg-type]
        engine.save_job(job)
    finally:
        engine.close()
    for folder, dirs, files in os.walk(home):
        for name in [*dirs, *files]:
            os.chown(Path(folder) / name, user.uid, user.gid)


# The local host of the runs that name node2: libvirt's test driver, which gsremote
# may open, so that node2 alone is this machine's libvirtd (over the test sshd).
LOCAL_TEST = "test:///default"


def _save_host_job(user: RemoteUser, guest: TestGuest, hosts: str, **options: object) -> None:
    """``hosts`` ([hosts.NAME] tables) in the user's jobs.toml, then a job on node2."""
    config = user.gs_home / "config" / "jobs.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(hosts)
    _save_job(user, guest, hosts=["node2"], **options)


def _node2(host: SshHost, **settings: object) -> str:
    extra = "".join(f"{key} = {value}\n" for key, value in settings.items())
    return f'[hosts.node2]\nuri = "{host.uri}"\n{extra}'


def _versions(user: RemoteUser) -> list[Path]:
    return sorted(p for p in user.archive.glob("*/*") if p.name.isdigit())


def _b3(path: Path) -> str:
    hasher = blake3.blake3()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return str(hasher.hexdigest())


def _guest(guest_factory: GuestFactory, label: str, data_mib: int) -> TestGuest:
    guest = guest_factory(
        label,
        disks=(DiskSpec("vda", "qcow2", 64 * MiB), DiskSpec("vdb", "raw", 128 * MiB)),
        start=False,
    )
    fill_random(guest.disks["vdb"].path, data_mib * MiB)  # the rest stays a hole
    return guest


def test_remote_backup_verified_and_clone_restored_by_upload(
    pooled: list[libvirt.virStoragePool],
    remote: tuple[SshHost, RemoteUser],
    guest_factory: GuestFactory,
    libvirt_conn: libvirt.virConnect,
) -> None:
    host, user = remote
    original = _guest(guest_factory, "rem", 24)
    pool_dir = _into_pool(libvirt_conn, original, pooled)
    original.start()
    vdb = pool_dir / original.disks["vdb"].path.name
    assert not user.can_read(vdb), "the test user must not reach the disk files"
    source_b3 = _b3(vdb)
    _save_job(user, original)
    listing = user.guestsafe(host.uri, "guests")
    assert listing.returncode == 0, listing.stderr
    assert f"stream volume {pooled[0].name()}/{vdb.name} (raw)" in listing.stdout
    before = original.console_size()

    run = user.guestsafe(host.uri, "run", "remote")

    assert run.returncode == 0, run.stderr
    at_shutdown = shutdown_counter(original, before)
    assert at_shutdown > 0 and original.is_running()
    (version,) = _versions(user)
    manifest = json.loads((version / "manifest.json").read_text())
    disks = {d["target"]: d for d in manifest["disks"]}
    assert disks["vdb"]["blake3"] == source_b3 == _b3(version / "vdb.raw")
    assert disks["vdb"]["pool"] == pooled[0].name()
    copy = (version / "vdb.raw").stat()
    assert copy.st_size == 128 * MiB
    assert copy.st_blocks * 512 < 40 * MiB, "the holes crossed the wire as data"
    # Format 3: the stream made the chunk table a local copy makes, so verify goes by chunks.
    assert disks["vdb"]["chunks"]["file"] == "vdb.raw.chunks"
    assert (version / "vdb.raw.chunks").is_file()
    verify = user.guestsafe(host.uri, "verify", original.name, "1")
    assert verify.returncode == 0, verify.stderr

    clone_name = original.name + "-c"
    guest_factory.adopt(clone_name)
    restore = user.guestsafe(host.uri, "restore", original.name, "1", clone_name, "--start")

    assert restore.returncode == 0, restore.stderr
    clone = libvirt_conn.lookupByName(clone_name)
    root = ET.fromstring(clone.XMLDesc(0))
    sources = [Path(s.get("file", "")) for s in root.findall("./devices/disk/source")]
    assert all(p.parent == pool_dir for p in sources), sources
    names = {v.name() for v in pooled[0].listAllVolumes(0)}
    assert {p.name for p in sources} <= names
    console = root.find("./devices/serial/source")
    assert console is not None
    assert boot_counter(Path(console.get("path", ""))) == at_shutdown
    clone_vdb = next(p for p in sources if p.name.endswith("vdb.raw"))
    assert _b3(clone_vdb) == source_b3


def test_a_job_naming_host_node2_backs_it_up_over_ssh_end_to_end(
    pooled: list[libvirt.virStoragePool],
    remote: tuple[SshHost, RemoteUser],
    guest_factory: GuestFactory,
    libvirt_conn: libvirt.virConnect,
) -> None:
    """``guestsafe run JOB`` for a job with ``host = "node2"`` (no --connect to node2):
    the series is node2's, the manifest names the host, and a clone restored to node2
    has its MACs checked across every host, the one that does not answer named."""
    host, user = remote
    guest = _guest(guest_factory, "remhost", 8)
    _into_pool(libvirt_conn, guest, pooled)
    guest.start()
    down = '[hosts.down]\nuri = "qemu+ssh://root@127.0.0.1:1/system"\n'
    _save_host_job(user, guest, _node2(host) + down)
    before = guest.console_size()

    run = user.guestsafe(LOCAL_TEST, "run", "remote")

    assert run.returncode == 0, run.stderr
    assert shutdown_counter(guest, before) > 0 and guest.is_running()
    (version,) = _versions(user)
    assert version.parent.name == f"node2%2F{guest.name}"
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["host_name"] == "node2" and manifest["uuid"] == guest.dom.UUIDString()
    verify = user.guestsafe(LOCAL_TEST, "verify", guest.name, "1", "--host", "node2")
    assert verify.returncode == 0 and "version 1: ok" in verify.stdout, verify.stderr

    clone_name = guest.name + "-c"
    guest_factory.adopt(clone_name)
    restore = user.guestsafe(
        LOCAL_TEST, "restore", guest.name, "1", clone_name, "--host", "node2", "--to-host", "node2"
    )

    assert restore.returncode == 0, restore.stderr
    mac = guest.dom.XMLDesc(0).split("mac address='")[1].split("'")[0]
    assert f"MAC {mac} is already used by guest {guest.name}" in restore.stderr
    assert "MACs not checked on 1 unreachable host(s) (down: " in restore.stderr
    clone_xml = libvirt_conn.lookupByName(clone_name).XMLDesc(0)
    assert mac not in clone_xml


def test_remote_disk_outside_any_pool_is_refused_before_the_stop(
    remote: tuple[SshHost, RemoteUser], guest_factory: GuestFactory
) -> None:
    host, user = remote
    guest = guest_factory("nopool")
    _save_job(user, guest)
    before = guest.console_size()

    run = user.guestsafe(host.uri, "run", "remote")

    assert run.returncode != 0
    advice = f"define a dir pool for {guest.disks['vda'].path.parent}"
    assert advice in run.stderr + run.stdout
    assert advice in user.guestsafe(host.uri, "guests").stdout
    assert guest.is_running() and "GS-POWEROFF" not in guest.console_text(before)
    assert _versions(user) == []


def test_remote_push_mode_is_refused_up_front(
    pooled: list[libvirt.virStoragePool],
    remote: tuple[SshHost, RemoteUser],
    guest_factory: GuestFactory,
    libvirt_conn: libvirt.virConnect,
) -> None:
    host, user = remote
    guest = guest_factory("remshort", start=False)
    _into_pool(libvirt_conn, guest, pooled)
    guest.start()
    _save_job(user, guest, mode="stop-short")
    before = guest.console_size()

    run = user.guestsafe(host.uri, "run", "remote")

    assert run.returncode != 0
    assert "mode stop-short has QEMU write the backup" in run.stderr + run.stdout
    assert guest.is_running() and "GS-POWEROFF" not in guest.console_text(before)
    assert _versions(user) == []


def test_connection_killed_mid_stream_restarts_the_guest_and_commits_nothing(
    pooled: list[libvirt.virStoragePool],
    remote: tuple[SshHost, RemoteUser],
    guest_factory: GuestFactory,
    libvirt_conn: libvirt.virConnect,
) -> None:
    host, user = remote
    guest = _guest(guest_factory, "remkill", 96)
    _into_pool(libvirt_conn, guest, pooled)
    guest.start()
    _save_job(user, guest)
    before = guest.console_size()
    # One second per 16 MiB received: the stream is still running when the link dies.
    proc = user.popen(
        sys.executable,
        "-m",
        "guestsafe.tui",
        "--connect",
        host.uri,
        "run",
        "remote",
        env={"GUESTSAFE_FAILPOINTS": "stream.chunk=slow"},
    )
    try:
        _wait_for_partial_data(user, proc)
        killed = host.kill_sessions()
        assert killed, "no SSH session to kill"
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode != 0, err
    assert "GS-POWEROFF" in guest.console_text(before), "the guest was never stopped"
    guest.wait_until_state(libvirt.VIR_DOMAIN_RUNNING, timeout=60)
    assert _versions(user) == []
    assert list(user.archive.glob("*/.partial-*")) == []
    assert "streaming volume" in err + out


def test_a_host_gone_for_good_leaves_the_restart_to_recover(
    pooled: list[libvirt.virStoragePool],
    remote: tuple[SshHost, RemoteUser],
    guest_factory: GuestFactory,
    libvirt_conn: libvirt.virConnect,
) -> None:
    """sshd itself stops mid-stream and stays away past node2's reconnect_wait: the run
    fails, the journal keeps the guest, and ``recover --host node2`` starts it once the
    host is back (and says what is left while it is not)."""
    host, user = remote
    guest = _guest(guest_factory, "remgone", 96)
    _into_pool(libvirt_conn, guest, pooled)
    guest.start()
    _save_host_job(user, guest, _node2(host, reconnect_wait=3))  # not the 60 s default
    proc = user.popen(
        sys.executable,
        "-m",
        "guestsafe.tui",
        "--connect",
        LOCAL_TEST,
        "run",
        "remote",
        env={"GUESTSAFE_FAILPOINTS": "stream.chunk=slow"},
    )
    try:
        _wait_for_partial_data(user, proc)
        host.stop()
        gone_at = time.monotonic()
        out, err = proc.communicate(timeout=300)
        waited = time.monotonic() - gone_at
        while_down = user.guestsafe(LOCAL_TEST, "recover", "--host", "node2")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if host.proc.poll() is not None:
            host.restart()

    assert proc.returncode != 0
    assert "still unreachable" in err + out
    assert waited < 40, f"the run waited {waited:.0f} s, not node2's reconnect_wait"
    assert guest.state() == libvirt.VIR_DOMAIN_SHUTOFF  # nobody could start it
    assert list((user.gs_home / "state" / "journal").iterdir()), "no journal entry was left"
    assert _versions(user) == []
    assert while_down.returncode == 4
    assert f"still to recover on host node2: {guest.name}" in while_down.stderr

    recover = user.guestsafe(LOCAL_TEST, "recover", "--host", "node2")

    assert recover.returncode == 0, recover.stderr
    guest.wait_until_state(libvirt.VIR_DOMAIN_RUNNING, timeout=60)
    assert list(user.archive.glob("*/.partial-*")) == []
    assert not list((user.gs_home / "state" / "journal").iterdir())


def _wait_for_partial_data(user: RemoteUser, proc: object, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in user.archive.glob("*/.partial-*/*.raw"):
            if path.stat().st_blocks * 512 >= 16 * MiB:
                return
        assert proc.poll() is None, "the run ended before the stream began"
        time.sleep(0.1)
    raise AssertionError("the stream never began")
