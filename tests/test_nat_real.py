"""NAT detection through real Linux NAT (nftables masquerade) against real STUN servers.

The lab (network namespaces, all addresses inside it)::

    lan1 192.168.1.2 ─ nat1 198.51.100.1 (masquerade) ──────────┐
    lan2 192.168.2.2 ─ nat2 198.51.101.1 (masquerade fully-random) ┤
    lan3 192.168.3.2 ─ nat3 198.51.102.1 (masquerade + NAT loopback)┤─ wan
    lan5 192.168.5.2 ─ nat5 198.51.104.1 → .2 (masquerade, renumbered) ┤
    pub  198.51.103.1, 2001:db8:103::1 (no NAT) ──────────────────┘

    wan: coturn on 203.0.113.10 and .11 (ports 3478, 3479), meshguard responders on
         203.0.113.20, 203.0.113.21, 2001:db8:ff::20, 2001:db8:ff::21 (port 3478)

Each client runs ``python -m meshguard.netcheck --json`` and the test checks what it reports
against what the nftables rules make the NAT do. coturn is Debian's ``turnserver`` in STUN-only
mode on two addresses, which turns on its RFC 5780 behaviour discovery.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import Lab, Namespace, wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
COTURN = ("203.0.113.10", "203.0.113.11")
RESPONDERS = ("203.0.113.20", "203.0.113.21")
RESPONDERS_V6 = ("2001:db8:ff::20", "2001:db8:ff::21")
LOOPBACK_PORT = 40005
"""The one port nat3 loops back (a port forward limited to the LAN side)."""
RTO = "0.1"


def python_argv(*args: str) -> list[str]:
    return ["env", f"PYTHONPATH={ROOT}", sys.executable, *args]


def _nat_box(
    lab: Lab, wan: Namespace, index: int, masquerade: str, extra_rules: str = ""
) -> tuple[Namespace, Namespace]:
    nat = lab.namespace(f"nat{index}")
    lan = lab.namespace(f"lan{index}")
    wan_if, _ = lab.link(nat, wan, f"198.51.{99 + index}.1/24", f"198.51.{99 + index}.254/24")
    lab.link(lan, nat, f"192.168.{index}.2/24", f"192.168.{index}.1/24")
    nat.run(["ip", "route", "add", "default", "via", f"198.51.{99 + index}.254"])
    lan.run(["ip", "route", "add", "default", "via", f"192.168.{index}.1"])
    nat.sysctl("net.ipv4.ip_forward", "1")
    ruleset = (
        "table ip nat {\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority 100;\n"
        f'    oifname "{wan_if}" {masquerade}\n'
        "  }\n"
        f"{extra_rules}"
        "}\n"
    )
    _nft(nat, ruleset)
    return nat, lan


def _nft(ns: Namespace, ruleset: str) -> None:
    proc = subprocess.run(
        ns.exec_argv(["nft", "-f", "-"]), input=ruleset, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"nft failed: {proc.stderr.strip()}\n{ruleset}")


def _start_coturn(lab: Lab, wan: Namespace, tmp: Path) -> None:
    listen = [arg for ip in COTURN for arg in ("--listening-ip", ip)]
    wan.popen(
        [
            "turnserver",
            "-n",  # no configuration file: Debian's /etc/turnserver.conf disables RFC 5780
            *listen,
            "--listening-port",
            "3478",
            "--alt-listening-port",
            "3479",
            "--no-auth",
            "--stun-only",
            "--no-tcp",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--fingerprint",
            "--relay-threads",
            "0",
            "--log-file",
            "stdout",
            "--simple-log",
            "--pidfile",
            str(tmp / "turnserver.pid"),
        ],
        stdout=(tmp / "turnserver.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    wanted = {f"{ip}:{port}" for ip in COTURN for port in (3478, 3479)}
    wait_until(
        lambda: wanted <= set(wan.run(["ss", "-Hlun"]).stdout.split()),
        timeout=15,
        what="coturn to listen on both addresses and both ports",
    )


def _start_responder(wan: Namespace, listen: str) -> None:
    proc = wan.popen(
        python_argv("-m", "meshguard.drivers.stun_socket", "serve", "--listen", listen),
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert line.startswith("listening on "), line


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Namespace]]:
    """The client namespaces by name, behind their NATs, with the STUN servers running."""
    tmp = tmp_path_factory.mktemp("natlab")
    with Lab(prefix="mgnat") as lab:
        wan = lab.namespace("wan")
        for ip in (*COTURN, *RESPONDERS):
            wan.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"])
        for ip in RESPONDERS_V6:
            wan.run(["ip", "addr", "add", f"{ip}/128", "dev", "lo"])
        _, lan1 = _nat_box(lab, wan, 1, "masquerade")
        _, lan2 = _nat_box(lab, wan, 2, "masquerade fully-random")
        # NAT loopback, as home routers do it: a LAN host that sends to the public address
        # and port of its own mapping is forwarded back to itself, source-NATed to the box.
        _, lan3 = _nat_box(
            lab,
            wan,
            3,
            "masquerade",
            "  chain prerouting {\n"
            "    type nat hook prerouting priority -100;\n"
            f"    ip saddr 192.168.3.0/24 ip daddr 198.51.102.1 udp dport {LOOPBACK_PORT} "
            f"dnat to 192.168.3.2:{LOOPBACK_PORT}\n"
            "  }\n"
            "  chain loopback {\n"
            "    type nat hook postrouting priority 110;\n"
            "    ip saddr 192.168.3.0/24 ip daddr 192.168.3.0/24 masquerade\n"
            "  }\n",
        )
        # A NAT whose ISP renumbers it mid-test (see the monitor test).
        nat5, lan5 = _nat_box(lab, wan, 5, "masquerade")
        nat5.sysctl("net.ipv4.conf.all.promote_secondaries", "1")
        pub = lab.namespace("pub")
        lab.link(pub, wan, "198.51.103.1/24", "198.51.103.254/24")
        lab.link(pub, wan, "2001:db8:103::1/64", "2001:db8:103::fe/64")
        pub.run(["ip", "route", "add", "default", "via", "198.51.103.254"])
        pub.run(["ip", "-6", "route", "add", "default", "via", "2001:db8:103::fe"])
        _start_coturn(lab, wan, tmp)
        for ip in RESPONDERS:
            _start_responder(wan, f"{ip}:3478")
        for ip in RESPONDERS_V6:
            _start_responder(wan, f"[{ip}]:3478")
        yield {"lan1": lan1, "lan2": lan2, "lan3": lan3, "pub": pub, "lan5": lan5, "nat5": nat5}


def netcheck(ns: Namespace, port: int, *servers: str) -> dict[str, object]:
    """Run netcheck from ``port``: a port of its own per test, because conntrack entries left
    by an earlier run from the same port would open the pinholes the filtering test probes."""
    stun_args = [arg for server in servers for arg in ("--stun", server)]
    argv = python_argv(
        "-m", "meshguard.netcheck", *stun_args, "--port", str(port), "--rto", RTO, "--json"
    )
    started = time.monotonic()
    proc = subprocess.run(ns.exec_argv(argv), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    result["seconds"] = round(time.monotonic() - started, 2)
    print(ns.name, servers, result)
    return result


def coturn() -> str:
    return f"{COTURN[0]}:3478"


def responders() -> list[str]:
    return [f"{ip}:3478" for ip in RESPONDERS]


def test_port_restricted_nat_through_coturn(clients: dict[str, Namespace]) -> None:
    port = 40001
    result = netcheck(clients["lan1"], port, coturn())
    assert result["public_endpoints"] == [f"198.51.100.1:{port}"]
    assert result["mapping"] == "endpoint-independent"
    assert result["filtering"] == "address-and-port-dependent"
    assert result["filtering_server"] == coturn()
    assert result["hairpinning"] is False


def test_port_restricted_nat_through_meshguard_responders(clients: dict[str, Namespace]) -> None:
    port = 40002
    result = netcheck(clients["lan1"], port, *responders())
    assert result["public_endpoints"] == [f"198.51.100.1:{port}"]
    assert result["mapping"] == "endpoint-independent"
    assert result["filtering"] == "unknown"
    assert result["hairpinning"] is False


def test_symmetric_nat_through_coturn(clients: dict[str, Namespace]) -> None:
    port = 40003
    result = netcheck(clients["lan2"], port, coturn())
    assert result["mapping"] == "address-and-port-dependent"
    assert result["filtering"] == "address-and-port-dependent"
    endpoints = result["public_endpoints"]
    assert isinstance(endpoints, list) and len(endpoints) == 3
    assert all(e.startswith("198.51.101.1:") for e in endpoints)
    assert result["hairpinning"] is False


def test_symmetric_nat_through_meshguard_responders(clients: dict[str, Namespace]) -> None:
    port = 40004
    result = netcheck(clients["lan2"], port, *responders())
    assert result["mapping"] == "address-and-port-dependent"
    endpoints = result["public_endpoints"]
    assert isinstance(endpoints, list) and len(endpoints) == 2
    assert all(e.startswith("198.51.101.1:") for e in endpoints)


def test_nat_loopback_rule_gives_hairpinning(clients: dict[str, Namespace]) -> None:
    port = LOOPBACK_PORT
    result = netcheck(clients["lan3"], port, *responders())
    assert result["public_endpoints"] == [f"198.51.102.1:{port}"]
    assert result["mapping"] == "endpoint-independent"
    assert result["hairpinning"] is True


def test_no_nat_through_coturn(clients: dict[str, Namespace]) -> None:
    port = 40006
    result = netcheck(clients["pub"], port, coturn())
    assert result["public_endpoints"] == [f"198.51.103.1:{port}"]
    assert result["mapping"] == "none"
    assert result["filtering"] == "endpoint-independent"


def test_no_nat_over_ipv6_through_meshguard_responders(clients: dict[str, Namespace]) -> None:
    port = 40007
    result = netcheck(clients["pub"], port, *(f"[{ip}]:3478" for ip in RESPONDERS_V6))
    assert result["public_endpoints"] == [f"[2001:db8:103::1]:{port}"]
    assert result["mapping"] == "none"


ASK_ONCE = """
import json, socket, sys
from meshguard.sansio import stun
host, port, change = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "change"
request = stun.StunMessage(
    stun.MessageClass.REQUEST, bytes(range(12)), change_request=change, change_ip=change,
    change_port=change,
)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 0))
sock.settimeout(5)
sock.sendto(stun.encode(request), (host, port))
data, source = sock.recvfrom(2048)
reply = stun.decode(data)
print(json.dumps({
    "local_port": sock.getsockname()[1], "source": list(source), "fingerprint": reply.fingerprint,
    "xor_mapped": reply.xor_mapped_address, "mapped": reply.mapped_address,
    "other": reply.other_address, "origin": reply.response_origin, "software": reply.software,
    "class": reply.message_class.name,
}))
"""


@pytest.mark.parametrize("change", [False, True])
def test_what_coturn_answers(clients: dict[str, Namespace], change: bool) -> None:
    """Our codec against coturn's RFC 5780 mode: the attributes the prober relies on."""
    proc = clients["pub"].run(
        python_argv("-c", ASK_ONCE, COTURN[0], "3478", "change" if change else "plain")
    )
    reply = json.loads(proc.stdout)
    print(reply)
    mapped = ["198.51.103.1", reply["local_port"]]
    assert reply["class"] == "SUCCESS"
    # coturn 4.6.1 (--fingerprint) signs answers from its primary address only; the client
    # verifies a FINGERPRINT when there is one and accepts answers without.
    assert reply["fingerprint"] is True or change
    assert reply["xor_mapped"] == reply["mapped"] == mapped
    assert reply["other"] == [COTURN[1], 3479]
    expected_source = [COTURN[1], 3479] if change else [COTURN[0], 3478]
    assert reply["source"] == reply["origin"] == expected_source


def read_lines_until(proc: subprocess.Popen[bytes], wanted: str, timeout: float) -> list[str]:
    """Lines ``proc`` prints until one starts with ``wanted``; fails after ``timeout``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([proc.stdout], [], [], left)[0]:
            break
        line = proc.stdout.readline().decode().strip()
        if not line:
            break
        lines.append(line)
        if line.startswith(wanted):
            return lines
    raise AssertionError(f"no line starting with {wanted!r} within {timeout} s: {lines}")


def test_monitor_notices_when_the_nat_is_renumbered(clients: dict[str, Namespace]) -> None:
    """A refreshing StunClient reports PublicAddressChanged when the NAT's address changes."""
    lan, nat = clients["lan5"], clients["nat5"]
    port, server = 40010, responders()[0]
    proc = lan.popen(
        python_argv(
            "-m",
            "meshguard.drivers.stun_socket",
            "monitor",
            "--stun",
            server,
            "--port",
            str(port),
            "--refresh",
            "0.5",
            "--rto",
            "0.1",
        ),
        stdout=subprocess.PIPE,
    )
    read_lines_until(proc, "listening on", timeout=10)
    first = read_lines_until(proc, "mapped", timeout=5)[-1]
    assert first == f"mapped {server} 198.51.104.1:{port}"
    wan_if = (
        nat.run(["ip", "-o", "route", "get", RESPONDERS[0]]).stdout.split(" dev ")[1].split()[0]
    )
    # The ISP hands out a new address: masquerade drops its conntrack entries for the old one.
    nat.run(["ip", "addr", "add", "198.51.104.2/24", "dev", wan_if])
    nat.run(["ip", "addr", "del", "198.51.104.1/24", "dev", wan_if])
    nat.run(["ip", "route", "replace", "default", "via", "198.51.104.254"])
    started = time.monotonic()
    lines = read_lines_until(proc, "changed", timeout=10)
    print(f"change noticed after {time.monotonic() - started:.2f} s: {lines}")
    assert lines[-1] == f"changed {server} 198.51.104.1:{port} -> 198.51.104.2:{port}"
