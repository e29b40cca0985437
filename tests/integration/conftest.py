"""Fixtures for integration tests against the real qemu:///system and real guests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import libvirt
import pytest
from rig import (
    LIBVIRT_URI,
    GuestAssets,
    GuestFactory,
    RigError,
    TestGuest,
    build_guest_assets,
    libvirt_problem,
    make_traversable,
    require,
    sweep_orphans,
)

VIR_RUNNING = libvirt.VIR_DOMAIN_RUNNING
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


@contextmanager
def _guest_dir() -> Iterator[Path]:
    """A temporary directory QEMU (user libvirt-qemu) can traverse.

    It is not under pytest's tmp_path: every pytest session that starts chmods
    /tmp/pytest-of-root to 0700, and chmod resets the ACL mask, so a second
    session on the host would cut a running test's guests off their disks.
    """
    GUEST_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    make_traversable(GUEST_ROOT)
    path = Path(tempfile.mkdtemp(prefix="guests-", dir=GUEST_ROOT))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A temporary directory QEMU can traverse (see _guest_dir)."""
    with _guest_dir() as path:
        yield path


@pytest.fixture
def guest_factory(
    libvirt_conn: libvirt.virConnect, workdir: Path, guest_assets: GuestAssets
) -> Iterator[GuestFactory]:
    """Call it to make guests (see rig.GuestFactory); they are all removed afterwards."""
    factory = GuestFactory(libvirt_conn, workdir, guest_assets)
    yield factory
    factory.cleanup()


@pytest.fixture(scope="module")
def module_guest_factory(
    libvirt_conn: libvirt.virConnect, guest_assets: GuestAssets
) -> Iterator[GuestFactory]:
    """Like guest_factory, for guests a module's tests share; removed after the module."""
    with _guest_dir() as path:
        factory = GuestFactory(libvirt_conn, path, guest_assets)
        yield factory
        factory.cleanup()


class SharedGuests:
    """One running guest per label for a module's tests, each handed out past GS-READY.

    A test that takes one must leave it as it found it: running, and past GS-READY
    of the boot it is in (wait for that line after the test's last restart), so the
    next test's power button is heard. After any failed test each guest is booted
    afresh, so one failure cannot cascade.
    """

    def __init__(self, factory: GuestFactory) -> None:
        self.factory = factory
        self.by_label: dict[str, TestGuest] = {}
        self.failures_seen = 0

    def get(
        self, session: pytest.Session, label: str, prepare: Callable[[TestGuest], None], **kw: Any
    ) -> TestGuest:
        guest = self.by_label.get(label)
        if guest is None:
            guest = self.factory(label, start=False, **kw)
            prepare(guest)
            guest.start()
            self.by_label[label] = guest
        elif session.testsfailed > self.failures_seen or guest.state() != VIR_RUNNING:
            if guest.is_running():
                guest.dom.destroy()
            guest.start()
        self.failures_seen = session.testsfailed
        return guest


@pytest.fixture(scope="module")
def _shared_guests(module_guest_factory: GuestFactory) -> SharedGuests:
    return SharedGuests(module_guest_factory)


@pytest.fixture
def shared_guest(
    _shared_guests: SharedGuests, request: pytest.FixtureRequest
) -> Callable[..., TestGuest]:
    """Call it as shared_guest(label, prepare=..., **guest_factory options): see SharedGuests.

    For matrices whose cases each need a running guest and leave it running: one
    boot per module instead of one per case. ``prepare`` runs once, before the
    first boot (e.g. to fill a disk).
    """

    def get(
        label: str, prepare: Callable[[TestGuest], None] = lambda guest: None, **kw: Any
    ) -> TestGuest:
        return _shared_guests.get(request.session, label, prepare, **kw)

    return get


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # A failed test's report carries what its guests printed; teardown deletes the logs.
    report = yield
    funcargs = getattr(item, "funcargs", {})
    for name in ("guest_factory", "module_guest_factory"):
        factory = funcargs.get(name)
        if report.failed and isinstance(factory, GuestFactory) and factory.guests:
            report.sections.append((f"guest consoles ({name})", factory.console_tails()))
    return report


# guestsafe's own fixtures for these tests: an engine with a home and an archive of its own.
from rig.gs import gs  # noqa: E402, F401
