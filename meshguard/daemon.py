"""``meshguard run``: the daemon on a real host.

It loads this node's identity from the configuration directory and the settings file, opens
the TUN interface (``mg0`` unless configured otherwise) with the node's mesh IPv4 and IPv6
addresses and routes to its static WireGuard peers' allowed IPs, binds the UDP port, and runs
the data plane until SIGINT or SIGTERM. Closing the TUN removes the interface with its
addresses and routes, so nothing is left behind. Log lines go to stderr as ``key=value``.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from meshguard.config import ConfigPaths, config_paths
from meshguard.drivers.loop import DataPlane, describe
from meshguard.drivers.netlink import configure_interface
from meshguard.drivers.tun import TunDevice
from meshguard.drivers.udp import UdpSocket
from meshguard.errors import UserError
from meshguard.identity.keyfile import load_identity
from meshguard.identity.meshaddr import mesh_ipv4, mesh_ipv6
from meshguard.sansio.types import Address
from meshguard.sansio.wireguard import DeviceConfig, WireGuardDevice
from meshguard.settings import HostPort, Settings, load_settings

log = logging.getLogger("meshguard")

MESH_IPV4_PREFIX = 16
MESH_IPV6_PREFIX = 64


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
    if args.config is not None:
        return load_settings(Path(args.config))
    if paths.config_file.exists():
        return load_settings(paths.config_file)
    return Settings()


def _resolve(endpoint: HostPort) -> Address:
    """An endpoint as an (IP, port) address; host names are looked up once, at start."""
    try:
        return (str(ipaddress.ip_address(endpoint.host)), endpoint.port)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_DGRAM)
    except socket.gaierror as error:
        raise UserError(f"cannot resolve endpoint {endpoint}: {error.strerror}") from None
    return (str(infos[0][4][0]), endpoint.port)


def _key_text(key: bytes) -> str:
    return base64.b64encode(key).decode()


def run_command(args: argparse.Namespace) -> int:
    """Run the daemon until SIGINT/SIGTERM; returns the exit status."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogfmtFormatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    log.propagate = False

    paths = _paths(args)
    identity = load_identity(paths.private_key)
    settings = _settings(args, paths)
    endpoints = [
        None if peer.endpoint is None else _resolve(peer.endpoint)
        for peer in settings.wireguard_peers
    ]
    device = WireGuardDevice(
        identity.x25519_private,
        entropy=os.urandom,
        rng=random.SystemRandom(),
        wallclock=time.time,
        config=DeviceConfig(mtu=settings.mtu),
    )
    now = time.monotonic()
    for peer, endpoint in zip(settings.wireguard_peers, endpoints, strict=True):
        device.add_peer(
            peer.public_key,
            allowed_ips=peer.allowed_ips,
            endpoint=endpoint,
            preshared_key=peer.preshared_key,
            persistent_keepalive=peer.persistent_keepalive,
            now=now,
        )

    offloads = not args.no_offload
    try:
        tun = TunDevice(settings.interface, offloads=offloads)
    except OSError as error:
        raise UserError(
            f"cannot create interface {settings.interface}: {error.strerror or error}"
        ) from None
    try:
        try:
            udp = UdpSocket(settings.listen_port, offloads=offloads)
        except OSError as error:
            raise UserError(
                f"cannot bind UDP port {settings.listen_port}: {error.strerror or error}"
            ) from None
        try:
            return _serve(device, tun, udp, settings, identity.public_key)
        finally:
            udp.close()
    finally:
        tun.close()


def _serve(
    device: WireGuardDevice,
    tun: TunDevice,
    udp: UdpSocket,
    settings: Settings,
    public_key: bytes,
) -> int:
    ipv4 = ipaddress.ip_interface(f"{mesh_ipv4(public_key)}/{MESH_IPV4_PREFIX}")
    ipv6 = ipaddress.ip_interface(f"{mesh_ipv6(public_key)}/{MESH_IPV6_PREFIX}")
    routes = [network for peer in settings.wireguard_peers for network in peer.allowed_ips]
    try:
        configure_interface(tun.name, mtu=settings.mtu, addresses=[ipv4, ipv6], routes=routes)
    except OSError as error:
        raise UserError(f"cannot configure interface {tun.name}: {error}") from None

    plane = DataPlane(
        device,
        tun,
        udp,
        mtu=settings.mtu,
        on_event=lambda event: log.info("event=%s", describe(event)),
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("event=stopping signal=%s", signal.Signals(signum).name)
        plane.stop()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    log.info(
        "event=started interface=%s mtu=%d listen_port=%d public_key=%s wg_public_key=%s "
        "ipv4=%s ipv6=%s tun_offload=%s udp_gso=%s udp_gro=%s peers=%d",
        tun.name,
        settings.mtu,
        udp.port,
        _key_text(public_key),
        _key_text(device.public_key),
        ipv4.ip,
        ipv6.ip,
        tun.vnet_hdr,
        udp.gso,
        udp.gro,
        len(settings.wireguard_peers),
    )
    try:
        plane.run()
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)
        plane.close()
    for peer in device.peers():
        stats = device.peer_stats(peer)
        log.info(
            "event=peer_summary peer=%s endpoint=%s rx_bytes=%d tx_bytes=%d handshake=%s",
            _key_text(peer),
            stats.endpoint,
            stats.rx_bytes,
            stats.tx_bytes,
            stats.handshake_completed,
        )
    drops = " ".join(f"{name}={count}" for name, count in sorted(device.counters.items()))
    log.info("event=stopped %s %s", drops, _counters_text(plane))
    return 0


def _counters_text(plane: DataPlane) -> str:
    counters = vars(plane.counters)
    return " ".join(f"{name}={value}" for name, value in counters.items())


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
