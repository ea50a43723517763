"""Data-plane benchmark (needs root): iperf3 TCP through three tunnels, in one invocation.

Two network namespaces joined by a veth pair; a single iperf3 TCP stream for ``--seconds``
over (1) the bare veth, (2) wireguard-go ↔ wireguard-go, (3) meshguard ↔ meshguard
(``meshguard run`` with static peers). Prints each throughput and the ratio
meshguard / wireguard-go, the CPU time both tunnel endpoints spent per TCP segment (a figure
that other load on the machine disturbs less than throughput), the WireGuard handshakes per
second one core completes (two sans-IO devices driven in memory, both sides' work counted),
and the resident memory of a meshguard data plane after its run.

    sudo python3 bench/bench_dataplane.py [--seconds 10] [--runs 1]

With ``--runs N`` the three measurements repeat N times; the best and median are printed
and each run's ratio is computed within that run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshguard.sansio.wireguard import HandshakeCompleted, WireGuardDevice
from tests.dataplane_lab import MeshguardNode, WireGuardGoNode
from tests.netns import Lab, Namespace, wait_until

A_UNDERLAY = "192.168.95.1"
B_UNDERLAY = "192.168.95.2"


def iperf3(client: Namespace, server: Namespace, address: object, seconds: float) -> float:
    """Bits per second of one iperf3 TCP stream from ``client`` to ``address``."""
    return iperf3_bytes(client, server, address, seconds)[0]


def iperf3_bytes(
    client: Namespace, server: Namespace, address: object, seconds: float
) -> tuple[float, int]:
    """(bits per second, bytes received) of one iperf3 TCP stream to ``address``."""
    listener = server.popen(
        ["iperf3", "-s", "-B", str(address)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_until(
        lambda: ":5201 " in server.run(["ss", "-Htln"]).stdout,
        timeout=10,
        what="iperf3 server",
    )
    out = client.run(
        ["iperf3", "-J", "-c", str(address), "-t", str(seconds)], timeout=seconds + 30
    ).stdout
    server.lab.stop(listener)
    received = json.loads(out)["end"]["sum_received"]
    return float(received["bits_per_second"]), int(received["bytes"])


def cpu_seconds(*processes: subprocess.Popen[bytes] | None) -> float:
    """User + system CPU time used so far by these processes (all their threads)."""
    total = 0
    for process in processes:
        assert process is not None
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def tunnel_run(
    a: Namespace,
    b: Namespace,
    address: object,
    seconds: float,
    *processes: subprocess.Popen[bytes] | None,
) -> tuple[float, float]:
    """(bits per second, CPU µs both tunnel endpoints spent per 1368-byte TCP segment)."""
    before = cpu_seconds(*processes)
    bits, received = iperf3_bytes(a, b, address, seconds)
    spent = cpu_seconds(*processes) - before
    return bits, spent / (received / 1368) * 1e6


def bare_veth(seconds: float) -> float:
    with Lab(prefix="mgb") as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        lab.link(a, b, f"{A_UNDERLAY}/24", f"{B_UNDERLAY}/24")
        return iperf3(a, b, B_UNDERLAY, seconds)


def wireguard_go(seconds: float) -> tuple[float, float]:
    with Lab(prefix="mgb") as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        lab.link(a, b, f"{A_UNDERLAY}/24", f"{B_UNDERLAY}/24")
        left = WireGuardGoNode(a, lab, A_UNDERLAY, ipv4="10.99.7.7", ipv6="fd99:6d67::7:7")
        right = WireGuardGoNode(b, lab, B_UNDERLAY, ipv4="10.99.8.8", ipv6="fd99:6d67::8:8")
        left.start([right.as_peer()])
        right.start([left.as_peer()])
        return tunnel_run(a, b, right.ipv4, seconds, left.process, right.process)


def meshguard(
    seconds: float, directory: Path, extra_args: tuple[str, ...] = ()
) -> tuple[float, float, int]:
    """Throughput, CPU µs per segment, and the larger daemon VmRSS (KiB) after the run."""
    with Lab(prefix="mgb") as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        lab.link(a, b, f"{A_UNDERLAY}/24", f"{B_UNDERLAY}/24")
        left = MeshguardNode(
            a, directory / f"a{lab.suffix}", A_UNDERLAY, extra_args=list(extra_args)
        )
        right = MeshguardNode(
            b, directory / f"b{lab.suffix}", B_UNDERLAY, extra_args=list(extra_args)
        )
        left.start([right.as_peer()])
        right.start([left.as_peer()])
        bits, cpu = tunnel_run(a, b, right.ipv4, seconds, left.process, right.process)
        return bits, cpu, max(left.rss_kib(), right.rss_kib())


def handshakes_per_second(duration: float = 3.0) -> float:
    """Complete initiator+responder handshakes per second between two in-memory devices."""
    clock = [1.8e9]
    a = WireGuardDevice(os.urandom(32), entropy=os.urandom, rng=_Rng(), wallclock=lambda: clock[0])
    b = WireGuardDevice(os.urandom(32), entropy=os.urandom, rng=_Rng(), wallclock=lambda: clock[0])
    a_addr, b_addr = ("192.0.2.1", 1), ("192.0.2.2", 2)
    a.add_peer(b.public_key, endpoint=b_addr, now=0.0)
    b.add_peer(a.public_key, endpoint=a_addr, now=0.0)
    completed = 0
    now = 0.0
    started = time.perf_counter()
    while time.perf_counter() - started < duration:
        for _ in range(50):
            now += 10.0
            clock[0] += 10.0
            a.initiate_handshake(b.public_key, now)
            for data, _ in a.datagrams_to_send():
                b.receive_datagram(data, a_addr, now)
            for data, _ in b.datagrams_to_send():
                a.receive_datagram(data, b_addr, now)
            completed += sum(isinstance(e, HandshakeCompleted) for e in a.events())
            b.events()
    elapsed = time.perf_counter() - started
    return completed / elapsed


class _Rng:
    """Jitter source for the in-memory devices: none needed for a throughput count."""

    def random(self) -> float:
        return 0.5


def _gbit(bits: float) -> str:
    return f"{bits / 1e9:6.2f} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:6.0f} Mbit/s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--with-plain",
        action="store_true",
        help="also run meshguard with --no-offload (no TUN/UDP offloads), for comparison",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_dataplane: needs root (network namespaces, TUN)", file=sys.stderr)
        return 2
    results: dict[str, list[float]] = {"veth": [], "wireguard-go": [], "meshguard": [], "ratio": []}
    rss: list[int] = []
    with tempfile.TemporaryDirectory(prefix="mgbench") as tmp:
        for run in range(1, args.runs + 1):
            veth = bare_veth(args.seconds)
            wgo, wgo_cpu = wireguard_go(args.seconds)
            mg, mg_cpu, mg_rss = meshguard(args.seconds, Path(tmp))
            results["veth"].append(veth)
            results["wireguard-go"].append(wgo)
            results["meshguard"].append(mg)
            results["ratio"].append(mg / wgo)
            rss.append(mg_rss)
            print(
                f"run {run}: bare veth {_gbit(veth)}  wireguard-go {_gbit(wgo)}  "
                f"meshguard {_gbit(mg)}  ratio meshguard/wireguard-go {mg / wgo:.2f}  "
                f"(CPU per 1368-byte segment, both ends: wireguard-go {wgo_cpu:.1f} µs, "
                f"meshguard {mg_cpu:.1f} µs)",
                flush=True,
            )
            if args.with_plain:
                plain, plain_cpu, _ = meshguard(args.seconds, Path(tmp), ("--no-offload",))
                print(
                    f"run {run}: meshguard --no-offload {_gbit(plain)}  "
                    f"(CPU per segment, both ends: {plain_cpu:.1f} µs)",
                    flush=True,
                )
    if args.runs > 1:
        for name in ("veth", "wireguard-go", "meshguard"):
            best, median = max(results[name]), statistics.median(results[name])
            print(f"{name:>13}: best {_gbit(best)}  median {_gbit(median)}")
        ratios = results["ratio"]
        print(f"{'ratio':>13}: best {max(ratios):.2f}  median {statistics.median(ratios):.2f}")
    print(f"handshakes per second (one core, both sides): {handshakes_per_second():.0f}")
    print(f"meshguard data plane resident memory (VmRSS): {max(rss) / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
