"""The bare WireGuard engine against real wireguard-go, for what ``meshguard run`` tests miss:
cookie replies (XChaCha20-Poly1305, mac2) understood by a real peer in both roles."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dataplane_lab import Peer, WireGuardGoNode, ping, wg_genkey
from tests.netns import Lab, Namespace

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed"),
]

ENGINE_PEER = Path(__file__).resolve().parent / "wg_engine_peer.py"
WG_UNDERLAY = "192.168.91.1"
ENGINE_UNDERLAY = "192.168.91.2"
ENGINE_PORT = 51821
ENGINE_TUNNEL = "10.99.9.9"


@pytest.fixture
def lab() -> Iterator[tuple[Lab, Namespace, Namespace]]:
    with Lab(prefix="mgc") as lab:
        wg_host = lab.namespace("wg")
        engine_host = lab.namespace("en")
        lab.link(wg_host, engine_host, f"{WG_UNDERLAY}/24", f"{ENGINE_UNDERLAY}/24")
        yield lab, wg_host, engine_host


def start_engine(
    engine_host: Namespace, wireguard_go: WireGuardGoNode, *extra: str
) -> tuple[subprocess.Popen[bytes], str]:
    process = engine_host.popen(
        [sys.executable, str(ENGINE_PEER), "--listen", f"{ENGINE_UNDERLAY}:{ENGINE_PORT}",
         "--address", ENGINE_TUNNEL, "--peer", wireguard_go.public_key, "--seconds", "60",
         *extra],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    public_key = process.stdout.readline().decode().strip()
    return process, public_key


def finish(lab: Lab, process: subprocess.Popen[bytes]) -> dict[str, Any]:
    lab.stop(process)
    assert process.stdout is not None
    summary: dict[str, Any] = json.loads(process.stdout.read().decode().strip().splitlines()[-1])
    return summary


def test_wireguard_go_follows_our_cookie_reply_when_we_are_under_load(
    lab: tuple[Lab, Namespace, Namespace],
) -> None:
    lab_, wg_host, engine_host = lab
    wireguard_go = WireGuardGoNode(wg_host, lab_, WG_UNDERLAY)
    process, engine_key = start_engine(engine_host, wireguard_go, "--under-load")
    wireguard_go.start(
        [Peer(engine_key, f"{ENGINE_UNDERLAY}:{ENGINE_PORT}", [f"{ENGINE_TUNNEL}/32"], None)]
    )
    # The first initiation is answered with a cookie; wireguard-go retries after
    # REKEY_TIMEOUT with mac2 made from that cookie, which we accept.
    assert ping(wg_host, ENGINE_TUNNEL, count=3, wait=8)
    summary = finish(lab_, process)
    assert summary["counters"].get("under_load", 0) >= 1, summary
    assert summary["handshakes"] == 1
    assert summary["pings_answered"] >= 3


def test_we_initiate_through_a_cookie_round_trip_and_ping_wireguard_go(
    lab: tuple[Lab, Namespace, Namespace],
) -> None:
    lab_, wg_host, engine_host = lab
    wireguard_go = WireGuardGoNode(wg_host, lab_, WG_UNDERLAY)
    engine_private, engine_public = wg_genkey()
    wireguard_go.start(
        [Peer(engine_public, f"{ENGINE_UNDERLAY}:{ENGINE_PORT}", [f"{ENGINE_TUNNEL}/32"], None)]
    )
    process, engine_key = start_engine(
        engine_host, wireguard_go, "--under-load", "--private", engine_private,
        "--endpoint", wireguard_go.endpoint, "--ping", wireguard_go.ipv4,
    )
    assert engine_key == engine_public
    # Our initiation is answered by a response without mac2, which we (under load) answer
    # with a cookie; our retransmission after REKEY_TIMEOUT gets a response carrying mac2.
    time.sleep(2 * 5.334 + 3)
    summary = finish(lab_, process)
    assert summary["counters"].get("under_load", 0) >= 1, summary
    assert summary["handshakes"] == 1, summary
    assert summary["echo_replies"] >= 2, summary
