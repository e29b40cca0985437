"""Import Debian's libguestfs Python binding (python3-guestfs) into the venv.

guestsafe's venv does not see the system's site-packages, and the Python package index's ``guestfs``
sdist is an old copy that must be compiled against libguestfs-dev. Debian's
binding is built for the very libguestfs the host runs, so guestsafe loads just
that one module (``guestfs.py`` and its C extension ``libguestfsmod``) from
Debian's directory by file path, without putting the rest of that directory on
``sys.path``. The extension is built for Debian's Python minor version; another
one is refused with a line saying so.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from guestsafe.engine.errors import RestoreError

DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")
INSTALL_HINT = "install the Debian package python3-guestfs (bash .ci/host-setup.sh does)"


def load_guestfs(directory: Path = DIST_PACKAGES) -> ModuleType:
    """The ``guestfs`` module; RestoreError saying what to install when it is missing."""
    if "guestfs" in sys.modules:
        return sys.modules["guestfs"]
    tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
    extensions = sorted(directory.glob("libguestfsmod.*.so"))
    wrapper = directory / "guestfs.py"
    if not wrapper.is_file() or not extensions:
        raise RestoreError(f"libguestfs' Python binding is missing in {directory}; {INSTALL_HINT}")
    matching = [ext for ext in extensions if tag in ext.name]
    if not matching:
        raise RestoreError(
            f"{extensions[0]} is built for another Python than this {tag}; "
            "create the venv with the system's python3 (/usr/bin/python3)"
        )
    _load("libguestfsmod", matching[0], extension=True)
    return _load("guestfs", wrapper, extension=False)


def _load(name: str, path: Path, *, extension: bool) -> ModuleType:
    loader = (
        importlib.machinery.ExtensionFileLoader(name, str(path))
        if extension
        else importlib.machinery.SourceFileLoader(name, str(path))
    )
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    if spec is None:
        raise RestoreError(f"cannot load {path}; {INSTALL_HINT}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except ImportError as exc:
        del sys.modules[name]
        raise RestoreError(f"cannot load {path}: {exc}; {INSTALL_HINT}") from exc
    return module
