"""Five real hosts run ``meshguard run`` and form a mesh over a simulated LAN and WAN.

Topology (network namespaces, all created here)::

    h1 h2 h3 --[bridge "lan" 192.168.50.0/24]-- router --[bridge 192.168.60.0/24]-- h4 h5

Each host has its own config directory (its identity and the four others' keys written with
``meshguard.identity``, as ``meshguard keygen`` / ``trust add`` do) and runs ``meshguard run``
as a real process with the LAN SWIM profile. h1, h2 and h5 are each given one seed address;
h4 gets its one seed from a DNS TXT record (dnsmasq on the router); h3 has none and is found
by mDNS on the LAN. The tests share one lab (module fixture) and run in
order: reachability, status, TCP, control ping, metrics, a host killed with SIGKILL and
restarted without seeds, an untrusted stranger, a trust removal, and finally
``meshguard down`` / SIGTERM removing the interface.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshguard.sansio.swim_config import SwimConfig
from tests.daemon_host import DaemonHost
from tests.dataplane_lab import tcp_transfer
from tests.netns import Lab, Namespace, add_bridge, plug_into_bridge, wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]

PORT = 51821
HOSTS = ("h1", "h2", "h3", "h4", "h5")
UNDERLAY = {
    "h1": "192.168.50.1",
    "h2": "192.168.50.2",
    "h3": "192.168.50.3",
    "h4": "192.168.60.4",
    "h5": "192.168.60.5",
    "stranger": "192.168.50.6",
}
SEED_OF = {"h1": "h2", "h2": "h1", "h3": None, "h4": "h1", "h5": "h1"}
DNS_SEEDED = "h4"
"""Finds its seed (h1) in a TXT record served by dnsmasq on the router, not in its config."""
SEED_DOMAIN = "mesh.test"
METRICS = "127.0.0.1:9101"
SWIM = SwimConfig.lan()


def detection_bound(members: int) -> float:
    """Worst case from the LAN profile: a full probe round to reach the dead host, its probe
    timeout, the longest suspicion (no confirmations), and a second to gossip the verdict."""
    _shortest, longest = SWIM.suspicion_timeouts(members)
    return members * SWIM.protocol_period + SWIM.probe_timeout + longest + 1.0


@dataclass
class Host(DaemonHost):
    lab: Lab
    underlay_ip: str

    @property
    def endpoint(self) -> str:
        return f"{self.underlay_ip}:{PORT}"

    def configure(
        self,
        *,
        seeds: list[str],
        mdns: bool = True,
        metrics: bool = False,
        dns_seed_domain: str | None = None,
    ) -> None:
        lines = [
            f"listen_port = {PORT}",
            'swim_profile = "lan"',
            "seeds = [" + ", ".join(f'"{seed}"' for seed in seeds) + "]",
            f"mdns = {'true' if mdns else 'false'}",
        ]
        if dns_seed_domain is not None:
            lines.append(f'dns_seed_domain = "{dns_seed_domain}"')
        if metrics:
            lines.append(f'metrics = "{METRICS}"')
        self.write_settings("\n".join(lines) + "\n")

    def start(self) -> None:
        starts = self.launch()
        wait_until(lambda: self.started(starts), timeout=30, what=f"{self.name} to start")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = super().cli(*args)
        if check and proc.returncode != 0:
            raise AssertionError(f"meshguard {' '.join(args)} on {self.name}: {proc.stderr}")
        return proc


@dataclass
class Mesh:
    lab: Lab
    hosts: dict[str, Host]
    stranger: Host
    timings: dict[str, float] = field(default_factory=dict)

    def others(self, name: str) -> list[Host]:
        return [host for key, host in self.hosts.items() if key != name]


def _ping_all(pairs: list[tuple[Host, str]], count: int = 2) -> list[str]:
    """Ping every (host, address) at once; returns the pairs that got no reply."""
    procs = [
        (
            host,
            address,
            subprocess.Popen(
                host.ns.exec_argv(["ping", "-c", str(count), "-i", "0.2", "-W", "2", address]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
        )
        for host, address in pairs
    ]
    failed = []
    for host, address, proc in procs:
        if proc.wait(timeout=30) != 0:
            failed.append(f"{host.name} -> {address}")
    return failed


def _reaches(host: Host, address: str) -> bool:
    return host.ns.run(["ping", "-c", "1", "-W", "1", address], check=False).returncode == 0


def _use_resolver(lab: Lab, ns: Namespace, nameserver: str) -> None:
    """Give ``ns`` its own /etc/resolv.conf (``ip netns exec`` mounts /etc/netns/<ns>/)."""
    parent = Path("/etc/netns")
    created_parent = not parent.exists()
    directory = parent / ns.name
    directory.mkdir(parents=True)
    (directory / "resolv.conf").write_text(f"nameserver {nameserver}\n")

    def remove() -> None:
        (directory / "resolv.conf").unlink()
        directory.rmdir()
        if created_parent:
            with contextlib.suppress(OSError):
                parent.rmdir()

    lab.cleanups.append(remove)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("mesh")
    with Lab(prefix="mgm") as lab:
        lan = lab.namespace("lan")
        router = lab.namespace("rtr")
        add_bridge(lan, "lan")
        wan = add_bridge(router, "seg2")
        router.run(["ip", "addr", "add", "192.168.60.254/24", "dev", wan])
        plug_into_bridge(lab, router, lan, "lan", "192.168.50.254/24")
        router.sysctl("net.ipv4.ip_forward", "1")
        router.popen(
            [
                "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--pid-file=",
                f"--local=/{SEED_DOMAIN}/", "--listen-address=192.168.60.254", "--bind-interfaces",
                f"--txt-record=_meshguard._udp.{SEED_DOMAIN},v=mg1 addr={UNDERLAY['h1']}:{PORT}",
            ],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        hosts: dict[str, Host] = {}
        for name in (*HOSTS, "stranger"):
            ns = lab.namespace(name)
            on_lan = UNDERLAY[name].startswith("192.168.50.")
            if on_lan:
                plug_into_bridge(lab, ns, lan, "lan", f"{UNDERLAY[name]}/24")
            else:
                plug_into_bridge(lab, ns, router, wan, f"{UNDERLAY[name]}/24")
            gateway = "192.168.50.254" if on_lan else "192.168.60.254"
            ns.run(["ip", "route", "add", "default", "via", gateway])
            hosts[name] = Host(name, ns, root / name, lab, UNDERLAY[name])
        _use_resolver(lab, hosts[DNS_SEEDED].ns, "192.168.60.254")
        stranger = hosts.pop("stranger")
        for host in hosts.values():
            for other in hosts.values():
                if other is not host:
                    host.trust(other)
            seed = SEED_OF[host.name]
            if host.name == DNS_SEEDED:
                host.configure(seeds=[], dns_seed_domain=SEED_DOMAIN)
            else:
                host.configure(
                    seeds=[] if seed is None else [hosts[seed].endpoint], metrics=host.name == "h1"
                )
        for host in hosts.values():
            stranger.trust(host)
        stranger.configure(seeds=[hosts["h1"].endpoint])
        # A crashed daemon's interface: a TUN device nobody holds, under the name h3 will use.
        hosts["h3"].ns.run(["ip", "tuntap", "add", "dev", "mg0", "mode", "tun"])
        started = time.monotonic()
        launched = {name: host.launch() for name, host in hosts.items()}
        wait_until(
            lambda: all(host.started(launched[name]) for name, host in hosts.items()),
            timeout=30,
            what="every daemon to start",
        )
        everyone = list(hosts.values())
        wait_until(
            lambda: all(h.sees_alive([o for o in everyone if o is not h]) for h in everyone),
            timeout=60,
            interval=0.25,
            what="every host to see every other alive",
        )
        mesh = Mesh(lab, hosts, stranger)
        mesh.timings["converge"] = time.monotonic() - started
        yield mesh
        for host in (*hosts.values(), stranger):
            if host.process is not None and host.process.poll() is None:
                lab.stop(host.process)
        print("\nmesh timings (s):", json.dumps({k: round(v, 2) for k, v in mesh.timings.items()}))


def test_every_host_reaches_every_other_over_ipv4_and_ipv6(mesh: Mesh) -> None:
    hosts = mesh.hosts
    assert "event=stale_interface_removed interface=mg0" in hosts["h3"].log()
    assert " seeds=1 " in hosts[DNS_SEEDED].log(), "the DNS TXT seed was not found"
    # h3 has no seed: either it found h1/h2 by mDNS, or they found it (whoever browsed first).
    h3_address = hosts["h3"].endpoint
    assert "event=mdns_seed" in hosts["h3"].log() or any(
        "event=mdns_seed" in line and h3_address in line
        for name in ("h1", "h2")
        for line in hosts[name].log().splitlines()
    )
    pairs = [
        (host, address)
        for host in hosts.values()
        for other in mesh.others(host.name)
        for address in (other.ipv4, other.ipv6)
    ]
    started = time.monotonic()
    assert _ping_all(pairs) == []
    mesh.timings["ping_all_pairs"] = time.monotonic() - started
    h1 = hosts["h1"]
    link = h1.ns.run(["ip", "-d", "link", "show", "mg0"]).stdout
    assert "mtu 1420" in link
    addresses = h1.ns.run(["ip", "addr", "show", "mg0"]).stdout
    assert f"{h1.ipv4}/16" in addresses and f"{h1.ipv6}/64" in addresses
    assert "10.99.0.0/16" in h1.ns.run(["ip", "route", "show", "dev", "mg0"]).stdout
    assert "fd99:6d67::/64" in h1.ns.run(["ip", "-6", "route", "show", "dev", "mg0"]).stdout


def test_status_json_shows_every_other_member_alive(mesh: Mesh) -> None:
    for host in mesh.hosts.values():
        status = json.loads(host.cli("status", "--json").stdout)
        assert status["node"]["public_key"] == host.public_key
        assert status["node"]["mesh_ipv4"] == host.ipv4
        rows = {row["public_key"]: row for row in status["members"]}
        for other in mesh.others(host.name):
            row = rows[other.public_key]
            assert row["state"] == "alive", (host.name, other.name, row)
            assert row["name"] == other.name
            assert (row["mesh_ipv4"], row["mesh_ipv6"]) == (other.ipv4, other.ipv6)
            assert row["tunnel"] is True
            assert row["path"] == "direct"
            assert row["endpoint"] == other.endpoint
            assert row["last_handshake"] is not None and row["rx_bytes"] > 0


def test_tcp_transfer_between_lan_and_wan_hosts_is_intact(mesh: Mesh) -> None:
    h2, h5 = mesh.hosts["h2"], mesh.hosts["h5"]
    started = time.monotonic()
    sent, received = tcp_transfer(h2.ns, h5.ns, h5.ipv4, 20_000_000)
    mesh.timings["tcp_20MB"] = time.monotonic() - started
    assert sent == received
    assert sent.startswith("20000000 ")


def test_meshguard_ping_reports_path_and_rtt(mesh: Mesh) -> None:
    out = mesh.hosts["h1"].cli("ping", "h4", "--count", "2", "--interval", "0.1").stdout
    assert f"reply from h4 ({mesh.hosts['h4'].ipv4}) via direct {mesh.hosts['h4'].endpoint}" in out
    assert "2 sent, 2 received, 0% loss" in out
    h4 = mesh.hosts["h4"]
    out = mesh.hosts["h1"].cli("ping", "-6", "h4", "--count", "2", "--interval", "0.1").stdout
    assert f"reply from h4 ({h4.ipv6}) via direct {h4.endpoint}" in out
    assert "2 sent, 2 received, 0% loss" in out


def test_metrics_are_served(mesh: Mesh) -> None:
    text = mesh.hosts["h1"].ns.run(
        [sys.executable, "-c",
         f"import urllib.request; print(urllib.request.urlopen('http://{METRICS}/metrics')"
         ".read().decode())"]
    ).stdout  # fmt: skip
    assert 'meshguard_members{state="alive"} 4.0' in text
    assert 'meshguard_peer_receive_bytes_total{peer="h4"}' in text


def test_killed_host_is_declared_dead_and_rejoins_from_its_state_file(mesh: Mesh) -> None:
    h5 = mesh.hosts["h5"]
    others = mesh.others("h5")
    assert h5.process is not None

    def state_lists_everyone() -> bool:
        state = json.loads((h5.directory / "state.json").read_text())
        return {m["public_key"] for m in state["members"]} == {o.public_key for o in others}

    # state.json is rewritten at most every 10 s (statefile.StateSaver).
    wait_until(state_lists_everyone, timeout=12, what="h5's state.json to list every member")

    os.killpg(h5.process.pid, signal.SIGKILL)
    h5.process.wait(timeout=10)
    killed = time.monotonic()
    assert h5.ns.run(["ip", "link", "show", "mg0"], check=False).returncode != 0
    detected: dict[str, float] = {}

    def all_detected() -> bool:
        for host in others:
            if host.name not in detected:
                row = host.members().get(h5.public_key)
                if row is not None and row["state"] == "dead" and not row["tunnel"]:
                    detected[host.name] = time.monotonic() - killed
        return len(detected) == len(others)

    bound = detection_bound(len(HOSTS))
    wait_until(all_detected, timeout=bound + 10, interval=0.1, what="h5 to be declared dead")
    mesh.timings["detect_dead_max"] = max(detected.values())
    mesh.timings["detect_dead_min"] = min(detected.values())
    mesh.timings["detect_bound"] = bound
    assert max(detected.values()) <= bound, detected

    # Restart without any seed and without mDNS: only state.json can lead it back.
    h5.configure(seeds=[], mdns=False)
    restarted = time.monotonic()
    h5.start()
    assert f"seeds={len(others)}" in h5.log().rsplit("event=started", 1)[1].split("\n")[0]
    everyone = [*others, h5]
    wait_until(
        lambda: all(h.sees_alive([o for o in everyone if o is not h]) for h in everyone),
        timeout=30,
        interval=0.2,
        what="h5 to rejoin",
    )
    mesh.timings["rejoin"] = time.monotonic() - restarted
    h1 = mesh.hosts["h1"]
    assert _ping_all([(h5, h1.ipv4), (h1, h5.ipv6), (mesh.hosts["h3"], h5.ipv4)]) == []


def test_untrusted_host_is_never_admitted(mesh: Mesh) -> None:
    stranger = mesh.stranger
    stranger.start()
    h1 = mesh.hosts["h1"]
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        for host in mesh.hosts.values():
            assert stranger.public_key not in host.members(), f"{host.name} admitted it"
        time.sleep(0.5)
    assert not any(row["state"] == "alive" for row in stranger.members().values())
    assert not _reaches(stranger, h1.ipv4)
    metrics = h1.ns.run(
        [sys.executable, "-c",
         f"import urllib.request; print(urllib.request.urlopen('http://{METRICS}/metrics')"
         ".read().decode())"]
    ).stdout  # fmt: skip
    untrusted = [
        line for line in metrics.splitlines()
        if line.startswith('meshguard_gossip_events_total{event="untrusted_sender"}')
    ]  # fmt: skip
    assert untrusted and float(untrusted[0].split()[-1]) > 0
    assert stranger.process is not None
    mesh.lab.stop(stranger.process)


def test_removing_a_key_cuts_that_host_off(mesh: Mesh) -> None:
    h4 = mesh.hosts["h4"]
    others = mesh.others("h4")
    assert _reaches(h4, mesh.hosts["h1"].ipv4)
    for host in others:
        host.cli("trust", "remove", "h4")
    removed = time.monotonic()
    h1 = mesh.hosts["h1"]
    assert h1.process is not None
    os.kill(h1.process.pid, signal.SIGHUP)
    wait_until(
        lambda: all(h4.public_key not in host.members() for host in others),
        timeout=10,
        interval=0.1,
        what="every host to forget h4 (SIGHUP on h1, the directory watcher on the others)",
    )
    mesh.timings["untrust_applied"] = time.monotonic() - removed
    assert "event=trust_reloaded reason=SIGHUP" in h1.log()
    assert "event=trust_reloaded reason=authorized_keys changed" in mesh.hosts["h2"].log()
    assert "reason=untrusted" in h1.log()
    for other in others:
        assert not _reaches(h4, other.ipv4), f"h4 still reaches {other.name}"
    time.sleep(2 * SWIM.protocol_period)
    for host in others:
        assert h4.public_key not in host.members(), f"h4's gossip brought it back on {host.name}"
        assert host.sees_alive([o for o in others if o is not host])
    assert h4.process is not None and h4.process.poll() is None
    assert _ping_all([(h1, mesh.hosts["h5"].ipv4), (mesh.hosts["h5"], h1.ipv6)]) == []


def test_trusting_the_key_again_readmits_the_host_without_restarts(mesh: Mesh) -> None:
    h4 = mesh.hosts["h4"]
    others = mesh.others("h4")
    for host in others:
        host.cli("trust", "add", h4.public_key, "--name", "h4")
    trusted = time.monotonic()
    everyone = [*others, h4]
    wait_until(
        lambda: all(h.sees_alive([o for o in everyone if o is not h]) for h in everyone),
        timeout=2 * SWIM.reconnect_interval + 10,
        interval=0.2,
        what="h4 to be readmitted",
    )
    mesh.timings["retrust_readmitted"] = time.monotonic() - trusted
    # If h4 never declared the others dead meanwhile, it still holds sessions they erased; as in
    # WireGuard, it starts a new handshake once data it sent got no answer for 15 s
    # (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT). Traffic the other way handshakes at once.
    assert _ping_all([(mesh.hosts["h3"], h4.ipv6)]) == []
    h1 = mesh.hosts["h1"]
    wait_until(lambda: _reaches(h4, h1.ipv4), timeout=20, what="h4 to reach h1 again")
    mesh.timings["retrust_traffic"] = time.monotonic() - trusted


def test_down_and_sigterm_leave_and_remove_the_interface(mesh: Mesh) -> None:
    h1, h2, h3 = mesh.hosts["h1"], mesh.hosts["h2"], mesh.hosts["h3"]
    assert h1.process is not None and h2.process is not None
    out = h1.cli("down").stdout
    assert "stopped" in out
    assert h1.process.wait(timeout=15) == 0
    mesh.lab.stop(h2.process, signal.SIGTERM)
    assert h2.process.returncode == 0
    for host in (h1, h2):
        assert host.ns.run(["ip", "link", "show", "mg0"], check=False).returncode != 0
        assert "10.99.0.0" not in host.ns.run(["ip", "route"]).stdout
        assert not (host.directory / "meshguard.sock").exists()
    wait_until(
        lambda: all(h3.members().get(h.public_key, {}).get("state") == "left" for h in (h1, h2)),
        timeout=5,
        what="h3 to see h1 and h2 leave",
    )
    assert not h3.members()[h1.public_key]["tunnel"]
