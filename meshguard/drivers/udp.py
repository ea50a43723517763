"""The UDP socket, with big buffers, GSO to send and GRO to receive when the kernel has them.

One ``sendmsg`` with a ``UDP_SEGMENT`` control message sends up to 64 equal-sized datagrams
to one destination (the last may be shorter); the kernel cuts them apart as late as possible.
With ``UDP_GRO`` one ``recvmsg`` returns a run of datagrams from one sender glued together,
with their size in a control message. Both are per call, never socket-wide, so ordinary
sends and receives keep working, and both fall back to one datagram per call.

GSO cannot fragment: a segment bigger than the path MTU fails the whole call with
``EMSGSIZE``. Datagrams above ``GSO_MAX_SEGMENT`` (the largest that fits a 1500-byte
Ethernet MTU over IPv4) therefore always go one per call, so the kernel fragments them; a
smaller path MTU lowers that limit the first time a GSO send fails with ``EMSGSIZE``, and
the failed run is sent again one datagram per call.

The socket is dual-stack (IPv6 with IPv4-mapped addresses); addresses are converted at the
edge so the core only ever sees ``("192.0.2.1", 51820)`` or ``("2001:db8::1", 51820)``.

``send_limited`` gives single datagrams their own IP TTL (IPv6 hop limit) as ancillary data
of their ``sendmsg`` (``IP_TTL`` at ``SOL_IP`` for IPv4, also to IPv4-mapped addresses on the
dual-stack socket, which the kernel hands to its IPv4 path; ``IPV6_HOPLIMIT`` at
``SOL_IPV6`` for IPv6): the socket's own TTL never changes, so nothing else sent meanwhile
is affected.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterable

from meshguard.sansio.types import Address

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
BUFFER_BYTES = 8 << 20
MAX_SEGMENTS = 64
MAX_GSO_BYTES = 65000
GSO_MAX_SEGMENT = 1500 - 20 - 8
RECV_BYTES = 65535
_CMSG_SPACE = socket.CMSG_SPACE(4)
_GRO_CMSG = struct.Struct("=i")
_SEGMENT = struct.Struct("=H")
_TTL = struct.Struct("=i")

_FALLBACK_ERRNOS = {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP}


def _gro_size(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The datagram size of a GRO run from ``recvmsg``'s control messages (0 if none)."""
    for level, kind, data in ancillary:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= _GRO_CMSG.size:
            size: int = _GRO_CMSG.unpack_from(data)[0]
            return size
    return 0


class UdpSocket:
    """A bound UDP socket that sends and receives in batches."""

    def __init__(self, port: int, *, host: str = "", offloads: bool = True) -> None:
        try:
            self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.dual_stack = True
        except OSError:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.dual_stack = False
        if not host:
            host = "::" if self.dual_stack else "0.0.0.0"
        elif self.dual_stack and ":" not in host:
            host = "::ffff:" + host
        self.sock.bind((host, port))
        self.port: int = self.sock.getsockname()[1]
        for force, plain, size in (
            (SO_SNDBUFFORCE, socket.SO_SNDBUF, BUFFER_BYTES),
            (SO_RCVBUFFORCE, socket.SO_RCVBUF, BUFFER_BYTES),
        ):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, force, size)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, plain, size)
        self.gso = offloads
        self.gso_max_segment = GSO_MAX_SEGMENT
        self.gro = False
        if offloads:
            try:
                self.sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                pass
        self.send_errors = 0
        self._to_core: dict[tuple[object, ...], Address] = {}
        self._to_kernel: dict[Address, tuple[str, int]] = {}

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def _core_address(self, raw: tuple[object, ...]) -> Address:
        address = self._to_core.get(raw)
        if address is None:
            host = str(raw[0])
            if host.startswith("::ffff:") and "." in host:
                host = host[7:]
            address = (host, int(raw[1]))  # type: ignore[call-overload]
            if len(self._to_core) > 4096:
                self._to_core.clear()
            self._to_core[raw] = address
        return address

    def _kernel_address(self, address: Address) -> tuple[str, int]:
        raw = self._to_kernel.get(address)
        if raw is None:
            host = address[0]
            if self.dual_stack and ":" not in host:
                host = "::ffff:" + host
            raw = (host, address[1])
            if len(self._to_kernel) > 4096:
                self._to_kernel.clear()
            self._to_kernel[address] = raw
        return raw

    def receive(self, max_calls: int) -> list[tuple[list[bytes], Address]]:
        """Datagrams waiting on the socket as runs from one sender, at most ``max_calls`` reads.

        Consecutive reads from the same sender are merged into one run, so the core sees
        one batch per sender.
        """
        runs: list[tuple[list[bytes], Address]] = []
        recvmsg = self.sock.recvmsg
        last_raw: object = None
        for _ in range(max_calls):
            try:
                data, ancillary, _flags, raw = recvmsg(RECV_BYTES, _CMSG_SPACE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            size = _gro_size(ancillary)
            if size and len(data) > size:
                datagrams = [data[i : i + size] for i in range(0, len(data), size)]
            else:
                datagrams = [data]
            if raw == last_raw:
                runs[-1][0].extend(datagrams)
            else:
                runs.append((datagrams, self._core_address(raw)))
                last_raw = raw
        return runs

    def send(self, datagrams: Iterable[tuple[bytes, Address]]) -> None:
        """Send datagrams, batching each destination's run of equal-sized ones with GSO.

        Datagrams too big for a GSO segment are sent one per call, in order with the rest.
        """
        by_destination: dict[Address, list[bytes]] = {}
        for data, address in datagrams:
            queue = by_destination.get(address)
            if queue is None:
                by_destination[address] = [data]
            else:
                queue.append(data)
        for address, queue in by_destination.items():
            raw = self._kernel_address(address)
            if self.gso and len(queue) > 1:
                self._send_gso(queue, raw)
            else:
                for data in queue:
                    self._send_one(data, raw)

    def send_limited(self, datagrams: Iterable[tuple[bytes, Address, int]]) -> None:
        """Send each datagram with its own IP TTL / IPv6 hop limit (1..255)."""
        sendmsg = self.sock.sendmsg
        for data, address, ttl in datagrams:
            if ":" in address[0]:
                control = (socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT, _TTL.pack(ttl))
            else:
                control = (socket.IPPROTO_IP, socket.IP_TTL, _TTL.pack(ttl))
            try:
                sendmsg([data], [control], 0, self._kernel_address(address))
            except OSError:
                self.send_errors += 1

    def _send_one(self, data: bytes, raw: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, raw)
        except OSError:
            self.send_errors += 1

    def _send_gso(self, queue: list[bytes], raw: tuple[str, int]) -> None:
        sendmsg = self.sock.sendmsg
        start = 0
        count = len(queue)
        while start < count:
            size = len(queue[start])
            end = start + 1
            if size > self.gso_max_segment:
                self._send_one(queue[start], raw)
                start = end
                continue
            limit = min(count, start + MAX_SEGMENTS, start + MAX_GSO_BYTES // size)
            while end < limit and len(queue[end]) == size:
                end += 1
            if end < limit and len(queue[end]) < size:
                end += 1
            if end - start == 1:
                self._send_one(queue[start], raw)
            else:
                try:
                    sendmsg(
                        queue[start:end], [(SOL_UDP, UDP_SEGMENT, _SEGMENT.pack(size))], 0, raw
                    )
                except OSError as error:
                    if error.errno == errno.EMSGSIZE:
                        self.gso_max_segment = min(self.gso_max_segment, size - 1)
                        for data in queue[start:end]:
                            self._send_one(data, raw)
                    elif error.errno in _FALLBACK_ERRNOS:
                        self.gso = False
                        for data in queue[start:end]:
                            self._send_one(data, raw)
                    else:
                        self.send_errors += 1
            start = end
