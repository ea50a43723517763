"""``meshguard status/peers/ping/down``: pure rendering, and the commands against a real socket."""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_control import FakeDaemon, Loop, _member

from meshguard import cli
from meshguard.cli_control import (
    format_bytes,
    format_duration,
    render_peers,
    render_ping,
    render_status,
    render_table,
)
from meshguard.control import (
    ControlServer,
    MemberStatus,
    PingReport,
    PingResult,
    StaticPeerStatus,
    Status,
    socket_path,
)
from meshguard.errors import UserError

NOW = 1_700_000_100.0


def _row(name: str, key: str, **changes: object) -> MemberStatus:
    row = MemberStatus(
        name=name,
        public_key=key,
        mesh_ipv4="10.99.1.2",
        mesh_ipv6="fd99:6d67::102",
        endpoint="192.0.2.7:51821",
        path="direct",
        state="alive",
        tunnel=True,
        last_handshake=NOW - 75,
        rx_bytes=1536,
        tx_bytes=0,
    )
    row.update(changes)  # type: ignore[typeddict-item]
    return row


STATUS = Status(
    node={
        "public_key": "SELFKEY=",
        "mesh_ipv4": "10.99.9.9",
        "mesh_ipv6": "fd99:6d67::909",
        "interface": "mg0",
        "listen_port": 51821,
        "data_plane": "userspace",
        "uptime": 3725,
    },
    members=[
        _row("web", "WWWWWWWWWWWW=", state="suspect", tunnel=False, endpoint=None, path="-",
             last_handshake=None, rx_bytes=0, mesh_ipv4="10.99.3.4", mesh_ipv6="fd99:6d67::304"),
        _row("-", "UUUUUUUUUUUU=", path="relayed", mesh_ipv4="10.99.5.6",
             mesh_ipv6="fd99:6d67::506", endpoint="[2001:db8::5]:51821"),
        _row("db1", "DDDDDDDDDDDD=", tx_bytes=3 * 1024**3),
    ],
)  # fmt: skip


def test_format_units() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(5 * 1024**2) == "5.00 MiB"
    assert format_bytes(3 * 1024**3) == "3.00 GiB"
    assert format_bytes(2 * 1024**4) == "2.00 TiB"
    assert format_duration(0) == "0s"
    assert format_duration(-3) == "0s"
    assert format_duration(59.9) == "59s"
    assert format_duration(185) == "3m05s"
    assert format_duration(3725) == "1h02m"
    assert format_duration(4 * 86400 + 3 * 3600) == "4d03h"


def test_render_table_aligns_columns() -> None:
    assert render_table(("A", "LONG"), [("xyz", "1"), ("", "22")]) == "A    LONG\nxyz  1\n     22"


def test_render_status() -> None:
    assert render_status(STATUS, NOW) == (
        "node:      SELFKEY=\n"
        "mesh IPs:  10.99.9.9  fd99:6d67::909\n"
        "interface: mg0, UDP port 51821, userspace data plane, up 1h02m\n"
        "members:   3 (2 alive, 1 suspect)\n"
        "\n"
        "NAME  KEY       MESH IPV4  MESH IPV6       ENDPOINT             PATH     STATE    "
        "HANDSHAKE  RX        TX\n"
        "db1   DDDDDDDD  10.99.1.2  fd99:6d67::102  192.0.2.7:51821      direct   alive    "
        "1m15s ago  1.50 KiB  3.00 GiB\n"
        "web   WWWWWWWW  10.99.3.4  fd99:6d67::304  -                    -        suspect  "
        "never      0 B       0 B\n"
        "-     UUUUUUUU  10.99.5.6  fd99:6d67::506  [2001:db8::5]:51821  relayed  alive    "
        "1m15s ago  1.50 KiB  0 B"
    )
    alone = render_status(Status(node=STATUS["node"], members=[]), NOW)
    assert alone.endswith("members:   0")


def test_render_status_lists_static_wireguard_peers() -> None:
    static = StaticPeerStatus(
        public_key="SSSS=",
        allowed_ips=["10.7.0.0/16", "fd07::/64"],
        endpoint="198.51.100.7:51820",
        last_handshake=NOW - 75,
        rx_bytes=1536,
        tx_bytes=0,
    )
    text = render_status(Status(node=STATUS["node"], members=[], static_peers=[static]), NOW)
    assert text.splitlines()[-3:] == [
        "",
        "STATIC WIREGUARD PEER  ALLOWED IPS             ENDPOINT            HANDSHAKE  RX"
        "        TX",
        "SSSS=                  10.7.0.0/16, fd07::/64  198.51.100.7:51820  1m15s ago  1.50 KiB"
        "  0 B",
    ]
    assert render_status({**STATUS, "static_peers": []}, NOW) == render_status(STATUS, NOW)


def test_render_peers() -> None:
    tunnels = [m for m in STATUS["members"] if m["tunnel"]]
    assert render_peers(tunnels, NOW).splitlines() == [
        "NAME  PUBLIC KEY     ALLOWED IPS                       ENDPOINT             "
        "HANDSHAKE  RX        TX",
        "db1   DDDDDDDDDDDD=  10.99.1.2/32, fd99:6d67::102/128  192.0.2.7:51821      "
        "1m15s ago  1.50 KiB  3.00 GiB",
        "-     UUUUUUUUUUUU=  10.99.5.6/32, fd99:6d67::506/128  [2001:db8::5]:51821  "
        "1m15s ago  1.50 KiB  0 B",
    ]
    assert render_peers([], NOW) == "no WireGuard peers (no member has a tunnel yet)"


def test_render_ping() -> None:
    report = PingReport(
        name="db1",
        public_key="DDDD=",
        mesh_ipv4="10.99.1.2",
        mesh_ipv6="fd99:6d67::102",
        address="10.99.1.2",
        reply=True,
        rtt_ms=0.4567,
        path="punched",
        endpoint="198.51.100.4:40000",
        detail="",
    )
    assert render_ping(report) == (
        "reply from db1 (10.99.1.2) via punched 198.51.100.4:40000: time=0.46 ms"
    )
    lost = PingReport(**{**report, "reply": False, "rtt_ms": None, "detail": "no tunnel"})
    assert render_ping(lost) == "no reply from db1 (10.99.1.2): no tunnel"
    over_ipv6 = PingReport(**{**report, "address": "fd99:6d67::102"})
    assert render_ping(over_ipv6).startswith("reply from db1 (fd99:6d67::102) via punched")


def _parse(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


@pytest.fixture
def daemon() -> FakeDaemon:
    return FakeDaemon([_member("db1", tunnel=True), _member("web", tunnel=False)])


@pytest.fixture
def served(tmp_path: Path, daemon: FakeDaemon) -> Iterator[ControlServer]:
    server = ControlServer(socket_path(tmp_path), daemon)
    loop = Loop(server)
    try:
        yield server
    finally:
        loop.stop()
        server.close()


def test_status_and_peers_commands(
    tmp_path: Path, served: ControlServer, daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parse(["--config-dir", str(tmp_path), "status"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "members:   2 (2 alive)" in out
    assert daemon.members[0]["mesh_ipv4"] in out

    args = _parse(["--config-dir", str(tmp_path), "status", "--json"])
    assert args.handler(args) == 0
    assert json.loads(capsys.readouterr().out) == daemon.status()

    args = _parse(["--config-dir", str(tmp_path), "peers", "--json"])
    assert args.handler(args) == 0
    assert json.loads(capsys.readouterr().out) == [daemon.members[0]]


def test_ping_command_counts_and_exit_status(
    tmp_path: Path, served: ControlServer, daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter(
        [
            PingResult(reply=True, rtt_ms=1.0, path="direct", endpoint="192.0.2.7:1", detail=""),
            PingResult(reply=False, rtt_ms=None, path="-", endpoint=None, detail="timed out"),
            PingResult(reply=True, rtt_ms=3.0, path="direct", endpoint="192.0.2.7:1", detail=""),
        ]
    )

    families: list[bool] = []

    def answer(public_key: bytes, timeout: float, done: object, *, ipv6: bool = False) -> None:
        families.append(ipv6)
        threading.Thread(target=done, args=(next(answers),)).start()  # type: ignore[arg-type]

    daemon.ping = answer  # type: ignore[method-assign]
    args = _parse(["--config-dir", str(tmp_path), "ping", "db1", "-c", "3", "--interval", "0"])
    assert args.handler(args) == 0
    lines = capsys.readouterr().out.splitlines()
    ip = daemon.members[0]["mesh_ipv4"]
    assert lines == [
        f"reply from db1 ({ip}) via direct 192.0.2.7:1: time=1.00 ms",
        f"no reply from db1 ({ip}): timed out",
        f"reply from db1 ({ip}) via direct 192.0.2.7:1: time=3.00 ms",
        "3 sent, 2 received, 33% loss, rtt min/avg/max 1.00/2.00/3.00 ms",
    ]

    answers = iter([PingResult(reply=False, rtt_ms=None, path="-", endpoint=None, detail="")])
    args = _parse(["--config-dir", str(tmp_path), "ping", "db1"])
    assert args.handler(args) == 1

    ipv6 = daemon.members[0]["mesh_ipv6"]
    answers = iter([PingResult(reply=True, rtt_ms=2.0, path="direct", endpoint=None, detail="")])
    args = _parse(["--config-dir", str(tmp_path), "ping", "-6", "db1"])
    assert args.handler(args) == 0
    answers = iter([PingResult(reply=True, rtt_ms=2.0, path="direct", endpoint=None, detail="")])
    args = _parse(["--config-dir", str(tmp_path), "ping", ipv6])
    assert args.handler(args) == 0
    assert families == [False, False, False, False, True, True]
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"reply from db1 ({ipv6}) via direct: time=2.00 ms"
    )


def test_commands_without_a_daemon_fail_in_one_line(tmp_path: Path) -> None:
    for command in ("status", "peers", "down", "ping db1"):
        args = _parse(["--config-dir", str(tmp_path), *command.split()])
        with pytest.raises(UserError) as excinfo:
            args.handler(args)
        assert str(excinfo.value) == (
            f"no daemon running for config dir {tmp_path} "
            f"(socket {tmp_path}/meshguard.sock not found)"
        )
    args = _parse(["--config-dir", str(tmp_path), "ping", "x", "--count", "0"])
    with pytest.raises(UserError, match=r"^--count must be at least 1$"):
        args.handler(args)


def test_down_waits_for_the_daemon_to_go(
    tmp_path: Path, daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    server = ControlServer(socket_path(tmp_path), daemon)
    loop = Loop(server)

    def exit_when_asked() -> None:
        while not daemon.stopping:
            threading.Event().wait(0.01)
        loop.stop()
        server.close()

    stopper = threading.Thread(target=exit_when_asked)
    stopper.start()
    args = _parse(["--config-dir", str(tmp_path), "down"])
    assert args.handler(args) == 0
    stopper.join()
    assert capsys.readouterr().out == f"meshguard daemon for {tmp_path} stopped\n"
