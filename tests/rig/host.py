"""What the host must offer the rig, and how tests react when it does not."""

from __future__ import annotations

import errno
import os
import pwd
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

LIBVIRT_URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
DEFAULT_QEMU_USER = "libvirt-qemu"
_FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})


def in_ci() -> bool:
    """True when the CI variable is set; CI must fail where a laptop may skip."""
    return os.environ.get("CI", "").strip().lower() not in _FALSE_WORDS


def require(condition: object, reason: str) -> None:
    """Skip the test when a prerequisite is missing, or fail it when running in CI.

    A test that needs a real part and cannot find it must not quietly skip
    in CI (README, "Set up on a fresh Debian 12 machine").
    """
    if condition:
        return
    if in_ci():
        pytest.fail(f"prerequisite missing (CI is set, so this fails): {reason}", pytrace=False)
    pytest.skip(reason)


def libvirt_problem(uri: str = LIBVIRT_URI) -> str | None:
    """Why integration tests cannot use libvirt at uri, or None when they can."""
    if os.geteuid() != 0:
        return "integration tests need root (they define guests on qemu:///system)"
    for tool in ("qemu-system-x86_64", "qemu-img", "virsh"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed; run .ci/host-setup.sh"
    try:
        import libvirt
    except ImportError:
        return "libvirt-python is not installed in this environment"
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as error:
        return f"libvirtd does not answer at {uri} ({error}); run .ci/host-setup.sh"
    conn.close()
    return None


def qemu_user() -> str | None:
    """The user QEMU runs as under qemu:///system, None if it runs as root."""
    text = QEMU_CONF.read_text() if QEMU_CONF.exists() else ""
    match = re.search(r'^\s*user\s*=\s*"([^"]+)"', text, re.MULTILINE)
    user = match.group(1) if match else DEFAULT_QEMU_USER
    return None if user in ("root", "+0") else user


def make_traversable(path: Path) -> None:
    """Let QEMU reach files under path: grant it search on every directory above.

    pytest's temporary directories are 0700. An ACL entry for the QEMU user
    keeps them closed to everyone else; without ACL support, fall back to o+x.
    """
    user = qemu_user()
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if mode & stat.S_IXOTH or user is None:
            continue
        if not _grant_search_acl(directory, user):
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _grant_search_acl(directory: Path, user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    result = subprocess.run(
        ["setfacl", "-m", f"u:{user}:x", str(directory)], capture_output=True, check=False
    )
    return result.returncode == 0


def supports_o_direct(directory: Path) -> bool:
    """Whether files in directory can be opened with O_DIRECT (tmpfs cannot)."""
    probe = directory / ".o-direct-probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
    except OSError as error:
        if error.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    probe.unlink()
    return True
