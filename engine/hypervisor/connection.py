"""The hypervisor adapter: everything guestsafe asks of libvirt.

Shutdown waits on libvirt's lifecycle events, delivered by libvirt's default
event loop running in a daemon thread, instead of polling in a sleep loop. A
coarse state check backs the events up, because an event can be lost when a
connection drops or when the guest stops before the callback is registered.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import libvirt

from guestsafe.engine import failpoints
from guestsafe.engine.errors import Cancelled, HypervisorError, NotFoundError, ShutdownTimeout
from guestsafe.engine.hypervisor.bounded_open import CONNECT_TIMEOUT, OpenTimedOut, open_within
from guestsafe.engine.hypervisor.domain_xml import GuestInfo, GuestState, parse_domain_xml
from guestsafe.engine.hypervisor.volumes import resolve_volumes
from guestsafe.engine.modes import OnTimeout

DEFAULT_URI = "qemu:///system"

# What libvirt raises; every method here turns it into a HypervisorError naming the
# guest, and the runner catches any that slips by, so one guest's error never
# skips the job's other guests.
LibvirtError = libvirt.libvirtError

_STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: GuestState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: GuestState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: GuestState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: GuestState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: GuestState.SHUTTING_DOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: GuestState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: GuestState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: GuestState.PMSUSPENDED,
}

# Tests arm it (failpoints.py): after each shutdown request, before the power-off.
SHUTDOWN_FAILPOINT = "shutdown.requested"

# How often an unanswered shutdown request is repeated.
SHUTDOWN_RESEND_SECONDS = 5.0

# How often the state is re-read while waiting, in case an event went missing.
_STATE_RECHECK_SECONDS = 1.0


def resolve_uri(uri: str | None) -> str:
    """--connect wins, then LIBVIRT_DEFAULT_URI, then qemu:///system."""
    return uri or os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI


def uri_is_remote(uri: str) -> bool:
    """Whether a libvirt URI names a transport or a host (``qemu+ssh://``, ``qemu://node2/``).

    ``qemu:///system``, ``qemu+unix:///system`` and ``test:///default`` are local:
    the daemon runs here and its paths are this machine's.
    """
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    if transport and transport != "unix":
        return True
    return bool(parts.hostname)


@dataclass(frozen=True)
class ShutdownResult:
    forced: bool
    seconds: float


class _EventLoop:
    """libvirt's default event loop, started once per process."""

    _lock = threading.Lock()
    _started = False

    @classmethod
    def ensure(cls) -> None:
        with cls._lock:
            if cls._started:
                return
            # libvirt prints every error to stderr by default; ours become exceptions.
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            libvirt.virEventRegisterDefaultImpl()
            thread = threading.Thread(target=cls._run, name="libvirt-events", daemon=True)
            thread.start()
            cls._started = True

    @staticmethod
    def _run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()


class _LifecycleBoard:
    """Remembers lifecycle events per domain UUID and wakes up waiters."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._events: dict[str, list[tuple[float, int, int]]] = {}
        self._start_watchers: dict[str, list[threading.Event]] = {}

    def record(self, uuid: str, event: int, detail: int) -> None:
        with self._cond:
            self._events.setdefault(uuid, []).append((time.monotonic(), event, detail))
            if event == libvirt.VIR_DOMAIN_EVENT_STARTED:
                for flag in self._start_watchers.get(uuid, []):
                    flag.set()
            self._cond.notify_all()

    def watch_starts(self, uuid: str, flag: threading.Event) -> None:
        with self._cond:
            self._start_watchers.setdefault(uuid, []).append(flag)

    def unwatch_starts(self, uuid: str, flag: threading.Event) -> None:
        with self._cond:
            self._start_watchers.get(uuid, []).remove(flag)

    def since(self, uuid: str, t0: float) -> list[tuple[int, int]]:
        with self._cond:
            return [(e, d) for (t, e, d) in self._events.get(uuid, []) if t >= t0]

    def wait(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)


class Hypervisor:
    """One libvirt connection plus the lifecycle events it delivers."""

    def __init__(self, uri: str | None = None, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.uri = resolve_uri(uri)
        # A remote host that does not answer within this fails the open (bounded_open.py).
        self.connect_timeout = connect_timeout
        _EventLoop.ensure()
        self._board = _LifecycleBoard()
        self._conn_lock = threading.Lock()
        self._conn = self._open()
        self._callback_id = self._subscribe()
        # Transient guests a backup stops, by name: (UUID, domain XML). Once shut
        # off such a guest is gone from libvirt; it counts as shut off here and
        # start() creates it again from the XML read before the shutdown.
        self._transient: dict[str, tuple[str, str]] = {}
        # How long a copy that lost this connection waits for it to come back before it
        # leaves the guest's restart to recover ([hosts.NAME] reconnect_wait); None: the
        # copy's own default.
        self.reconnect_wait: float | None = None

    def _subscribe(self) -> int:
        return int(
            self._conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
            )
        )

    def _live(self) -> libvirt.virConnect:
        """The connection, opened again if libvirtd dropped it (a restart, say).

        Lifecycle events sent while the connection was down are lost; the
        waits below also read the state, so they notice the change anyway.
        """
        with self._conn_lock:
            try:
                alive = self._conn.isAlive() == 1
            except libvirt.libvirtError:
                alive = False
            if not alive:
                self._reconnect()
            return self._conn

    def _reconnect(self) -> None:
        with suppress(libvirt.libvirtError):  # already gone with the old daemon
            self._conn.close()
        self._conn = self._open()
        try:
            self._callback_id = self._subscribe()
        except libvirt.libvirtError as exc:
            raise HypervisorError(
                f"reconnected to {self.uri}, but cannot watch guest events: {_libvirt_message(exc)}"
            ) from exc

    def _open(self) -> libvirt.virConnect:
        try:
            if uri_is_remote(self.uri):
                conn = open_within(self.uri, self.connect_timeout)
            else:
                conn = libvirt.open(self.uri)
        except OpenTimedOut as exc:
            raise HypervisorError(
                f"cannot connect to {self.uri}: {exc} (is the host up and on the network?)"
            ) from exc
        except libvirt.libvirtError as exc:
            raise HypervisorError(
                f"cannot connect to {self.uri}: {_libvirt_message(exc)} "
                "(is libvirtd running? use --connect to choose another URI)"
            ) from exc
        if conn is None:
            raise HypervisorError(f"cannot connect to {self.uri}")
        return conn

    def _on_lifecycle(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        self._board.record(dom.UUIDString(), event, detail)

    def close(self) -> None:
        try:
            self._conn.domainEventDeregisterAny(self._callback_id)
            self._conn.close()
        except libvirt.libvirtError:
            pass

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connection(self) -> libvirt.virConnect:
        return self._live()

    @property
    def hostname(self) -> str:
        try:
            return str(self._live().getHostname())
        except libvirt.libvirtError:
            return os.uname().nodename

    # --- looking guests up -------------------------------------------------

    def _domain(self, name: str) -> libvirt.virDomain:
        try:
            return self._live().lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFoundError(f"guest {name!r} is not defined on {self.uri}") from exc
            raise HypervisorError(
                f"cannot look up guest {name!r}: {_libvirt_message(exc)}"
            ) from exc

    def exists(self, name: str) -> bool:
        try:
            self._domain(name)
        except NotFoundError:
            return False
        return True

    def guests(self) -> list[GuestInfo]:
        infos = []
        for dom in self._call(self._live().listAllDomains, 0):
            try:
                infos.append(self._info(dom))
            except HypervisorError:
                continue  # undefined between the listing and the lookup
        return sorted(infos, key=lambda g: g.name)

    def guest(self, name: str) -> GuestInfo:
        return self._info(self._domain(name), name)

    def _info(self, dom: libvirt.virDomain, name: str | None = None) -> GuestInfo:
        xml = self._call(dom.XMLDesc, libvirt.VIR_DOMAIN_XML_INACTIVE, guest=name)
        persistent = bool(self._call(dom.isPersistent, guest=name))
        return resolve_volumes(self._live(), parse_domain_xml(xml, _state_of(dom), persistent))

    def state(self, name: str) -> str:
        # A GuestState; typed as its str so callers can hold it beside their own words.
        try:
            return _state_of(self._domain(name))
        except NotFoundError:
            if name in self._transient:
                return GuestState.SHUTOFF  # a transient guest that stopped: gone until created
            raise

    def keep_transient(self, name: str, uuid: str, xml: str) -> None:
        """Remember a transient guest's XML: once it stops, start() creates it from that."""
        self._transient[name] = (uuid, xml)

    def _uuid(self, name: str) -> str:
        try:
            return str(self._call(self._domain(name).UUIDString, guest=name))
        except NotFoundError:
            if name in self._transient:
                return self._transient[name][0]
            raise

    def all_macs(self) -> dict[str, str]:
        """Every MAC of every defined guest, live and persistent config, mapped to the first
        guest listed that uses it."""
        return {mac: owners[0] for mac, owners in self.mac_owners().items()}

    def mac_owners(self) -> dict[str, list[str]]:
        """Every MAC of every defined guest, mapped to all the guests that use it, in
        libvirt's listing order."""
        macs: dict[str, list[str]] = {}
        for info in self._every_config():
            for mac in info.macs:
                owners = macs.setdefault(mac, [])
                if info.name not in owners:
                    owners.append(info.name)
        return macs

    def disk_users(self) -> dict[str, set[str]]:
        """Every disk and NVRAM path of every defined guest (live and persistent config),
        mapped to the names of the guests that use it."""
        users: dict[str, set[str]] = {}
        for info in self._every_config():
            sources = [d.source for d in info.disks if d.source] + [info.nvram or ""]
            for source in filter(None, sources):
                users.setdefault(source, set()).add(info.name)
        return users

    def _every_config(self) -> Iterator[GuestInfo]:
        """Each defined guest's live and persistent configuration, in listing order."""
        for dom in self._call(self._live().listAllDomains, 0):
            for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
                try:
                    xml = dom.XMLDesc(flags)
                except libvirt.libvirtError:
                    continue  # undefined between the listing and the lookup
                yield resolve_volumes(self._live(), parse_domain_xml(xml))

    def has_managed_save(self, name: str) -> bool:
        """Whether the guest has a saved memory image (``virsh managedsave``) it resumes from."""
        return bool(self._call(self._domain(name).hasManagedSaveImage, 0))

    def discard_managed_save(self, name: str) -> None:
        self._call(self._domain(name).managedSaveRemove, 0)

    def xml(self, name: str, *, inactive: bool = True) -> str:
        """The domain XML with secure info (it may hold console passwords)."""
        flags = libvirt.VIR_DOMAIN_XML_SECURE
        if inactive:
            flags |= libvirt.VIR_DOMAIN_XML_INACTIVE
        try:
            dom = self._domain(name)
        except NotFoundError:
            if name in self._transient:
                return self._transient[name][1]
            raise
        return str(self._call(dom.XMLDesc, flags, guest=name))

    # --- changing guests ---------------------------------------------------

    def define(self, xml: str) -> GuestInfo:
        dom = self._call(self._live().defineXML, xml)
        return self._info(dom)

    def undefine(self, name: str) -> None:
        dom = self._domain(name)
        flags = libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        # The checkpoints push backups begin are libvirt's metadata: without this flag
        # libvirt refuses to undefine a guest that has any.
        flags |= libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        try:
            dom.undefineFlags(flags)
        except libvirt.libvirtError:
            self._call(dom.undefine)

    def start(self, name: str, *, paused: bool = False, attempts: int = 5) -> None:
        """Start a guest; an already running guest counts as started.

        Right after a guest stops, libvirt may still be handing its disk files
        back to their owner; a start in that moment fails with "Permission
        denied". Such failures are retried a few times before giving up.
        """
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        if name in self._transient and not self.exists(name):
            self._create_transient(name, flags, attempts)
            return
        dom = self._domain(name)
        for attempt in range(attempts):
            try:
                dom.createWithFlags(flags)
                return
            except libvirt.libvirtError as exc:
                if self._call(dom.isActive, guest=name):
                    return
                if attempt + 1 == attempts or not _transient(exc):
                    raise HypervisorError(
                        f"cannot start guest {name!r}: {_libvirt_message(exc)}"
                    ) from exc
                time.sleep(0.5 * (attempt + 1))

    def _create_transient(self, name: str, flags: int, attempts: int) -> None:
        """Create a transient guest again from the XML kept before its shutdown."""
        xml = self._transient[name][1]
        for attempt in range(attempts):
            try:
                self._live().createXML(xml, flags)
                return
            except libvirt.libvirtError as exc:
                if self.exists(name):
                    return  # created meanwhile (by someone else, or a retry that landed)
                if attempt + 1 == attempts or not _transient(exc):
                    raise HypervisorError(
                        f"cannot start transient guest {name!r} again from its XML: "
                        f"{_libvirt_message(exc)}"
                    ) from exc
                time.sleep(0.5 * (attempt + 1))

    def resume(self, name: str) -> None:
        self._call(self._domain(name).resume, guest=name)

    def destroy(self, name: str) -> None:
        dom = self._domain(name)
        if self._call(dom.isActive, guest=name):
            self._call(dom.destroy, guest=name)

    def shutdown(
        self,
        name: str,
        *,
        timeout: float,
        on_timeout: str = OnTimeout.ABORT,
        log: Callable[[str], None] = lambda _msg: None,
        cancel: threading.Event | None = None,
    ) -> ShutdownResult:
        """Shut a guest down cleanly and wait until libvirt says it stopped.

        Under ``abort`` a guest that ignores the request keeps running and
        ShutdownTimeout is raised. Under ``force`` it is powered off. A set
        ``cancel`` ends the wait within a second with ``Cancelled``; the guest is
        left as it is then (the request may still be acted on later).
        """
        dom = self._domain(name)
        uuid = str(self._call(dom.UUIDString, guest=name))
        t0 = time.monotonic()
        if _state_of(dom) == GuestState.SHUTOFF:
            return ShutdownResult(False, 0.0)
        if self._request_shutdown(dom, name, uuid, t0, timeout, cancel or threading.Event()):
            return ShutdownResult(False, time.monotonic() - t0)
        if on_timeout != OnTimeout.FORCE:
            raise ShutdownTimeout(
                f"guest {name!r} did not shut down within {timeout:g} s; it is still running "
                'and no backup was made (set on_timeout = "force" to power it off)'
            )
        log(f"guest {name} ignored the shutdown request for {timeout:g} s: powering it off")
        try:
            dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
        except libvirt.libvirtError:
            if _state_of(dom) != GuestState.SHUTOFF:
                self._call(dom.destroy, guest=name)
        if not self._wait_stopped(dom, uuid, t0, 30):
            raise HypervisorError(f"guest {name!r} could not be powered off")
        return ShutdownResult(True, time.monotonic() - t0)

    def _request_shutdown(
        self,
        dom: libvirt.virDomain,
        name: str,
        uuid: str,
        t0: float,
        timeout: float,
        cancel: threading.Event,
    ) -> bool:
        """Ask for a shutdown, and ask again now and then until the timeout.

        A guest that is still booting has no ACPI daemon yet and drops the
        power-button event; asking again is what an operator would do.
        """
        deadline = t0 + timeout
        while True:
            try:
                dom.shutdown()
            except libvirt.libvirtError as exc:
                if _state_of(dom) == GuestState.SHUTOFF:
                    return True
                raise HypervisorError(
                    f"cannot ask guest {name!r} to shut down: {_libvirt_message(exc)}"
                ) from exc
            failpoints.hit(SHUTDOWN_FAILPOINT)  # a crash with the request in flight
            window = min(SHUTDOWN_RESEND_SECONDS, deadline - time.monotonic())
            if self._wait_stopped(dom, uuid, t0, time.monotonic() - t0 + max(window, 0), cancel):
                return True
            if time.monotonic() >= deadline:
                return False

    def _wait_stopped(
        self,
        dom: libvirt.virDomain,
        uuid: str,
        t0: float,
        timeout: float,
        cancel: threading.Event | None = None,
    ) -> bool:
        deadline = t0 + timeout
        while True:
            if cancel is not None and cancel.is_set():
                waited = time.monotonic() - t0
                raise Cancelled(f"run cancelled during the shutdown wait (after {waited:.0f} s)")
            stopped = any(
                e == libvirt.VIR_DOMAIN_EVENT_STOPPED for e, _ in self._board.since(uuid, t0)
            )
            if stopped or self._fresh_state(dom) == GuestState.SHUTOFF:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._board.wait(min(remaining, _STATE_RECHECK_SECONDS))

    def _fresh_state(self, dom: libvirt.virDomain) -> GuestState:
        """The state, looked up anew when the domain handle died with its connection."""
        state = _state_of(dom)
        if state != GuestState.UNKNOWN:
            return state
        try:
            return _state_of(self._live().lookupByUUIDString(dom.UUIDString()))
        except libvirt.libvirtError:
            return GuestState.UNKNOWN

    @contextmanager
    def watch_started(self, name: str) -> Iterator[threading.Event]:
        """An Event that libvirt's next STARTED event for this guest sets."""
        uuid = self._uuid(name)
        flag = threading.Event()
        self._board.watch_starts(uuid, flag)
        try:
            yield flag
        finally:
            self._board.unwatch_starts(uuid, flag)

    def started_since(self, name: str, t0: float) -> bool:
        """Whether libvirt reported the guest starting after monotonic time ``t0``."""
        uuid = self._uuid(name)
        return any(e == libvirt.VIR_DOMAIN_EVENT_STARTED for e, _ in self._board.since(uuid, t0))

    def lifecycle_since(self, name: str, t0: float) -> list[tuple[int, int]]:
        """libvirt's lifecycle events (event, detail) for the guest after monotonic ``t0``."""
        return self._board.since(self._uuid(name), t0)

    def wait_state(self, name: str, state: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.state(name) != state:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._board.wait(min(remaining, 0.2))
        return True

    def _call(self, fn: Callable[..., Any], *args: Any, guest: str | None = None) -> Any:
        try:
            return fn(*args)
        except libvirt.libvirtError as exc:
            where = f"guest {guest!r}: " if guest is not None else ""
            raise HypervisorError(f"{where}{_libvirt_message(exc)}") from exc


@contextmanager
def connect(uri: str | None = None) -> Iterator[Hypervisor]:
    hv = Hypervisor(uri)
    try:
        yield hv
    finally:
        hv.close()


def _state_of(dom: libvirt.virDomain) -> GuestState:
    try:
        state, _reason = dom.state()
    except libvirt.libvirtError:
        return GuestState.UNKNOWN
    return _STATE_NAMES.get(state, GuestState.UNKNOWN)


def _transient(exc: libvirt.libvirtError) -> bool:
    message = _libvirt_message(exc)
    return "Permission denied" in message or "Cannot access storage" in message


def _libvirt_message(exc: libvirt.libvirtError) -> str:
    return str(exc.get_error_message() or exc).strip()
