"""Where a guest's disks live: on this machine, or behind a remote libvirt connection.

A guest on another host (``qemu+ssh://``, ``qemu+tls://``) has disk files this
machine cannot open: they are read and written through libvirt storage-volume
streams, which the remote transport provides. Until that transport is here, the
backup and restore code asks ``require_local_disks`` first and refuses, before any
guest is stopped or any file written, with a line saying so.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from guestsafe.engine.errors import RemoteDisksUnsupported
from guestsafe.engine.hypervisor.connection import Hypervisor

# Transports that reach another machine's libvirtd; unix (and none) stay on this one.
_REMOTE_TRANSPORTS = frozenset({"ssh", "libssh", "libssh2", "tls", "tcp", "ext"})


def uri_is_remote(uri: str) -> bool:
    """True if ``uri`` reaches a libvirtd on another machine (or through a network path)."""
    scheme, _, _ = uri.partition("://")
    _driver, _, transport = scheme.partition("+")
    if transport in _REMOTE_TRANSPORTS:
        return True
    # qemu://node2/system is qemu+tls: a host name without a transport means TLS.
    return transport == "" and bool(urlsplit(uri).hostname)


def is_remote(hv: Hypervisor) -> bool:
    """True if ``hv``'s guests have disks this machine cannot open as files."""
    return uri_is_remote(hv.uri)


def require_local_disks(hv: Hypervisor, guest: str, action: str) -> None:
    """Refuse ``action`` on ``guest``'s disks when they sit on another host."""
    if is_remote(hv):
        raise RemoteDisksUnsupported(
            f"guest {guest!r} on {hv.uri}: {action} over a remote connection needs libvirt "
            "storage-volume streams, and remote disks are not supported yet"
        )
