"""Fixtures for integration tests against the real qemu:///system and real guests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path

import libvirt
import pytest
from rig import (
    LIBVIRT_URI,
    GuestAssets,
    GuestFactory,
    RigError,
    build_guest_assets,
    libvirt_problem,
    make_traversable,
    require,
    sweep_orphans,
)

# Under /var/tmp, not /tmp: some hosts mount /tmp as tmpfs, where O_DIRECT fails.
GUEST_ROOT = Path("/var/tmp/guestsafe-test-guests")


@pytest.fixture(scope="session")
def libvirt_uri() -> str:
    return LIBVIRT_URI


@pytest.fixture(scope="session")
def libvirt_conn(libvirt_uri: str) -> Iterator[libvirt.virConnect]:
    """A connection to qemu:///system; skips (or fails in CI) when libvirtd is not usable."""
    problem = libvirt_problem(libvirt_uri)
    require(problem is None, problem or "")
    conn = libvirt.open(libvirt_uri)
    # Guests of an earlier, killed run would slow every test on this small host.
    sweep_orphans(conn)
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def guest_assets(libvirt_conn: libvirt.virConnect) -> GuestAssets:
    """Kernel and initramfs of the test guest, built once per machine."""
    try:
        return build_guest_assets()
    except RigError as error:
        require(False, f"cannot build the test guest: {error}")
        raise  # unreachable: require skipped or failed


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A temporary directory QEMU (user libvirt-qemu) can traverse.

    It is not under pytest's tmp_path: every pytest session that starts chmods
    /tmp/pytest-of-root to 0700, and chmod resets the ACL mask, so a second
    session on the host would cut a running test's guests off their disks.
    """
    GUEST_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    make_traversable(GUEST_ROOT)
    path = Path(tempfile.mkdtemp(prefix="guests-", dir=GUEST_ROOT))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def guest_factory(
    libvirt_conn: libvirt.virConnect, workdir: Path, guest_assets: GuestAssets
) -> Iterator[GuestFactory]:
    """Call it to make guests (see rig.GuestFactory); they are all removed afterwards."""
    factory = GuestFactory(libvirt_conn, workdir, guest_assets)
    yield factory
    factory.cleanup()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # A failed test's report carries what its guests printed; teardown deletes the logs.
    report = yield
    factory = getattr(item, "funcargs", {}).get("guest_factory")
    if report.failed and isinstance(factory, GuestFactory) and factory.guests:
        report.sections.append(("guest consoles", factory.console_tails()))
    return report


# guestsafe's own fixtures for these tests: an engine with a home and an archive of its own.
from rig.gs import gs  # noqa: E402, F401
