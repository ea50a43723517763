"""The control socket: a real unix socket server driven by a loop thread, and the real client.

The daemon is not under test here, so a small in-memory ``StatusSource`` stands in for it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import selectors
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshguard.control import (
    ControlClient,
    ControlError,
    ControlServer,
    MemberStatus,
    PingDone,
    PingResult,
    Status,
    resolve_peer,
    socket_path,
)
from meshguard.identity.keys import Identity, public_key_to_base64
from meshguard.identity.meshaddr import mesh_ipv4, mesh_ipv6


def _member(name: str, *, tunnel: bool, state: str = "alive") -> MemberStatus:
    key = Identity.generate(os.urandom).public_key
    return MemberStatus(
        name=name,
        public_key=public_key_to_base64(key),
        mesh_ipv4=str(mesh_ipv4(key)),
        mesh_ipv6=str(mesh_ipv6(key)),
        endpoint="192.0.2.7:51821" if tunnel else None,
        path="direct" if tunnel else "-",
        state=state,
        tunnel=tunnel,
        last_handshake=1_700_000_000.0 if tunnel else None,
        rx_bytes=1234 if tunnel else 0,
        tx_bytes=5678 if tunnel else 0,
    )


class FakeDaemon:
    """A StatusSource with fixed members; pings are answered by ``answer_pings`` (any thread)."""

    def __init__(self, members: list[MemberStatus]) -> None:
        self.members = members
        self.stopping = False
        self.pings: list[tuple[bytes, float, PingDone]] = []
        self.ipv6: list[bool] = []
        self.fail_status = False

    def status(self) -> Status:
        if self.fail_status:
            raise RuntimeError("state is broken")
        return Status(
            node={
                "public_key": "self",
                "mesh_ipv4": "10.99.1.1",
                "mesh_ipv6": "fd99:6d67::1",
                "interface": "mg0",
                "listen_port": 51821,
                "data_plane": "userspace",
                "uptime": 12.5,
            },
            members=self.members,
        )

    def ping(
        self, public_key: bytes, timeout: float, done: PingDone, *, ipv6: bool = False
    ) -> None:
        self.pings.append((public_key, timeout, done))
        self.ipv6.append(ipv6)

    def shutdown(self) -> None:
        self.stopping = True


class Loop:
    """The daemon side: a thread that waits on the server's descriptor and calls handle_ready."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self._stop_read, self._stop_write = socket.socketpair()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.server.fileno(), selectors.EVENT_READ)
        selector.register(self._stop_read, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is self._stop_read:
                    selector.close()
                    return
                self.server.handle_ready()

    def stop(self) -> None:
        self._stop_write.send(b"x")
        self._thread.join(timeout=5)
        assert not self._thread.is_alive()
        self._stop_read.close()
        self._stop_write.close()


@pytest.fixture
def members() -> list[MemberStatus]:
    return [
        _member("db1", tunnel=True),
        _member("web", tunnel=False, state="suspect"),
        _member("-", tunnel=True),
    ]


@pytest.fixture
def daemon(members: list[MemberStatus]) -> FakeDaemon:
    return FakeDaemon(members)


@pytest.fixture
def served(tmp_path: Path, daemon: FakeDaemon) -> Iterator[ControlServer]:
    server = ControlServer(socket_path(tmp_path), daemon)
    loop = Loop(server)
    try:
        yield server
    finally:
        loop.stop()
        server.close()


def test_status_and_peers_round_trip(
    tmp_path: Path, served: ControlServer, members: list[MemberStatus]
) -> None:
    with ControlClient(tmp_path) as client:
        status = client.status()
        assert status["node"]["interface"] == "mg0"
        assert status["members"] == members
        assert client.peers() == [members[0], members[2]]


def test_socket_is_private_and_removed_on_close(tmp_path: Path, daemon: FakeDaemon) -> None:
    server = ControlServer(socket_path(tmp_path), daemon)
    mode = os.stat(tmp_path / "meshguard.sock").st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["meshguard.sock"]
    server.close()
    assert not (tmp_path / "meshguard.sock").exists()
    server.close()


def test_no_daemon_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ControlError) as excinfo:
        ControlClient(tmp_path).status()
    assert str(excinfo.value) == (
        f"no daemon running for config dir {tmp_path} "
        f"(socket {tmp_path / 'meshguard.sock'} not found)"
    )


def test_stale_socket_is_replaced_but_a_live_daemon_is_not(
    tmp_path: Path, daemon: FakeDaemon
) -> None:
    path = socket_path(tmp_path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    with pytest.raises(ControlError, match="stale socket"):
        ControlClient(tmp_path).status()

    first = ControlServer(path, daemon)
    try:
        with pytest.raises(ControlError, match="already running"):
            ControlServer(path, daemon)
        assert path.exists()
    finally:
        first.close()


def test_close_leaves_a_newer_daemons_socket_alone(tmp_path: Path, daemon: FakeDaemon) -> None:
    path = socket_path(tmp_path)
    old = ControlServer(path, daemon)
    os.unlink(path)
    new = ControlServer(path, daemon)
    old.close()
    assert path.exists()
    new.close()
    assert not path.exists()


def test_a_regular_file_in_the_way_is_an_error(tmp_path: Path, daemon: FakeDaemon) -> None:
    (tmp_path / "meshguard.sock").write_text("not a socket")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        ControlServer(socket_path(tmp_path), daemon)


def test_peer_credentials_are_checked(tmp_path: Path, daemon: FakeDaemon) -> None:
    stranger = frozenset({os.geteuid() + 1})
    server = ControlServer(socket_path(tmp_path), daemon, allowed_uids=stranger)
    loop = Loop(server)
    try:
        with pytest.raises(ControlError, match=f"permission denied: uid {os.geteuid()} may not"):
            ControlClient(tmp_path).status()
    finally:
        loop.stop()
        server.close()


NOBODY = 65534


def _status_error_as_nobody(directory: Path) -> str:
    """The client's error when run as uid/gid 65534 (effective ids only, so they can be
    restored; glibc switches every thread, which the server thread does not mind)."""
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        with pytest.raises(ControlError) as excinfo:
            ControlClient(directory).status()
    finally:
        os.seteuid(0)
        os.setegid(0)
    return str(excinfo.value)


@pytest.mark.root
def test_another_user_is_refused_by_mode_and_by_peer_credentials(daemon: FakeDaemon) -> None:
    """The 0600 socket refuses another user's connection; with the mode opened up by mistake,
    the SO_PEERCRED check still refuses its request."""
    directory = Path(tempfile.mkdtemp(prefix="mgctl-"))
    try:
        directory.chmod(0o755)
        path = socket_path(directory)
        server = ControlServer(path, daemon)
        loop = Loop(server)
        try:
            assert _status_error_as_nobody(directory) == (
                f"permission denied on {path}: the control socket is root-only"
            )
            path.chmod(0o666)
            assert _status_error_as_nobody(directory) == (
                f"permission denied: uid {NOBODY} may not use the control socket"
            )
            assert ControlClient(directory).status()["members"] == daemon.members
        finally:
            loop.stop()
            server.close()
    finally:
        shutil.rmtree(directory)


def test_ping_completes_from_another_thread(
    tmp_path: Path, served: ControlServer, daemon: FakeDaemon, members: list[MemberStatus]
) -> None:
    def answer_when_asked() -> None:
        while not daemon.pings:
            threading.Event().wait(0.01)
        public_key, timeout, done = daemon.pings[0]
        assert public_key_to_base64(public_key) == members[0]["public_key"]
        assert timeout == 1.5
        done(
            PingResult(
                reply=True, rtt_ms=0.42, path="direct", endpoint="192.0.2.7:51821", detail=""
            )
        )
        done(PingResult(reply=False, rtt_ms=None, path="-", endpoint=None, detail="ignored"))

    answerer = threading.Thread(target=answer_when_asked)
    answerer.start()
    with ControlClient(tmp_path) as client:
        report = client.ping(members[0]["mesh_ipv4"], timeout=1.5)
        answerer.join()
        assert report == {
            "name": "db1",
            "public_key": members[0]["public_key"],
            "mesh_ipv4": members[0]["mesh_ipv4"],
            "mesh_ipv6": members[0]["mesh_ipv6"],
            "address": members[0]["mesh_ipv4"],
            "reply": True,
            "rtt_ms": 0.42,
            "path": "direct",
            "endpoint": "192.0.2.7:51821",
            "detail": "",
        }
        assert client.status()["members"] == members
        assert daemon.ipv6 == [False]


def test_ping_of_a_mesh_ipv6_goes_over_ipv6(
    tmp_path: Path, served: ControlServer, daemon: FakeDaemon, members: list[MemberStatus]
) -> None:
    def answer_when_asked() -> None:
        while not daemon.pings:
            threading.Event().wait(0.01)
        done = daemon.pings[0][2]
        done(PingResult(reply=True, rtt_ms=0.5, path="direct", endpoint=None, detail=""))

    answerer = threading.Thread(target=answer_when_asked)
    answerer.start()
    with ControlClient(tmp_path) as client:
        report = client.ping(members[0]["mesh_ipv6"], timeout=1.5)
        answerer.join()
    assert daemon.ipv6 == [True]
    assert report["address"] == members[0]["mesh_ipv6"]


def test_requests_behind_a_pending_ping_wait_their_turn(
    tmp_path: Path, served: ControlServer, daemon: FakeDaemon
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(socket_path(tmp_path)))
        sock.sendall(b'{"cmd":"ping","peer":"db1","timeout":1}\n{"cmd":"peers"}\n')
        while not daemon.pings:
            threading.Event().wait(0.01)
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        daemon.pings[0][2](
            PingResult(reply=False, rtt_ms=None, path="-", endpoint=None, detail="timed out")
        )
        sock.settimeout(5)
        replies = b""
        while replies.count(b"\n") < 2:
            replies += sock.recv(65536)
        first, second = (json.loads(line) for line in replies.splitlines())
        assert first["result"]["detail"] == "timed out"
        assert first["result"]["name"] == "db1"
        assert [row["name"] for row in second["result"]] == ["db1", "-"]


def test_ping_without_a_reply_from_the_daemon_times_out(
    tmp_path: Path, served: ControlServer
) -> None:
    with pytest.raises(ControlError, match="did not answer"):
        ControlClient(tmp_path, timeout=0.2).ping("db1", timeout=0.1)


def test_bad_requests_get_one_line_errors_and_the_server_keeps_serving(
    tmp_path: Path, served: ControlServer, daemon: FakeDaemon
) -> None:
    with ControlClient(tmp_path) as client:
        requests: list[tuple[dict[str, object], str]] = [
            ({"cmd": "reboot"}, "unknown command 'reboot' (status, peers, ping, down)"),
            ({"nothing": 1}, "unknown command None"),
            ({"cmd": "ping"}, "ping needs a peer"),
            ({"cmd": "ping", "peer": "db1", "timeout": 0}, "ping timeout must be seconds"),
            ({"cmd": "ping", "peer": "db1", "timeout": True}, "ping timeout must be seconds"),
            ({"cmd": "ping", "peer": "nobody"}, "no member matches 'nobody'"),
            ({"cmd": "ping", "peer": "db1", "ipv6": "yes"}, "ping ipv6 must be true or false"),
        ]
        for request, error in requests:
            with pytest.raises(ControlError, match=error.replace("(", r"\(").replace(")", r"\)")):
                client.request(request)
        daemon.fail_status = True
        with pytest.raises(ControlError, match="internal error in status: state is broken"):
            client.status()
        daemon.fail_status = False
        assert len(client.status()["members"]) == 3
    assert daemon.pings == []

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(socket_path(tmp_path)))
        sock.sendall(b"not json\n[1,2]\n")
        replies = b""
        while replies.count(b"\n") < 2:
            replies += sock.recv(65536)
        assert [json.loads(line)["error"] for line in replies.splitlines()] == [
            "request is not JSON",
            "unknown command None (status, peers, ping, down)",
        ]
        sock.sendall(b"x" * 70_000)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        assert json.loads(reply) == {"ok": False, "error": "request too long"}
    assert ControlClient(tmp_path).status()["members"]


def test_a_ping_that_fails_to_start_does_not_wedge_the_connection(
    tmp_path: Path, served: ControlServer, daemon: FakeDaemon
) -> None:
    def broken(public_key: bytes, timeout: float, done: PingDone, *, ipv6: bool) -> None:
        raise OSError("no route")

    daemon.ping = broken  # type: ignore[method-assign]
    with ControlClient(tmp_path) as client:
        with pytest.raises(ControlError, match="internal error in ping: no route"):
            client.ping("db1")
        assert len(client.status()["members"]) == 3


def test_down_asks_the_daemon_to_stop(
    tmp_path: Path, served: ControlServer, daemon: FakeDaemon
) -> None:
    ControlClient(tmp_path).down()
    assert daemon.stopping


def test_resolve_peer(members: list[MemberStatus]) -> None:
    db1 = members[0]
    assert resolve_peer("db1", members) is db1
    assert resolve_peer(db1["public_key"], members) is db1
    assert resolve_peer(db1["mesh_ipv4"], members) is db1
    assert resolve_peer(db1["mesh_ipv6"], members) is db1
    assert resolve_peer(ipaddress.IPv6Address(db1["mesh_ipv6"]).exploded, members) is db1
    assert resolve_peer(db1["public_key"][:10], members) is db1
    with pytest.raises(ControlError, match="no member matches 'zz'"):
        resolve_peer("zz", members)
    twin = MemberStatus(**{**db1, "public_key": db1["public_key"][:10] + "x"})
    with pytest.raises(ControlError, match="matches several members"):
        resolve_peer(db1["public_key"][:10], [db1, twin])


def test_socket_path_length_is_checked(tmp_path: Path, daemon: FakeDaemon) -> None:
    assert socket_path(tmp_path) == tmp_path / "meshguard.sock"
    with pytest.raises(ControlError, match="longer than 107 bytes"):
        socket_path(tmp_path / ("d" * 120))
    longest = tmp_path / ("d" * (107 - len(os.fsencode(tmp_path / "meshguard.sock")) - 1))
    longest.mkdir()
    server = ControlServer(socket_path(longest), daemon)
    assert len(os.fsencode(server.path)) == 107
    server.close()
