"""``meshguard netcheck``'s member report: the daemon's paths by member, or one line without one.

The STUN side runs against a real responder on loopback (``meshguard.drivers.stun_socket
serve``); the daemon side against a real control socket whose status comes from a small
in-memory source (the daemon itself needs root: tests/test_nat_traversal_real.py runs it).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshguard import netcheck
from meshguard.control import ControlServer, MemberStatus, PingDone, Status, socket_path
from meshguard.identity.keys import Identity, public_key_to_base64
from meshguard.identity.meshaddr import mesh_ipv4, mesh_ipv6

REPO = Path(__file__).resolve().parent.parent


def _member(
    name: str, path: str, state: str = "alive", endpoint: str | None = None
) -> MemberStatus:
    key = Identity.generate(os.urandom).public_key
    return MemberStatus(
        name=name,
        public_key=public_key_to_base64(key),
        mesh_ipv4=str(mesh_ipv4(key)),
        mesh_ipv6=str(mesh_ipv6(key)),
        endpoint=endpoint,
        path=path,
        state=state,
        tunnel=path != "-",
        last_handshake=None,
        rx_bytes=0,
        tx_bytes=0,
    )


MEMBERS = [
    _member("relay", "direct", endpoint="203.0.113.1:51821"),
    _member("home", "punched", endpoint="198.51.100.1:51821"),
    _member("phone", "relayed", endpoint="203.0.113.1:51821"),
    _member("laptop", "-", endpoint="198.51.101.1:4000"),
    _member("gone", "direct", state="dead", endpoint="192.0.2.9:51821"),
    _member("flaky", "punched", state="suspect", endpoint="198.51.102.1:51821"),
]


def _status(members: list[MemberStatus]) -> Status:
    return Status(
        node={
            "public_key": "self",
            "mesh_ipv4": "10.99.1.1",
            "mesh_ipv6": "fd99:6d67::1",
            "interface": "mg0",
            "listen_port": 51821,
            "data_plane": "userspace",
            "uptime": 3.0,
        },
        members=members,
    )


class StaticDaemon:
    """A control.StatusSource that reports fixed members."""

    def status(self) -> Status:
        return _status(MEMBERS)

    def ping(self, public_key: bytes, timeout: float, done: PingDone) -> None:
        raise AssertionError("netcheck does not ping")

    def shutdown(self) -> None:
        raise AssertionError("netcheck does not stop the daemon")


@pytest.fixture
def daemon_dir(tmp_path: Path) -> Iterator[Path]:
    """A config directory whose control socket is served on a thread until the test ends."""
    server = ControlServer(socket_path(tmp_path), StaticDaemon())
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if select.select([server.fileno()], [], [], 0.05)[0]:
                server.handle_ready()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield tmp_path
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


@pytest.fixture(scope="module")
def responder() -> Iterator[str]:
    """A real STUN responder on a loopback port; yields its HOST:PORT."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshguard.drivers.stun_socket", "serve", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        assert line.startswith("listening on "), line
        yield line.removeprefix("listening on ")
    finally:
        proc.kill()
        proc.wait(timeout=5)


def test_reachability_by_path_and_state() -> None:
    rows = {row.name: row for row in netcheck.reachability(_status(MEMBERS))}
    assert [row.name for row in netcheck.reachability(_status(MEMBERS))] == sorted(rows)
    assert (rows["relay"].reach, rows["relay"].endpoint) == ("direct", "203.0.113.1:51821")
    assert (rows["home"].reach, rows["home"].endpoint) == ("punched", "198.51.100.1:51821")
    assert (rows["phone"].reach, rows["phone"].endpoint) == ("relayed", "203.0.113.1:51821")
    assert (rows["laptop"].reach, rows["laptop"].endpoint) == ("unreachable", None)
    assert (rows["gone"].reach, rows["gone"].state) == ("unreachable", "dead")
    assert (rows["flaky"].reach, rows["flaky"].state) == ("punched", "suspect")


def test_member_report_from_a_running_daemon(daemon_dir: Path) -> None:
    report = netcheck.member_report(daemon_dir)
    assert report.members is not None and len(report.members) == len(MEMBERS)
    assert report.detail == f"from the daemon of {daemon_dir}"
    text = netcheck.format_members(report)
    lines = text.splitlines()
    assert lines[0] == f"members (from the daemon of {daemon_dir}):"
    home = next(line for line in lines if line.strip().startswith("home "))
    assert home.endswith("punched via 198.51.100.1:51821")
    assert MEMBERS[1]["mesh_ipv4"] in home
    assert next(line for line in lines if "gone" in line).endswith("unreachable (dead)")
    assert next(line for line in lines if "flaky" in line).endswith("(suspect)")


def test_member_report_without_a_daemon_is_one_line(tmp_path: Path) -> None:
    report = netcheck.member_report(tmp_path)
    assert report.members is None
    text = netcheck.format_members(report)
    assert "\n" not in text
    assert text.startswith(
        f"members:          unknown (no daemon running for config dir {tmp_path}"
    )
    assert netcheck.members_as_dict(report)["members"] is None


def test_netcheck_uses_the_configured_stun_servers_and_reports_no_daemon(
    tmp_path: Path, responder: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "meshguard.toml").write_text(f'stun_servers = ["{responder}"]\n')
    assert netcheck.main(["--config-dir", str(tmp_path), "--rto", "0.05"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"public endpoints: 127.0.0.1:{out[0].rsplit(':', 1)[1]}"
    assert f"  {responder} sees 127.0.0.1:" in "\n".join(out)
    assert out[-1].startswith("members:          unknown (no daemon running for config dir")


def test_netcheck_json_carries_the_members(
    daemon_dir: Path, responder: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config-dir", str(daemon_dir), "--stun", responder, "--rto", "0.05", "--json"]
    assert netcheck.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["observations"][0]["server"] == responder
    reach = {row["name"]: row["reach"] for row in result["members"]}
    assert reach == {
        "relay": "direct",
        "home": "punched",
        "phone": "relayed",
        "laptop": "unreachable",
        "gone": "unreachable",
        "flaky": "punched",
    }
    assert result["members_detail"] == f"from the daemon of {daemon_dir}"


def test_a_bad_settings_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "meshguard.toml").write_text('stun_servers = ["not an endpoint"]\n')
    assert netcheck.main(["--config-dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("meshguard: error: ") and captured.err.count("\n") == 1
