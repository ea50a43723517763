"""Where a node finds its first peers: static seeds, DNS TXT records and the LAN (mDNS/DNS-SD).

Discovery only produces candidate addresses (and, on the LAN, the public key a responder
claims). Nothing found here is trusted: the daemon hands the addresses to SWIM, whose
authenticated handshake decides whether the node behind an address is a trusted member.

Static seeds are ``HOST:PORT`` strings; an IPv6 literal goes in brackets
(``[2001:db8::1]:51821``); HOST may also be a DNS name, resolved when the daemon starts.

DNS seeds are TXT records at ``_meshguard._udp.<domain>``. Each record is one seed entry::

    "v=mg1 addr=seed1.example.com:51821"
    "v=mg1 addr=192.0.2.10:51821 addr=[2001:db8::10]:51821"

Space-separated ``key=value`` fields; ``v=mg1`` must come first (records without it, such as
other TXT uses of the name, are skipped); ``addr`` may repeat; unknown fields are ignored so
later versions can add some. A record longer than 255 bytes is split by DNS into several
strings, which are joined before parsing.

LAN discovery advertises ``<name>._meshguard._udp.local.`` with the mesh UDP port, the node's
underlay addresses and TXT properties ``v=mg1`` and ``pk=<base64 Ed25519 public key>``, and
browses the same service type. Each sighting of another node becomes a ``LanPeer`` on a
thread-safe queue the daemon loop drains (``LanDiscovery.fileno()`` becomes readable when one
is waiting), because zeroconf calls back from its own threads.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import queue
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import dns.exception
import dns.rdatatype
import dns.resolver
import ifaddr
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from meshguard.errors import UserError
from meshguard.identity.keys import public_key_from_base64, public_key_to_base64
from meshguard.identity.meshaddr import MESH_IPV4_NETWORK, MESH_IPV6_NETWORK
from meshguard.sansio.types import Address

DNS_SEED_PREFIX = "_meshguard._udp."
MDNS_SERVICE_TYPE = "_meshguard._udp.local."
TXT_VERSION = "mg1"

_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class SeedError(UserError):
    """A seed string (from the command line, the config file or a TXT record) is malformed."""


class DiscoveryError(UserError):
    """LAN discovery cannot start (no usable interface, multicast socket refused)."""


@dataclass(frozen=True, slots=True)
class Seed:
    """A seed as written: ``host`` is an IP literal (no brackets) or a DNS name."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _is_hostname(text: str) -> bool:
    labels = text.rstrip(".").split(".")
    return len(text) <= 253 and all(_HOSTNAME_LABEL.match(label) for label in labels)


def parse_port(text: str, *, what: str, allow_zero: bool = False) -> int:
    """A UDP/TCP port number 1..65535 (0 too with ``allow_zero``) from its decimal text form."""
    lowest = 0 if allow_zero else 1
    if not text.isdigit() or not lowest <= int(text) <= 65535:
        raise SeedError(f"{what}: port must be a number from {lowest} to 65535, not {text!r}")
    return int(text)


def parse_host_port(text: str, *, what: str = "seed", allow_zero_port: bool = False) -> Seed:
    """Parse ``HOST:PORT`` (``[IPv6]:PORT`` for IPv6 literals); raises SeedError saying why not.

    ``what`` names the source in the error (``--seed``, ``seeds in meshguard.toml``, ...);
    ``allow_zero_port`` accepts port 0 (a listening address: "any free port").
    """
    text = text.strip()
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise SeedError(f"{what}: {text!r} is not [IPV6]:PORT")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise SeedError(f"{what}: {host!r} in brackets is not an IPv6 address") from None
        return Seed(
            host, parse_port(port_text, what=f"{what}: {text!r}", allow_zero=allow_zero_port)
        )
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise SeedError(f"{what}: {text!r} is not HOST:PORT")
    if ":" in host:
        raise SeedError(f"{what}: {text!r}: put an IPv6 address in brackets, as [{host}]:PORT")
    port = parse_port(port_text, what=f"{what}: {text!r}", allow_zero=allow_zero_port)
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if host.replace(".", "").isdigit() or not _is_hostname(host):
            raise SeedError(f"{what}: {host!r} is neither an IP address nor a host name") from None
    return Seed(host, port)


def resolve_seeds(seeds: Iterable[Seed]) -> tuple[list[Address], list[str]]:
    """Turn seeds into UDP addresses (every A/AAAA of a name); blocking, call it off the loop.

    Returns the addresses in order without duplicates, and one line per seed that did not resolve.
    """
    addresses: dict[Address, None] = {}
    problems: list[str] = []
    for seed in seeds:
        try:
            infos = socket.getaddrinfo(seed.host, seed.port, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as exc:
            problems.append(f"seed {seed}: cannot resolve {seed.host!r}: {exc}")
            continue
        for _family, _type, _proto, _name, sockaddr in infos:
            addresses[(str(sockaddr[0]), int(sockaddr[1]))] = None
    return list(addresses), problems


def parse_txt_record(text: str) -> list[Seed]:
    """The seeds of one ``_meshguard._udp`` TXT record; [] if it is not a ``v=mg1`` record.

    Raises SeedError for a ``v=mg1`` record with a malformed field.
    """
    fields = text.split()
    if not fields or fields[0] != f"v={TXT_VERSION}":
        return []
    seeds = []
    for field in fields[1:]:
        name, sep, value = field.partition("=")
        if not sep:
            raise SeedError(f"TXT record {text!r}: field {field!r} is not key=value")
        if name == "addr":
            seeds.append(parse_host_port(value, what=f"TXT record {text!r}"))
    return seeds


def dns_seed_name(domain: str) -> str:
    """The TXT owner name for a seed domain: ``_meshguard._udp.<domain>``."""
    domain = domain.strip().rstrip(".")
    if not _is_hostname(domain):
        raise SeedError(f"dns_seed_domain: {domain!r} is not a domain name")
    return f"{DNS_SEED_PREFIX}{domain}."


def lookup_dns_seeds(
    domain: str, *, nameservers: Sequence[str] | None = None, timeout: float = 5.0
) -> tuple[list[Seed], list[str]]:
    """Query TXT ``_meshguard._udp.<domain>`` and parse every record; blocking.

    ``nameservers`` overrides the system resolver (``/etc/resolv.conf``). Returns the seeds
    in record order without duplicates, and one line per problem (lookup failure, bad record).
    """
    name = dns_seed_name(domain)
    resolver = dns.resolver.Resolver(configure=nameservers is None)
    if nameservers is not None:
        resolver.nameservers = list(nameservers)
    resolver.lifetime = timeout
    try:
        answer = resolver.resolve(name, dns.rdatatype.TXT)
    except dns.resolver.NXDOMAIN:
        return [], [f"DNS seeds: {name} does not exist"]
    except dns.resolver.NoAnswer:
        return [], [f"DNS seeds: {name} has no TXT records"]
    except dns.exception.DNSException as exc:
        return [], [f"DNS seeds: lookup of {name} failed: {exc}"]
    seeds: dict[Seed, None] = {}
    problems: list[str] = []
    for rdata in answer:
        text = b"".join(rdata.strings).decode("utf-8", errors="replace")
        try:
            seeds.update(dict.fromkeys(parse_txt_record(text)))
        except SeedError as exc:
            problems.append(f"DNS seeds: {exc}")
    return list(seeds), problems


@dataclass(frozen=True, slots=True)
class LanPeer:
    """A node seen on the LAN: the key it claims (unverified) and where it says it listens."""

    public_key: bytes
    addresses: tuple[str, ...]
    port: int

    def udp_addresses(self) -> list[Address]:
        return [(host, self.port) for host in self.addresses]


def is_underlay_address(text: str) -> bool:
    """Whether an address may carry mesh traffic from another host.

    Excludes the mesh ranges (a tunnel address is no way to reach a node that has no tunnel
    yet), loopback, unspecified and link-local addresses (the latter would need a scope id).
    """
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if address in MESH_IPV4_NETWORK or address in MESH_IPV6_NETWORK:
        return False
    return not (address.is_loopback or address.is_unspecified or address.is_link_local)


def mdns_instance_name(public_key: bytes) -> str:
    """The DNS-SD instance name of a node: ``mg-<first 12 hex digits of its key>``."""
    return f"mg-{public_key[:6].hex()}.{MDNS_SERVICE_TYPE}"


def parse_mdns_properties(properties: dict[bytes, bytes | None]) -> bytes | None:
    """The public key from a responder's TXT properties, or None if they are not ``v=mg1``."""
    if properties.get(b"v") != TXT_VERSION.encode():
        return None
    encoded = properties.get(b"pk")
    if encoded is None:
        return None
    try:
        return public_key_from_base64(encoded.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None


class LanDiscovery:
    """An mDNS/DNS-SD responder for this node and a browser for the others.

    Starts on construction; ``close()`` withdraws the advertisement (a goodbye packet) and
    stops zeroconf's threads. It runs on every interface except loopback and the mesh TUN, and
    advertises their addresses (``is_underlay_address``) unless ``addresses`` are given; the
    interfaces are read once, at start. Raises DiscoveryError if it cannot start.
    """

    def __init__(
        self,
        public_key: bytes,
        port: int,
        *,
        addresses: Sequence[str] | None = None,
    ) -> None:
        self._public_key = public_key
        self._found: queue.SimpleQueue[LanPeer] = queue.SimpleQueue()
        interfaces, found = _underlay_interfaces()
        if not interfaces:
            raise DiscoveryError("mDNS: no network interface to run on (only loopback and mesh)")
        advertised = found if addresses is None else list(addresses)
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._zeroconf = Zeroconf(interfaces=interfaces, ip_version=IPVersion.All)
        except OSError as error:
            os.close(self._wake_read)
            os.close(self._wake_write)
            raise DiscoveryError(f"mDNS: cannot start: {error}") from None
        self._info = ServiceInfo(
            MDNS_SERVICE_TYPE,
            mdns_instance_name(public_key),
            port=port,
            properties={"v": TXT_VERSION, "pk": public_key_to_base64(public_key)},
            server=f"mg-{public_key[:6].hex()}.local.",
            parsed_addresses=[a for a in advertised if is_underlay_address(a)],
        )
        try:
            self._zeroconf.register_service(self._info, allow_name_change=True)
            self._browser = ServiceBrowser(
                self._zeroconf, MDNS_SERVICE_TYPE, handlers=[self._on_service_state_change]
            )
        except BaseException:
            self._zeroconf.close()
            os.close(self._wake_read)
            os.close(self._wake_write)
            raise

    def fileno(self) -> int:
        """A descriptor that is readable while discovered peers wait in ``drain()``."""
        return self._wake_read

    def drain(self) -> list[LanPeer]:
        """Every peer sighted since the last call (the same peer may appear again later)."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_read, 4096):
                pass
        found = []
        while True:
            try:
                found.append(self._found.get_nowait())
            except queue.Empty:
                return found

    def close(self) -> None:
        self._browser.cancel()
        self._zeroconf.unregister_service(self._info)
        self._zeroconf.close()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        """Runs on zeroconf's browser thread, so it only ever touches the queue and the pipe."""
        if state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
            return
        info = zeroconf.get_service_info(service_type, name, timeout=3000)
        if info is None or info.port is None:
            return
        public_key = parse_mdns_properties(info.properties)
        if public_key is None or public_key == self._public_key:
            return
        addresses = tuple(a for a in info.parsed_addresses() if is_underlay_address(a))
        if not addresses:
            return
        self._found.put(LanPeer(public_key, addresses, info.port))
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b"\0")


def _underlay_interfaces() -> tuple[list[str | int], list[str]]:
    """Where to run mDNS and what to advertise: every interface but loopback and the mesh's own.

    Returns zeroconf's interface list (IPv4 addresses, and interface indexes for IPv6) and the
    addresses to advertise (``is_underlay_address``). An interface carrying a mesh address is
    the TUN device: announcing the mesh over the mesh would only loop back into it.
    """
    interfaces: list[str | int] = []
    advertised: list[str] = []
    for adapter in ifaddr.get_adapters():
        texts = [ip.ip if isinstance(ip.ip, str) else ip.ip[0] for ip in adapter.ips]
        addresses = [ipaddress.ip_address(text.split("%")[0]) for text in texts]
        if any(a in MESH_IPV4_NETWORK or a in MESH_IPV6_NETWORK for a in addresses):
            continue
        if all(a.is_loopback for a in addresses):
            continue
        interfaces.extend(str(a) for a in addresses if a.version == 4)
        if adapter.index is not None and any(a.version == 6 for a in addresses):
            interfaces.append(adapter.index)
        advertised.extend(str(a) for a in addresses if is_underlay_address(str(a)))
    return interfaces, sorted(set(advertised))
