"""``meshguard run``: the mesh daemon on a real host.

It loads this node's identity, its trusted keys (``authorized_keys/``) and its settings, opens
the TUN interface (``mg0`` unless configured otherwise) with the node's mesh IPv4 and IPv6,
routes for the whole mesh (10.99.0.0/16, fd99:6d67::/64) and for the static WireGuard peers'
allowed IPs, binds the UDP port and runs one ``Node`` (SWIM membership + WireGuard + STUN)
through the data plane until SIGINT, SIGTERM or ``meshguard down``. Trusted members become
WireGuard peers on their own (the Node does that); static ``[[wireguard_peer]]`` entries are
added to the Node's device, so plain WireGuard peers keep working next to the mesh.

Where it finds the mesh: the members of its state file, the static seeds, the DNS TXT seeds
and, with ``mdns``, trusted nodes seen on the LAN. While it runs it keeps the state file up
to date, reloads the trust store on SIGHUP and when ``authorized_keys/`` changes, answers the
control socket (status, peers, ping, down) and, with ``--metrics``, serves Prometheus text.

With ``--uapi`` (wireguard-go it starts, or ``--uapi-socket`` to attach) or ``--kernel`` the
tunnels belong to that WireGuard implementation and the daemon proxies its datagrams through
the mesh port (``meshguard.drivers.wgproxy``); ``docs/running.md`` describes the modes.

Closing the TUN removes the interface with its addresses and routes. On the way out the node
leaves the mesh gracefully (a signed LEFT record), so the others remove its tunnel at once; a
TUN interface of the same name left idle by a crash is removed (and logged) at the next start.
Log lines go to stderr as ``key=value``.

This module is the command-line side (flags, settings, logging); the engine is
``meshguard.mesh_daemon.MeshDaemon``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from meshguard.config import ConfigPaths, config_paths
from meshguard.errors import UserError
from meshguard.identity.keyfile import load_identity
from meshguard.settings import (
    Settings,
    SettingsError,
    check_data_plane,
    load_settings,
    parse_flag_endpoint,
)

log = logging.getLogger("meshguard")


class _LogfmtFormatter(logging.Formatter):
    """``time=... level=... event=... key=value ...``: one greppable line per record."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        level = record.levelname.lower()
        return f"time={stamp}.{int(record.msecs):03d}Z level={level} {record.getMessage()}"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="settings file (TOML); default: meshguard.toml in the config directory, if any",
    )
    parser.add_argument(
        "--seed",
        metavar="HOST:PORT",
        action="append",
        default=[],
        help="a member to join through (repeatable; added to the file's seeds)",
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (overrides the file)",
    )
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--kernel",
        action="store_true",
        help="data plane: the kernel's WireGuard (needs its module), configured over netlink",
    )
    modes.add_argument(
        "--uapi",
        action="store_true",
        help="data plane: start wireguard-go and drive it over its UAPI socket",
    )
    parser.add_argument(
        "--wireguard-go",
        metavar="PATH",
        help="the wireguard-go executable for --uapi (default: wireguard-go on PATH)",
    )
    parser.add_argument(
        "--uapi-socket",
        metavar="PATH",
        help="attach to a running UAPI implementation (boringtun, wireguard-go) at PATH; "
        "implies --uapi",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log debug details")
    parser.add_argument(
        "--no-offload",
        action="store_true",
        help="do not use TUN/UDP segmentation offloads (for comparison and broken kernels)",
    )


def _paths(args: argparse.Namespace) -> ConfigPaths:
    directory: str | None = getattr(args, "config_dir", None)
    return config_paths(None if directory is None else Path(directory).absolute())


def _settings(args: argparse.Namespace, paths: ConfigPaths) -> Settings:
    """The settings file, then the command line's overrides."""
    if args.config is not None:
        settings = load_settings(Path(args.config))
    elif paths.config_file.exists():
        settings = load_settings(paths.config_file)
    else:
        settings = Settings()
    extra = tuple(parse_flag_endpoint("--seed", text) for text in getattr(args, "seed", []))
    if extra:
        settings = dataclasses.replace(
            settings, seeds=tuple(dict.fromkeys(settings.seeds + extra))
        )
    metrics = getattr(args, "metrics", None)
    if metrics is not None:
        settings = dataclasses.replace(
            settings, metrics=parse_flag_endpoint("--metrics", metrics, allow_zero_port=True)
        )
    return _data_plane_flags(args, settings)


def _data_plane_flags(args: argparse.Namespace, settings: Settings) -> Settings:
    """--kernel, --uapi, --wireguard-go and --uapi-socket over the file's data plane keys."""
    wireguard_go: str | None = getattr(args, "wireguard_go", None)
    uapi_socket: str | None = getattr(args, "uapi_socket", None)
    if getattr(args, "kernel", False):
        if wireguard_go is not None or uapi_socket is not None:
            raise SettingsError("command line: --wireguard-go and --uapi-socket need --uapi")
        return dataclasses.replace(
            settings, data_plane="kernel", wireguard_go=None, uapi_socket=None
        )
    if getattr(args, "uapi", False) or wireguard_go is not None or uapi_socket is not None:
        if wireguard_go is not None and uapi_socket is not None:
            raise SettingsError("command line: give --wireguard-go or --uapi-socket, not both")
        if wireguard_go is not None or uapi_socket is not None:
            settings = dataclasses.replace(
                settings, wireguard_go=wireguard_go, uapi_socket=uapi_socket
            )
        settings = dataclasses.replace(settings, data_plane="uapi")
    check_data_plane(settings, "command line")
    return settings


def run_command(args: argparse.Namespace) -> int:
    """Run the daemon until SIGINT/SIGTERM or ``meshguard down``; returns the exit status."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogfmtFormatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    log.propagate = False

    paths = _paths(args)
    identity = load_identity(paths.private_key)
    settings = _settings(args, paths)
    # Imported here: the engine pulls in pyroute2, zeroconf, numpy and prometheus-client, which
    # the other commands (registered next to this one) should not pay for at every start.
    from meshguard.mesh_daemon import MeshDaemon

    daemon = MeshDaemon(identity, settings, paths, offloads=not args.no_offload)
    return daemon.run()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m meshguard.daemon``: the ``run`` command on its own."""
    parser = argparse.ArgumentParser(prog="meshguard run", description=__doc__)
    parser.add_argument("--config-dir", help="configuration directory")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except UserError as error:
        print(f"meshguard: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
