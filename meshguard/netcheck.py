"""``meshguard netcheck``: what the NAT in front of this host does, and how members are reached.

It binds one UDP port (``--port``, default any), runs ``NatProber`` against the STUN servers
given with ``--stun`` (else the config directory's ``stun_servers``, else the public defaults)
and prints the public endpoints, the mapping and filtering behaviour and whether hairpinning
works. When a daemon runs for the config directory, it also asks it (control socket) how each
member is reached: directly, punched, relayed, or not at all. Without a daemon it says so in
one line. ``add_netcheck_arguments`` and ``netcheck_command`` are what the ``meshguard`` CLI
registers; ``python -m meshguard.netcheck`` runs it directly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from meshguard.config import config_paths
from meshguard.control import ControlClient, Status
from meshguard.drivers.stun_socket import (
    UsageError,
    endpoint_text,
    local_addresses,
    open_udp_socket,
    resolve_server,
    run_prober,
)
from meshguard.errors import UserError
from meshguard.sansio.messages import NatFiltering, NatMapping
from meshguard.sansio.natdetect import NatProber, NatReport
from meshguard.sansio.stun import StunTiming
from meshguard.settings import load_settings

DEFAULT_STUN_SERVERS = ("stun.l.google.com:19302", "stun1.l.google.com:19302")
"""Public servers on two addresses, so mapping behaviour can be compared; used only when the
user names none. They do not support RFC 5780, so filtering stays unknown with them."""

STUN_PORT = 3478
SOFTWARE = "meshguard netcheck"

_MAPPING_WORDS = {
    NatMapping.UNKNOWN: "unknown",
    NatMapping.NONE: "none (no NAT: the public address is a local one)",
    NatMapping.ENDPOINT_INDEPENDENT: "endpoint-independent",
    NatMapping.ADDRESS_DEPENDENT: "address-dependent",
    NatMapping.ADDRESS_AND_PORT_DEPENDENT: "address-and-port-dependent",
}
_FILTERING_WORDS = {
    NatFiltering.UNKNOWN: "unknown",
    NatFiltering.ENDPOINT_INDEPENDENT: "endpoint-independent",
    NatFiltering.ADDRESS_DEPENDENT: "address-dependent",
    NatFiltering.ADDRESS_AND_PORT_DEPENDENT: "address-and-port-dependent",
}


def add_netcheck_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stun",
        action="append",
        metavar="HOST:PORT",
        help="STUN server to ask (repeat; at least two addresses, or one RFC 5780 server, "
        f"to learn the mapping behaviour); default: {', '.join(DEFAULT_STUN_SERVERS)}",
    )
    parser.add_argument(
        "--port", type=int, default=0, help="local UDP port to probe from (default: any)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--rto",
        type=float,
        default=0.25,
        metavar="SECONDS",
        help="first STUN retransmission timeout; a silent server is given up after 15x this",
    )


def report_as_dict(report: NatReport) -> dict[str, object]:
    """The report as JSON-ready data (enum values by name, lower case)."""
    return {
        "public_endpoints": [endpoint_text((e.host, e.port)) for e in report.public_endpoints],
        "mapping": report.nat.mapping.name.lower().replace("_", "-"),
        "filtering": report.nat.filtering.name.lower().replace("_", "-"),
        "filtering_server": (
            None if report.filtering_server is None else endpoint_text(report.filtering_server)
        ),
        "hairpinning": report.nat.hairpinning if report.hairpinning_tested else None,
        "observations": [
            {"server": endpoint_text(o.destination), "mapped": endpoint_text(o.mapped)}
            for o in report.observations
        ],
        "unanswered": [endpoint_text(a) for a in report.unanswered],
    }


def format_report(report: NatReport) -> str:
    """The report for a person to read."""
    public = ", ".join(endpoint_text((e.host, e.port)) for e in report.public_endpoints)
    filtering = _FILTERING_WORDS[report.nat.filtering]
    if report.filtering_server is not None:
        filtering += f" (tested with {endpoint_text(report.filtering_server)})"
    else:
        filtering += " (needs an RFC 5780 STUN server)"
    if report.hairpinning_tested:
        hairpin = "yes" if report.nat.hairpinning else "no"
    else:
        hairpin = "not tested (no public address learned)"
    lines = [
        f"public endpoints: {public or 'none learned'}",
        f"mapping:          {_MAPPING_WORDS[report.nat.mapping]}",
        f"filtering:        {filtering}",
        f"hairpinning:      {hairpin}",
        "servers:",
    ]
    lines += [
        f"  {endpoint_text(o.destination)} sees {endpoint_text(o.mapped)}"
        for o in report.observations
    ]
    lines += [f"  {endpoint_text(a)} did not answer" for a in report.unanswered]
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class MemberReach:
    """How the daemon reaches one member: ``reach`` is "direct", "punched", "relayed" or
    "unreachable"; ``endpoint`` is where its datagrams go (the relay's address when relayed)."""

    name: str
    public_key: str
    mesh_ipv4: str
    state: str
    reach: str
    endpoint: str | None


@dataclass(frozen=True, slots=True)
class MemberReport:
    """The daemon's view of the members, or why there is none (``members`` is None)."""

    members: list[MemberReach] | None
    detail: str


_REACHED = ("direct", "punched", "relayed")


def reachability(status: Status) -> list[MemberReach]:
    """Each member of a daemon's status by how it is reached, sorted by name then key.

    A member counts as reached only while it is alive or suspect and has a path; a dead or
    departed member, or one whose path is still being searched for, is "unreachable"."""
    rows = []
    for member in status["members"]:
        usable = member["state"] in ("alive", "suspect") and member["path"] in _REACHED
        rows.append(
            MemberReach(
                name=member["name"],
                public_key=member["public_key"],
                mesh_ipv4=member["mesh_ipv4"],
                state=member["state"],
                reach=member["path"] if usable else "unreachable",
                endpoint=member["endpoint"] if usable else None,
            )
        )
    return sorted(rows, key=lambda row: (row.name, row.public_key))


def member_report(config_dir: Path | None) -> MemberReport:
    """Ask the daemon of ``config_dir`` (None: the default directory) about its members."""
    try:
        directory = config_paths(config_dir).directory
        with ControlClient(directory, timeout=3) as client:
            status = client.status()
    except UserError as error:
        return MemberReport(None, " ".join(str(error).splitlines()))
    return MemberReport(reachability(status), f"from the daemon of {directory}")


def format_members(report: MemberReport) -> str:
    """The member table for a person, or one line saying why there is none."""
    if report.members is None:
        return f"members:          unknown ({report.detail})"
    if not report.members:
        return f"members:          none ({report.detail})"
    lines = [f"members ({report.detail}):"]
    width = max(len(row.name) for row in report.members)
    for row in report.members:
        via = "" if row.endpoint is None else f" via {row.endpoint}"
        state = "" if row.state == "alive" else f" ({row.state})"
        lines.append(f"  {row.name:<{width}}  {row.mesh_ipv4:<15}  {row.reach}{via}{state}")
    return "\n".join(lines)


def members_as_dict(report: MemberReport) -> dict[str, object]:
    """The member report as JSON-ready data (``members`` null without a daemon)."""
    return {
        "members": None if report.members is None else [asdict(row) for row in report.members],
        "members_detail": report.detail,
    }


def _configured_stun_servers(config_dir: Path | None) -> list[str]:
    """The config directory's ``stun_servers`` (none without a settings file)."""
    try:
        path = config_paths(config_dir).config_file
    except UserError:
        return []
    if not path.exists():
        return []
    return [str(server) for server in load_settings(path).stun_servers]


def netcheck_command(args: argparse.Namespace) -> int:
    """Run the probe, then ask the daemon (if any) about its members; 0 when some STUN server
    answered, 1 when none did.

    Bad input (an unparsable or unresolvable server, a port that cannot be bound, an invalid
    settings file) raises ``UserError`` before anything is sent.
    """
    directory = getattr(args, "config_dir", None)
    config_dir = None if directory is None else Path(directory).absolute()
    texts: Sequence[str] = args.stun or _configured_stun_servers(config_dir) or DEFAULT_STUN_SERVERS
    if args.rto <= 0:
        raise UserError("--rto must be positive")
    try:
        servers = list(dict.fromkeys(resolve_server(text, STUN_PORT) for text in texts))
        dual_stack = any(":" in host for host, _ in servers)
        sock = open_udp_socket("0.0.0.0", args.port, dual_stack=dual_stack)
    except UsageError as exc:
        raise UserError(str(exc)) from exc
    except (OSError, OverflowError) as exc:
        raise UserError(f"cannot bind UDP port {args.port}: {exc}") from exc
    with sock:
        prober = NatProber(
            servers,
            local_addresses(sock),
            os.urandom,
            StunTiming(rto=args.rto, transmissions=4, last_wait_factor=8),
            SOFTWARE,
        )
        report = run_prober(sock, prober)
    members = member_report(config_dir)
    if args.json:
        print(json.dumps({**report_as_dict(report), **members_as_dict(members)}, indent=2))
    else:
        print(format_report(report))
        print(format_members(members))
    return 0 if report.observations else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="meshguard netcheck",
        description="Find out what the NAT in front of this host does.",
    )
    parser.add_argument(
        "--config-dir",
        metavar="DIR",
        help="configuration directory whose daemon and stun_servers to use (default: as meshguard)",
    )
    add_netcheck_arguments(parser)
    try:
        return netcheck_command(parser.parse_args(argv))
    except UserError as error:
        print(f"meshguard: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
