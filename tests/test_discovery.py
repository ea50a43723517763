"""Seed discovery: HOST:PORT parsing, DNS TXT seeds against a real DNS server, LAN mDNS between
two network namespaces."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns import Lab

from meshguard.discovery import (
    LanPeer,
    Seed,
    SeedError,
    dns_seed_name,
    is_underlay_address,
    lookup_dns_seeds,
    mdns_instance_name,
    parse_host_port,
    parse_mdns_properties,
    parse_txt_record,
    resolve_seeds,
)
from meshguard.identity.keys import Identity, public_key_to_base64

REPO = Path(__file__).resolve().parent.parent


def _key() -> bytes:
    return Identity.generate(os.urandom).public_key


@pytest.mark.parametrize(
    ("text", "seed"),
    [
        ("192.0.2.1:51821", Seed("192.0.2.1", 51821)),
        (" 192.0.2.1:1 ", Seed("192.0.2.1", 1)),
        ("[2001:db8::1]:51821", Seed("2001:db8::1", 51821)),
        ("[::1]:65535", Seed("::1", 65535)),
        ("seed.example.com:51821", Seed("seed.example.com", 51821)),
        ("seed-1.example.com.:7", Seed("seed-1.example.com.", 7)),
        ("localhost:9", Seed("localhost", 9)),
    ],
)
def test_parse_host_port_accepts(text: str, seed: Seed) -> None:
    assert parse_host_port(text) == seed


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("192.0.2.1", "is not HOST:PORT"),
        (":51821", "is not HOST:PORT"),
        ("192.0.2.1:0", "port must be a number from 1 to 65535"),
        ("192.0.2.1:65536", "port must be a number from 1 to 65535"),
        ("192.0.2.1:http", "port must be a number from 1 to 65535"),
        ("192.0.2.1:-1", "port must be a number from 1 to 65535"),
        ("2001:db8::1:51821", "put an IPv6 address in brackets"),
        ("[2001:db8::1]51821", "is not [IPV6]:PORT"),
        ("[2001:db8::1", "is not [IPV6]:PORT"),
        ("[192.0.2.1]:51821", "is not an IPv6 address"),
        ("999.0.2.1:51821", "is neither an IP address nor a host name"),
        ("bad_name!:51821", "is neither an IP address nor a host name"),
        ("-lead.example:51821", "is neither an IP address nor a host name"),
    ],
)
def test_parse_host_port_rejects_with_one_line(text: str, complaint: str) -> None:
    with pytest.raises(SeedError) as excinfo:
        parse_host_port(text, what="--seed")
    message = str(excinfo.value)
    assert message.startswith("--seed: ")
    assert complaint in message
    assert "\n" not in message


def test_seed_str_round_trips_through_the_parser() -> None:
    for seed in (Seed("192.0.2.1", 5), Seed("2001:db8::1", 6), Seed("a.example", 7)):
        assert parse_host_port(str(seed)) == seed


def test_resolve_seeds_keeps_order_drops_duplicates_and_reports_failures() -> None:
    addresses, problems = resolve_seeds(
        [
            Seed("127.0.0.1", 51821),
            Seed("::1", 51822),
            Seed("127.0.0.1", 51821),
            Seed("no-such-host.invalid", 1),
        ]
    )
    assert addresses == [("127.0.0.1", 51821), ("::1", 51822)]
    assert len(problems) == 1
    assert problems[0].startswith("seed no-such-host.invalid:1: cannot resolve")


def test_txt_record_format() -> None:
    assert parse_txt_record("v=mg1 addr=192.0.2.1:51821") == [Seed("192.0.2.1", 51821)]
    assert parse_txt_record("v=mg1 addr=a.example:1 future=x addr=[2001:db8::2]:2") == [
        Seed("a.example", 1),
        Seed("2001:db8::2", 2),
    ]
    assert parse_txt_record("v=spf1 include:example.com") == []
    assert parse_txt_record("") == []
    assert parse_txt_record("addr=192.0.2.1:1 v=mg1") == []
    with pytest.raises(SeedError, match="is not key=value"):
        parse_txt_record("v=mg1 192.0.2.1:1")
    with pytest.raises(SeedError, match="put an IPv6 address in brackets"):
        parse_txt_record("v=mg1 addr=2001:db8::1:1")


def test_dns_seed_name() -> None:
    assert dns_seed_name("example.com") == "_meshguard._udp.example.com."
    assert dns_seed_name("mesh.example.com.") == "_meshguard._udp.mesh.example.com."
    with pytest.raises(SeedError):
        dns_seed_name("not a domain")


def test_underlay_addresses_exclude_mesh_loopback_and_link_local() -> None:
    assert is_underlay_address("192.168.1.5")
    assert is_underlay_address("2001:db8::5")
    assert not is_underlay_address("10.99.3.4")
    assert not is_underlay_address("fd99:6d67::1234")
    assert not is_underlay_address("127.0.0.1")
    assert not is_underlay_address("::1")
    assert not is_underlay_address("fe80::1")
    assert not is_underlay_address("0.0.0.0")
    assert not is_underlay_address("nonsense")


def test_mdns_properties_carry_a_valid_key_only() -> None:
    key = _key()
    encoded = public_key_to_base64(key).encode()
    assert parse_mdns_properties({b"v": b"mg1", b"pk": encoded}) == key
    assert parse_mdns_properties({b"v": b"mg2", b"pk": encoded}) is None
    assert parse_mdns_properties({b"v": b"mg1"}) is None
    assert parse_mdns_properties({b"v": b"mg1", b"pk": None}) is None
    assert parse_mdns_properties({b"v": b"mg1", b"pk": b"AAAA"}) is None
    assert parse_mdns_properties({b"v": b"mg1", b"pk": b"\xff\xfe"}) is None
    assert mdns_instance_name(key) == f"mg-{key[:6].hex()}._meshguard._udp.local."
    assert LanPeer(key, ("192.0.2.1", "2001:db8::1"), 7).udp_addresses() == [
        ("192.0.2.1", 7),
        ("2001:db8::1", 7),
    ]


@pytest.mark.root
def test_dns_txt_seeds_from_a_real_dns_server_in_a_namespace() -> None:
    """dnsmasq in one namespace serves the TXT records; the lookup runs in another."""
    with Lab(prefix="mgdns") as lab:
        server, client = lab.namespace("dns"), lab.namespace("cli")
        lab.link(server, client, "192.168.53.1/24", "192.168.53.2/24")
        name = "_meshguard._udp.mesh.test"
        long_record = "v=mg1 " + " ".join(f"addr=seed{i}.mesh.test:{51000 + i}" for i in range(12))
        assert len(long_record) > 255
        dnsmasq = server.popen(
            [
                "dnsmasq",
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--local=/test/",
                "--port=53",
                "--listen-address=192.168.53.1",
                "--bind-interfaces",
                "--pid-file=",
                f"--txt-record={name},v=mg1 addr=192.0.2.1:51821 addr=[2001:db8::1]:51821",
                f"--txt-record={name},v=spf1 -all",
                f"--txt-record={name},v=mg1 addr=bad:port",
                f"--txt-record={name},{long_record[:200]},{long_record[200:]}",
            ],
            stderr=subprocess.PIPE,
        )
        code = (
            "import json, sys; from meshguard.discovery import lookup_dns_seeds as f; "
            "seeds, problems = f(sys.argv[1], nameservers=[sys.argv[2]], timeout=2); "
            "print(json.dumps([[str(s) for s in seeds], problems]))"
        )
        argv = [sys.executable, "-c", code, "mesh.test", "192.168.53.1"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        deadline = time.monotonic() + 10
        while True:
            proc = subprocess.run(
                client.exec_argv(argv), capture_output=True, text=True, env=env, timeout=30
            )
            assert proc.returncode == 0, proc.stderr
            seeds, problems = json.loads(proc.stdout)
            if seeds or time.monotonic() > deadline or dnsmasq.poll() is not None:
                break
            time.sleep(0.2)
        assert dnsmasq.poll() is None, dnsmasq.stderr.read() if dnsmasq.stderr else ""
        assert sorted(seeds) == sorted(
            [
                "192.0.2.1:51821",
                "[2001:db8::1]:51821",
                *(f"seed{i}.mesh.test:{51000 + i}" for i in range(12)),
            ]
        )
        assert len(problems) == 1
        assert "bad:port" in problems[0]

        missing = subprocess.run(
            client.exec_argv([*argv[:-2], "nothing.test", "192.168.53.1"]),
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        expected = ["DNS seeds: _meshguard._udp.nothing.test. does not exist"]
        assert json.loads(missing.stdout) == [[], expected]


def test_dns_lookup_failure_is_one_line_not_an_exception() -> None:
    seeds, problems = lookup_dns_seeds("mesh.test", nameservers=["127.0.0.1"], timeout=0.5)
    assert seeds == []
    assert len(problems) == 1
    assert problems[0].startswith("DNS seeds: lookup of _meshguard._udp.mesh.test. failed")


_MDNS_NODE = """
import json, selectors, sys, time
import ifaddr
from meshguard.discovery import LanDiscovery, _underlay_interfaces
public_key, port, seconds = bytes.fromhex(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
names = {adapter.index: adapter.nice_name for adapter in ifaddr.get_adapters()}
interfaces, advertised = _underlay_interfaces()
used = sorted(names[i] if isinstance(i, int) else i for i in interfaces)
print("interfaces " + json.dumps([used, advertised]), flush=True)
discovery = LanDiscovery(public_key, port)
selector = selectors.DefaultSelector()
selector.register(discovery, selectors.EVENT_READ)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    selector.select(deadline - time.monotonic())
    for peer in discovery.drain():
        print(json.dumps([peer.public_key.hex(), list(peer.addresses), peer.port]), flush=True)
discovery.close()
"""


@pytest.mark.root
def test_lan_discovery_between_two_namespaces() -> None:
    """Two real zeroconf responders+browsers on one veth segment find each other, not themselves.

    Host a also has a mesh-addressed interface (standing in for mg0): its addresses must not
    be advertised.
    """
    keys = {"a": _key(), "b": _key()}
    ports = {"a": 51821, "b": 51999}
    addresses = {"a": "192.168.88.1", "b": "192.168.88.2"}
    with Lab(prefix="mgmdns") as lab:
        hosts = {role: lab.namespace(role) for role in ("a", "b")}
        lab.link(hosts["a"], hosts["b"], "192.168.88.1/24", "192.168.88.2/24")
        for command in (
            ["ip", "tuntap", "add", "dev", "mgmesh", "mode", "tun"],
            ["ip", "addr", "add", "10.99.7.7/16", "dev", "mgmesh"],
            ["ip", "addr", "add", "fd99:6d67::77/64", "dev", "mgmesh", "nodad"],
            ["ip", "link", "set", "mgmesh", "up"],
        ):
            hosts["a"].run(command)
        env = {"PYTHONPATH": str(REPO)}
        procs = {
            role: hosts[role].popen(
                [sys.executable, "-c", _MDNS_NODE, keys[role].hex(), str(ports[role]), "15"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for role in hosts
        }
        seen: dict[str, list[tuple[str, list[str], int]]] = {"a": [], "b": []}
        interfaces: dict[str, list[list[str]]] = {}
        selector = selectors.DefaultSelector()
        for role, proc in procs.items():
            assert proc.stdout is not None
            os.set_blocking(proc.stdout.fileno(), False)
            selector.register(proc.stdout, selectors.EVENT_READ, role)
        buffers = {"a": b"", "b": b""}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(seen.values()):
            for key, _ in selector.select(0.5):
                chunk = key.fileobj.read()  # type: ignore[union-attr]
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffers[key.data] += chunk
                *lines, buffers[key.data] = buffers[key.data].split(b"\n")
                for line in lines:
                    if line.startswith(b"interfaces "):
                        interfaces[key.data] = json.loads(line.split(b" ", 1)[1])
                    if line.startswith(b"["):
                        seen[key.data].append(tuple(json.loads(line)))
        for role, proc in procs.items():
            if not seen[role]:
                lab.stop(proc)
                assert proc.stderr is not None
                pytest.fail(f"{role} found nobody: {proc.stderr.read().decode()[-2000:]}")
        for role in ("a", "b"):
            used, advertised = interfaces[role]
            assert addresses[role] in used
            assert not {"mgmesh", "10.99.7.7", "lo", "127.0.0.1"} & set(used)
            assert advertised == [addresses[role]]
        for role, other in (("a", "b"), ("b", "a")):
            assert {entry[0] for entry in seen[role]} == {keys[other].hex()}
            assert all(entry[1] == [addresses[other]] for entry in seen[role])
            assert all(entry[2] == ports[other] for entry in seen[role])
