"""Where meshguard keeps its files.

The configuration directory is, first match wins:

1. ``$MESHGUARD_CONFIG_DIR`` (the CLI's ``--config-dir`` overrides it);
2. ``/etc/meshguard`` when running as root (a system daemon);
3. ``$XDG_CONFIG_HOME/meshguard`` if that variable holds an absolute path;
4. ``~/.config/meshguard``.

Inside it: ``private.key`` (the identity, see ``meshguard.identity.keyfile``), ``authorized_keys/``
(trusted peers, see ``meshguard.identity.trust``) and ``meshguard.toml`` (daemon settings).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from meshguard.errors import UserError

CONFIG_DIR_ENV = "MESHGUARD_CONFIG_DIR"
SYSTEM_CONFIG_DIR = Path("/etc/meshguard")
PRIVATE_KEY_NAME = "private.key"
AUTHORIZED_KEYS_NAME = "authorized_keys"
CONFIG_FILE_NAME = "meshguard.toml"


def config_dir(environ: Mapping[str, str] | None = None, euid: int | None = None) -> Path:
    """The configuration directory (see the module docstring); arguments default to this process.

    Raises UserError if it depends on a home directory that cannot be determined.
    """
    environ = os.environ if environ is None else environ
    euid = os.geteuid() if euid is None else euid
    explicit = environ.get(CONFIG_DIR_ENV, "")
    if explicit:
        return Path(explicit).absolute()
    if euid == 0:
        return SYSTEM_CONFIG_DIR
    xdg_config_home = environ.get("XDG_CONFIG_HOME", "")
    if xdg_config_home and Path(xdg_config_home).is_absolute():
        return Path(xdg_config_home) / "meshguard"
    home = environ.get("HOME", "")
    if not home:
        try:
            home = str(Path.home())
        except RuntimeError:
            raise UserError(f"cannot determine the home directory; set {CONFIG_DIR_ENV}") from None
    return Path(home) / ".config" / "meshguard"


@dataclass(frozen=True, slots=True)
class ConfigPaths:
    """The files of one configuration directory."""

    directory: Path

    @property
    def private_key(self) -> Path:
        return self.directory / PRIVATE_KEY_NAME

    @property
    def authorized_keys(self) -> Path:
        return self.directory / AUTHORIZED_KEYS_NAME

    @property
    def config_file(self) -> Path:
        return self.directory / CONFIG_FILE_NAME


def config_paths(directory: Path | None = None) -> ConfigPaths:
    """The paths inside ``directory``, or inside ``config_dir()`` if none is given."""
    return ConfigPaths(config_dir() if directory is None else directory)


def private_key_path(directory: Path | None = None) -> Path:
    """``<config dir>/private.key``."""
    return config_paths(directory).private_key


def authorized_keys_dir(directory: Path | None = None) -> Path:
    """``<config dir>/authorized_keys``."""
    return config_paths(directory).authorized_keys


def config_file_path(directory: Path | None = None) -> Path:
    """``<config dir>/meshguard.toml``."""
    return config_paths(directory).config_file
