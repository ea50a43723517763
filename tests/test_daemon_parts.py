"""Pieces of ``meshguard run`` that need no root: flags over settings, the ICMP echo used by
``meshguard ping``, path names for the control socket and the logfmt event lines."""

from __future__ import annotations

import argparse
import ipaddress
import struct
from pathlib import Path

import pytest

from meshguard.config import config_paths
from meshguard.daemon import _settings, add_run_arguments
from meshguard.mesh_daemon import (
    _checksum,
    icmp_echo_reply_key,
    icmp_echo_request,
    logfmt_event,
    path_name,
)
from meshguard.sansio import swim
from meshguard.sansio.messages import Endpoint, NatInfo
from meshguard.sansio.traversal import PathChanged, PathInfo, PathKind
from meshguard.settings import HostPort, SettingsError

SOURCE = ipaddress.IPv4Address("10.99.1.2")
DESTINATION = ipaddress.IPv4Address("10.99.3.4")


def _args(tmp_path: Path, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config-dir")
    add_run_arguments(parser)
    return parser.parse_args(["--config-dir", str(tmp_path), *argv])


def test_flags_add_seeds_and_override_metrics(tmp_path: Path) -> None:
    (tmp_path / "meshguard.toml").write_text(
        'seeds = ["192.0.2.1:51821"]\nmetrics = "127.0.0.1:9101"\nmdns = false\n'
    )
    args = _args(
        tmp_path, "--seed", "192.0.2.2:51821", "--seed", "192.0.2.1:51821",
        "--metrics", "[::1]:0",
    )  # fmt: skip
    settings = _settings(args, config_paths(tmp_path))
    assert settings.seeds == (HostPort("192.0.2.1", 51821), HostPort("192.0.2.2", 51821))
    assert settings.metrics == HostPort("::1", 0)
    assert settings.mdns is False


def test_a_bad_flag_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^command line: --seed: expected host:port"):
        _settings(_args(tmp_path, "--seed", "nowhere"), config_paths(tmp_path))


def test_echo_request_is_a_valid_ipv4_icmp_packet() -> None:
    packet = icmp_echo_request(SOURCE, DESTINATION, 0x1234, 7, b"payload")
    assert packet[0] == 0x45 and packet[9] == 1
    assert struct.unpack_from("!H", packet, 2)[0] == len(packet)
    assert (packet[12:16], packet[16:20]) == (SOURCE.packed, DESTINATION.packed)
    assert _checksum(packet[:20]) == 0
    assert _checksum(packet[20:]) == 0
    assert packet[20] == 8 and struct.unpack_from("!HH", packet, 24) == (0x1234, 7)
    assert icmp_echo_reply_key(packet) is None


def test_echo_reply_is_matched_by_source_identifier_and_sequence() -> None:
    request = icmp_echo_request(DESTINATION, SOURCE, 0x1234, 7, b"payload")
    reply = request[:20] + b"\x00" + request[21:]
    assert icmp_echo_reply_key(reply) == (DESTINATION.packed, 0x1234, 7)
    assert icmp_echo_reply_key(reply[:27]) is None
    udp = reply[:9] + b"\x11" + reply[10:]
    assert icmp_echo_reply_key(udp) is None


def test_echo_request_is_a_valid_icmpv6_packet_and_its_reply_matches() -> None:
    source, destination = ipaddress.IPv6Address("fd99:6d67::1"), ipaddress.IPv6Address("fd99::2")
    packet = icmp_echo_request(source, destination, 0x1234, 7, b"payload")
    assert packet[0] >> 4 == 6 and packet[6] == 58
    assert struct.unpack_from("!H", packet, 4)[0] == len(packet) - 40
    assert (packet[8:24], packet[24:40]) == (source.packed, destination.packed)
    pseudo = source.packed + destination.packed + struct.pack("!I3xB", len(packet) - 40, 58)
    assert _checksum(pseudo + packet[40:]) == 0
    assert packet[40] == 128 and struct.unpack_from("!HH", packet, 44) == (0x1234, 7)
    assert icmp_echo_reply_key(packet) is None
    reply = packet[:40] + b"\x81" + packet[41:]
    assert icmp_echo_reply_key(reply) == (source.packed, 0x1234, 7)


def test_path_names_follow_the_control_protocol() -> None:
    named = {"direct": "direct", "punched": "punched", "relayed": "relayed"}
    for kind in PathKind:
        assert path_name(kind) == named.get(kind.value, "-")
    assert path_name(None) == "-"


def test_event_lines_are_flat_key_value_pairs() -> None:
    key = bytes(32)
    joined = swim.MemberJoined(
        key, 3, (Endpoint("192.0.2.1", 51821), Endpoint("2001:db8::1", 5)), NatInfo()
    )
    assert logfmt_event(joined) == (
        "event=MemberJoined public_key=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= "
        "incarnation=3 endpoints=192.0.2.1:51821,[2001:db8::1]:5 nat.mapping=unknown "
        "nat.filtering=unknown nat.hairpinning=False nat.allows_relay=False"
    )
    changed = PathChanged(key, PathInfo(PathKind.RELAYED, ("192.0.2.9", 51821), b"\x01" * 32, None))
    line = logfmt_event(changed)
    assert " path.kind=relayed path.endpoint=192.0.2.9:51821 " in line
    assert line.endswith(" path.rtt=-")
    assert " " not in line.split("path.relay=")[1].split(" path.rtt")[0]
