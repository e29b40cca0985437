from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from guestsafe.engine.errors import ConfigError
from guestsafe.engine.paths import Paths


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def no_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GUESTSAFE_HOME", raising=False)


def test_guestsafe_home_puts_everything_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUESTSAFE_HOME", str(tmp_path / "gs"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # wins even for root
    p = Paths.default()
    assert p == Paths(
        config_file=tmp_path / "gs" / "config" / "jobs.toml",
        state_dir=tmp_path / "gs" / "state",
        log_dir=tmp_path / "gs" / "log",
        cache_dir=tmp_path / "gs" / "cache",
    )


def test_guestsafe_home_relative_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GUESTSAFE_HOME", "sandbox")
    assert Paths.default().state_dir == tmp_path / "sandbox" / "state"


@pytest.mark.usefixtures("no_home")
def test_root_gets_site_dirs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert Paths.default() == Paths(
        config_file=Path("/etc/guestsafe/jobs.toml"),
        state_dir=Path("/var/lib/guestsafe"),
        log_dir=Path("/var/log/guestsafe"),
        cache_dir=Path("/var/cache/guestsafe"),
    )


@pytest.mark.usefixtures("no_home")
def test_empty_guestsafe_home_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUESTSAFE_HOME", "")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert Paths.default().state_dir == Path("/var/lib/guestsafe")


@pytest.mark.usefixtures("no_home")
def test_non_root_gets_user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "st"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "ca"))
    p = Paths.default()
    assert p.config_file == tmp_path / "cfg" / "guestsafe" / "jobs.toml"
    assert p.state_dir == tmp_path / "st" / "guestsafe"
    assert p.log_dir.is_relative_to(tmp_path / "st" / "guestsafe")
    assert p.cache_dir == tmp_path / "ca" / "guestsafe"


@pytest.mark.parametrize("euid", [0, 1000])
@pytest.mark.usefixtures("no_home")
def test_config_option_overrides_only_the_config_file(
    euid: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    plain = Paths.default()
    custom = Paths.default(config_file=tmp_path / "other.toml")
    assert custom.config_file == tmp_path / "other.toml"
    assert (custom.state_dir, custom.log_dir, custom.cache_dir) == (
        plain.state_dir,
        plain.log_dir,
        plain.cache_dir,
    )


def test_config_option_with_guestsafe_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUESTSAFE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    p = Paths.default(config_file=Path("mine.toml"))
    assert p.config_file == tmp_path / "mine.toml"
    assert p.state_dir == tmp_path / "state"


def test_ensure_creates_private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUESTSAFE_HOME", str(tmp_path / "a" / "gs"))
    old = os.umask(0o022)
    try:
        p = Paths.default()
        p.ensure()
    finally:
        os.umask(old)
    for d in (p.config_file.parent, p.state_dir, p.log_dir, p.cache_dir, tmp_path / "a"):
        assert d.is_dir()
        assert _mode(d) == 0o700, d
    assert not p.config_file.exists()


def test_ensure_mode_is_exact_whatever_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GUESTSAFE_HOME", str(tmp_path / "gs"))
    old = os.umask(0o277)
    try:
        Paths.default().ensure()
    finally:
        os.umask(old)
    assert _mode(tmp_path / "gs" / "state") == 0o700


def test_ensure_leaves_existing_dirs_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUESTSAFE_HOME", str(tmp_path))
    (tmp_path / "log").mkdir(mode=0o755)
    (tmp_path / "log").chmod(0o755)
    home_mode = _mode(tmp_path)
    Paths.default().ensure()
    Paths.default().ensure()  # idempotent
    assert _mode(tmp_path / "log") == 0o755
    assert _mode(tmp_path) == home_mode
    assert _mode(tmp_path / "state") == 0o700


def test_ensure_failure_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("GUESTSAFE_HOME", str(tmp_path / "file" / "gs"))
    with pytest.raises(ConfigError, match="cannot create directory"):
        Paths.default().ensure()
