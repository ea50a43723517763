"""Hole punching and relaying between real ``meshguard run`` daemons behind real Linux NAT.

The lab (network namespaces, all addresses inside it)::

    A 192.168.1.2 ─ nat1 198.51.100.1 (masquerade + firewall) ──────────┐
    B 192.168.2.2 ─ nat2 198.51.101.1 (masquerade + firewall) ──────────┤
    C 192.168.3.2 ─ nat3 198.51.102.1 (masquerade fully-random + fw.) ──┤
    D 192.168.4.2 ─ nat4 198.51.103.1 (masquerade fully-random + fw.) ──┤─ wan (router, counters)
    E 192.168.5.2 ─ nat5 198.51.104.1 (bare masquerade) ────────────────┤
    F 192.168.6.2 ─ nat6 198.51.105.1 (bare masquerade) ────────────────┤
    R 203.0.113.1 (public, relay = true) ───────────────────────────────┘

Every host runs ``meshguard run`` (LAN SWIM profile, no mDNS) with R as its only seed and its
only STUN server; R answers STUN on its mesh port. Masquerade keeps the source port when it is
free (endpoint-independent mapping); the firewall of a home router (an input chain admitting
only established flows) drops unsolicited inbound datagrams (port-restricted filtering): A and
B must punch. ``fully-random`` gives every destination a random port (symmetric NAT): C and D
cannot punch and must be relayed through R. E and F sit behind masquerade without a firewall,
as in tests/test_nat_real.py: there a datagram from the peer that arrives before the host has
sent to it is accepted into conntrack, and the host's own flow to that peer then clashes with
it and leaves from a random port (kernel 6.x). meshguard sends its first datagrams to a member
whose NAT has not opened toward it with IP TTL 2: they open the own NAT and die in the wan
router, one hop before the peer's NAT, so E and F are punched too. Named nftables counters in
the wan router count the UDP bytes between public addresses, which shows where the tunnel
traffic really went.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from meshguard.config import config_paths
from meshguard.identity.trust import TrustStore
from tests.daemon_host import DaemonHost
from tests.dataplane_lab import tcp_transfer
from tests.netns import Lab, Namespace, wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(180)]

PORT = 51821
RELAY_IP = "203.0.113.1"
RELAY = f"{RELAY_IP}:{PORT}"
NATS = {
    "A": (1, "masquerade", True),
    "B": (2, "masquerade", True),
    "C": (3, "masquerade fully-random", True),
    "D": (4, "masquerade fully-random", True),
    "E": (5, "masquerade", False),
    "F": (6, "masquerade", False),
}
"""Host behind each NAT box: (index, masquerade statement, whether the box has a firewall)."""
PUNCH_BOUND = 60.0
"""Seconds from starting the daemons until every pair has its final path (see ``final``)."""
RESEARCH_BOUND = 10.0
"""Seconds to allow at least for a path that was lost to be found again (relay: ~4.5 s)."""
CONNECTED_BOUND = 90.0
"""Seconds from starting the daemons until every member sees every other alive with a path.
Membership itself converges slowly across these NATs: a member has been seen to learn of
another only 22 s after both started, and all pairs were connected 34-47 s after the start."""
TRANSFER = 2_000_000
MTU = 1420
"""The default tunnel MTU. Relayed members get host routes with MTU 1280, so a relayed
datagram (1280 + 32 WireGuard + 156 envelope bytes + 28 IPv4/UDP = 1496; WireGuard's padding
to 16 bytes rules out 1284) is never fragmented; the wan router counts IP fragments to prove
it."""


def public_ip(name: str) -> str:
    return f"198.51.{99 + NATS[name][0]}.1"


@dataclass
class Host(DaemonHost):
    def configure(self, *, relay: bool) -> None:
        """R seeds nobody and asks no STUN server; everyone else uses R for both."""
        relay_only = [] if relay else [f'"{RELAY}"']
        self.write_settings(
            f"listen_port = {PORT}\n"
            f"mtu = {MTU}\n"
            'swim_profile = "lan"\n'
            "mdns = false\n"
            f"seeds = [{', '.join(relay_only)}]\n"
            f"stun_servers = [{', '.join(relay_only)}]\n"
            f"relay = {'true' if relay else 'false'}\n"
        )

    def cli(self, *args: str, directory: Path | None = None) -> str:
        """``meshguard`` in this host's namespace; asserts success and returns stdout."""
        proc = super().cli(*args, in_namespace=True, directory=directory)
        assert proc.returncode == 0, f"meshguard {' '.join(args)} on {self.name}: {proc.stderr}"
        return proc.stdout

    def members(self, by: str = "name") -> dict[str, dict[str, Any]]:
        """This host's member rows by name ({} if the daemon does not answer)."""
        return super().members(by)


@dataclass
class Mesh:
    lab: Lab
    hosts: dict[str, Host]
    nats: dict[str, Namespace]
    wan: Namespace
    started: float
    timings: dict[str, float] = field(default_factory=dict)

    def counter(self, name: str) -> int:
        """Bytes counted so far by the wan router's named counter ``name``."""
        out = self.wan.run(["nft", "list", "counter", "ip", "watch", name]).stdout
        match = re.search(r"bytes (\d+)", out)
        assert match, out
        return int(match.group(1))

    def counters(self) -> dict[str, int]:
        return {name: self.counter(name) for name in (*COUNTERS, "fragments")}

    def transfer(self, source: str, target: str) -> tuple[dict[str, int], int]:
        """TCP ``TRANSFER`` bytes from ``source`` to ``target``'s mesh IPv4, checked intact;
        returns what the wan counters and R's own relay byte counter grew by meanwhile."""
        before = self.counters()
        relayed_before = self.hosts["R"].status()["counters"]["relay_forwarded_bytes"]
        a, b = self.hosts[source], self.hosts[target]
        sent, received = tcp_transfer(a.ns, b.ns, b.ipv4, TRANSFER)
        assert sent == received and sent.startswith(f"{TRANSFER} ")
        after = self.counters()
        relayed = self.hosts["R"].status()["counters"]["relay_forwarded_bytes"] - relayed_before
        delta = {name: after[name] - before[name] for name in after}
        print(f"wan UDP bytes during the {source}->{target} transfer:", delta, "relayed:", relayed)
        return delta, relayed


COUNTERS = {
    "a_b": ("198.51.100.1", "198.51.101.1"),
    "b_a": ("198.51.101.1", "198.51.100.1"),
    "a_r": ("198.51.100.1", RELAY_IP),
    "c_d": ("198.51.102.1", "198.51.103.1"),
    "d_c": ("198.51.103.1", "198.51.102.1"),
    "c_r": ("198.51.102.1", RELAY_IP),
    "r_d": (RELAY_IP, "198.51.103.1"),
    "e_f": ("198.51.104.1", "198.51.105.1"),
    "f_e": ("198.51.105.1", "198.51.104.1"),
    "e_r": ("198.51.104.1", RELAY_IP),
}
"""Named counters of UDP bytes from one public address to another, in the wan router."""


def _nft(ns: Namespace, ruleset: str) -> None:
    proc = subprocess.run(
        ns.exec_argv(["nft", "-f", "-"]), input=ruleset, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"nft failed: {proc.stderr.strip()}\n{ruleset}")


def _nat_box(lab: Lab, wan: Namespace, name: str) -> tuple[Namespace, Namespace]:
    index, masquerade, firewall = NATS[name]
    nat = lab.namespace(f"nat{index}")
    lan = lab.namespace(name.lower())
    wan_if, _ = lab.link(nat, wan, f"{public_ip(name)}/24", f"198.51.{99 + index}.254/24")
    lab.link(lan, nat, f"192.168.{index}.2/24", f"192.168.{index}.1/24")
    nat.run(["ip", "route", "add", "default", "via", f"198.51.{99 + index}.254"])
    lan.run(["ip", "route", "add", "default", "via", f"192.168.{index}.1"])
    nat.sysctl("net.ipv4.ip_forward", "1")
    _nft(
        nat,
        "table ip nat {\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority 100;\n"
        f'    oifname "{wan_if}" {masquerade}\n'
        "  }\n"
        "}\n",
    )
    if firewall:
        _nft(
            nat,
            "table inet firewall {\n"
            "  chain input {\n"
            "    type filter hook input priority 0; policy accept;\n"
            f'    iifname "{wan_if}" ct state established,related accept\n'
            f'    iifname "{wan_if}" drop\n'
            "  }\n"
            "}\n",
        )
    return nat, lan


def _watch_wan(wan: Namespace) -> None:
    counters = "".join(f"  counter {name} {{}}\n" for name in COUNTERS)
    rules = "".join(
        f"    ip saddr {src} ip daddr {dst} meta l4proto udp counter name {name}\n"
        for name, (src, dst) in COUNTERS.items()
    )
    _nft(
        wan,
        "table ip watch {\n"
        f"{counters}"
        "  counter fragments {}\n"
        "  chain before_defrag {\n"
        "    type filter hook prerouting priority -500; policy accept;\n"
        "    ip frag-off & 0x3fff != 0 counter name fragments\n"
        "  }\n"
        "  chain forward {\n"
        "    type filter hook forward priority 0; policy accept;\n"
        f"{rules}"
        "  }\n"
        "}\n",
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("natmesh")
    with Lab(prefix="mgpunch") as lab:
        wan = lab.namespace("wan")
        wan.sysctl("net.ipv4.ip_forward", "1")
        relay_ns = lab.namespace("r")
        lab.link(relay_ns, wan, f"{RELAY_IP}/24", "203.0.113.254/24")
        relay_ns.run(["ip", "route", "add", "default", "via", "203.0.113.254"])
        hosts = {"R": Host("R", relay_ns, root / "R")}
        nats = {}
        for name in NATS:
            nats[name], ns = _nat_box(lab, wan, name)
            hosts[name] = Host(name, ns, root / name)
        _watch_wan(wan)
        for host in hosts.values():
            for other in hosts.values():
                if other is not host:
                    TrustStore(config_paths(host.directory).authorized_keys).add(
                        other.name, other.key
                    )
            host.configure(relay=host.name == "R")
        started = time.monotonic()
        hosts["R"].launch()
        wait_until(hosts["R"].started, timeout=30, what="R to start")
        for name in NATS:
            hosts[name].launch()
        wait_until(
            lambda: all(host.started() for host in hosts.values()),
            timeout=30,
            what="every daemon to start",
        )
        mesh = Mesh(lab, hosts, nats, wan, started)
        mesh.timings["daemons_started"] = round(time.monotonic() - started, 2)
        try:
            _record_path_times(mesh)
            yield mesh
        finally:
            for host in hosts.values():
                if host.process is not None:
                    lab.stop(host.process)
            print("\nNAT traversal timings:", json.dumps(mesh.timings))
            for host in hosts.values():
                tail = "\n".join(host.log().splitlines()[-15:])
                print(f"--- {host.name} log tail ---\n{tail}")


def final(x: str, y: str) -> set[str]:
    """The kinds of path ``x`` should end up with toward ``y``: R is public (direct); a
    symmetric NAT on either side leaves only the relay; masquerade on both sides, with or
    without a firewall, is punched (direct: a direct check that met no NAT to open)."""
    if "R" in (x, y):
        return {"direct"}
    if NATS[x][1].endswith("fully-random") or NATS[y][1].endswith("fully-random"):
        return {"relayed"}
    return {"punched", "direct"}


def _record_path_times(mesh: Mesh) -> None:
    """Poll every host's view of the others until every ordered pair sees the other alive on
    its final kind of path (or the bound passes), noting when each ordered pair first showed
    each path kind, and when the last pair settled (``final_paths_by``), in seconds since the
    daemons were started."""
    names = list(mesh.hosts)
    while time.monotonic() - mesh.started < PUNCH_BOUND:
        views = {name: mesh.hosts[name].members() for name in names}
        now = round(time.monotonic() - mesh.started, 2)
        for x in names:
            for y, row in views[x].items():
                if row["path"] != "-":
                    mesh.timings.setdefault(f"{x}->{y} {row['path']}", now)
        pending = [
            f"{x}->{y}"
            for x in names
            for y in names
            if x != y
            and not (
                views[x].get(y, {}).get("state") == "alive" and views[x][y]["path"] in final(x, y)
            )
        ]
        if not pending:
            mesh.timings["final_paths_by"] = now
            return
        time.sleep(0.1)
    print("pairs without their final path at the bound:", pending)


def _wait_for_path(mesh: Mesh, a: str, b: str, paths: set[str]) -> dict[str, Any]:
    """Wait until ``a`` and ``b`` each see the other alive on one of ``paths``: until
    PUNCH_BOUND after the start, and at least RESEARCH_BOUND (a path found once can be lost and
    searched for again, which takes a few seconds)."""
    rows: dict[str, dict[str, Any]] = {}

    def settled() -> bool:
        for x, y in ((a, b), (b, a)):
            rows[x] = mesh.hosts[x].members().get(y, {})
        return all(
            row.get("state") == "alive" and row.get("path") in paths for row in rows.values()
        )

    remaining = PUNCH_BOUND - (time.monotonic() - mesh.started)
    try:
        wait_until(
            settled, timeout=max(remaining, RESEARCH_BOUND), interval=0.2, what=f"{a}-{b} {paths}"
        )
    finally:
        print(f"{a} sees {b}: {rows.get(a)}\n{b} sees {a}: {rows.get(b)}")
    return rows[a]


def _rtt_ms(mesh: Mesh, a: str, b: str) -> float:
    """Average ICMP round-trip time from ``a`` to ``b``'s mesh address over 20 pings."""
    out = (
        mesh.hosts[a]
        .ns.run(["ping", "-c", "20", "-i", "0.05", "-W", "2", mesh.hosts[b].ipv4], timeout=30)
        .stdout
    )
    match = re.search(r"= [\d.]+/([\d.]+)/", out)
    assert match and " 0% packet loss" in out, out
    return float(match.group(1))


def test_port_restricted_nats_are_punched_and_carry_traffic_directly(mesh: Mesh) -> None:
    row = _wait_for_path(mesh, "A", "B", {"punched", "direct"})
    assert row["endpoint"].startswith(public_ip("B") + ":"), row
    b_row = mesh.hosts["B"].members()["A"]
    assert b_row["endpoint"].startswith(public_ip("A") + ":"), b_row

    delta, _ = mesh.transfer("A", "B")
    a = mesh.hosts["A"]
    assert delta["a_b"] >= TRANSFER, "the tunnel traffic did not go straight from nat1 to nat2"
    assert delta["a_r"] < TRANSFER // 10, "the tunnel traffic went through R"

    out = a.cli("ping", "B", "--count", "3", "--interval", "0.1")
    print(out)
    assert re.search(rf"via (punched|direct) {re.escape(public_ip('B'))}:\d+", out), out
    assert "3 sent, 3 received, 0% loss" in out
    mesh.timings["AB_rtt_ms"] = _rtt_ms(mesh, "A", "B")
    mesh.timings["BA_rtt_ms"] = _rtt_ms(mesh, "B", "A")

    # nat1's conntrack holds the punched flow: A's mesh port to nat2's public address, with
    # replies from there admitted to nat1's public address.
    flows = (
        mesh.nats["A"]
        .run(["conntrack", "-L", "-p", "udp", "--orig-dst", public_ip("B")], check=False)
        .stdout
    )
    print("conntrack on nat1:\n" + flows)
    assert re.search(
        rf"src=192\.168\.1\.2 dst={re.escape(public_ip('B'))} sport={PORT} .*"
        rf"src={re.escape(public_ip('B'))} dst={re.escape(public_ip('A'))} .*\[ASSURED\]",
        flows,
    ), flows


def test_symmetric_nats_are_relayed_through_r_and_carry_traffic(mesh: Mesh) -> None:
    row = _wait_for_path(mesh, "C", "D", {"relayed"})
    assert row["endpoint"] == RELAY, row
    assert mesh.hosts["D"].members()["C"]["endpoint"] == RELAY

    delta, relayed = mesh.transfer("C", "D")
    c, d = mesh.hosts["C"], mesh.hosts["D"]
    assert delta["c_r"] >= TRANSFER and delta["r_d"] >= TRANSFER, "R did not carry the traffic"
    assert relayed >= TRANSFER, f"R's own relay counter shows only {relayed} bytes"
    assert delta["c_d"] < TRANSFER // 10 and delta["d_c"] < TRANSFER // 10
    route = c.ns.run(["ip", "route", "get", d.ipv4]).stdout
    assert "mtu 1280" in route, f"no relay route MTU on C toward D: {route}"
    assert delta["fragments"] == 0, "relayed datagrams were IP-fragmented"

    out = c.cli("ping", "D", "--count", "3", "--interval", "0.1")
    print(out)
    assert f"via relayed {RELAY}" in out, out
    assert "3 sent, 3 received, 0% loss" in out
    mesh.timings["CD_rtt_ms"] = _rtt_ms(mesh, "C", "D")
    mesh.timings["DC_rtt_ms"] = _rtt_ms(mesh, "D", "C")


def test_pairs_across_nat_kinds_are_connected(mesh: Mesh) -> None:
    """Every member sees every other alive with a path, within the bound; a port-restricted
    and a symmetric NAT (A-C) pass traffic."""
    views: dict[str, dict[str, dict[str, Any]]] = {}

    def everyone_connected() -> bool:
        for host in mesh.hosts.values():
            views[host.name] = host.members()
        return all(
            views[x].get(y, {}).get("state") == "alive" and views[x][y]["path"] != "-"
            for x in mesh.hosts
            for y in mesh.hosts
            if x != y
        )

    remaining = CONNECTED_BOUND - (time.monotonic() - mesh.started)
    try:
        wait_until(
            everyone_connected, timeout=max(remaining, RESEARCH_BOUND), what="all pairs connected"
        )
    finally:
        table = {x: {y: (row["state"], row["path"]) for y, row in views[x].items()} for x in views}
        print("views:", json.dumps(table))
    mesh.timings.setdefault("all_pairs_connected_by", round(time.monotonic() - mesh.started, 2))
    assert "final_paths_by" in mesh.timings, "not every pair reached its final kind of path"
    print("A-C path:", views["A"]["C"]["path"])
    assert _rtt_ms(mesh, "A", "C") > 0


def test_netcheck_reports_how_each_member_is_reached(mesh: Mesh) -> None:
    """netcheck on A: its NAT facts (through R, its configured STUN server) and, from A's
    daemon, each member with its path."""
    _wait_for_path(mesh, "A", "B", {"punched", "direct"})
    _wait_for_path(mesh, "A", "D", {"relayed", "punched", "direct"})
    a = mesh.hosts["A"]
    report = json.loads(a.cli("netcheck", "--rto", "0.1", "--json"))
    print(json.dumps(report, indent=2))
    assert report["observations"][0]["server"] == RELAY
    assert report["public_endpoints"][0].startswith(public_ip("A") + ":")
    reach = {row["name"]: row for row in report["members"]}
    assert set(reach) == set(mesh.hosts) - {"A"}
    assert reach["R"]["reach"] == "direct" and reach["R"]["endpoint"] == RELAY
    assert reach["B"]["reach"] in ("punched", "direct")
    assert reach["B"]["endpoint"].startswith(public_ip("B") + ":")
    assert reach["D"]["reach"] == mesh.hosts["A"].members()["D"]["path"]

    text = a.cli("netcheck", "--rto", "0.1")
    print(text)
    assert f"{RELAY} sees {public_ip('A')}:" in text
    b_line = next(line for line in text.splitlines() if line.strip().startswith("B "))
    assert mesh.hosts["B"].ipv4 in b_line and f" via {public_ip('B')}:" in b_line

    # Without a daemon for the directory: the NAT facts and one line about the members.
    empty = a.directory.parent / "no-daemon"
    empty.mkdir()
    alone = a.cli("netcheck", "--rto", "0.1", "--stun", RELAY, directory=empty)
    print(alone)
    assert f"{RELAY} sees {public_ip('A')}:" in alone
    assert alone.splitlines()[-1].startswith("members:          unknown (no daemon running")


def test_bare_masquerade_nats_are_punched_and_carry_traffic_directly(mesh: Mesh) -> None:
    """Without a firewall, a full-TTL datagram from the peer arriving first would make the
    NAT give the host's own flow a random port; the opening probes (TTL 2, they die in the
    wan router) prevent that: E and F are punched, both NATs keep port 51821 for the flow,
    and the tunnel traffic goes straight from nat5 to nat6."""
    row = _wait_for_path(mesh, "E", "F", {"punched"})
    assert row["endpoint"] == f"{public_ip('F')}:{PORT}", row
    assert mesh.hosts["F"].members()["E"]["endpoint"] == f"{public_ip('E')}:{PORT}"
    for x, y, nat in (("E", "F", "nat5"), ("F", "E", "nat6")):
        flows = mesh.nats[x].run(["conntrack", "-L", "-p", "udp"], check=False).stdout
        print(f"conntrack on {nat}:\n" + flows)
        inside = f"192\\.168\\.{NATS[x][0]}\\.2"
        here, there = re.escape(public_ip(x)), re.escape(public_ip(y))
        assert re.search(
            rf"src={inside} dst={there} sport={PORT} dport={PORT} "
            rf"src={there} dst={here} sport={PORT} dport={PORT} \[ASSURED\]",
            flows,
        ), f"no port-preserving punched flow on {nat}"
        clash = rf"^udp\s+\d+\s+\d+\s+src={there} dst={here} sport={PORT} dport={PORT} "
        assert not re.search(clash, flows, re.M), (
            f"{nat} holds a flow the peer opened toward port {PORT} (the clash's cause)"
        )

    delta, relayed = mesh.transfer("E", "F")
    e = mesh.hosts["E"]
    assert delta["e_f"] >= TRANSFER, "the tunnel traffic did not go straight from nat5 to nat6"
    assert delta["e_r"] < TRANSFER // 10, "the tunnel traffic went through R"
    assert relayed < TRANSFER // 10, f"R relayed {relayed} bytes"
    out = e.cli("ping", "F", "--count", "3", "--interval", "0.1")
    print(out)
    assert f"via punched {public_ip('F')}:{PORT}" in out, out
    mesh.timings["EF_rtt_ms"] = _rtt_ms(mesh, "E", "F")
