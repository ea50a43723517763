"""Real UDP sockets for the STUN pieces outside a running mesh.

- ``run_prober`` drives a ``NatProber`` on a UDP socket with a deadline loop (``meshguard
  netcheck`` uses it);
- ``monitor`` keeps asking STUN servers and prints every change of our public address;
- ``serve`` runs meshguard's own ``StunResponder`` on a socket, so tests and operators can
  use it as a plain STUN server: ``python -m meshguard.drivers.stun_socket serve --listen
  203.0.113.10:3478``. It prints ``listening on HOST:PORT`` once bound and runs until killed.

Sockets are dual-stack when any address is IPv6; addresses are converted at the edge so the
core only sees ``("192.0.2.1", 3478)`` or ``("2001:db8::1", 3478)``.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import select
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from pyroute2 import IPRoute

from meshguard.sansio.errors import LocalProtocolError
from meshguard.sansio.natdetect import NatProber, NatReport
from meshguard.sansio.stun import (
    MappedAddress,
    PublicAddressChanged,
    StunClient,
    StunResponder,
    StunTimeout,
    StunTiming,
)
from meshguard.sansio.types import Address

RECV_BYTES = 65535


class UsageError(ValueError):
    """A malformed address on the command line."""


def parse_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or (with a default port) a bare host or IPv6 literal."""
    host, port_text = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise UsageError(f"bad address {text!r}: expected [IPv6]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not port_text:
        if default_port is None:
            raise UsageError(f"bad address {text!r}: expected HOST:PORT")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 0xFFFF:
        raise UsageError(f"bad port in {text!r}")
    if not host:
        raise UsageError(f"bad address {text!r}: empty host")
    return host, int(port_text)


def resolve_server(text: str, default_port: int = 3478) -> Address:
    """A STUN server given as ``HOST[:PORT]``, resolved (IPv4 preferred)."""
    host, port = parse_host_port(text, default_port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve STUN server {host!r}: {exc.strerror}") from exc
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    address = infos[0][4]
    return str(address[0]), int(address[1])


def endpoint_text(address: Address) -> str:
    """``HOST:PORT``, with brackets around an IPv6 host."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ipv6(host: str) -> bool:
    return ":" in host


def open_udp_socket(bind_host: str, port: int, *, dual_stack: bool) -> socket.socket:
    """A UDP socket bound to (``bind_host``, ``port``); IPv6 dual-stack when asked."""
    if dual_stack or _is_ipv6(bind_host):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        host = bind_host if _is_ipv6(bind_host) else _to_wire(bind_host, ipv6=True)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        host = bind_host
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _to_wire(host: str, *, ipv6: bool) -> str:
    if not ipv6 or _is_ipv6(host):
        return host
    return "::" if host == "0.0.0.0" else f"::ffff:{host}"


def from_wire(sockaddr: tuple[object, ...]) -> Address:
    """A socket address as the core's (IP, port); IPv4-mapped IPv6 becomes IPv4."""
    host, port = str(sockaddr[0]).split("%")[0], int(str(sockaddr[1]))
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped), port
    return str(ip), port


def send(sock: socket.socket, data: bytes, addr: Address) -> None:
    """Send one datagram; an unreachable destination is the network's answer, not an error."""
    ipv6 = sock.family == socket.AF_INET6
    if not ipv6 and _is_ipv6(addr[0]):
        return
    with contextlib.suppress(OSError):
        sock.sendto(data, (_to_wire(addr[0], ipv6=ipv6), addr[1]))


def local_addresses(sock: socket.socket) -> list[Address]:
    """The (IP, port) pairs ``sock`` can be seen as when no NAT is in the way.

    A socket bound to a wildcard address uses whichever of the host's addresses the route
    picks, so every address of every interface counts.
    """
    bound = from_wire(sock.getsockname())
    if bound[0] not in ("0.0.0.0", "::"):
        return [bound]
    families = (
        {socket.AF_INET, socket.AF_INET6} if sock.family == socket.AF_INET6 else {socket.AF_INET}
    )
    with IPRoute() as netlink:
        hosts = [
            str(message.get_attr("IFA_ADDRESS"))
            for message in netlink.get_addr()
            if message["family"] in families and message.get_attr("IFA_ADDRESS") is not None
        ]
    return [(host, bound[1]) for host in dict.fromkeys(hosts)]


class StunMachine(Protocol):
    """What ``drive`` needs: the sans-IO interface plus ``matches`` to pick its datagrams."""

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]: ...
    def next_deadline(self) -> float | None: ...
    def on_timer(self, now: float) -> None: ...
    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None: ...
    def matches(self, data: bytes) -> bool: ...


def drive(
    sock: socket.socket,
    machine: StunMachine,
    done: Callable[[], bool],
    *,
    clock: Callable[[], float] = time.monotonic,
    budget: float | None = None,
) -> None:
    """Run ``machine`` on ``sock`` until ``done()`` is true.

    ``done`` is called after every step (a datagram or a timer), so it is also where the
    caller drains events. Datagrams the machine does not claim are ignored. ``budget`` (in
    seconds) bounds the run in case a machine's schedule is misconfigured.
    """
    give_up = None if budget is None else clock() + budget
    while True:
        for data, addr in machine.datagrams_to_send():
            send(sock, data, addr)
        if done():
            return
        now = clock()
        if give_up is not None and now >= give_up:
            raise TimeoutError(f"gave up after {budget:.0f} s")
        limits = [t for t in (machine.next_deadline(), give_up) if t is not None]
        readable, _, _ = select.select(
            [sock], [], [], max(0.0, min(limits) - now) if limits else None
        )
        received: tuple[bytes, tuple[object, ...]] | None = None
        if readable:
            with contextlib.suppress(OSError):
                received = sock.recvfrom(RECV_BYTES)
        if received is not None and machine.matches(received[0]):
            machine.receive_datagram(received[0], from_wire(received[1]), clock())
        deadline = machine.next_deadline()
        if deadline is not None and clock() >= deadline:
            machine.on_timer(clock())


def run_prober(sock: socket.socket, prober: NatProber, *, budget: float = 120.0) -> NatReport:
    """Run ``prober`` to completion on ``sock`` and return its report."""
    prober.start(time.monotonic())
    drive(sock, prober, lambda: prober.report is not None, budget=budget)
    if prober.report is None:
        raise LocalProtocolError("the prober stopped without a report")
    return prober.report


def monitor(sock: socket.socket, client: StunClient, servers: Sequence[Address]) -> None:
    """Watch our public address as ``servers`` see it; print one line per event, forever.

    Lines: ``mapped SERVER ADDRESS``, ``changed SERVER OLD -> NEW``, ``timeout SERVER``,
    ``error SERVER CODE REASON``.
    """

    def print_events() -> bool:
        for event in client.events():
            if isinstance(event, MappedAddress):
                line = f"mapped {endpoint_text(event.server)} {endpoint_text(event.mapped)}"
            elif isinstance(event, PublicAddressChanged):
                line = (
                    f"changed {endpoint_text(event.server)} {endpoint_text(event.previous)}"
                    f" -> {endpoint_text(event.current)}"
                )
            elif isinstance(event, StunTimeout):
                line = f"timeout {endpoint_text(event.server)}"
            else:
                line = (
                    f"error {endpoint_text(event.server)} {event.error.code} {event.error.reason}"
                )
            print(line, flush=True)
        return False

    for server in servers:
        client.monitor(server, time.monotonic())
    drive(sock, client, print_events)


def serve(sock: socket.socket, responder: StunResponder) -> None:
    """Answer Binding requests on ``sock`` until the process is stopped."""
    while True:
        try:
            data, sockaddr = sock.recvfrom(RECV_BYTES)
        except OSError:
            continue
        source = from_wire(sockaddr)
        reply = responder.answer(data, source)
        if reply is not None:
            send(sock, reply, source)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meshguard.drivers.stun_socket",
        description="meshguard's STUN responder and client on a plain UDP socket.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="answer STUN Binding requests")
    serve_parser.add_argument(
        "--listen", required=True, metavar="ADDR:PORT", help="address and UDP port to bind"
    )
    serve_parser.add_argument("--software", default="meshguard", help="SOFTWARE attribute")
    monitor_parser = commands.add_parser(
        "monitor", help="print our public address as STUN servers see it, and every change"
    )
    monitor_parser.add_argument("--stun", action="append", required=True, metavar="HOST:PORT")
    monitor_parser.add_argument("--port", type=int, default=0, help="local UDP port")
    monitor_parser.add_argument(
        "--refresh", type=float, default=60.0, metavar="SECONDS", help="time between asks"
    )
    monitor_parser.add_argument("--rto", type=float, default=0.5, metavar="SECONDS")
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            host, port = parse_host_port(args.listen)
            sock = open_udp_socket(host, port, dual_stack=False)
        else:
            servers = [resolve_server(text) for text in args.stun]
            timing = StunTiming(rto=args.rto, refresh_interval=args.refresh)
            sock = open_udp_socket(
                "0.0.0.0", args.port, dual_stack=any(":" in h for h, _ in servers)
            )
    except (UsageError, LocalProtocolError, OSError, OverflowError) as exc:
        print(f"stun_socket: error: {exc}", file=sys.stderr)
        return 2
    bound = from_wire(sock.getsockname())
    print(f"listening on {endpoint_text(bound)}", flush=True)
    with sock, contextlib.suppress(KeyboardInterrupt):
        if args.command == "serve":
            serve(sock, StunResponder(args.software))
        else:
            monitor(sock, StunClient(os.urandom, timing, "meshguard monitor"), servers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
