"""A version's files: a lazily loaded tree, and extraction of the selection.

The data comes from a ``FileSource`` opened by the ``opener`` the screen is given:
the Restore tab passes one that starts the engine's libguestfs appliance on the
version (seconds, so it runs in a worker behind a loading indicator); tests pass a
fake. Every call on the source runs in a worker; the widgets change on the UI
thread only (``call_from_thread``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import ClassVar, Protocol

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, LoadingIndicator, ProgressBar, Static, Tree
from textual.widgets.tree import TreeNode

from guestsafe.engine.api import Entry, Extracted, ExtractProgress, Filesystem, byte_size, escape

from .worker_errors import ReportsWorkerErrors, background


class FileSource(Protocol):
    """What the browser reads: the engine's VersionFiles, or a test's fake."""

    @property
    def filesystems(self) -> list[Filesystem]: ...

    def listdir(self, path: str) -> list[Entry]: ...

    def extract(
        self,
        path: str,
        dest: Path,
        *,
        force: bool = False,
        progress: ExtractProgress | None = None,
        cancel: threading.Event | None = None,
    ) -> Extracted: ...


PROGRESS_EVERY = 0.1  # seconds between progress bar updates
SourceOpener = Callable[[], AbstractContextManager[FileSource]]


@dataclass
class NodeData:
    """A tree node's path in the version (``/dev/sda1:/etc``) and whether it is loaded."""

    path: str
    is_dir: bool
    loaded: bool = False


def entry_label(entry: Entry) -> str:
    when = datetime.fromtimestamp(entry.mtime_ns / 1e9).strftime("%Y-%m-%d %H:%M")
    name = escape(entry.name) + ("/" if entry.kind == "dir" else "")
    if entry.kind == "link":
        name += f" -> {escape(entry.target)}"
    size = "" if entry.kind == "dir" else byte_size(entry.size)
    return f"{name}  {size}  {when}".replace("[", r"\[")


class FileBrowserScreen(ReportsWorkerErrors, Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("x", "extract", "Extract", id="files.extract"),
        Binding("escape", "close", "Close", id="files.close"),
    ]

    def __init__(self, title: str, opener: SourceOpener) -> None:
        super().__init__()
        self._title = title
        self._opener = opener
        self._stack = ExitStack()
        self._source: FileSource | None = None
        self._cancel = threading.Event()
        self._extracting = False

    def compose(self) -> ComposeResult:
        with Vertical(id="files-body"):
            yield Label(f"Files of {escape(self._title)} (read-only)", id="files-title")
            yield LoadingIndicator(id="files-loading")
            tree: Tree[NodeData] = Tree("filesystems", id="files-tree")
            tree.display = False
            yield tree
            with Horizontal(id="files-extract-bar"):
                yield Label("Extract into ")
                yield Input(id="files-dest", placeholder="/root/restored (a folder)")
            yield ProgressBar(id="files-progress", show_eta=False)
            yield Static("Opening the version's disks (read-only)...", id="files-status")
        yield Footer()

    def on_mount(self) -> None:
        self._open()

    @background(group="files-open")
    def _open(self) -> None:
        source = self._stack.enter_context(self._opener())
        if self._cancel.is_set():  # closed while the appliance started
            self._stack.close()
            return
        filesystems = list(source.filesystems)
        self.app.call_from_thread(self._opened, source, filesystems)

    def _opened(self, source: FileSource, filesystems: list[Filesystem]) -> None:
        self._source = source
        self.query_one("#files-loading").display = False
        tree = self.query_one("#files-tree", Tree)
        tree.display = True
        tree.root.expand()
        for fs in filesystems:
            label = f"{fs.device}:/  {fs.fstype}  {byte_size(fs.size)}"
            tree.root.add(label, data=NodeData(f"{fs.device}:/", True))
        status = "no filesystem found" if not filesystems else "x extracts the selection"
        self._status(f"{len(filesystems)} filesystems; {status}")
        tree.focus()

    def _status(self, text: str) -> None:
        self.query_one("#files-status", Static).update(text)

    @on(Tree.NodeExpanded, "#files-tree")
    def _expanded(self, event: Tree.NodeExpanded[NodeData]) -> None:
        data = event.node.data
        if data is None or data.loaded or not data.is_dir or self._source is None:
            return
        data.loaded = True
        self._list(event.node, data.path)

    @background(group="files-list", exclusive=False)
    def _list(self, node: TreeNode[NodeData], path: str) -> None:
        assert self._source is not None
        entries = self._source.listdir(path)
        self.app.call_from_thread(self._listed, node, path, entries)

    def _listed(self, node: TreeNode[NodeData], path: str, entries: list[Entry]) -> None:
        base = path.rstrip("/")
        for entry in entries:
            data = NodeData(f"{base}/{entry.name}", entry.kind == "dir")
            if data.is_dir:
                node.add(entry_label(entry), data=data)
            else:
                node.add_leaf(entry_label(entry), data=data)
        if not entries:
            node.add_leaf("(empty)")

    def action_extract(self) -> None:
        tree = self.query_one("#files-tree", Tree)
        node = tree.cursor_node
        if self._source is None or node is None or node.data is None:
            self.app.notify("Choose a file or folder first.", severity="warning")
            return
        dest = self.query_one("#files-dest", Input).value.strip()
        if not dest:
            self.app.notify("Type the folder to extract into, then press x.", severity="warning")
            self.query_one("#files-dest", Input).focus()
            return
        if self._extracting:
            self.app.notify("An extraction is running.", severity="warning")
            return
        self._extracting = True
        self._cancel.clear()
        self._status(f"extracting {escape(node.data.path)} into {escape(dest)}...")
        self._extract(node.data.path, Path(dest))

    @on(Input.Submitted, "#files-dest")
    def _dest_given(self) -> None:
        self.query_one("#files-tree", Tree).focus()

    @background(group="files-extract")
    def _extract(self, path: str, dest: Path) -> None:
        assert self._source is not None
        shown = [0.0]

        def progress(done: int, total: int, name: str) -> None:
            now = time.monotonic()
            if now - shown[0] >= PROGRESS_EVERY or done == total:
                shown[0] = now
                self.app.call_from_thread(self._progressed, done, total)

        try:
            result = self._source.extract(path, dest, progress=progress, cancel=self._cancel)
        finally:
            self.app.call_from_thread(self._stopped_extracting)
        self.app.call_from_thread(self._extracted, result, dest)

    def _stopped_extracting(self) -> None:
        self._extracting = False

    def _progressed(self, done: int, total: int) -> None:
        self.query_one("#files-progress", ProgressBar).update(total=max(total, 1), progress=done)

    def _extracted(self, result: Extracted, dest: Path) -> None:
        skipped = f", {len(result.skipped)} skipped" if result.skipped else ""
        self._status(
            f"extracted {result.files} files, {byte_size(result.bytes)} into "
            f"{escape(str(dest))}{skipped}"
        )

    def action_close(self) -> None:
        if self._extracting:
            self._cancel.set()
            self.app.notify("Stopping the extraction after this file; then press Escape again.")
            return
        self._cancel.set()
        self._status("closing the version's disks...")
        self._close_source()

    @background(group="files-close")
    def _close_source(self) -> None:
        self._stack.close()  # the appliance and the guest's lock
        self.app.call_from_thread(self.dismiss, None)
