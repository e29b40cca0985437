"""Where guestsafe keeps its files.

Three cases, first match wins:

1. ``GUESTSAFE_HOME=/some/dir`` puts everything under that directory:
   ``config/jobs.toml``, ``state/``, ``log/`` and ``cache/``. Tests and the demo
   sandbox use it so they never touch the host's real configuration.
2. root (effective uid 0) gets the host-wide directories:
   ``/etc/guestsafe/jobs.toml``, ``/var/lib/guestsafe``, ``/var/log/guestsafe`` and
   ``/var/cache/guestsafe``. platformdirs' ``site_config_dir`` would give
   ``/etc/xdg/guestsafe``, which is the XDG search path for desktop sessions. A
   systemd timer or cron job runs with no XDG variables, and an administrator looks
   for a host service's configuration in ``/etc/<name>`` (FHS), so guestsafe uses
   the FHS directories instead.
3. Anyone else gets platformdirs' per-user directories (``~/.config/guestsafe``,
   ``~/.local/state/guestsafe`` and so on, honouring the ``XDG_*`` variables).

The CLI's ``--config`` overrides only the config file; state, logs and cache stay
where the rules above put them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from guestsafe.engine.errors import ConfigError

APP = "guestsafe"
HOME_ENV = "GUESTSAFE_HOME"
CONFIG_NAME = "jobs.toml"
# Backups hold whole disks and domain XML with console passwords: only the owner
# may look inside guestsafe's directories.
DIR_MODE = 0o700


@dataclass(frozen=True)
class Paths:
    config_file: Path
    state_dir: Path
    log_dir: Path
    cache_dir: Path

    @classmethod
    def default(cls, config_file: Path | None = None) -> Paths:
        """The paths for this process: see the module docstring for the rules."""
        paths = _home_paths() or (_site_paths() if os.geteuid() == 0 else _user_paths())
        if config_file is None:
            return paths
        return cls(_absolute(config_file), paths.state_dir, paths.log_dir, paths.cache_dir)

    def ensure(self) -> None:
        """Create the state, log and cache dirs and the config file's dir.

        Missing directories are created with mode 0700; existing ones are left
        exactly as they are, since an administrator may have chosen their modes.
        """
        for directory in (self.config_file.parent, self.state_dir, self.log_dir, self.cache_dir):
            ensure_dir(directory)


def ensure_dir(directory: Path) -> None:
    """Create ``directory`` and any missing parents with mode 0700.

    ``Path.mkdir(parents=True)`` would give the parents the umask's mode, which can
    leave a world-readable directory above the state dir; this sets each one it
    creates to 0700 and never touches one that already exists.
    """
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue  # created by a concurrent guestsafe process: not ours to chmod
        except OSError as exc:
            raise ConfigError(f"cannot create directory {path}: {exc.strerror}") from exc
        # mkdir's mode is filtered by the umask; make the result exact.
        path.chmod(DIR_MODE)


def _absolute(path: Path) -> Path:
    return Path(path).expanduser().absolute()


def _home_paths() -> Paths | None:
    home = os.environ.get(HOME_ENV, "")
    if not home:
        return None
    root = _absolute(Path(home))
    return Paths(
        config_file=root / "config" / CONFIG_NAME,
        state_dir=root / "state",
        log_dir=root / "log",
        cache_dir=root / "cache",
    )


def _site_paths() -> Paths:
    return Paths(
        config_file=Path("/etc") / APP / CONFIG_NAME,
        state_dir=Path("/var/lib") / APP,
        log_dir=Path("/var/log") / APP,
        cache_dir=Path("/var/cache") / APP,
    )


def _user_paths() -> Paths:
    return Paths(
        config_file=platformdirs.user_config_path(APP) / CONFIG_NAME,
        state_dir=platformdirs.user_state_path(APP),
        log_dir=platformdirs.user_log_path(APP),
        cache_dir=platformdirs.user_cache_path(APP),
    )
