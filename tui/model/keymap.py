"""The operator's own keys: ``keys.toml`` next to ``jobs.toml``.

Every binding in the console has an id, so a key can be moved without
touching the code::

    [keys]
    "jobs.start" = "f9"        # Start now on F9 instead of s
    "app.quit" = "f10,q"       # several keys: comma-separated

Keys that terminals swallow or send for other keys (ctrl+s freezes output,
ctrl+m is Enter, ctrl+h Backspace, ctrl+i Tab) are refused.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

FILE_NAME = "keys.toml"
REFUSED_KEYS = frozenset({"ctrl+s", "ctrl+m", "ctrl+h", "ctrl+i"})


def keymap_path(config_file: Path) -> Path:
    return config_file.parent / FILE_NAME


def load_keymap(path: Path) -> tuple[dict[str, str], list[str]]:
    """The keymap in ``path`` (binding id -> keys), and what was wrong with it."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, []
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return {}, [f"{path}: {exc}"]
    table = document.get("keys", {})
    if not isinstance(table, dict):
        return {}, [f'{path}: [keys] must be a table of binding id = "key"']
    keymap: dict[str, str] = {}
    problems: list[str] = []
    for binding_id, keys in table.items():
        if not isinstance(keys, str) or not keys.strip():
            problems.append(f'{path}: {binding_id} must be a key name such as "f9"')
            continue
        refused = sorted(set(k.strip() for k in keys.split(",")) & REFUSED_KEYS)
        if refused:
            problems.append(f"{path}: {binding_id}: {refused[0]} is not usable in a terminal")
            continue
        keymap[binding_id] = keys
    return keymap, problems
