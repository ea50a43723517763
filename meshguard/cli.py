"""The ``meshguard`` command line.

Every subcommand group is a ``register(subparsers)`` function in ``REGISTRARS``: it adds its
parsers and sets ``handler`` (``Callable[[argparse.Namespace], int]``, returning the exit
status) with ``set_defaults``. Another module contributes subcommands (the daemon's ``run``, for
one) by defining such a function and having it listed in ``REGISTRARS``; ``config_paths_of``
gives its handler the configuration directory the user chose.

A user's mistake raises ``UserError`` anywhere below; ``main`` prints it as one line,
``meshguard: error: <message>``, and returns 2, as it does for command-line syntax errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeAlias

from meshguard import __version__
from meshguard.config import ConfigPaths, config_paths
from meshguard.errors import UserError
from meshguard.identity.keyfile import load_identity, save_identity
from meshguard.identity.keys import Identity, public_key_to_base64
from meshguard.identity.meshaddr import find_collisions, mesh_ipv4, mesh_ipv6
from meshguard.identity.trust import (
    TrustedKey,
    TrustStore,
    TrustStoreError,
    check_name,
    is_valid_name,
    public_key_from_argument,
)

PROG = "meshguard"
USER_ERROR_STATUS = 2

Subparsers: TypeAlias = "argparse._SubParsersAction[_Parser]"
Registrar = Callable[[Subparsers], None]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose syntax errors are UserErrors, so they print as one line too."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see '{self.prog} --help')")


def config_paths_of(args: argparse.Namespace) -> ConfigPaths:
    """The configuration paths for this invocation: ``--config-dir`` or ``config_dir()``."""
    directory: str | None = args.config_dir
    return config_paths(None if directory is None else Path(directory).absolute())


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _own_identity_if_usable(paths: ConfigPaths) -> Identity | None:
    """This node's identity, or None if there is none yet (or it is unusable)."""
    try:
        return load_identity(paths.private_key)
    except UserError:
        return None


def _ensure_config_dir(paths: ConfigPaths) -> None:
    """Create the configuration directory, private to its owner, if it does not exist."""
    try:
        paths.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot create the config directory {paths.directory}: {error.strerror}"
        ) from None


def _keygen(args: argparse.Namespace) -> int:
    paths = config_paths_of(args)
    if not args.force and os.path.lexists(paths.private_key):
        raise UserError(
            f"refusing to overwrite the existing key file {paths.private_key} "
            "(use --force to replace it)"
        )
    _ensure_config_dir(paths)
    identity = Identity.generate(os.urandom)
    save_identity(paths.private_key, identity, force=args.force)
    print(f"new identity saved to {paths.private_key}")
    print(f"public key: {public_key_to_base64(identity.public_key)}")
    print(f"mesh IPv4:  {mesh_ipv4(identity.public_key)}")
    print(f"mesh IPv6:  {mesh_ipv6(identity.public_key)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    identity = load_identity(config_paths_of(args).private_key)
    key = identity.x25519_public if args.wg else identity.public_key
    print(public_key_to_base64(key))
    return 0


def _ip(args: argparse.Namespace) -> int:
    paths = config_paths_of(args)
    if args.key is None:
        public_key = load_identity(paths.private_key).public_key
    else:
        public_key = _peer_key(args.key, TrustStore(paths.authorized_keys))
    print(mesh_ipv4(public_key))
    print(mesh_ipv6(public_key))
    return 0


def _peer_key(key_name_or_file: str, store: TrustStore) -> bytes:
    """A key given as base64, as a ``.pub`` file, or as the name of a trusted peer."""
    try:
        return public_key_from_argument(key_name_or_file)
    except TrustStoreError as error:
        if not is_valid_name(key_name_or_file):
            raise
        not_a_key = error
    for trusted in store.list():
        if trusted.name == key_name_or_file:
            return trusted.public_key
    raise UserError(f"{not_a_key}, and no trusted peer has that name")


def _register_identity(subparsers: Subparsers) -> None:
    keygen = subparsers.add_parser("keygen", help="create this node's identity key")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    keygen.set_defaults(handler=_keygen)

    export = subparsers.add_parser("export", help="print this node's public key (base64)")
    export.add_argument(
        "--wg", action="store_true", help="print the X25519 key for plain WireGuard peers"
    )
    export.set_defaults(handler=_export)

    ip = subparsers.add_parser("ip", help="print the mesh IPv4 and IPv6 addresses")
    ip.add_argument(
        "key",
        nargs="?",
        metavar="KEY",
        help="a base64 public key, a .pub file or a trusted peer's name (default: this node)",
    )
    ip.set_defaults(handler=_ip)


def _trust_add(args: argparse.Namespace) -> int:
    paths = config_paths_of(args)
    store = TrustStore(paths.authorized_keys)
    check_name(args.name)
    public_key = public_key_from_argument(args.key_or_file)
    own = _own_identity_if_usable(paths)
    if own is not None and own.public_key == public_key:
        raise UserError("that is this node's own public key")
    _ensure_config_dir(paths)
    added = store.add(args.name, public_key)
    print(f"trusted {added.name}: {public_key_to_base64(public_key)}")
    names = {trusted.public_key: trusted.name for trusted in store.list()}
    if own is not None:
        names[own.public_key] = "this node"
    for address, keys in find_collisions(names):
        if public_key in keys:
            others = ", ".join(names[key] for key in keys if key != public_key)
            _warn(f"{added.name}'s mesh address {address} is also that of {others}")
    return 0


def _trust_remove(args: argparse.Namespace) -> int:
    store = TrustStore(config_paths_of(args).authorized_keys)
    for name in store.remove(args.name_or_key):
        print(f"removed {name}")
    return 0


def _trust_list(args: argparse.Namespace) -> int:
    store = TrustStore(config_paths_of(args).authorized_keys)
    loaded = store.load()
    for problem in loaded.problems:
        _warn(f"{store.directory}/{problem}")
    width = max((len(trusted.name) for trusted in loaded.keys), default=0)
    for trusted in loaded.keys:
        print(f"{trusted.name:<{width}}  {_describe(trusted)}")
    if not loaded.keys:
        print(f"{PROG}: no trusted keys in {store.directory}", file=sys.stderr)
    return 0


def _describe(trusted: TrustedKey) -> str:
    key = trusted.public_key
    return f"{public_key_to_base64(key)}  {mesh_ipv4(key)}  {mesh_ipv6(key)}"


def _register_trust(subparsers: Subparsers) -> None:
    trust = subparsers.add_parser("trust", help="manage the trusted peers (authorized_keys/)")
    actions = trust.add_subparsers(dest="trust_action", metavar="ACTION", required=True)

    add = actions.add_parser("add", help="trust a peer's public key")
    add.add_argument("key_or_file", metavar="KEY_OR_FILE", help="base64 key or a .pub file")
    add.add_argument("--name", required=True, help="the peer's name (A-Z a-z 0-9 . _ -)")
    add.set_defaults(handler=_trust_add)

    remove = actions.add_parser("remove", help="stop trusting a peer")
    remove.add_argument("name_or_key", metavar="NAME_OR_KEY")
    remove.set_defaults(handler=_trust_remove)

    listing = actions.add_parser("list", help="list the trusted peers and their mesh addresses")
    listing.set_defaults(handler=_trust_list)


def _config_show(args: argparse.Namespace) -> int:
    """Report the configuration and every problem found, without failing on them."""
    paths = config_paths_of(args)
    print(f"config dir:      {paths.directory}")
    own: Identity | None = None
    if not os.path.lexists(paths.private_key):
        print(f"private key:     {paths.private_key} (missing: run '{PROG} keygen')")
    else:
        try:
            own = load_identity(paths.private_key)
        except UserError as error:
            print(f"private key:     {paths.private_key} (unusable: {error})")
    if own is not None:
        print(f"private key:     {paths.private_key} (present)")
        print(f"public key:      {public_key_to_base64(own.public_key)}")
        print(f"wireguard key:   {public_key_to_base64(own.x25519_public)}")
        print(f"mesh IPv4:       {mesh_ipv4(own.public_key)}")
        print(f"mesh IPv6:       {mesh_ipv6(own.public_key)}")
    store = TrustStore(paths.authorized_keys)
    try:
        loaded = store.load()
    except TrustStoreError as error:
        print(f"authorized keys: {store.directory} (unusable: {error})")
        return 0
    print(f"authorized keys: {store.directory} ({len(loaded.keys)} trusted)")
    for problem in loaded.problems:
        print(f"  problem:       {problem}")
    names = {trusted.public_key: trusted.name for trusted in loaded.keys}
    if own is not None:
        names[own.public_key] = "this node"
    for address, keys in find_collisions(names):
        print(f"  collision:     {address} is claimed by {', '.join(names[key] for key in keys)}")
    return 0


def _register_config(subparsers: Subparsers) -> None:
    config = subparsers.add_parser("config", help="inspect the configuration")
    actions = config.add_subparsers(dest="config_action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="show paths, this node's key and any problems")
    show.set_defaults(handler=_config_show)


def _register_daemon(subparsers: Subparsers) -> None:
    from meshguard import daemon

    run = subparsers.add_parser("run", aliases=["up"], help="run the mesh daemon (root)")
    daemon.add_run_arguments(run)
    run.set_defaults(handler=daemon.run_command)


def _register_demo(subparsers: Subparsers) -> None:
    from meshguard import demo

    parser = subparsers.add_parser(
        "demo", help="build a mesh of network namespaces on this machine and show it (root)"
    )
    demo.add_demo_arguments(parser)
    parser.set_defaults(handler=demo.demo_command)


def _register_netcheck(subparsers: Subparsers) -> None:
    from meshguard import netcheck

    check = subparsers.add_parser(
        "netcheck", help="discover public endpoints, NAT mapping, filtering and hairpinning"
    )
    netcheck.add_netcheck_arguments(check)
    check.set_defaults(handler=netcheck.netcheck_command)


def _register_control(subparsers: Subparsers) -> None:
    from meshguard import cli_control

    cli_control.register(subparsers)


REGISTRARS: tuple[Registrar, ...] = (
    _register_identity,
    _register_trust,
    _register_config,
    _register_daemon,
    _register_demo,
    _register_control,
    _register_netcheck,
)


def build_parser(registrars: Sequence[Registrar] = REGISTRARS) -> argparse.ArgumentParser:
    """The full command-line parser: global options plus every registrar's subcommands."""
    parser = _Parser(prog=PROG, description="A decentralized mesh VPN built on WireGuard.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--config-dir",
        metavar="DIR",
        help="configuration directory (default: $MESHGUARD_CONFIG_DIR, /etc/meshguard for "
        "root, else $XDG_CONFIG_HOME/meshguard or ~/.config/meshguard)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in registrars:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else 0
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except UserError as error:
        message = " ".join(str(error).splitlines())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return USER_ERROR_STATUS
