"""A second, distinct hypervisor for cluster tests: a user's session libvirtd over SSH.

``qemu:///system`` is this machine's host ``local``; node2 is the session daemon of
the unprivileged user ``gsnode2`` (``qemu+libssh://gsnode2@127.0.0.1:PORT/session``),
with its own guests, pools and QEMU processes. Nothing is installed for it: over
SSH, libvirt's ``virt-ssh-helper`` starts the user's ``libvirtd --timeout=120`` on
first use (Debian 12's libvirt 9.0; without XDG_RUNTIME_DIR its socket lives under
``~/.cache/libvirt``). Root holds the key; the libssh transport checks the test
sshd's host key against the URI's ``known_hosts`` file, so root's own
``~/.ssh/known_hosts`` is left alone (OpenSSH's ``ssh`` would only read that one).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .errors import RigError
from .sshhost import SSHD, _keygen, serve_sshd

SESSION_USER = "gsnode2"


@dataclass
class SessionHost:
    """The test sshd and ``gsnode2``'s home; ``uri`` reaches its session libvirtd."""

    uri: str
    home: Path  # gsnode2's HOME (0700, its own): guests and pools go under it
    uid: int
    gid: int
    proc: subprocess.Popen[bytes]

    def give(self, path: Path) -> None:
        """Hand ``path`` (and everything under it) to gsnode2, whose QEMU opens it."""
        subprocess.run(["chown", "-R", f"{self.uid}:{self.gid}", str(path)], check=True)

    def stop(self) -> None:
        """Stop sshd and the session daemon this test started (by its pid file)."""
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        pidfile = self.home / ".cache" / "libvirt" / "libvirtd.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)
        shutil.rmtree(self.home, ignore_errors=True)


def _ensure_user(name: str, home: Path) -> pwd.struct_passwd:
    """A system user with a shell (sshd runs virt-ssh-helper through it) and no password."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--shell", "/bin/sh", "--home-dir", str(home), name],
            check=True,
            capture_output=True,
        )
    # '*': no password login, but not locked ('!'), which sshd refuses even for keys.
    subprocess.run(
        ["usermod", "--home", str(home), "--shell", "/bin/sh", "-p", "*", name],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(name)


def start_session_host(workdir: Path, name: str = SESSION_USER) -> SessionHost:
    if not Path(SSHD).exists():
        raise RigError(f"{SSHD} is missing (apt-get install openssh-server)")
    # Short: QEMU's monitor socket lives under ~/.config/libvirt, and a UNIX socket
    # path has 108 bytes at most (the test's workdir is too deep for one).
    home = Path(tempfile.mkdtemp(prefix="gsn2-", dir="/var/tmp"))
    entry = _ensure_user(name, home)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    directory = workdir / "sshd-session"
    directory.mkdir(mode=0o755)  # sshd reads authorized_keys as gsnode2
    directory.chmod(0o755)
    _keygen(directory / "host_ed25519")
    key = directory / "root_ed25519"
    _keygen(key)
    authorized = directory / "authorized_keys"
    authorized.write_text(key.with_suffix(".pub").read_text())
    authorized.chmod(0o644)
    port, proc, _, host_key = serve_sshd(directory, name)
    known = directory / "known_hosts"
    known.write_text(host_key)
    query = f"keyfile={quote(str(key))}&known_hosts={quote(str(known))}&sshauth=privkey"
    uri = f"qemu+libssh://{name}@127.0.0.1:{port}/session?{query}"
    return SessionHost(uri, home, entry.pw_uid, entry.pw_gid, proc)
