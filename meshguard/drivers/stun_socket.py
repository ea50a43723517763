"""Real UDP sockets for the STUN pieces outside a running mesh.

- ``run_prober`` drives a ``NatProber`` on a UDP socket with a deadline loop (``meshguard
  netcheck`` uses it);
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
import select
import socket
import sys
import time
from collections.abc import Callable, Sequence

from pyroute2 import IPRoute

from meshguard.sansio.natdetect import NatProber, NatReport
from meshguard.sansio.stun import StunResponder
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


def run_prober(
    sock: socket.socket,
    prober: NatProber,
    *,
    clock: Callable[[], float] = time.monotonic,
    budget: float = 120.0,
) -> NatReport:
    """Run ``prober`` to completion on ``sock`` and return its report.

    ``budget`` bounds the whole run in case the prober's schedule is misconfigured; datagrams
    that do not belong to the run are ignored.
    """
    give_up = clock() + budget
    prober.start(clock())
    while True:
        for data, addr in prober.datagrams_to_send():
            send(sock, data, addr)
        if prober.report is not None:
            return prober.report
        now = clock()
        if now >= give_up:
            raise TimeoutError(f"NAT detection did not finish within {budget:.0f} s")
        deadline = prober.next_deadline()
        wait = give_up - now if deadline is None else max(0.0, min(deadline, give_up) - now)
        readable, _, _ = select.select([sock], [], [], wait)
        if readable:
            try:
                data, sockaddr = sock.recvfrom(RECV_BYTES)
            except OSError:
                continue
            if prober.matches(data):
                prober.receive_datagram(data, from_wire(sockaddr), clock())
        else:
            prober.on_timer(clock())


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
        description="Run meshguard's STUN responder on a UDP socket.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="answer STUN Binding requests")
    serve_parser.add_argument(
        "--listen", required=True, metavar="ADDR:PORT", help="address and UDP port to bind"
    )
    serve_parser.add_argument("--software", default="meshguard", help="SOFTWARE attribute")
    args = parser.parse_args(argv)
    try:
        host, port = parse_host_port(args.listen)
        sock = open_udp_socket(host, port, dual_stack=False)
    except (UsageError, OSError) as exc:
        print(f"stun_socket: error: {exc}", file=sys.stderr)
        return 2
    bound = from_wire(sock.getsockname())
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    with sock, contextlib.suppress(KeyboardInterrupt):
        serve(sock, StunResponder(args.software))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
