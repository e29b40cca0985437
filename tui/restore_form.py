"""The restore form: which guest, which version, the new guest's ID, and which of its
disks go onto existing block devices instead of new files ("vdb=/dev/vg/lv").

With ``[hosts.NAME]`` in jobs.toml a "To host" field names the host the new guest is
defined on (this machine when empty), as the CLI's ``--to-host``."""

from __future__ import annotations

from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Input, Label, Static

from guestsafe.engine.api import LOCAL_HOST, escape, split_series

from .field_input import FieldInput
from .formatting import literal
from .tick_box import TickBox


class RestoreForm(Vertical):
    @dataclass
    class Submitted(Message):
        guest: str
        number: int
        new_name: str
        start: bool = False  # start the restored guest, as the CLI's --start
        disk_targets: tuple[str, ...] = ()  # "vdb=/dev/vg/lv", as the CLI's --disk-target
        boot: bool = False  # boot now on overlays of the version (guestsafe boot), no copy
        # Onto devices that hold a filesystem or partition table (the CLI's --force).
        overwrite_devices: bool = False
        to_host: str | None = None  # the host the new guest is defined on (--to-host)

    # The row taken last: (its name as shown, its real name).
    _chosen: tuple[str, str] | None = None

    def __init__(self, *, hosts: list[str] | None = None, id: str | None = None) -> None:
        super().__init__(id=id)
        self._hosts = list(hosts or [])  # "local" first; the field shows beside another

    def compose(self) -> ComposeResult:
        with Horizontal(id="restore-fields"):
            yield Label("ID", classes="restore-label")
            yield FieldInput(id="r-guest", placeholder="guest", compact=True)
            yield Label("Version", classes="restore-label")
            yield FieldInput(id="r-version", placeholder="n", type="integer", compact=True)
            yield Label("New ID", classes="restore-label")
            yield FieldInput(id="r-new", placeholder="new guest name", compact=True)
            yield TickBox("start", id="r-start", compact=True)
            yield Button("Restore", id="r-submit", variant="primary", compact=True)
        with Horizontal(id="restore-devices"):
            yield Label("Onto devices", classes="restore-label")
            yield FieldInput(
                id="r-disks",
                placeholder="optional: vdb=/dev/vg/lv (several: space between)",
                compact=True,
            )
            yield TickBox("overwrite", id="r-overwrite", compact=True)
        if len(self._hosts) > 1:
            with Horizontal(id="restore-hosts"):
                yield Label("To host", classes="restore-label")
                known = ", ".join(self._hosts)
                yield FieldInput(id="r-host", placeholder=f"this machine; {known}", compact=True)
        yield Static("", id="r-error", classes="field-error")

    def on_mount(self) -> None:
        self.query_one("#r-error", Static).display = False

    def prefill(self, guest: str, number: int) -> None:
        """Take ID and version from the archive row, and suggest a new ID naming both.

        An Input draws its value raw, so a name with control or invisible characters
        (an ANSI escape, an RTL override) is shown escaped; submitting the shown text
        restores that very guest. The suggested new ID keeps only visible characters.
        """
        shown = escape(guest)
        self._chosen = (shown, guest)
        self._input("r-guest").value = shown
        self._input("r-version").value = str(number)
        _host, name = split_series(guest)  # "node2/web1": web1 of host node2
        visible = "".join(c for c in name if c.isprintable()).strip() or "restored"
        self._input("r-new").value = f"{visible}-v{number}"
        self._error("")

    def focus_new_id(self) -> None:
        new = self._input("r-new")
        new.focus()
        new.action_end()

    def _input(self, widget_id: str) -> Input:
        return self.query_one(f"#{widget_id}", Input)

    def _error(self, message: str) -> None:
        error = self.query_one("#r-error", Static)
        error.update(literal(message))
        error.display = bool(message)

    @on(Input.Submitted)
    @on(Button.Pressed, "#r-submit")
    def submit(self, event: Message | None = None, *, boot: bool = False) -> None:
        if event is not None:
            event.stop()
        guest = self._input("r-guest").value
        if self._chosen is not None and guest == self._chosen[0]:
            guest = self._chosen[1]
        version = self._input("r-version").value.strip()
        new_name = self._input("r-new").value
        if not guest:
            self._error("ID: choose a version in the table, or type the guest's name")
            self._input("r-guest").focus()
            return
        if not version.isdigit() or int(version) < 1:
            self._error("Version must be a version number from the table")
            self._input("r-version").focus()
            return
        if not new_name.strip():
            self._error("New ID: the restored guest needs a name of its own")
            self._input("r-new").focus()
            return
        disk_targets = tuple(self._input("r-disks").value.split())
        bad = next((spec for spec in disk_targets if "=" not in spec), None)
        if bad is not None:
            self._error(f"Onto devices: write each as DISK=DEVICE, e.g. vdb=/dev/vg/lv ({bad})")
            self._input("r-disks").focus()
            return
        if boot and disk_targets:
            self._error("Onto devices: Boot now puts every disk on an overlay; empty it")
            self._input("r-disks").focus()
            return
        to_host = self._to_host()
        if to_host == "":
            return
        self._error("")
        start = self.query_one("#r-start", TickBox).value
        overwrite = self.query_one("#r-overwrite", TickBox).value
        self.post_message(
            self.Submitted(
                guest,
                int(version),
                new_name,
                start,
                disk_targets,
                boot=boot,
                overwrite_devices=overwrite,
                to_host=to_host,
            )
        )

    def _to_host(self) -> str | None:
        """The host typed (None: this machine); "" after saying it is not a known one."""
        if len(self._hosts) <= 1:
            return None
        typed = self._input("r-host").value.strip()
        if not typed or typed == LOCAL_HOST:
            return None
        if typed not in self._hosts:
            self._error(f"To host: {typed!r} is not in jobs.toml (known: {', '.join(self._hosts)})")
            self._input("r-host").focus()
            return ""
        return typed
