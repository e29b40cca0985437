"""The hypervisor hosts of ``jobs.toml``: ``[hosts.NAME]`` tables, each a libvirt URI.

::

    [hosts.node2]
    uri = "qemu+ssh://root@node2/system"   # libvirt's own remote protocol
    reconnect_wait = 60                    # seconds a lost connection is waited for
    connect_timeout = 30                   # seconds a connection may take to open

The host guestsafe runs on is implicit: ``local``, on the ``--connect`` (or
``LIBVIRT_DEFAULT_URI``) URI, and never a table here. A job names its host with
``host = "node2"``, or several with ``hosts = ["local", "node2"]`` (cluster mode:
the guests of each backed up onto this machine's destination or device).

guestsafe authenticates as the libvirt client does (SSH keys, TLS certificates)
and never stores a password: a URI carrying one is refused, and so is one that
turns certificate checks off (``no_verify``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from guestsafe.engine.hypervisor.hosts import LOCAL_HOST

__all__ = ["LOCAL_HOST", "Host", "check_host_name", "check_uri", "host_names", "parse_hosts"]

HOST_KEYS = ("uri", "reconnect_wait", "connect_timeout")
# The longest reconnect_wait: a stopped guest waits that long for its restart.
MAX_RECONNECT_WAIT = 3600
# connect_timeout's range: at least a handshake's time, at most what a command may hang.
MIN_CONNECT_TIMEOUT, MAX_CONNECT_TIMEOUT = 1, 600
_HOST_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
# The hypervisor drivers guestsafe backs up (test: libvirt's test driver, for the demo
# and tests), and the transports libvirt's remote driver knows.
DRIVERS = ("qemu", "test")
TRANSPORTS = ("", "ssh", "libssh", "libssh2", "tls", "tcp", "unix")
_URI_RE = re.compile(r"(?P<driver>[a-z]+)(\+(?P<transport>[a-z0-9]+))?://(?P<rest>.*)")


@dataclass(frozen=True)
class Host:
    """One hypervisor host: its name in jobs.toml and the libvirt URI that reaches it."""

    name: str
    uri: str
    # Seconds a copy that lost the connection waits for it before leaving the guest's
    # restart to ``guestsafe recover``; None: the copy's default (60 s).
    reconnect_wait: float | None = None
    # Seconds opening the connection may take before the host counts as unreachable;
    # None: the default (30 s, engine/hypervisor/bounded_open.py).
    connect_timeout: float | None = None


def parse_hosts(table: object) -> tuple[dict[str, Host], list[tuple[str, str]]]:
    """The hosts of a ``[hosts]`` table, and (field, message) for each problem."""
    if not isinstance(table, dict):
        return {}, [("hosts", "hosts must be tables like [hosts.node2] with a uri")]
    hosts: dict[str, Host] = {}
    problems: list[tuple[str, str]] = []
    for name, entry in table.items():
        host, problem = _parse_host(name, entry)
        if problem is not None:
            problems.append((f"hosts.{name}", problem))
        elif host is not None:
            hosts[name] = host
    return hosts, problems


def _parse_host(name: str, entry: object) -> tuple[Host | None, str | None]:
    where = f"[hosts.{name}]"
    wrong_name = check_host_name(name)
    if wrong_name is not None:
        return None, f"{where}: {wrong_name}"
    if name == LOCAL_HOST:
        return None, (
            f"{where}: {LOCAL_HOST!r} is this machine's own libvirt (set it with --connect "
            "or LIBVIRT_DEFAULT_URI); give the other host another name"
        )
    if not isinstance(entry, dict):
        return None, f'{where} must be a table with uri = "qemu+ssh://root@{name}/system"'
    unknown = [key for key in entry if key not in HOST_KEYS]
    if unknown:
        return None, f"{where}: unknown key {unknown[0]!r}"
    uri = entry.get("uri")
    if not isinstance(uri, str):
        return None, f'{where}: uri is required, e.g. uri = "qemu+ssh://root@{name}/system"'
    wrong_uri = check_uri(uri)
    if wrong_uri is not None:
        return None, f"{where}: {wrong_uri}"
    try:
        wait = _seconds(entry.get("reconnect_wait"), 0, MAX_RECONNECT_WAIT)
    except ValueError:
        return None, (
            f"{where}: reconnect_wait must be a number of seconds from 0 to "
            f"{MAX_RECONNECT_WAIT}, not {entry['reconnect_wait']!r}"
        )
    try:
        timeout = _seconds(entry.get("connect_timeout"), MIN_CONNECT_TIMEOUT, MAX_CONNECT_TIMEOUT)
    except ValueError:
        return None, (
            f"{where}: connect_timeout must be a number of seconds from "
            f"{MIN_CONNECT_TIMEOUT} to {MAX_CONNECT_TIMEOUT}, not {entry['connect_timeout']!r}"
        )
    return Host(name, uri, wait, timeout), None


def _seconds(value: object, low: float, high: float) -> float | None:
    """``value`` as seconds, None when absent; ValueError unless a number from low to high."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(value)
    return float(value)


def check_host_name(name: object) -> str | None:
    """Why ``name`` cannot name a host, or None; it becomes part of archive folder names."""
    if not isinstance(name, str) or not _HOST_NAME_RE.fullmatch(name):
        return (
            f"host name {name!r} must be 1 to 64 of A-Z a-z 0-9 . _ - and not start with '.' or '-'"
        )
    return None


def check_uri(uri: str) -> str | None:
    """Why ``uri`` is no libvirt URI guestsafe connects to, or None.

    The shape is libvirt's: ``driver[+transport]://[user@][host][:port]/path[?query]``.
    A password (``user:pass@``) is refused, since guestsafe never stores one, and so
    is ``no_verify``, which would accept any TLS certificate.
    """
    match = _URI_RE.fullmatch(uri)
    if match is None or any(ch.isspace() for ch in uri):
        return f"uri {uri!r} is not a libvirt URI like qemu+ssh://root@node2/system"
    driver, transport = match["driver"], match["transport"] or ""
    if driver not in DRIVERS:
        return f"uri {uri!r}: driver {driver!r} is not one of {', '.join(DRIVERS)}"
    if transport not in TRANSPORTS:
        known = ", ".join(t for t in TRANSPORTS if t)
        return f"uri {uri!r}: transport {transport!r} is not one of {known}"
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 (parsing the port is the check)
    except ValueError:
        return f"uri {uri!r}: the port must be a number"
    if parts.password is not None:
        return (
            "uri carries a password (user:password@); guestsafe never stores one: "
            "use an SSH key or a TLS certificate"
        )
    if not parts.path.startswith("/"):
        return f"uri {uri!r} must name a path, like /system"
    if any(key == "no_verify" for key, _ in parse_qsl(parts.query)):
        return f"uri {uri!r}: no_verify turns off the TLS certificate check; remove it"
    return None


def host_names(hosts: Mapping[str, Host]) -> list[str]:
    """Every host a job may name: ``local`` first, then the configured ones in file order."""
    return [LOCAL_HOST, *hosts]


def host_table(hosts: Mapping[str, Host]) -> dict[str, dict[str, str | float]]:
    """``hosts`` as the ``[hosts]`` table of jobs.toml."""
    return {name: _host_entry(host) for name, host in hosts.items()}


def _host_entry(host: Host) -> dict[str, str | float]:
    entry: dict[str, str | float] = {"uri": host.uri}
    if host.reconnect_wait is not None:
        entry["reconnect_wait"] = host.reconnect_wait
    if host.connect_timeout is not None:
        entry["connect_timeout"] = host.connect_timeout
    return entry
