"""Opening a remote libvirt connection within a time limit.

libvirt's ssh transport runs ``ssh``, which waits out TCP's retries for a host
that is switched off or cut off (about two minutes on Linux, ``tcp_syn_retries``
6) or, for a host that takes the TCP connection but never speaks, forever.
Every command that asks such a host (the Guests tab, the MAC census of a
restore, the recovery that starts each command) would hang as long. The open
runs in a daemon thread instead; the caller stops waiting at the limit and
the thread, when libvirt finally answers, closes what it got.
"""

from __future__ import annotations

import threading

import libvirt

# Long enough for an SSH handshake and libvirt's own over a slow link; an SSH
# ``ConnectTimeout`` in ~/.ssh/config (README) can make a dead host fail sooner.
CONNECT_TIMEOUT = 30.0


class OpenTimedOut(Exception):
    """The host did not answer within the limit."""


class _Attempt:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.conn: libvirt.virConnect | None = None
        self.error: libvirt.libvirtError | None = None
        self.abandoned = False
        self.done = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            self.error = exc
            conn = None
        with self._lock:
            if self.abandoned and conn is not None:
                conn.close()  # nobody waits for it any more
            else:
                self.conn = conn
            self.done.set()

    def abandon(self) -> bool:
        """Give up unless the open has just finished; True when given up."""
        with self._lock:
            if self.done.is_set():
                return False
            self.abandoned = True
            return True


def open_within(uri: str, timeout: float = CONNECT_TIMEOUT) -> libvirt.virConnect | None:
    """``libvirt.open(uri)``, or ``OpenTimedOut`` after ``timeout`` seconds.

    libvirt's own errors are raised as they are, as from ``libvirt.open``.
    """
    attempt = _Attempt(uri)
    threading.Thread(target=attempt.run, name=f"open {uri}", daemon=True).start()
    if not attempt.done.wait(timeout) and attempt.abandon():
        raise OpenTimedOut(f"no answer within {timeout:g} s")
    if attempt.error is not None:
        raise attempt.error
    return attempt.conn
