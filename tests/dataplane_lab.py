"""Tunnel endpoints for real-host tests and the benchmark: wireguard-go and ``meshguard run``.

Each endpoint lives in a namespace of a ``tests.netns.Lab`` and is torn down with it: the
process is killed by PID and wireguard-go's UAPI socket (``/var/run/wireguard/<if>.sock``,
shared by all namespaces) is removed.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import itertools
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.netns import Lab, Namespace, run, wait_until

REPO = Path(__file__).resolve().parent.parent
_interface_numbers = itertools.count()
WG_PORT = 51820
MG_PORT = 51821


def wg_genkey() -> tuple[str, str]:
    """A fresh WireGuard key pair (private, public), base64, from ``wg``."""
    private = run(["wg", "genkey"]).stdout.strip()
    public = subprocess.run(
        ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
    ).stdout.strip()
    return private, public


def psk() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def meshguard_cli(config_dir: Path, *args: str) -> str:
    """Run ``python -m meshguard <args>`` with ``config_dir``; returns stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "meshguard", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "MESHGUARD_CONFIG_DIR": str(config_dir), "PYTHONPATH": str(REPO)},
        cwd=REPO,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"meshguard {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Peer:
    """What one endpoint needs to know about the other."""

    public_key: str
    endpoint: str | None
    allowed_ips: list[str]
    preshared_key: str | None = None


@dataclass
class MeshguardNode:
    """``meshguard run`` with its own config dir, identity (from ``meshguard keygen``) and
    settings file with static ``[[wireguard_peer]]`` entries."""

    ns: Namespace
    directory: Path
    underlay_ip: str
    interface: str = "mg0"
    port: int = MG_PORT
    extra_args: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "meshguard", "run"])
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        meshguard_cli(self.directory, "keygen")
        self.wg_public_key = meshguard_cli(self.directory, "export", "--wg").strip()
        ipv4, ipv6 = meshguard_cli(self.directory, "ip").split()
        self.ipv4 = ipaddress.ip_address(ipv4)
        self.ipv6 = ipaddress.ip_address(ipv6)
        self.log_path = self.directory / "daemon.log"

    @property
    def endpoint(self) -> str:
        return host_port(self.underlay_ip, self.port)

    def as_peer(self, preshared_key: str | None = None) -> Peer:
        return Peer(
            self.wg_public_key, self.endpoint, [f"{self.ipv4}/32", f"{self.ipv6}/128"],
            preshared_key,
        )

    def start(self, peers: list[Peer]) -> None:
        lines = [f"listen_port = {self.port}", f'interface = "{self.interface}"']
        for peer in peers:
            lines += ["[[wireguard_peer]]", f'public_key = "{peer.public_key}"']
            if peer.endpoint:
                lines.append(f'endpoint = "{peer.endpoint}"')
            lines.append("allowed_ips = [" + ", ".join(f'"{n}"' for n in peer.allowed_ips) + "]")
            if peer.preshared_key:
                lines.append(f'preshared_key = "{peer.preshared_key}"')
        settings = self.directory / "settings.toml"
        settings.write_text("\n".join(lines) + "\n")
        log = self.log_path.open("ab")
        self.process = self.ns.popen(
            [*self.command, "--config", str(settings), *self.extra_args],
            env={"MESHGUARD_CONFIG_DIR": str(self.directory), "PYTHONPATH": str(REPO)},
            cwd=REPO,
            stdout=log,
            stderr=log,
        )
        log.close()
        wait_until(
            lambda: "event=started" in self.log() or self.process.poll() is not None,  # type: ignore[union-attr]
            timeout=20,
            what="meshguard run to start",
        )
        if self.process.poll() is not None:
            raise RuntimeError(f"meshguard run exited: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def handshakes(self) -> int:
        return self.log().count("event=HandshakeCompleted")

    def rss_kib(self) -> int:
        """VmRSS of the daemon (``ip netns exec`` execs it, so it keeps the PID)."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS for the meshguard process")


@dataclass
class WireGuardGoNode:
    """wireguard-go configured with ``wg`` and ``ip``, addressed like a static mesh peer."""

    ns: Namespace
    lab: Lab
    underlay_ip: str
    ipv4: str = "10.99.7.7"
    ipv6: str = "fd99:6d67::7:7"
    port: int = WG_PORT
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.interface = f"wgo{self.lab.suffix}{next(_interface_numbers)}"[:15]
        self.private_key, self.public_key = wg_genkey()
        self.socket = Path(f"/var/run/wireguard/{self.interface}.sock")

    @property
    def endpoint(self) -> str:
        return host_port(self.underlay_ip, self.port)

    def as_peer(self, preshared_key: str | None = None) -> Peer:
        return Peer(
            self.public_key, self.endpoint, [f"{self.ipv4}/32", f"{self.ipv6}/128"], preshared_key
        )

    def start(self, peers: list[Peer], log_path: Path | None = None) -> None:
        log = (log_path or Path(os.devnull)).open("ab")
        self.process = self.ns.popen(
            ["wireguard-go", "-f", self.interface],
            env={"LOG_LEVEL": "debug", "WG_PROCESS_FOREGROUND": "1"},
            stdout=log,
            stderr=log,
        )
        log.close()
        self.lab.cleanups.append(self._remove_socket)
        wait_until(self.socket.exists, timeout=10, what="wireguard-go's UAPI socket")
        key_file = Path(f"/tmp/{self.interface}.key")
        key_file.write_text(self.private_key + "\n")
        try:
            self.ns.run(
                ["wg", "set", self.interface, "private-key", str(key_file),
                 "listen-port", str(self.port)]
            )
        finally:
            key_file.unlink()
        for peer in peers:
            command = ["wg", "set", self.interface, "peer", peer.public_key,
                       "allowed-ips", ",".join(peer.allowed_ips)]
            if peer.endpoint:
                command += ["endpoint", peer.endpoint]
            if peer.preshared_key:
                psk_file = Path(f"/tmp/{self.interface}.psk")
                psk_file.write_text(peer.preshared_key + "\n")
                command += ["preshared-key", str(psk_file)]
            try:
                self.ns.run(command)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    Path(f"/tmp/{self.interface}.psk").unlink()
        self.ns.run(["ip", "link", "set", self.interface, "mtu", "1420", "up"])
        self.ns.run(["ip", "addr", "add", f"{self.ipv4}/32", "dev", self.interface])
        self.ns.run(["ip", "addr", "add", f"{self.ipv6}/128", "dev", self.interface, "nodad"])
        for peer in peers:
            for network in peer.allowed_ips:
                self.ns.run(["ip", "route", "add", network, "dev", self.interface])

    def _remove_socket(self) -> None:
        if self.process is not None:
            self.lab.stop(self.process)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()

    def latest_handshake(self) -> int:
        """Unix time of the latest handshake with any peer (0 if none)."""
        out = self.ns.run(["wg", "show", self.interface, "latest-handshakes"]).stdout.split()
        return max((int(value) for value in out[1::2]), default=0)

    def transfer(self) -> tuple[int, int]:
        """(rx, tx) bytes over all peers."""
        out = self.ns.run(["wg", "show", self.interface, "transfer"]).stdout.split()
        return sum(int(v) for v in out[1::3]), sum(int(v) for v in out[2::3])


def ping(ns: Namespace, address: object, *, count: int = 3, wait: float = 2) -> bool:
    """Whether all ``count`` pings to ``address`` are answered."""
    proc = ns.run(
        ["ping", "-c", str(count), "-i", "0.2", "-W", str(wait), str(address)],
        check=False,
        timeout=count * (wait + 1) + 5,
    )
    return proc.returncode == 0


_RECEIVER = """
import hashlib, socket, sys
server = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(1)
print('listening', flush=True)
conn, _ = server.accept()
digest, total = hashlib.sha256(), 0
while chunk := conn.recv(1 << 20):
    digest.update(chunk)
    total += len(chunk)
print(total, digest.hexdigest(), flush=True)
"""

_SENDER = """
import hashlib, os, socket, sys
size = int(sys.argv[3])
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
digest, sent = hashlib.sha256(), 0
while sent < size:
    chunk = os.urandom(min(1 << 20, size - sent))
    conn.sendall(chunk)
    digest.update(chunk)
    sent += len(chunk)
conn.shutdown(socket.SHUT_WR)
conn.recv(1)
print(sent, digest.hexdigest(), flush=True)
"""


def tcp_transfer(
    sender: Namespace, receiver: Namespace, address: object, size: int, *, port: int = 5555
) -> tuple[str, str]:
    """Send ``size`` random bytes over TCP; returns (sent, received) as 'bytes sha256'."""
    listener = receiver.popen(
        [sys.executable, "-c", _RECEIVER, str(address), str(port)],
        stdout=subprocess.PIPE,
    )
    assert listener.stdout is not None
    assert listener.stdout.readline().strip() == b"listening"
    started = time.monotonic()
    sent = sender.run(
        [sys.executable, "-c", _SENDER, str(address), str(port), str(size)], timeout=120
    ).stdout.strip()
    received = listener.stdout.readline().decode().strip()
    listener.wait(timeout=max(10, 120 - (time.monotonic() - started)))
    return sent, received
