"""meshguard.toml parsing: every key, its default, and one-line errors for bad values."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path

import pytest

from meshguard.settings import (
    HostPort,
    Settings,
    SettingsError,
    load_settings,
    parse_flag_endpoint,
    parse_settings,
)

KEY = base64.b64encode(bytes(range(32))).decode()


def test_empty_file_gives_the_defaults() -> None:
    settings = parse_settings("")
    assert settings == Settings()
    assert settings.listen_port == 51821
    assert settings.interface == "mg0"
    assert settings.mtu == 1420
    assert settings.mdns is True
    assert settings.relay is False
    assert settings.opening_ttl == 2
    assert settings.eager_tunnels is False
    assert settings.swim_profile == "wan"
    assert settings.seeds == settings.advertise == settings.stun_servers == ()
    assert settings.metrics is None and settings.dns_seed_domain is None


def test_every_mesh_key_is_read() -> None:
    settings = parse_settings(
        """
        listen_port = 5000
        interface = "mesh1"
        mtu = 1380
        seeds = ["192.0.2.1:51821", "[2001:db8::1]:51821", "seed.example.com:51821",
                 "192.0.2.1:51821"]
        dns_seed_domain = "example.com."
        mdns = false
        eager_tunnels = true
        metrics = "127.0.0.1:0"
        swim_profile = "lan"
        advertise = ["198.51.100.7:5000", "[2001:db8::7]:5000"]
        stun_servers = ["stun.example.net:3478"]
        relay = true
        opening_ttl = 3

        [[wireguard_peer]]
        public_key = "{KEY}"
        endpoint = "192.0.2.9:51820"
        allowed_ips = ["10.99.7.7/32"]
        persistent_keepalive = 25
        """.replace("{KEY}", KEY)
    )
    assert settings.listen_port == 5000
    assert settings.interface == "mesh1"
    assert settings.mtu == 1380
    assert settings.seeds == (
        HostPort("192.0.2.1", 51821),
        HostPort("2001:db8::1", 51821),
        HostPort("seed.example.com", 51821),
    )
    assert settings.dns_seed_domain == "example.com"
    assert settings.mdns is False
    assert settings.eager_tunnels is True
    assert settings.metrics == HostPort("127.0.0.1", 0)
    assert settings.swim_profile == "lan"
    assert settings.advertise == (HostPort("198.51.100.7", 5000), HostPort("2001:db8::7", 5000))
    assert settings.stun_servers == (HostPort("stun.example.net", 3478),)
    assert settings.relay is True
    assert settings.opening_ttl == 3
    (peer,) = settings.wireguard_peers
    assert peer.public_key == bytes(range(32))
    assert peer.allowed_ips == (ipaddress.ip_network("10.99.7.7/32"),)
    assert peer.persistent_keepalive == 25


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listen_port = 70000", "listen_port: must be between 0 and 65535, got 70000"),
        ('mtu = "big"', "mtu: expected an integer, got a string"),
        ('interface = "far-too-long-name0"', "interface: 'far-too-long-name0' is not"),
        ("sedes = []", "sedes: unknown setting (known: advertise, data_plane, dns_seed_domain"),
        ('seeds = "192.0.2.1:51821"', 'seeds: expected a list of "host:port" strings'),
        ('seeds = ["192.0.2.1"]', "seeds[0]: expected host:port or [IPv6]:port"),
        ('seeds = ["2001:db8::1:51821"]', "seeds[0]: write an IPv6 endpoint as [address]:port"),
        ('seeds = ["192.0.2.1:0"]', "seeds[0]: port must be between 1 and 65535, got 0"),
        ('seeds = ["bad_host!:1"]', "seeds[0]: 'bad_host!' is not an IP address or host name"),
        ('dns_seed_domain = "no spaces.example"', "dns_seed_domain: 'no spaces.example' is not"),
        ("dns_seed_domain = 7", "dns_seed_domain: expected a string, got an integer"),
        ('mdns = "yes"', "mdns: expected true or false, got a string"),
        ("eager_tunnels = 1", "eager_tunnels: expected true or false, got an integer"),
        ('relay = "on"', "relay: expected true or false, got a string"),
        ("opening_ttl = 256", "opening_ttl: "),
        ("opening_ttl = -1", "opening_ttl: "),
        ('data_plane = "fast"', "data_plane: expected one of userspace, uapi, kernel, got 'fast'"),
        ("wireguard_go = 3", "wireguard_go: expected a string, got an integer"),
        (
            'wireguard_go = "/usr/bin/wireguard-go"',
            "wireguard_go and uapi_socket need the uapi data plane",
        ),
        (
            'data_plane = "uapi"\nwireguard_go = "wg"\nuapi_socket = "/run/wg.sock"',
            "set either wireguard_go or uapi_socket, not both",
        ),
        ('metrics = "9101"', "metrics: expected host:port or [IPv6]:port, got '9101'"),
        ('swim_profile = "fast"', "swim_profile: expected one of wan, lan, got 'fast'"),
        ('advertise = ["host.example:51821"]', "advertise[0]: 'host.example' is not an IP"),
        ("stun_servers = [3478]", "stun_servers[0]: expected a string, got an integer"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(text: str, message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        parse_settings(text, source="meshguard.toml")
    error = str(raised.value)
    assert "\n" not in error
    assert error.startswith("meshguard.toml: ")
    assert message in error


def test_flag_values_are_checked_like_the_file() -> None:
    assert parse_flag_endpoint("--seed", "[2001:db8::1]:1") == HostPort("2001:db8::1", 1)
    assert parse_flag_endpoint("--metrics", "0.0.0.0:0", allow_zero_port=True).port == 0
    with pytest.raises(SettingsError, match=r"^command line: --seed: port must be between 1"):
        parse_flag_endpoint("--seed", "192.0.2.1:0")


def test_unreadable_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="no such file"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"seeds = [\xff]")
    with pytest.raises(SettingsError, match="not UTF-8"):
        load_settings(bad)


PSK = base64.b64encode(b"\x07" * 32).decode()
OTHER_KEY = base64.b64encode(bytes(range(1, 33))).decode()


def test_wireguard_peers_every_field() -> None:
    settings = parse_settings(
        f"""
        [[wireguard_peer]]
        public_key = "{KEY}"
        endpoint = "192.0.2.1:51820"
        allowed_ips = ["10.99.7.7/32", "fd99:6d67::7/128", "192.168.5.9/24"]
        preshared_key = "{PSK}"
        persistent_keepalive = 25

        [[wireguard_peer]]
        public_key = "{OTHER_KEY}"
        endpoint = "[2001:db8::1]:51820"
        persistent_keepalive = 0
        """
    )
    first, second = settings.wireguard_peers
    assert first.public_key == bytes(range(32))
    assert first.endpoint == HostPort("192.0.2.1", 51820)
    assert first.allowed_ips == (
        ipaddress.ip_network("10.99.7.7/32"),
        ipaddress.ip_network("fd99:6d67::7/128"),
        ipaddress.ip_network("192.168.5.0/24"),
    )
    assert first.preshared_key == b"\x07" * 32
    assert first.persistent_keepalive == 25
    assert second.endpoint == HostPort("2001:db8::1", 51820)
    assert str(second.endpoint) == "[2001:db8::1]:51820"
    assert second.allowed_ips == () and second.preshared_key is None
    assert second.persistent_keepalive is None


def test_preshared_key_is_not_in_repr() -> None:
    settings = parse_settings(f'[[wireguard_peer]]\npublic_key = "{KEY}"\npreshared_key = "{PSK}"')
    assert PSK not in repr(settings) and "\\x07\\x07" not in repr(settings)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("endpoint = '192.0.2.1:5'", "wireguard_peer[0].public_key: missing"),
        ("public_key = 'AAAA'", "wireguard_peer[0].public_key: expected a base64 32-byte key"),
        (f"public_key = '{KEY}'\npreshared_key = 'x'", "wireguard_peer[0].preshared_key: expected"),
        (f"public_key = '{KEY}'\nendpoint = '192.0.2.1'", "wireguard_peer[0].endpoint: expected"),
        (
            f"public_key = '{KEY}'\nallowed_ips = ['10.0.0.0/33']",
            "wireguard_peer[0].allowed_ips[0]: '10.0.0.0/33' is not an address/prefix",
        ),
        (
            f"public_key = '{KEY}'\nallowed_ips = '10.0.0.0/8'",
            "wireguard_peer[0].allowed_ips: expected a list of CIDR strings, got a string",
        ),
        (
            f"public_key = '{KEY}'\npersistent_keepalive = 1.5",
            "wireguard_peer[0].persistent_keepalive: expected an integer, got a number",
        ),
        (
            f"public_key = '{KEY}'\npersistent_keepalive = 70000",
            "wireguard_peer[0].persistent_keepalive: must be between 0 and 65535",
        ),
        (f"public_key = '{KEY}'\nallowed-ips = []", "wireguard_peer[0].allowed-ips: unknown"),
        (
            f"public_key = '{KEY}'\n[[wireguard_peer]]\npublic_key = '{KEY}'",
            "wireguard_peer[1].public_key: same key as wireguard_peer[0]",
        ),
    ],
)
def test_bad_wireguard_peers_are_one_line_naming_the_field(table: str, message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        parse_settings("[[wireguard_peer]]\n" + table, source="meshguard.toml")
    error = str(raised.value)
    assert "\n" not in error
    assert error.startswith("meshguard.toml: ")
    assert message in error


def test_wireguard_peer_must_be_an_array_of_tables() -> None:
    with pytest.raises(SettingsError, match="wireguard_peer: expected \\[\\[wireguard_peer\\]\\]"):
        parse_settings("wireguard_peer = 3")


def test_data_plane_settings() -> None:
    settings = parse_settings('data_plane = "uapi"\nuapi_socket = "/run/wireguard/wg9.sock"')
    assert settings.data_plane == "uapi"
    assert settings.uapi_socket == "/run/wireguard/wg9.sock"
    assert settings.wireguard_go is None
    assert parse_settings('data_plane = "kernel"').data_plane == "kernel"
    assert parse_settings("").data_plane == "userspace"
