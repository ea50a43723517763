"""The daemon's control socket: ``meshguard status``, ``peers``, ``ping`` and ``down``.

Where: ``<config dir>/meshguard.sock``, so a command talks to the daemon of the configuration
directory it was given (``--config-dir``) and several daemons (the demo, tests) never collide.
The socket inherits the protection of the config directory (root-only ``/etc/meshguard``, which
also holds the private key), is created mode 0600 (bound under a temporary name, chmod-ed, then
renamed into place, so it is never reachable with looser permissions), and every connection's
peer credentials (SO_PEERCRED) must be uid 0 or the daemon's own uid.

Protocol: newline-delimited JSON over a stream socket, one request at a time per connection::

    → {"cmd": "status"}                      ← {"ok": true, "result": Status}
    → {"cmd": "peers"}                       ← {"ok": true, "result": [MemberStatus, ...]}
    → {"cmd": "ping", "peer": "db1", "timeout": 2.0, "ipv6": false}
                                             ← {"ok": true, "result": PingReport}
    → {"cmd": "down"}                        ← {"ok": true, "result": {"stopping": true}}
    any failure                              ← {"ok": false, "error": "<one line>"}

Why the server is driven by the daemon's own loop and not a thread: ``status`` reads the live
state of the node, which only the loop thread may touch; answering from the loop needs no locks.
``ControlServer`` keeps its sockets in a private epoll selector and exposes that selector's one
descriptor (``fileno()``): the daemon registers it for reading in its own loop and calls
``handle_ready()`` whenever it is readable; nothing in there blocks. A ping takes a round trip,
so ``StatusSource.ping`` completes through a callback, which may be invoked later from the loop
or from any other thread.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import selectors
import socket
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, Protocol, TypedDict

from meshguard.errors import UserError

SOCKET_NAME = "meshguard.sock"
MAX_SOCKET_PATH = 107
"""sun_path holds 108 bytes including the terminating NUL."""
MAX_REQUEST_BYTES = 64 * 1024
MAX_CONNECTIONS = 32
MAX_PING_TIMEOUT = 30.0
COMMANDS = ("status", "peers", "ping", "down")

log = logging.getLogger(__name__)


class NodeStatus(TypedDict):
    """This node, as ``status`` reports it."""

    public_key: str
    mesh_ipv4: str
    mesh_ipv6: str
    interface: str
    listen_port: int
    data_plane: str
    """"userspace", "kernel" or "uapi"."""
    uptime: float
    """Seconds since the daemon started."""


class MemberStatus(TypedDict):
    """One row of the member table (``status``); rows with a tunnel also form ``peers``."""

    name: str
    """The peer's name in authorized_keys/, or "-"."""
    public_key: str
    """Base64 Ed25519 public key."""
    mesh_ipv4: str
    mesh_ipv6: str
    endpoint: str | None
    """The UDP endpoint traffic goes to ("HOST:PORT", IPv6 in brackets), None if none yet."""
    path: str
    """"direct", "punched" (direct after hole punching), "relayed", or "-" (no path)."""
    state: str
    """Membership state: "alive", "suspect", "dead" or "left"."""
    tunnel: bool
    """Whether a WireGuard peer (session or pending handshake) exists for this member."""
    last_handshake: float | None
    """Unix time of the last completed handshake, None if never."""
    rx_bytes: int
    tx_bytes: int


class StaticPeerStatus(TypedDict):
    """A ``[[wireguard_peer]]`` from the settings: plain WireGuard, outside the mesh."""

    public_key: str
    """Base64 X25519 (WireGuard) public key."""
    allowed_ips: list[str]
    endpoint: str | None
    last_handshake: float | None
    """Wall-clock seconds of the latest handshake, None before the first."""
    rx_bytes: int
    tx_bytes: int


class Status(TypedDict):
    node: NodeStatus
    members: list[MemberStatus]
    static_peers: NotRequired[list[StaticPeerStatus]]
    counters: NotRequired[dict[str, int]]
    """Hole punching and relay counters (``relay_forwarded``, ``punch_succeeded``, ...)."""


class PingResult(TypedDict):
    """What the daemon measured for one ping."""

    reply: bool
    rtt_ms: float | None
    """Round-trip time in milliseconds; None without a reply."""
    path: str
    """The path the probe took: "direct", "punched", "relayed" or "-"."""
    endpoint: str | None
    detail: str
    """Why there was no reply ("timed out", "no tunnel", ...); "" on success."""


class PingReport(PingResult):
    """A ``PingResult`` together with the member it went to."""

    name: str
    public_key: str
    mesh_ipv4: str
    mesh_ipv6: str
    address: str
    """The mesh address that was pinged (the member's IPv4 or IPv6)."""


PingDone = Callable[[PingResult], None]


class StatusSource(Protocol):
    """What the daemon provides to the control socket; called on the daemon's loop thread."""

    def status(self) -> Status:
        """A snapshot of this node and every member."""
        ...

    def ping(
        self, public_key: bytes, timeout: float, done: PingDone, *, ipv6: bool = False
    ) -> None:
        """Start one ping of the member's mesh IPv4 (or IPv6); call ``done`` exactly once,
        from any thread, when the reply arrives or after ``timeout`` seconds. Must not block."""
        ...

    def shutdown(self) -> None:
        """Begin a graceful shutdown (leave the mesh, remove the interface, exit)."""
        ...


class ControlError(UserError):
    """A control command failed; the message is one line for the user."""


def socket_path(config_dir: Path) -> Path:
    """``<config dir>/meshguard.sock``; raises ControlError if the path is too long for AF_UNIX."""
    path = config_dir.absolute() / SOCKET_NAME
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ControlError(
            f"control socket path {path} is longer than {MAX_SOCKET_PATH} bytes; "
            "use a shorter config directory"
        )
    return path


def _peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _is_ipv6_literal(query: str) -> bool:
    try:
        return ipaddress.ip_address(query.strip()).version == 6
    except ValueError:
        return False


def resolve_peer(query: str, members: list[MemberStatus]) -> MemberStatus:
    """The member meant by ``query``: a name, a base64 key, a mesh IP, or a unique key prefix.

    Raises ControlError naming the problem (no such member, or several match).
    """
    query = query.strip()
    try:
        address = ipaddress.ip_address(query)
    except ValueError:
        address = None

    def has_address(member: MemberStatus) -> bool:
        mesh_ips = (member["mesh_ipv4"], member["mesh_ipv6"])
        return address is not None and address in map(ipaddress.ip_address, mesh_ips)

    for matches in (
        [m for m in members if m["name"] == query],
        [m for m in members if m["public_key"] == query],
        [m for m in members if has_address(m)],
        [m for m in members if len(query) >= 4 and m["public_key"].startswith(query)],
    ):
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(f"{m['name']} ({m['public_key'][:8]})" for m in matches)
            raise ControlError(f"{query!r} matches several members: {names}")
    raise ControlError(f"no member matches {query!r} (give a name, a public key or a mesh IP)")


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    waiting: bool = False
    """A reply is owed (a ping in flight): later requests wait in ``inbuf``."""
    closing: bool = False
    """Close once ``outbuf`` is flushed."""


class ControlServer:
    """The listening control socket and its connections, driven by ``handle_ready()``.

    Raises ControlError if another daemon already serves ``path``, or if ``path`` exists and is
    not a socket. A socket left by a crashed daemon (connection refused) is replaced.
    """

    def __init__(
        self, path: Path, source: StatusSource, *, allowed_uids: frozenset[int] | None = None
    ) -> None:
        self.path = path
        self._source = source
        self._allowed_uids = allowed_uids or frozenset({0, os.geteuid()})
        self._selector = selectors.EpollSelector()
        self._connections: dict[int, _Connection] = {}
        self._completed: list[tuple[_Connection, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._closed = False
        _remove_stale_socket(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            temporary = path.parent / f".mg{secrets.token_hex(4)}"  # no longer than ``path``
            self._listener.bind(os.fsencode(temporary))
            try:
                os.chmod(temporary, 0o600)
                os.rename(temporary, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
                raise
            self._inode = os.stat(path).st_ino
            self._listener.listen(16)
            self._listener.setblocking(False)
            self._selector.register(self._listener, selectors.EVENT_READ, None)
            self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        except OSError as error:
            self._release()
            raise ControlError(f"cannot create the control socket {path}: {error}") from None

    def fileno(self) -> int:
        """Readable whenever ``handle_ready()`` has work to do."""
        return self._selector.fileno()

    def handle_ready(self) -> None:
        """Accept, read, answer and flush whatever is ready; never blocks."""
        for key, events in self._selector.select(0):
            if key.fileobj is self._listener:
                self._accept()
            elif key.fileobj == self._wake_read:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_read, 4096):
                        pass
            else:
                connection: _Connection = key.data
                if events & selectors.EVENT_READ:
                    self._read(connection)
                if events & selectors.EVENT_WRITE and connection.sock.fileno() >= 0:
                    self._flush(connection)
        with self._lock:
            completed, self._completed = self._completed, []
        for connection, message in completed:
            if connection.sock.fileno() >= 0:
                connection.waiting = False
                self._send(connection, message)
                self._process(connection)

    def close(self) -> None:
        """Close every connection and remove the socket file (if it is still ours)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for connection in list(self._connections.values()):
            self._drop(connection)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        self._release()

    def _release(self) -> None:
        self._selector.close()
        self._listener.close()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            uid = _peer_uid(sock)
            if uid not in self._allowed_uids or len(self._connections) >= MAX_CONNECTIONS:
                reason = (
                    f"permission denied: uid {uid} may not use the control socket"
                    if uid not in self._allowed_uids
                    else "too many control connections"
                )
                with contextlib.suppress(OSError):
                    sock.send(_encode({"ok": False, "error": reason}))
                sock.close()
                log.warning("control: refused a connection: %s", reason)
                continue
            connection = _Connection(sock)
            self._connections[sock.fileno()] = connection
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _read(self, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(connection)
            return
        connection.inbuf += data
        self._process(connection)
        if len(connection.inbuf) > MAX_REQUEST_BYTES and not connection.closing:
            connection.inbuf.clear()
            connection.closing = True
            self._send(connection, {"ok": False, "error": "request too long"})

    def _process(self, connection: _Connection) -> None:
        """Answer complete request lines in order, stopping while a reply is owed."""
        while not connection.waiting and not connection.closing:
            line, newline, rest = bytes(connection.inbuf).partition(b"\n")
            if not newline:
                return
            connection.inbuf[:] = rest
            if line.strip():
                self._answer(connection, line)

    def _answer(self, connection: _Connection, line: bytes) -> None:
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            self._send(connection, {"ok": False, "error": "request is not JSON"})
            return
        command = request.get("cmd") if isinstance(request, dict) else None
        if command not in COMMANDS:
            known = ", ".join(COMMANDS)
            self._send(connection, {"ok": False, "error": f"unknown command {command!r} ({known})"})
            return
        try:
            if command == "status":
                self._send(connection, {"ok": True, "result": self._source.status()})
            elif command == "peers":
                rows = [row for row in self._source.status()["members"] if row["tunnel"]]
                self._send(connection, {"ok": True, "result": rows})
            elif command == "down":
                self._source.shutdown()
                self._send(connection, {"ok": True, "result": {"stopping": True}})
            else:
                self._start_ping(connection, request)
        except ControlError as error:
            self._send(connection, {"ok": False, "error": str(error)})
        except Exception as error:
            log.exception("control: %s failed", command)
            self._send(connection, {"ok": False, "error": f"internal error in {command}: {error}"})

    def _start_ping(self, connection: _Connection, request: dict[str, Any]) -> None:
        peer, timeout = request.get("peer"), request.get("timeout", 2.0)
        if not isinstance(peer, str):
            raise ControlError("ping needs a peer (a name, a public key or a mesh IP)")
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 0 < timeout <= MAX_PING_TIMEOUT
        ):
            raise ControlError(f"ping timeout must be seconds in (0, {MAX_PING_TIMEOUT:g}]")
        ipv6 = request.get("ipv6", _is_ipv6_literal(peer))
        if not isinstance(ipv6, bool):
            raise ControlError("ping ipv6 must be true or false")
        member = resolve_peer(peer, self._source.status()["members"])
        finished = threading.Event()

        def done(result: PingResult) -> None:
            if finished.is_set():
                return
            finished.set()
            report = PingReport(
                name=member["name"],
                public_key=member["public_key"],
                mesh_ipv4=member["mesh_ipv4"],
                mesh_ipv6=member["mesh_ipv6"],
                address=member["mesh_ipv6" if ipv6 else "mesh_ipv4"],
                reply=result["reply"],
                rtt_ms=result["rtt_ms"],
                path=result["path"],
                endpoint=result["endpoint"],
                detail=result["detail"],
            )
            with self._lock:
                if self._closed:
                    return
                self._completed.append((connection, {"ok": True, "result": report}))
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake_write, b"\0")

        connection.waiting = True
        try:
            self._source.ping(
                base64.b64decode(member["public_key"]), float(timeout), done, ipv6=ipv6
            )
        except BaseException:
            finished.set()
            connection.waiting = False
            raise

    def _send(self, connection: _Connection, message: dict[str, Any]) -> None:
        connection.outbuf += _encode(message)
        self._flush(connection)

    def _flush(self, connection: _Connection) -> None:
        try:
            while connection.outbuf:
                sent = connection.sock.send(connection.outbuf)
                del connection.outbuf[:sent]
        except BlockingIOError:
            pass
        except OSError:
            self._drop(connection)
            return
        if not connection.outbuf and connection.closing:
            self._drop(connection)
            return
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if connection.outbuf else 0)
        if self._selector.get_key(connection.sock).events != wanted:
            self._selector.modify(connection.sock, wanted, connection)

    def _drop(self, connection: _Connection) -> None:
        if connection.sock.fileno() < 0:
            return
        self._connections.pop(connection.sock.fileno(), None)
        self._selector.unregister(connection.sock)
        connection.sock.close()


def _remove_stale_socket(path: Path) -> None:
    """Clear ``path`` for a new daemon, refusing if a live daemon answers there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket; remove it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fsencode(path))
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError as error:
        raise ControlError(f"cannot check the existing control socket {path}: {error}") from None
    finally:
        probe.close()
    raise ControlError(f"a meshguard daemon is already running for {path.parent} (socket {path})")


class ControlClient:
    """Talks to the daemon of one config directory; one connection, reused, blocking."""

    def __init__(self, config_dir: Path, *, timeout: float = 5.0) -> None:
        self.config_dir = config_dir
        self.path = socket_path(config_dir)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def status(self) -> Status:
        result: Status = self.request({"cmd": "status"})
        return result

    def peers(self) -> list[MemberStatus]:
        result: list[MemberStatus] = self.request({"cmd": "peers"})
        return result

    def ping(self, peer: str, timeout: float = 2.0, *, ipv6: bool | None = None) -> PingReport:
        """Ping ``peer``'s mesh IPv4, or its IPv6 with ``ipv6`` (default: IPv6 only when
        ``peer`` is an IPv6 address)."""
        request: dict[str, Any] = {"cmd": "ping", "peer": peer, "timeout": timeout}
        if ipv6 is not None:
            request["ipv6"] = ipv6
        result: PingReport = self.request(request, wait=self.timeout + timeout)
        return result

    def down(self) -> None:
        self.request({"cmd": "down"})

    def request(self, message: dict[str, Any], *, wait: float | None = None) -> Any:
        """Send one request and return its result; raises ControlError with the daemon's reason."""
        sock = self._connect()
        sock.settimeout(self.timeout if wait is None else wait)
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                # A daemon that refuses the connection says why and closes at once, maybe
                # before the request is written: the reason is still there to read.
                sock.sendall(_encode(message))
            while b"\n" not in self._buffer:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ControlError(f"the daemon closed the control connection ({self.path})")
                self._buffer += chunk
        except TimeoutError:
            self.close()
            raise ControlError(f"the daemon did not answer on {self.path}") from None
        except OSError as error:
            self.close()
            raise ControlError(f"control connection to {self.path} failed: {error}") from None
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            reply = json.loads(line)
            ok, payload = reply["ok"], reply["result"] if reply["ok"] else reply["error"]
        except (ValueError, TypeError, KeyError):
            raise ControlError(f"the daemon sent a malformed reply on {self.path}") from None
        if not ok:
            raise ControlError(str(payload))
        return payload

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fsencode(self.path))
        except FileNotFoundError:
            sock.close()
            raise ControlError(
                f"no daemon running for config dir {self.config_dir} (socket {self.path} not found)"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise ControlError(
                f"no daemon running for config dir {self.config_dir} "
                f"(stale socket {self.path}: connection refused)"
            ) from None
        except PermissionError:
            sock.close()
            raise ControlError(
                f"permission denied on {self.path}: the control socket is root-only"
            ) from None
        except OSError as error:
            sock.close()
            raise ControlError(f"cannot connect to {self.path}: {error}") from None
        self._sock = sock
        return sock
