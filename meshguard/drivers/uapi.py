"""The cross-platform WireGuard UAPI: configure wireguard-go, boringtun & co. over their socket.

The protocol (wireguard.com/xplatform) is line-based text over a unix socket, usually
``/var/run/wireguard/<interface>.sock``: a ``set=1`` or ``get=1`` request of ``key=value``
lines ended by an empty line; the answer ends with ``errno=N`` and an empty line (``get``
lists the device, then each peer starting at its ``public_key``). Keys travel as hex.

``WireGuardGo`` starts ``wireguard-go -f <interface>`` as a child process, waits for its
socket and, on ``close``, kills it by PID and removes the socket if it is left behind. The
child gets SIGTERM from the kernel if meshguard dies (``PR_SET_PDEATHSIG``), so a crash does
not leave it holding the interface.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from meshguard.errors import UserError
from meshguard.sansio.types import Address

SOCKET_DIRECTORY = Path("/var/run/wireguard")
_TIMEOUT = 5.0
_START_TIMEOUT = 10.0
_MAX_REPLY = 1 << 22
_PR_SET_PDEATHSIG = 1

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class UapiError(UserError):
    """The UAPI socket is unreachable or refused a request (one line)."""


@dataclass(frozen=True, slots=True)
class ExternalPeerStats:
    """What the external implementation reports about one peer."""

    endpoint: str | None
    last_handshake: float | None
    """Wall-clock seconds, None before the first handshake."""
    rx_bytes: int
    tx_bytes: int


def socket_path(interface: str) -> Path:
    return SOCKET_DIRECTORY / f"{interface}.sock"


def _endpoint_text(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_lines(
    public_key: bytes,
    *,
    endpoint: Address | None,
    allowed_ips: Iterable[Network],
    persistent_keepalive: int | None = None,
    preshared_key: bytes | None = None,
) -> list[str]:
    """The ``set`` lines that create or update one peer, replacing its allowed IPs."""
    lines = [f"public_key={public_key.hex()}"]
    if preshared_key is not None:
        lines.append(f"preshared_key={preshared_key.hex()}")
    if endpoint is not None:
        lines.append(f"endpoint={_endpoint_text(endpoint)}")
    lines.append(f"persistent_keepalive_interval={persistent_keepalive or 0}")
    lines.append("replace_allowed_ips=true")
    lines.extend(f"allowed_ip={network}" for network in allowed_ips)
    return lines


class UapiClient:
    """Requests to one UAPI socket; each request opens its own connection."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _exchange(self, request: str) -> list[str]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(_TIMEOUT)
                conn.connect(str(self.path))
                conn.sendall(request.encode())
                reply = b""
                while not reply.endswith(b"\n\n") and reply != b"\n":
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
                    if len(reply) > _MAX_REPLY:
                        raise UapiError(f"UAPI socket {self.path}: reply too long")
        except FileNotFoundError:
            raise UapiError(f"UAPI socket {self.path} does not exist") from None
        except OSError as error:
            raise UapiError(f"UAPI socket {self.path}: {error.strerror or error}") from None
        lines = reply.decode(errors="replace").splitlines()
        errno_value = next((line[6:] for line in lines if line.startswith("errno=")), None)
        if errno_value is None:
            raise UapiError(f"UAPI socket {self.path}: incomplete reply")
        if errno_value != "0":
            code = int(errno_value) if errno_value.lstrip("-").isdigit() else 0
            reason = os.strerror(abs(code)) if code else errno_value
            raise UapiError(f"UAPI socket {self.path} refused the request: {reason}")
        return [line for line in lines if line and not line.startswith("errno=")]

    def set(self, lines: Iterable[str]) -> None:
        """One ``set=1`` transaction."""
        self._exchange("set=1\n" + "".join(f"{line}\n" for line in lines) + "\n")

    def get(self) -> tuple[dict[str, str], dict[bytes, ExternalPeerStats]]:
        """The device's keys (``listen_port``, ...) and each peer's statistics by key."""
        device: dict[str, str] = {}
        peers: dict[bytes, dict[str, str]] = {}
        current: dict[str, str] | None = None
        for line in self._exchange("get=1\n\n"):
            key, _, value = line.partition("=")
            if key == "public_key":
                current = peers.setdefault(bytes.fromhex(value), {})
            elif current is None:
                device[key] = value
            else:
                current[key] = value
        return device, {key: _peer_stats(values) for key, values in peers.items()}

    def listen_port(self) -> int:
        port = self.get()[0].get("listen_port", "")
        if not port.isdigit():
            raise UapiError(f"UAPI socket {self.path}: no listen port reported")
        return int(port)

    def remove_peer(self, public_key: bytes) -> None:
        self.set([f"public_key={public_key.hex()}", "remove=true"])


def _peer_stats(values: dict[str, str]) -> ExternalPeerStats:
    seconds = int(values.get("last_handshake_time_sec", "0") or 0)
    nanoseconds = int(values.get("last_handshake_time_nsec", "0") or 0)
    return ExternalPeerStats(
        endpoint=values.get("endpoint"),
        last_handshake=seconds + nanoseconds / 1e9 if seconds else None,
        rx_bytes=int(values.get("rx_bytes", "0") or 0),
        tx_bytes=int(values.get("tx_bytes", "0") or 0),
    )


class WireGuardGo:
    """A ``wireguard-go`` child process owning one interface and its UAPI socket."""

    def __init__(self, executable: str, interface: str) -> None:
        self.interface = interface
        self.socket = socket_path(interface)
        if self.socket.exists():
            if _socket_alive(self.socket):
                raise UserError(
                    f"{self.socket} is in use: another WireGuard process owns interface "
                    f"{interface}; set another 'interface'"
                )
            self.socket.unlink()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        try:
            self.process = subprocess.Popen(
                [executable, "-f", interface],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                env={**os.environ, "LOG_LEVEL": "error"},
                preexec_fn=_die_with_parent,
            )
        except OSError as error:
            self._stderr.close()
            raise UserError(f"cannot start {executable}: {error.strerror or error}") from None
        deadline = time.monotonic() + _START_TIMEOUT
        while not _socket_alive(self.socket):
            if self.process.poll() is not None:
                detail = self._stderr_line()
                self.close()
                raise UserError(
                    f"{executable} exited with status {self.process.returncode}"
                    + (f": {detail}" if detail else "")
                )
            if time.monotonic() > deadline:
                self.close()
                raise UserError(f"{executable} did not open {self.socket} within 10 s")
            time.sleep(0.02)

    def exit_reason(self) -> str:
        """Exit status and last stderr line, for a log line once it has exited."""
        status = self.process.poll()
        detail = self._stderr_line()
        return f"status {status}" + (f": {detail}" if detail else "")

    def _stderr_line(self) -> str:
        """The last line wireguard-go wrote to stderr (why it failed to start)."""
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""

    def close(self) -> None:
        """Kill the process by PID (it removes its interface) and its socket if left over."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stderr.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when meshguard dies, however it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _socket_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
