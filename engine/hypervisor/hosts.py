"""The hypervisor hosts guestsafe knows, each with its own libvirt connection.

``local`` is this machine's libvirt (``--connect``, ``LIBVIRT_DEFAULT_URI`` or
``qemu:///system``); the others come from ``[hosts.NAME]`` in jobs.toml. A host's
connection is opened the first time something asks for it, and its state is kept:
connected, unreachable (with libvirt's own reason), or not tried yet. An
unreachable host is tried again on the next request, so a host that comes back
needs no restart; one that stays down fails its own guests and nobody else's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from guestsafe.engine.errors import GuestsafeError, HostUnreachable, NotFoundError
from guestsafe.engine.hypervisor.bounded_open import CONNECT_TIMEOUT
from guestsafe.engine.hypervisor.connection import Hypervisor

LOCAL_HOST = "local"


class HostState(StrEnum):
    NOT_TRIED = "not connected yet"
    CONNECTED = "connected"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class HostStatus:
    name: str
    uri: str
    state: HostState
    reason: str | None = None  # why it is unreachable, as libvirt said it

    def describe(self) -> str:
        """``node2 (qemu+ssh://root@node2/system): unreachable: <reason>``."""
        state = f"{self.state}: {self.reason}" if self.reason else str(self.state)
        return f"{self.name} ({self.uri}): {state}"


class HostRegistry:
    """Every known host's connection, opened lazily; thread-safe."""

    def __init__(
        self,
        local_uri: str,
        remotes: Mapping[str, str] | None = None,
        *,
        local: Callable[[], Hypervisor] | None = None,
        opener: Callable[[str, float], Hypervisor] = Hypervisor,
    ) -> None:
        self._uris: dict[str, str] = {LOCAL_HOST: local_uri}
        self._local = local
        self._opener = opener
        self._lock = threading.Lock()
        self._open: dict[str, Hypervisor] = {}
        self._failed: dict[str, str] = {}
        self._waits: dict[str, float] = {}
        self._timeouts: dict[str, float] = {}
        self.configure(remotes or {})

    def configure(
        self,
        remotes: Mapping[str, str],
        reconnect_waits: Mapping[str, float] | None = None,
        connect_timeouts: Mapping[str, float] | None = None,
    ) -> None:
        """Take the hosts jobs.toml names now; a host gone or moved is disconnected.

        ``reconnect_waits``: a host's ``reconnect_wait``, set on its connection.
        ``connect_timeouts``: a host's ``connect_timeout``, for opening its connection.
        """
        with self._lock:
            self._waits = dict(reconnect_waits or {})
            self._timeouts = dict(connect_timeouts or {})
            for name, hv in self._open.items():
                hv.reconnect_wait = self._waits.get(name)
            wanted = {LOCAL_HOST: self._uris[LOCAL_HOST], **remotes}
            for name in list(self._open):
                if wanted.get(name) != self._uris.get(name):
                    self._open.pop(name).close()
            self._failed = {
                n: r for n, r in self._failed.items() if wanted.get(n) == self._uris.get(n)
            }
            self._uris = wanted

    def names(self) -> list[str]:
        """``local`` first, then the configured hosts in file order."""
        return list(self._uris)

    def uri(self, name: str) -> str:
        self._known(name)
        return self._uris[name]

    def connect_timeout(self, name: str) -> float:
        """Seconds opening host ``name``'s connection may take ([hosts.NAME] connect_timeout)."""
        return self._timeouts.get(name, CONNECT_TIMEOUT)

    def _known(self, name: str) -> None:
        if name not in self._uris:
            known = ", ".join(self._uris)
            raise NotFoundError(f"host {name!r} is not defined in jobs.toml (known: {known})")

    def get(self, name: str) -> Hypervisor:
        """Host ``name``'s connection, opened if need be; ``HostUnreachable`` says why not."""
        self._known(name)
        if name == LOCAL_HOST and self._local is not None:
            return self._connect_local()
        with self._lock:
            hv = self._open.get(name)
            if hv is not None:
                return hv
            uri = self._uris[name]
            try:
                hv = self._opener(uri, self.connect_timeout(name))
            except GuestsafeError as exc:
                reason = _remote_reason(exc.message)
                self._failed[name] = reason
                raise HostUnreachable(f"host {name!r} is unreachable: {reason}") from exc
            self._failed.pop(name, None)
            hv.reconnect_wait = self._waits.get(name)
            self._open[name] = hv
            return hv

    def _connect_local(self) -> Hypervisor:
        assert self._local is not None
        try:
            hv = self._local()
        except GuestsafeError as exc:
            with self._lock:
                self._failed[LOCAL_HOST] = exc.message
            raise HostUnreachable(f"host {LOCAL_HOST!r} is unreachable: {exc.message}") from exc
        with self._lock:
            self._failed.pop(LOCAL_HOST, None)
            self._open[LOCAL_HOST] = hv
        return hv

    def try_get(self, name: str) -> Hypervisor | None:
        """Host ``name``'s connection, or None if it cannot be reached (``status`` says why)."""
        try:
            return self.get(name)
        except HostUnreachable:
            return None

    def status(self, name: str) -> HostStatus:
        self._known(name)
        with self._lock:
            uri = self._uris[name]
            if name in self._failed:
                return HostStatus(name, uri, HostState.UNREACHABLE, self._failed[name])
            if name in self._open:
                return HostStatus(name, uri, HostState.CONNECTED)
            return HostStatus(name, uri, HostState.NOT_TRIED)

    def connected(self) -> list[tuple[str, Hypervisor]]:
        """Every host that answers now, each tried (again) if need be, in ``names`` order."""
        found = ((name, self.try_get(name)) for name in self.names())
        return [(name, hv) for name, hv in found if hv is not None]

    def close(self) -> None:
        """Close the other hosts' connections; the local one belongs to whoever gave it."""
        with self._lock:
            for name, hv in list(self._open.items()):
                if name != LOCAL_HOST or self._local is None:
                    hv.close()
            self._open.clear()


# The local connection's advice, which misleads for another host (--connect is this one's).
_LOCAL_ADVICE = " (is libvirtd running? use --connect to choose another URI)"


def _remote_reason(message: str) -> str:
    return message.removesuffix(_LOCAL_ADVICE)
