"""Daemon settings: a TOML file read into frozen dataclasses, checked before anything starts.

Example::

    listen_port = 51821
    interface = "mg0"
    mtu = 1420

    seeds = ["203.0.113.10:51821", "[2001:db8::10]:51821", "seed.example.com:51821"]
    dns_seed_domain = "example.com"   # TXT records at _meshguard._udp.example.com
    mdns = true                       # LAN discovery (mDNS/DNS-SD)
    eager_tunnels = false             # handshake with every member at once
    metrics = "127.0.0.1:9101"        # Prometheus text at http://127.0.0.1:9101/metrics
    swim_profile = "wan"              # or "lan": faster failure detection on one LAN
    advertise = ["198.51.100.7:51821"]  # endpoints other members use; default: interfaces
    stun_servers = ["stun.example.net:3478"]  # learn (and advertise) the public endpoint
    relay = false                     # relay WireGuard datagrams between other members
    opening_ttl = 2                   # IP TTL of hole-punching opening probes; 0: none
    data_plane = "userspace"          # or "uapi" (wireguard-go, boringtun) or "kernel"
    wireguard_go = "/usr/bin/wireguard-go"  # uapi: the wireguard-go to start (default: PATH)
    uapi_socket = "/var/run/wireguard/wg0.sock"  # uapi: attach to a running one instead

    [[wireguard_peer]]              # a plain WireGuard device (phone, router, wireguard-go)
    public_key = "<base64 X25519>"
    endpoint = "192.0.2.1:51820"    # or "[2001:db8::1]:51820" or "host.example:51820"
    allowed_ips = ["10.99.7.7/32", "fd99:6d67::7/128"]
    preshared_key = "<base64>"      # optional
    persistent_keepalive = 25       # optional, seconds

Every problem is reported as one line naming the file and the field
(``meshguard.toml: wireguard_peer[1].endpoint: expected host:port``); unknown keys are errors,
so a typo never silently changes nothing. Each key is parsed by its own function (an entry in
``_TOP_LEVEL``). ``meshguard run``'s flags override the file; ``parse_flag_endpoint`` checks
their values the same way.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshguard.errors import UserError
from meshguard.sansio.traversal import TraversalConfig

DEFAULT_LISTEN_PORT = 51821
DEFAULT_INTERFACE = "mg0"
DEFAULT_MTU = 1420
DEFAULT_OPENING_TTL = TraversalConfig().opening_ttl
MIN_MTU = 1280
MAX_MTU = 65535 - 80

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_INTERFACE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,15}")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")


class SettingsError(UserError):
    """The settings file is unreadable or invalid; the message is one line naming the field."""


@dataclass(frozen=True, slots=True)
class HostPort:
    """An endpoint as written: an IP literal or a host name, and a UDP port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class WireGuardPeerSettings:
    """A static peer speaking plain WireGuard."""

    public_key: bytes
    endpoint: HostPort | None = None
    allowed_ips: tuple[Network, ...] = ()
    preshared_key: bytes | None = field(default=None, repr=False)
    persistent_keepalive: int | None = None


SWIM_PROFILES = ("wan", "lan")
DATA_PLANES = ("userspace", "uapi", "kernel")


@dataclass(frozen=True, slots=True)
class Settings:
    listen_port: int = DEFAULT_LISTEN_PORT
    interface: str = DEFAULT_INTERFACE
    mtu: int = DEFAULT_MTU
    wireguard_peers: tuple[WireGuardPeerSettings, ...] = ()
    seeds: tuple[HostPort, ...] = ()
    """Where to join when the state file knows nobody reachable; host names resolve at start."""
    dns_seed_domain: str | None = None
    """Seeds published as TXT records at ``_meshguard._udp.<domain>``."""
    mdns: bool = True
    eager_tunnels: bool = False
    metrics: HostPort | None = None
    """Where to serve Prometheus text (port 0: any free port); None: no metrics."""
    swim_profile: str = "wan"
    advertise: tuple[HostPort, ...] = ()
    """Endpoints (IP literals) other members reach this node at; empty: the host's interfaces."""
    stun_servers: tuple[HostPort, ...] = ()
    relay: bool = False
    """Relay datagrams between members that cannot reach each other (advertised in gossip)."""
    opening_ttl: int = DEFAULT_OPENING_TTL
    """IP TTL of the opening probes of hole punching: past our own NAT, short of the peer's
    (raise it when this host's NAT is more than one hop away, e.g. behind a carrier-grade
    NAT); 0 sends none."""
    data_plane: str = "userspace"
    """Who encrypts: meshguard itself, a UAPI implementation (wireguard-go), or the kernel."""
    wireguard_go: str | None = None
    """The wireguard-go executable the uapi data plane starts; None: ``wireguard-go`` on PATH."""
    uapi_socket: str | None = None
    """A running UAPI implementation's socket to attach to instead of starting wireguard-go."""



def load_settings(path: Path) -> Settings:
    """Read and check a settings file; raises SettingsError with one line on any problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise SettingsError(f"{path}: cannot read: {reason}") from None
    return parse_settings(text, source=str(path))


def parse_settings(text: str, *, source: str = "<settings>") -> Settings:
    """Parse settings from TOML text; ``source`` names it in error messages."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"{source}: invalid TOML: {error}") from None
    return _Parser(source).settings(document)


def parse_flag_endpoint(flag: str, text: str, *, allow_zero_port: bool = False) -> HostPort:
    """A ``HOST:PORT`` command-line value, checked like the file's; SettingsError names ``flag``."""
    return _Parser("command line").endpoint(flag, text, allow_zero_port=allow_zero_port)


def check_data_plane(settings: Settings, source: str) -> None:
    """wireguard_go and uapi_socket only make sense together with the uapi data plane."""
    if settings.uapi_socket is not None and settings.wireguard_go is not None:
        raise SettingsError(f"{source}: set either wireguard_go or uapi_socket, not both")
    if settings.data_plane != "uapi" and (settings.uapi_socket or settings.wireguard_go):
        raise SettingsError(
            f"{source}: wireguard_go and uapi_socket need the uapi data plane "
            f"(data_plane = \"uapi\"), not {settings.data_plane!r}"
        )


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, problem: str) -> SettingsError:
        return SettingsError(f"{self.source}: {field}: {problem}")

    def settings(self, document: Mapping[str, Any]) -> Settings:
        self.reject_unknown(document, set(_TOP_LEVEL), prefix="")
        values: dict[str, Any] = {}
        for key, (attribute, parse) in _TOP_LEVEL.items():
            if key in document:
                values[attribute] = parse(self, key, document[key])
        settings = Settings(**values)
        check_data_plane(settings, self.source)
        return settings

    def reject_unknown(self, table: Mapping[str, Any], known: set[str], prefix: str) -> None:
        for key in table:
            if key not in known:
                known_list = ", ".join(sorted(known))
                raise self.fail(prefix + key, f"unknown setting (known: {known_list})")

    def integer(self, field: str, value: Any, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(field, f"expected an integer, got {_kind(value)}")
        if not low <= value <= high:
            raise self.fail(field, f"must be between {low} and {high}, got {value}")
        return value

    def string(self, field: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.fail(field, f"expected a string, got {_kind(value)}")
        return value

    def listen_port(self, field: str, value: Any) -> int:
        return self.integer(field, value, 0, 65535)

    def mtu(self, field: str, value: Any) -> int:
        return self.integer(field, value, MIN_MTU, MAX_MTU)

    def opening_ttl(self, field: str, value: Any) -> int:
        return self.integer(field, value, 0, 255)

    def interface(self, field: str, value: Any) -> str:
        name = self.string(field, value)
        if not _INTERFACE_NAME.fullmatch(name) or name in (".", ".."):
            raise self.fail(
                field, f"{name!r} is not an interface name (1-15 of A-Z a-z 0-9 _ . -)"
            )
        return name

    def key(self, field: str, value: Any) -> bytes:
        text = self.string(field, value)
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != 32:
            raise self.fail(field, "expected a base64 32-byte key (44 characters)")
        return key

    def endpoint(self, field: str, value: Any, *, allow_zero_port: bool = False) -> HostPort:
        text = self.string(field, value).strip()
        host, separator, port_text = text.rpartition(":")
        if not separator or not host or not port_text.isdigit():
            raise self.fail(field, f"expected host:port or [IPv6]:port, got {text!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise self.fail(field, f"{host!r} is not an IPv6 address") from None
        elif ":" in host:
            raise self.fail(field, f"write an IPv6 endpoint as [address]:port, got {text!r}")
        else:
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                if not _HOSTNAME.fullmatch(host) or len(host) > 253:
                    raise self.fail(field, f"{host!r} is not an IP address or host name") from None
        port = int(port_text)
        lowest = 0 if allow_zero_port else 1
        if not lowest <= port <= 65535:
            raise self.fail(field, f"port must be between {lowest} and 65535, got {port}")
        return HostPort(host, port)

    def endpoints(self, field: str, value: Any) -> tuple[HostPort, ...]:
        if not isinstance(value, list):
            raise self.fail(field, f"expected a list of \"host:port\" strings, got {_kind(value)}")
        found = [self.endpoint(f"{field}[{index}]", item) for index, item in enumerate(value)]
        return tuple(dict.fromkeys(found))

    def ip_endpoints(self, field: str, value: Any) -> tuple[HostPort, ...]:
        found = self.endpoints(field, value)
        for index, endpoint in enumerate(found):
            try:
                ipaddress.ip_address(endpoint.host)
            except ValueError:
                raise self.fail(
                    f"{field}[{index}]", f"{endpoint.host!r} is not an IP address"
                ) from None
        return found

    def listen_address(self, field: str, value: Any) -> HostPort:
        return self.endpoint(field, value, allow_zero_port=True)

    def boolean(self, field: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(field, f"expected true or false, got {_kind(value)}")
        return value

    def domain(self, field: str, value: Any) -> str:
        name = self.string(field, value).strip().rstrip(".")
        if not _HOSTNAME.fullmatch(name) or len(name) > 253:
            raise self.fail(field, f"{name!r} is not a domain name")
        return name

    def swim_profile(self, field: str, value: Any) -> str:
        profile = self.string(field, value)
        if profile not in SWIM_PROFILES:
            raise self.fail(field, f"expected one of {', '.join(SWIM_PROFILES)}, got {profile!r}")
        return profile

    def data_plane(self, field: str, value: Any) -> str:
        mode = self.string(field, value)
        if mode not in DATA_PLANES:
            raise self.fail(field, f"expected one of {', '.join(DATA_PLANES)}, got {mode!r}")
        return mode

    def path(self, field: str, value: Any) -> str:
        text = self.string(field, value)
        if not text or "\0" in text:
            raise self.fail(field, "expected a file path")
        return text

    def networks(self, field: str, value: Any) -> tuple[Network, ...]:
        if not isinstance(value, list):
            raise self.fail(field, f"expected a list of CIDR strings, got {_kind(value)}")
        networks: list[Network] = []
        for index, item in enumerate(value):
            text = self.string(f"{field}[{index}]", item)
            try:
                networks.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                raise self.fail(f"{field}[{index}]", f"{text!r} is not an address/prefix") from None
        return tuple(networks)

    def wireguard_peers(self, field: str, value: Any) -> tuple[WireGuardPeerSettings, ...]:
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise self.fail(field, "expected [[wireguard_peer]] tables")
        peers: list[WireGuardPeerSettings] = []
        seen: dict[bytes, int] = {}
        for index, table in enumerate(value):
            prefix = f"{field}[{index}]."
            self.reject_unknown(table, set(_PEER_FIELDS), prefix=prefix)
            if "public_key" not in table:
                raise self.fail(prefix + "public_key", "missing")
            values = {
                attribute: parse(self, prefix + key, table[key])
                for key, (attribute, parse) in _PEER_FIELDS.items()
                if key in table
            }
            peer = WireGuardPeerSettings(**values)
            if peer.public_key in seen:
                raise self.fail(
                    prefix + "public_key", f"same key as {field}[{seen[peer.public_key]}]"
                )
            seen[peer.public_key] = index
            peers.append(peer)
        return tuple(peers)

    def keepalive(self, field: str, value: Any) -> int | None:
        seconds = self.integer(field, value, 0, 65535)
        return seconds or None


def _kind(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


_Field = tuple[str, Callable[[_Parser, str, Any], Any]]

_TOP_LEVEL: dict[str, _Field] = {
    "listen_port": ("listen_port", _Parser.listen_port),
    "interface": ("interface", _Parser.interface),
    "mtu": ("mtu", _Parser.mtu),
    "wireguard_peer": ("wireguard_peers", _Parser.wireguard_peers),
    "seeds": ("seeds", _Parser.endpoints),
    "dns_seed_domain": ("dns_seed_domain", _Parser.domain),
    "mdns": ("mdns", _Parser.boolean),
    "eager_tunnels": ("eager_tunnels", _Parser.boolean),
    "metrics": ("metrics", _Parser.listen_address),
    "swim_profile": ("swim_profile", _Parser.swim_profile),
    "advertise": ("advertise", _Parser.ip_endpoints),
    "stun_servers": ("stun_servers", _Parser.endpoints),
    "relay": ("relay", _Parser.boolean),
    "opening_ttl": ("opening_ttl", _Parser.opening_ttl),
    "data_plane": ("data_plane", _Parser.data_plane),
    "wireguard_go": ("wireguard_go", _Parser.path),
    "uapi_socket": ("uapi_socket", _Parser.path),
}

_PEER_FIELDS: dict[str, _Field] = {
    "public_key": ("public_key", _Parser.key),
    "endpoint": ("endpoint", _Parser.endpoint),
    "allowed_ips": ("allowed_ips", _Parser.networks),
    "preshared_key": ("preshared_key", _Parser.key),
    "persistent_keepalive": ("persistent_keepalive", _Parser.keepalive),
}
