"""``meshguard status``, ``peers``, ``ping`` and ``down``: commands that ask the running daemon.

They talk to the daemon of the chosen config directory over its control socket
(``meshguard.control``). ``register(subparsers)`` adds them to the ``meshguard`` parser; the
rendering functions are pure so tests can check the tables without a daemon.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshguard.config import config_paths
from meshguard.control import (
    ControlClient,
    MemberStatus,
    PingReport,
    StaticPeerStatus,
    Status,
    socket_path,
)
from meshguard.errors import UserError

MEMBER_STATES = ("alive", "suspect", "dead", "left")


def format_bytes(count: int) -> str:
    """Bytes in IEC units, as ``wg show`` prints them: ``0 B``, ``1.50 KiB``, ``3.00 GiB``."""
    if count < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


def format_duration(seconds: float) -> str:
    """A coarse duration: ``45s``, ``3m05s``, ``2h10m``, ``4d03h``."""
    whole = max(int(seconds), 0)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_handshake(timestamp: float | None, now: float) -> str:
    return "never" if timestamp is None else f"{format_duration(now - timestamp)} ago"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, no trailing whitespace."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = []
    for row in (header, *rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def _sorted_members(members: Sequence[MemberStatus]) -> list[MemberStatus]:
    return sorted(members, key=lambda m: (m["name"] == "-", m["name"], m["public_key"]))


def render_status(status: Status, now: float) -> str:
    """The ``meshguard status`` text: this node, one line per member, then the static
    WireGuard peers of the settings, if any."""
    node, members = status["node"], status["members"]
    static = render_static_peers(status.get("static_peers", []), now)
    states = Counter(member["state"] for member in members)
    counts = ", ".join(f"{states[state]} {state}" for state in MEMBER_STATES if states[state])
    summary = [
        f"node:      {node['public_key']}",
        f"mesh IPs:  {node['mesh_ipv4']}  {node['mesh_ipv6']}",
        f"interface: {node['interface']}, UDP port {node['listen_port']}, "
        f"{node['data_plane']} data plane, up {format_duration(node['uptime'])}",
        f"members:   {len(members)}" + (f" ({counts})" if counts else ""),
    ]
    if not members:
        return "\n".join(summary) + static
    header = ("NAME", "KEY", "MESH IPV4", "MESH IPV6", "ENDPOINT", "PATH", "STATE", "HANDSHAKE",
              "RX", "TX")  # fmt: skip
    rows = [
        (
            member["name"],
            member["public_key"][:8],
            member["mesh_ipv4"],
            member["mesh_ipv6"],
            member["endpoint"] or "-",
            member["path"],
            member["state"],
            format_handshake(member["last_handshake"], now),
            format_bytes(member["rx_bytes"]),
            format_bytes(member["tx_bytes"]),
        )
        for member in _sorted_members(members)
    ]
    return "\n".join(summary) + "\n\n" + render_table(header, rows) + static


def render_static_peers(peers: Sequence[StaticPeerStatus], now: float) -> str:
    """The static ``[[wireguard_peer]]`` table of ``status`` ("" when there are none)."""
    if not peers:
        return ""
    header = ("STATIC WIREGUARD PEER", "ALLOWED IPS", "ENDPOINT", "HANDSHAKE", "RX", "TX")
    rows = [
        (
            peer["public_key"],
            ", ".join(peer["allowed_ips"]) or "-",
            peer["endpoint"] or "-",
            format_handshake(peer["last_handshake"], now),
            format_bytes(peer["rx_bytes"]),
            format_bytes(peer["tx_bytes"]),
        )
        for peer in sorted(peers, key=lambda p: p["public_key"])
    ]
    return "\n\n" + render_table(header, rows)


def render_peers(peers: Sequence[MemberStatus], now: float) -> str:
    """The ``meshguard peers`` text: one line per WireGuard peer (members with a tunnel)."""
    if not peers:
        return "no WireGuard peers (no member has a tunnel yet)"
    header = ("NAME", "PUBLIC KEY", "ALLOWED IPS", "ENDPOINT", "HANDSHAKE", "RX", "TX")
    rows = [
        (
            peer["name"],
            peer["public_key"],
            f"{peer['mesh_ipv4']}/32, {peer['mesh_ipv6']}/128",
            peer["endpoint"] or "-",
            format_handshake(peer["last_handshake"], now),
            format_bytes(peer["rx_bytes"]),
            format_bytes(peer["tx_bytes"]),
        )
        for peer in _sorted_members(peers)
    ]
    return render_table(header, rows)


def render_ping(report: PingReport) -> str:
    """One line per ping, like ping(8): who answered, over which path, and how fast."""
    who = f"{report['name']} ({report['address']})"
    if not report["reply"]:
        return f"no reply from {who}: {report['detail'] or 'timed out'}"
    via = report["path"] + (f" {report['endpoint']}" if report["endpoint"] else "")
    return f"reply from {who} via {via}: time={report['rtt_ms']:.2f} ms"


def _config_dir(args: argparse.Namespace) -> Path:
    directory: str | None = args.config_dir
    return config_paths(None if directory is None else Path(directory).absolute()).directory


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _status(args: argparse.Namespace) -> int:
    with ControlClient(_config_dir(args)) as client:
        status = client.status()
    if args.json:
        _print_json(status)
    else:
        print(render_status(status, time.time()))
    return 0


def _peers(args: argparse.Namespace) -> int:
    with ControlClient(_config_dir(args)) as client:
        peers = client.peers()
    if args.json:
        _print_json(peers)
    else:
        print(render_peers(peers, time.time()))
    return 0


def _down(args: argparse.Namespace) -> int:
    directory = _config_dir(args)
    with ControlClient(directory) as client:
        client.down()
    path = socket_path(directory)
    deadline = time.monotonic() + args.wait
    while path.exists():
        if time.monotonic() >= deadline:
            raise UserError(f"the daemon for {directory} accepted 'down' but is still running")
        time.sleep(0.1)
    print(f"meshguard daemon for {directory} stopped")
    return 0


def _ping(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise UserError("--count must be at least 1")
    if not 0 < args.timeout <= 30:
        raise UserError("--timeout must be more than 0 and at most 30 seconds")
    if args.interval < 0:
        raise UserError("--interval must not be negative")
    rtts: list[float] = []
    with ControlClient(_config_dir(args)) as client:
        for sequence in range(args.count):
            if sequence:
                time.sleep(args.interval)
            report = client.ping(args.peer, timeout=args.timeout, ipv6=args.ipv6)
            print(render_ping(report), flush=True)
            if report["reply"] and report["rtt_ms"] is not None:
                rtts.append(report["rtt_ms"])
    if args.count > 1:
        loss = 100 * (args.count - len(rtts)) / args.count
        line = f"{args.count} sent, {len(rtts)} received, {loss:.0f}% loss"
        if rtts:
            average = sum(rtts) / len(rtts)
            line += f", rtt min/avg/max {min(rtts):.2f}/{average:.2f}/{max(rtts):.2f} ms"
        print(line)
    return 0 if rtts else 1


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``status``, ``peers``, ``ping`` and ``down`` to the ``meshguard`` command line."""
    status = subparsers.add_parser("status", help="show this node and every member")
    status.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    status.set_defaults(handler=_status)

    peers = subparsers.add_parser("peers", help="list the WireGuard peers (members with a tunnel)")
    peers.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    peers.set_defaults(handler=_peers)

    ping = subparsers.add_parser("ping", help="ping a member through the mesh")
    ping.add_argument("peer", metavar="PEER", help="a trusted name, a public key or a mesh IP")
    family = ping.add_mutually_exclusive_group()
    family.add_argument(
        "-4", dest="ipv6", action="store_false", default=None, help="ping the mesh IPv4 (default)"
    )
    family.add_argument(
        "-6", dest="ipv6", action="store_true", help="ping the mesh IPv6 (default for an IPv6 PEER)"
    )
    ping.add_argument("--count", "-c", type=int, default=1, help="pings to send (default 1)")
    ping.add_argument(
        "--timeout", type=float, default=2.0, help="seconds to wait for each reply (default 2)"
    )
    ping.add_argument(
        "--interval", type=float, default=1.0, help="seconds between pings (default 1)"
    )
    ping.set_defaults(handler=_ping)

    down = subparsers.add_parser("down", help="stop the running daemon (leaves the mesh)")
    down.add_argument(
        "--wait", type=float, default=15.0, help="seconds to wait for it to exit (default 15)"
    )
    down.set_defaults(handler=_down)
