"""Where the configuration directory is (issue 2, item 7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshguard.config import (
    ConfigPaths,
    authorized_keys_dir,
    config_dir,
    config_file_path,
    config_paths,
    private_key_path,
)
from meshguard.errors import UserError

USER = 1000


def test_environment_variable_wins_even_for_root() -> None:
    environ = {"MESHGUARD_CONFIG_DIR": "/srv/mesh", "XDG_CONFIG_HOME": "/x", "HOME": "/home/u"}
    assert config_dir(environ, euid=0) == Path("/srv/mesh")
    assert config_dir(environ, euid=USER) == Path("/srv/mesh")


def test_relative_environment_variable_is_made_absolute() -> None:
    assert config_dir({"MESHGUARD_CONFIG_DIR": "conf"}, euid=USER) == Path.cwd() / "conf"


def test_root_uses_etc() -> None:
    assert config_dir({"XDG_CONFIG_HOME": "/x", "HOME": "/root"}, euid=0) == Path("/etc/meshguard")
    assert config_dir({"MESHGUARD_CONFIG_DIR": ""}, euid=0) == Path("/etc/meshguard")


def test_user_uses_xdg_config_home_then_home() -> None:
    assert config_dir({"XDG_CONFIG_HOME": "/x", "HOME": "/home/u"}, euid=USER) == Path(
        "/x/meshguard"
    )
    assert config_dir({"HOME": "/home/u"}, euid=USER) == Path("/home/u/.config/meshguard")
    # The XDG spec says a relative XDG_CONFIG_HOME is invalid and must be ignored.
    assert config_dir({"XDG_CONFIG_HOME": "rel", "HOME": "/home/u"}, euid=USER) == Path(
        "/home/u/.config/meshguard"
    )


def test_without_any_home_the_user_is_told_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOME", raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.raises(UserError, match="set MESHGUARD_CONFIG_DIR"):
        config_dir({}, euid=USER)


def test_defaults_follow_this_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESHGUARD_CONFIG_DIR", str(tmp_path))
    assert config_dir() == tmp_path
    assert private_key_path() == tmp_path / "private.key"
    assert authorized_keys_dir() == tmp_path / "authorized_keys"
    assert config_file_path() == tmp_path / "meshguard.toml"


def test_paths_inside_an_explicit_directory() -> None:
    paths = config_paths(Path("/d"))
    assert paths == ConfigPaths(Path("/d"))
    assert (paths.private_key, paths.authorized_keys, paths.config_file) == (
        Path("/d/private.key"),
        Path("/d/authorized_keys"),
        Path("/d/meshguard.toml"),
    )
