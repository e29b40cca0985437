"""The README's restore-by-hand recipe, followed as written (issue 12, case 24).

The recipe's shell block is read from README.md and run with bash: b3sum, cp, sed
and virsh against a real guest's version, while the original runs. Only what the
recipe says to fill in is filled in: the version, the clone's name, its folder,
and one ``s|old|new|g`` per path its own ``grep`` lists that the original owns.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from rig import GuestFactory, unique_name
from rig.gs import BOOT, GS, shutdown_counter
from rig.host import make_traversable

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_PATHS = ("/var/lib/libvirt/images/web1.qcow2", "/var/log/libvirt/qemu/web1-serial.log")


def recipe(document: Path, heading: str) -> list[str]:
    """The lines of the first ```sh block after ``heading`` in ``document``."""
    text = document.read_text()
    after = text[text.index(heading) :]
    block = after[after.index("```sh\n") + len("```sh\n") :]
    return block[: block.index("```\n")].splitlines()


def readme_recipe() -> list[str]:
    return recipe(ROOT / "README.md", "## Restoring by hand, without guestsafe")


def test_case_24_readme_and_format_md_give_one_recipe() -> None:
    format_md = recipe(ROOT / "engine" / "archive" / "FORMAT.md", "(a clone)")
    assert format_md == readme_recipe()


def _fill_in(lines: list[str], values: dict[str, str], substitutions: list[str], out: Path) -> str:
    """The recipe with its blanks filled in, as a person would type it."""
    filled = []
    for line in lines:
        name = line.split("=", 1)[0]
        if name in values and re.fullmatch(r"[A-Z]+=\S+.*", line):
            filled.append(f"{name}={shlex.quote(values[name])}")
        elif any(example in line for example in EXAMPLE_PATHS):
            if substitutions:  # the recipe's examples: one line per path of this guest
                filled += [f'    -e "{s}" \\' for s in substitutions]
                substitutions = []
        else:
            filled.append(line.replace("/root/", f"{out}/"))
    return "\n".join(filled) + "\n"


def _listed_paths(grep_line: str, version: Path) -> list[str]:
    """Run the recipe's own grep and take the paths it lists."""
    command = grep_line.split("#", 1)[0]
    shown = subprocess.run(
        ["bash", "-c", command], cwd=version, capture_output=True, text=True, check=True
    ).stdout
    found = re.findall(r"(?:file|path)='([^']+)'", shown)
    found += re.findall(r"<nvram[^>]*>([^<]+)</nvram>", shown)
    return list(dict.fromkeys(found))


def _wait_boot(console: Path, timeout: float = 90) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = BOOT.search(console.read_text(errors="replace")) if console.exists() else None
        if match:
            return int(match.group(1))
        time.sleep(0.3)
    raise AssertionError(f"no GS-BOOT on {console}")


@pytest.mark.integration
def test_case_24_the_by_hand_recipe_boots_a_clone_beside_the_running_original(
    gs: GS,
    guest_factory: GuestFactory,
    libvirt_conn: libvirt.virConnect,
    libvirt_uri: str,
    workdir: Path,
) -> None:
    original = guest_factory("byhand")
    before = original.console_size()
    gs.job("hand", [original])
    assert gs.engine.run_job("hand").ok
    at_shutdown = shutdown_counter(original, before)
    assert original.is_running()
    [version] = gs.engine.versions(gs.archive, original.name)
    clone = unique_name("byhandclone")
    folder = workdir / clone
    folder.mkdir()
    make_traversable(folder)
    guest_factory.adopt(clone, folder)

    lines = readme_recipe()
    [grep_line] = [line for line in lines if line.startswith("grep ")]
    owned = [
        p for p in _listed_paths(grep_line, version.path) if p.startswith(str(original.directory))
    ]
    # The original's disk and its serial log (console and serial share one file).
    assert sorted(owned) == sorted([str(original.disks["vda"].path), str(original.console_log)])
    new_names = {"vda.qcow2": "$IMAGES/$NEW-vda.qcow2", "console.log": "$IMAGES/$NEW-serial.log"}
    substitutions = [f"s|{p}|{new_names[Path(p).name]}|g" for p in owned]
    values = {"V": str(version.path), "NEW": clone, "IMAGES": str(folder)}
    script = _fill_in(lines, values, substitutions, folder)

    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={**os.environ, "LIBVIRT_DEFAULT_URI": libvirt_uri},
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert proc.returncode == 0, f"{script}\n{proc.stdout}\n{proc.stderr}"
    assert "vda.qcow2: OK" in proc.stdout  # b3sum checked the version
    dom = libvirt_conn.lookupByName(clone)
    assert dom.isActive() and original.is_running()
    assert _wait_boot(folder / f"{clone}-serial.log") == at_shutdown
    assert dom.UUIDString() != original.dom.UUIDString()
    clone_macs = {m.get("address") for m in ET.fromstring(dom.XMLDesc(0)).iter("mac")}
    assert clone_macs and not clone_macs & set(original.macs)
