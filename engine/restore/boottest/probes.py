"""The running clone's signs, read through libvirt: state, agent, serial console.

The console is read from a file the clone's XML names: a ``<serial type='file'>``
source, or the ``<log file=...>`` of a pty console (``isolate.py`` gives a pty
console without one a log; see there why a file and not libvirt's console
stream). Both are the clone's own new files (a restore never reuses a path), so
all of it is this boot's.
"""

from __future__ import annotations

import contextlib
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import libvirt_qemu

from guestsafe.engine.errors import GuestsafeError
from guestsafe.engine.hypervisor.connection import Hypervisor
from guestsafe.engine.hypervisor.domain_xml import PAUSED, RUNNING

AGENT_CHANNEL = "org.qemu.guest_agent.0"
AGENT_TIMEOUT = 1  # seconds per ping: an agent that is up answers at once
CONSOLE_TAIL = 1 << 20  # bytes of the console looked at, from its end
_PING = json.dumps({"execute": "guest-ping"})
_STATES_ALIVE = (RUNNING, PAUSED)  # blocked reads as running
_WORDS = {"shutoff": "off", "crashed": "down (crashed)"}
# Lifecycle events that end a test: the guest crashed, or stopped while we watched.
_DEATH_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "shut off",
}


def has_agent_channel(xml: str) -> bool:
    targets = ET.fromstring(xml).findall("./devices/channel/target")
    return any(t.get("name") == AGENT_CHANNEL for t in targets)


def console_file(xml: str) -> Path | None:
    """The file the clone's serial console writes to, if it writes to one."""
    devices = ET.fromstring(xml).find("devices")
    if devices is None:
        return None
    for dev in [*devices.findall("serial"), *devices.findall("console")]:
        source = dev.find("source")
        if dev.get("type") == "file" and source is not None and source.get("path"):
            return Path(source.get("path", ""))
        log = dev.find("log")
        if log is not None and log.get("file"):
            return Path(log.get("file", ""))
    return None


class CloneProbes:
    """``signs.Probes`` for clone ``name`` on ``hv``, from the moment it is made."""

    def __init__(self, hv: Hypervisor, name: str, since: float) -> None:
        self.hv = hv
        self.name = name
        self.since = since
        live = hv.xml(name, inactive=False)
        self.agent = has_agent_channel(live)
        self.console = console_file(live)
        # The clone's console file is its own, new (clone_xml.free_path): read it all.
        self.offset = 0

    def down(self) -> str | None:
        for event, _detail in self.hv.lifecycle_since(self.name, self.since):
            if event in _DEATH_EVENTS:
                return f"the clone {_DEATH_EVENTS[event]} before a sign of life"
        state = self.hv.state(self.name)
        if state not in _STATES_ALIVE:
            return f"the clone went {_WORDS.get(state, state)} before a sign of life"
        return None

    def agent_answers(self) -> bool | None:
        if not self.agent:
            return None
        try:
            dom = self.hv.connection.lookupByName(self.name)
            libvirt_qemu.qemuAgentCommand(dom, _PING, AGENT_TIMEOUT, 0)
        except (libvirt.libvirtError, GuestsafeError):
            return False
        return True

    def console_text(self) -> str | None:
        if self.console is None:
            return None
        try:
            with open(self.console, "rb") as f:
                f.seek(max(self.offset, _size(self.console) - CONSOLE_TAIL))
                return f.read(CONSOLE_TAIL).decode(errors="replace")
        except OSError:
            return None  # not created yet, or not ours to read


def _size(path: Path) -> int:
    with contextlib.suppress(OSError):
        return os.stat(path).st_size
    return 0
