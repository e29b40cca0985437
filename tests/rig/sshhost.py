"""A second host for the tests: sshd on 127.0.0.1 reaching this machine's libvirtd.

guestsafe runs as an unprivileged user (``gsremote``) that cannot read the
guests' disk files, and talks to libvirt over ``qemu+ssh://root@127.0.0.1:PORT``
with a key of its own and a known_hosts file holding the test sshd's host key,
so only libvirt's remote protocol can reach the disks. Key authentication only:
no password exists, and host keys are checked (never ``no_verify``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from .errors import RigError

REMOTE_USER = "gsremote"
SSHD = "/usr/sbin/sshd"


@dataclass
class RemoteUser:
    """The unprivileged local user guestsafe runs as, with a home and archive it owns."""

    name: str
    uid: int
    gid: int
    home: Path  # HOME: its ssh key and known_hosts
    gs_home: Path  # GUESTSAFE_HOME
    archive: Path

    def run(
        self, *argv: str, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*argv, env=env), capture_output=True, text=True, timeout=timeout
        )

    def popen(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*argv, env=env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def argv(self, *argv: str, env: dict[str, str] | None = None) -> list[str]:
        base = {
            "HOME": str(self.home),
            "GUESTSAFE_HOME": str(self.gs_home),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
        }
        pairs = [f"{k}={v}" for k, v in {**base, **(env or {})}.items()]
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            "env",
            "-i",
            *pairs,
            *argv,
        ]

    def guestsafe(self, uri: str, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "guestsafe.tui", "--connect", uri, *args, **kw)  # type: ignore[arg-type]

    def can_read(self, path: Path) -> bool:
        return self.run("test", "-r", str(path)).returncode == 0


@dataclass
class SshHost:
    """A running test sshd; ``uri`` reaches libvirtd through it as root."""

    port: int
    uri: str
    proc: subprocess.Popen[bytes]
    directory: Path
    log: Path
    killed: list[int] = field(default_factory=list)

    def sessions(self) -> list[int]:
        """The pids of sshd's per-connection children (one per libvirt connection)."""
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]

    def kill_sessions(self) -> list[int]:
        """Kill every SSH connection now, as a network failure would; sshd keeps listening."""
        pids = self.sessions()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        self.killed += pids
        return pids

    def restart(self) -> None:
        """sshd again on the same port and keys, after ``stop`` (the host is back)."""
        self.proc = _launch(self.directory / "sshd_config", self.log)
        _wait_listening(self.port, self.proc, self.log)

    def stop(self) -> None:
        self.kill_sessions()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def ensure_user(name: str = REMOTE_USER) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    subprocess.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(name)


def make_remote_user(workdir: Path, name: str = REMOTE_USER) -> RemoteUser:
    """``name``'s own folder under ``workdir``: HOME, GUESTSAFE_HOME and an archive, 0700."""
    entry = ensure_user(name)
    home = workdir / f"home-{name}"
    for path in (home, home / ".ssh", home / "gshome", home / "archive"):
        path.mkdir(mode=0o700)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    # The interpreter may live under root's 0700 home (pyenv): search on the folders
    # above it, and nothing more, so the user can run guestsafe at all.
    for path in {Path(os.path.realpath(sys.executable)), Path(sys.prefix)}:
        _grant_search(path.parent, name)
    # ssh reads known_hosts under the home the passwd entry names, not $HOME.
    subprocess.run(["usermod", "--home", str(home), name], check=True, capture_output=True)
    return RemoteUser(name, entry.pw_uid, entry.pw_gid, home, home / "gshome", home / "archive")


def _grant_search(path: Path, user: str) -> None:
    for directory in (path, *path.parents):
        if directory.stat().st_mode & stat.S_IXOTH:
            continue
        subprocess.run(["setfacl", "-m", f"u:{user}:x", str(directory)], check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )


def start_sshd(workdir: Path, user: RemoteUser) -> SshHost:
    """sshd on a spare loopback port, root's key login only, the user's key authorized."""
    if not Path(SSHD).exists():
        raise RigError(f"{SSHD} is missing (apt-get install openssh-server)")
    directory = workdir / "sshd"
    directory.mkdir(mode=0o755)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    _keygen(directory / "host_ed25519")
    key = user.home / ".ssh" / "id_ed25519"
    _keygen(key)
    for path in (key, key.with_suffix(".pub")):
        os.chown(path, user.uid, user.gid)
    shutil.copy(key.with_suffix(".pub"), directory / "authorized_keys")
    port, proc, log, host_key = serve_sshd(directory, "root", "PermitRootLogin prohibit-password")
    known = user.home / ".ssh" / "known_hosts"
    known.write_text(host_key)
    os.chown(known, user.uid, user.gid)
    query = f"keyfile={quote(str(key))}&known_hosts={quote(str(known))}&no_tty=1"
    uri = f"qemu+ssh://root@127.0.0.1:{port}/system?{query}"
    return SshHost(port, uri, proc, directory, log)


def serve_sshd(
    directory: Path, allow_user: str, *extra: str
) -> tuple[int, subprocess.Popen[bytes], Path, str]:
    """sshd on a spare loopback port, key logins of ``allow_user`` only, with the
    host key and authorized_keys in ``directory``: (port, process, log, the
    known_hosts line for its host key)."""
    port = _free_port()
    config = directory / "sshd_config"
    lines = [
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {directory / 'host_ed25519'}",
        f"PidFile {directory / 'sshd.pid'}",
        f"AuthorizedKeysFile {directory / 'authorized_keys'}",
        "AuthenticationMethods publickey",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        *extra,
        f"AllowUsers {allow_user}",
        "UsePAM no",
        # The test's folders sit under /var/tmp (world-writable): sshd's path check
        # would refuse the authorized_keys there.
        "StrictModes no",
        "",
    ]
    config.write_text("\n".join(lines))
    host_pub = (directory / "host_ed25519.pub").read_text().split()
    log = directory / "sshd.log"
    proc = _launch(config, log)
    _wait_listening(port, proc, log)
    return port, proc, log, f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n"


def _launch(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [SSHD, "-D", "-f", str(config), "-E", str(log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text() if log.exists() else ""
            raise RigError(f"sshd exited with {proc.returncode}: {text}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RigError(f"sshd did not listen on 127.0.0.1:{port}")


def ssh_host(workdir: Path) -> Iterator[tuple[SshHost, RemoteUser]]:
    """For a fixture: the user and the sshd, stopped afterwards."""
    user = make_remote_user(workdir)
    host = start_sshd(workdir, user)
    try:
        yield host, user
    finally:
        host.stop()
