"""``meshguard run --uapi``: wireguard-go owns the tunnels, meshguard the mesh port (real, root).

Three hosts on one bridge (network namespaces created here): ``u1`` and ``u2`` run
``meshguard run --uapi`` (each starting its own wireguard-go, with its own interface name so
the UAPI sockets in /var/run/wireguard never collide), ``s`` runs the default userspace data
plane. They find each other through seeds. Asserted: the two wireguard-go nodes ping each
other's mesh IPv4 and IPv6 through wireguard-go's tunnel and see each other alive; the
userspace node and a wireguard-go node exchange traffic both ways (the one-port proxy is
wire-compatible with meshguard's own WireGuard); ``meshguard ping`` works through the raw
ICMP socket; and on exit wireguard-go is gone, its socket and interface removed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshguard.config import config_paths
from meshguard.control import ControlError
from meshguard.drivers.uapi import UapiClient
from meshguard.identity.keyfile import load_identity
from meshguard.identity.trust import TrustStore
from tests.daemon_host import DaemonHost
from tests.dataplane_lab import REPO, tcp_transfer
from tests.netns import Lab, Namespace, add_bridge, plug_into_bridge, wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]

PORT = 51821
UNDERLAY = {"u1": "192.168.70.1", "u2": "192.168.70.2", "s": "192.168.70.3"}
SEED_OF = {"u1": "u2", "u2": "u1", "s": "u1"}
UAPI_HOSTS = ("u1", "u2")


@dataclass
class Host(DaemonHost):
    interface: str
    uapi: bool

    def start(self, seed: str, extra: str = "") -> None:
        self.write_settings(
            f'listen_port = {PORT}\nswim_profile = "lan"\nmdns = false\n'
            f'interface = "{self.interface}"\nseeds = ["{seed}:{PORT}"]\n{extra}'
        )
        self.launch(*(["--uapi"] if self.uapi else []))


def _ping(host: Host, address: str, count: int = 3) -> bool:
    proc = host.ns.run(
        ["ping", "-c", str(count), "-i", "0.2", "-W", "2", address], check=False, timeout=60
    )
    return proc.returncode == 0


def _only_mesh_port(ns: Namespace) -> None:
    """Drop UDP from outside to any port but the mesh port: wireguard-go's own listening
    port is unreachable, so every tunnel datagram must pass meshguard's proxy."""
    ns.run(["nft", "add", "table", "inet", "onlymesh"])
    ns.run(
        ["nft", "add", "chain", "inet", "onlymesh", "input",
         "{ type filter hook input priority 0 ; }"]
    )  # fmt: skip
    ns.run(
        ["nft", "add", "rule", "inet", "onlymesh", "input",
         "iifname", "!=", "lo", "udp", "dport", "!=", str(PORT), "drop"]
    )  # fmt: skip


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Host]]:
    root = tmp_path_factory.mktemp("uapi")
    with Lab(prefix="mgu") as lab:
        switch = lab.namespace("sw")
        add_bridge(switch, "lan")
        found: dict[str, Host] = {}
        for name, address in UNDERLAY.items():
            ns = lab.namespace(name)
            plug_into_bridge(lab, ns, switch, "lan", f"{address}/24")
            interface = f"wg{lab.suffix}{name}"
            found[name] = Host(name, ns, root / name, interface, uapi=name in UAPI_HOSTS)
            if name in UAPI_HOSTS:
                _only_mesh_port(ns)
        for host in found.values():
            for other in found.values():
                if other is not host:
                    TrustStore(config_paths(host.directory).authorized_keys).add(
                        other.name, other.key
                    )
        for name, host in found.items():
            host.start(UNDERLAY[SEED_OF[name]])
            assert host.process is not None
            lab.processes.append(host.process)
        for host in found.values():
            wait_until(host.started, timeout=30, what=f"{host.name} to start")
        yield found


def test_uapi_nodes_ping_each_other_through_wireguard_go(hosts: dict[str, Host]) -> None:
    u1, u2 = hosts["u1"], hosts["u2"]
    wait_until(lambda: u1.sees_alive([u2]) and u2.sees_alive([u1]), timeout=30, what="mesh")
    for source, target in ((u1, u2), (u2, u1)):
        assert _ping(source, target.ipv4), f"{source.name} -> {target.ipv4}\n{source.log()}"
        assert _ping(source, target.ipv6), f"{source.name} -> {target.ipv6}"
    # The traffic went through wireguard-go's interface, and its UAPI counters show it.
    for host in (u1, u2):
        link = host.ns.run(["ip", "-d", "link", "show", host.interface]).stdout
        assert "tun" in link
        status = host.status()
        assert status["node"]["data_plane"] == "uapi"
        (row,) = [r for r in status["members"] if r["public_key"] != hosts["s"].public_key]
        assert row["state"] == "alive" and row["tunnel"]
        assert row["rx_bytes"] > 0 and row["tx_bytes"] > 0 and row["last_handshake"]


def test_status_json_shows_each_other_alive(hosts: dict[str, Host]) -> None:
    u1, u2 = hosts["u1"], hosts["u2"]
    wait_until(lambda: u1.sees_alive([u2]) and u2.sees_alive([u1]), timeout=30, what="mesh")
    for host, other in ((u1, u2), (u2, u1)):
        proc = host.cli("status", "--json")
        assert proc.returncode == 0, proc.stderr
        text = proc.stdout
        assert other.public_key in text and '"alive"' in text


def test_mixed_mesh_userspace_and_wireguard_go(hosts: dict[str, Host]) -> None:
    s, u1 = hosts["s"], hosts["u1"]
    wait_until(lambda: s.sees_alive([u1]) and u1.sees_alive([s]), timeout=30, what="mesh")
    assert _ping(s, u1.ipv4), s.log()[-3000:]
    assert _ping(u1, s.ipv4), u1.log()[-3000:]
    assert _ping(u1, s.ipv6)
    rows = {row["public_key"]: row for row in s.status()["members"]}
    assert rows[u1.public_key]["endpoint"] == f"{UNDERLAY['u1']}:{PORT}"
    sent, received = tcp_transfer(s.ns, u1.ns, u1.ipv4, 2_000_000)
    assert sent == received
    sent, received = tcp_transfer(u1.ns, s.ns, s.ipv6, 2_000_000)
    assert sent == received


def test_meshguard_ping_uses_raw_icmp(hosts: dict[str, Host]) -> None:
    u1, u2 = hosts["u1"], hosts["u2"]
    proc = u1.cli("ping", u2.public_key)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "direct" in proc.stdout and "ms" in proc.stdout
    proc = u1.cli("ping", u2.ipv6)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"({u2.ipv6}) via direct" in proc.stdout


def test_exit_stops_wireguard_go_and_removes_its_socket(hosts: dict[str, Host]) -> None:
    for name in UAPI_HOSTS:
        host = hosts[name]
        match = re.search(r"event=wireguard_go_started pid=(\d+)", host.log())
        assert match is not None
        pid = int(match.group(1))
        socket_file = Path("/var/run/wireguard") / f"{host.interface}.sock"
        assert socket_file.exists() and os.path.exists(f"/proc/{pid}")
        proc = host.cli("down")
        assert proc.returncode == 0, proc.stderr
        assert host.process is not None
        assert host.process.wait(timeout=20) == 0, host.log()[-2000:]
        assert not os.path.exists(f"/proc/{pid}")
        assert not socket_file.exists()
        link = host.ns.run(["ip", "link", "show", host.interface], check=False)
        assert link.returncode != 0


def test_attach_to_running_uapi_socket_leaves_it_running(tmp_path: Path) -> None:
    """``--uapi-socket``: meshguard configures a WireGuard it did not start, and leaves it."""
    with Lab(prefix="mgu") as lab:
        ns = lab.namespace("attach")
        interface = f"wg{lab.suffix}x"
        socket_file = Path("/var/run/wireguard") / f"{interface}.sock"
        wireguard_go = ns.popen(["wireguard-go", "-f", interface], stderr=subprocess.DEVNULL)
        wait_until(socket_file.exists, timeout=10, what="wireguard-go's socket")
        host = Host("x", ns, tmp_path / "x", interface, uapi=False)
        (host.directory / "meshguard.toml").write_text(f"listen_port = {PORT}\nmdns = false\n")
        log = host.log_path.open("ab")
        host.process = ns.popen(
            [sys.executable, "-m", "meshguard", "--config-dir", str(host.directory), "run",
             "--uapi-socket", str(socket_file)],
            env={"PYTHONPATH": str(REPO), "PATH": os.environ["PATH"]},
            cwd=REPO, stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        wait_until(host.started, timeout=30, what="meshguard to start")
        client = UapiClient(socket_file)
        device, _peers = client.get()
        identity = load_identity(config_paths(host.directory).private_key)
        assert device["private_key"] == identity.x25519_private.hex()
        assert int(device["listen_port"]) not in (0, PORT)
        addresses = ns.run(["ip", "-o", "addr", "show", "dev", interface]).stdout
        assert host.ipv4 in addresses and host.ipv6 in addresses
        assert host.status()["node"]["interface"] == interface
        assert host.cli("down").returncode == 0
        assert host.process.wait(timeout=20) == 0
        assert wireguard_go.poll() is None and socket_file.exists()
        lab.stop(wireguard_go)
        wait_until(lambda: not socket_file.exists(), timeout=10, what="socket removal")


def _lone_uapi_host(lab: Lab, directory: Path, role: str) -> Host:
    ns = lab.namespace(role)
    host = Host(role, ns, directory, f"wg{lab.suffix}{role}", uapi=True)
    host.start("192.0.2.1")
    assert host.process is not None
    wait_until(host.started, timeout=30, what="meshguard --uapi to start")
    return host


def _wireguard_go_pid(host: Host) -> int:
    match = re.search(r"event=wireguard_go_started pid=(\d+)", host.log())
    assert match is not None
    return int(match.group(1))


def test_wireguard_go_dies_with_a_crashed_daemon(tmp_path: Path) -> None:
    """kill -9 of meshguard: the kernel sends wireguard-go SIGTERM (PR_SET_PDEATHSIG), so its
    interface goes with it; the socket file it leaves is dead, and the next start replaces it."""
    with Lab(prefix="mgu") as lab:
        host = _lone_uapi_host(lab, tmp_path / "k", "k")
        pid = _wireguard_go_pid(host)
        socket_file = Path("/var/run/wireguard") / f"{host.interface}.sock"
        assert host.process is not None
        lab.stop(host.process, signal.SIGKILL)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=10, what="wireguard-go")
        link = host.ns.run(["ip", "link", "show", host.interface], check=False)
        assert link.returncode != 0
        host.start("192.0.2.1")
        wait_until(lambda: host.log().count("event=started") == 2, timeout=30, what="restart")
        assert host.cli("down").returncode == 0
        assert host.process.wait(timeout=20) == 0
        assert not socket_file.exists()


def test_daemon_stops_when_wireguard_go_dies(tmp_path: Path) -> None:
    with Lab(prefix="mgu") as lab:
        host = _lone_uapi_host(lab, tmp_path / "w", "w")
        os.kill(_wireguard_go_pid(host), signal.SIGKILL)
        assert host.process is not None
        assert host.process.wait(timeout=20) == 1
        assert "event=wireguard_go_exited" in host.log()
        link = host.ns.run(["ip", "link", "show", host.interface], check=False)
        assert link.returncode != 0


def _behind_symmetric_nat(lab: Lab, switch: Namespace, index: int) -> Namespace:
    """A host behind an nftables NAT that maps every destination to a new random port, so
    nothing can be punched to it: the only way between two such hosts is a relay."""
    nat = lab.namespace(f"nat{index}")
    host = lab.namespace(f"n{index}")
    wan_if = plug_into_bridge(lab, nat, switch, "wan", f"203.0.113.{10 + index}/24")
    lab.link(host, nat, f"192.168.{index}.2/24", f"192.168.{index}.1/24")
    host.run(["ip", "route", "add", "default", "via", f"192.168.{index}.1"])
    nat.sysctl("net.ipv4.ip_forward", "1")
    ruleset = (
        "table ip nat {\n  chain postrouting {\n"
        "    type nat hook postrouting priority 100;\n"
        f'    oifname "{wan_if}" masquerade random,fully-random\n  }}\n}}\n'
    )
    subprocess.run(nat.exec_argv(["nft", "-f", "-"]), input=ruleset, text=True, check=True)
    return host


def test_relayed_path_between_wireguard_go_nodes_behind_symmetric_nats(tmp_path: Path) -> None:
    """Two --uapi nodes behind symmetric NATs reach each other through a relaying --uapi node:
    the proxy wraps wireguard-go's datagrams in relay envelopes and unwraps them again."""
    with Lab(prefix="mgr") as lab:
        switch = lab.namespace("wan")
        add_bridge(switch, "wan")
        hosts: dict[str, Host] = {}
        for index, (name, uapi) in enumerate((("relay", True), ("stun", False)), start=1):
            ns = lab.namespace(name)
            plug_into_bridge(lab, ns, switch, "wan", f"203.0.113.{index}/24")
            hosts[name] = Host(name, ns, tmp_path / name, f"wg{lab.suffix}{name[0]}", uapi=uapi)
        for index in (1, 2):
            ns = _behind_symmetric_nat(lab, switch, index)
            hosts[f"n{index}"] = Host(f"n{index}", ns, tmp_path / f"n{index}",
                                      f"wg{lab.suffix}n{index}", uapi=True)  # fmt: skip
        for host in hosts.values():
            for other in hosts.values():
                if other is not host:
                    TrustStore(config_paths(host.directory).authorized_keys).add(
                        other.name, other.key
                    )
        hosts["relay"].start("203.0.113.2", "relay = true\n")
        hosts["stun"].start("203.0.113.1")
        hosts["n1"].start("203.0.113.1")
        hosts["n2"].start("203.0.113.1")
        for host in hosts.values():
            assert host.process is not None
            lab.processes.append(host.process)
            wait_until(host.started, timeout=30, what=f"{host.name} to start")
        n1, n2 = hosts["n1"], hosts["n2"]

        def relayed(host: Host, other: Host) -> bool:
            try:
                rows = {row["public_key"]: row for row in host.status()["members"]}
            except ControlError:
                return False
            row = rows.get(other.public_key, {})
            return bool(row.get("state") == "alive" and row.get("path") == "relayed")

        wait_until(lambda: relayed(n1, n2) and relayed(n2, n1), timeout=60, what="relay path")
        assert _ping(n1, n2.ipv4, count=5), n1.log()[-3000:]
        assert _ping(n2, n1.ipv6, count=5), n2.log()[-3000:]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--uapi", "--wireguard-go", "/nonexistent/wireguard-go"],
         "meshguard: error: cannot start /nonexistent/wireguard-go: No such file or directory\n"),
        (["--wireguard-go", "wireguard-go", "--uapi-socket", "/run/x.sock"],
         "meshguard: error: command line: give --wireguard-go or --uapi-socket, not both\n"),
        (["--uapi-socket", "/nonexistent/wg.sock"],
         "meshguard: error: UAPI socket /nonexistent/wg.sock does not exist\n"),
    ],
)  # fmt: skip
def test_bad_uapi_flags_are_one_line_and_leave_nothing(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    with Lab(prefix="mgu") as lab:
        ns = lab.namespace("bad")
        host = Host("bad", ns, tmp_path / "bad", f"wg{lab.suffix}bad", uapi=False)
        (host.directory / "meshguard.toml").write_text(
            f'mdns = false\ninterface = "{host.interface}"\n'
        )
        proc = subprocess.run(
            ns.exec_argv(
                [sys.executable, "-m", "meshguard", "--config-dir", str(host.directory), "run",
                 *flags]
            ),
            capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
            env={"PYTHONPATH": str(REPO), "PATH": os.environ["PATH"]},
        )  # fmt: skip
        assert (proc.returncode, proc.stderr) == (2, message)
        assert ns.run(["ip", "link", "show", host.interface], check=False).returncode != 0
        assert not (Path("/var/run/wireguard") / f"{host.interface}.sock").exists()
