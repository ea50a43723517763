"""``meshguard demo``: a real mesh of a few hosts on this one machine, built and torn down.

Each node is a Linux network namespace running its own ``meshguard run`` (a real daemon with a
real TUN interface and UDP socket) with its own config directory in a temporary directory:
its identity, and every other node's public key trusted. The nodes share a "WAN" (a bridge in
a namespace of its own); the last node sits behind a NAT box (a namespace doing nftables
masquerade). Every node is seeded with the first node's WAN address (that node is started
first) and uses the LAN failure detector timings, so the mesh forms in seconds.

The demo shows ``meshguard status`` and ``meshguard ping`` as a user would run them (the real
commands, inside a node's namespace), keeps the mesh up for ``--for`` seconds or until Ctrl-C,
then stops the daemons by PID and deletes everything it created. Every namespace carries the
``mgdemo`` prefix and a random suffix, so the demo never touches anything else on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from meshguard.config import config_paths
from meshguard.control import ControlClient, ControlError, MemberStatus
from meshguard.errors import UserError
from meshguard.identity.keyfile import save_identity
from meshguard.identity.keys import Identity, public_key_to_base64
from meshguard.identity.meshaddr import mesh_ipv4
from meshguard.identity.trust import TrustStore
from meshguard.netlab import Lab, Namespace, add_bridge, plug_into_bridge

PREFIX = "mgdemo"
MIN_NODES, MAX_NODES, DEFAULT_NODES = 2, 10, 4
PORT = 51821
WAN_PREFIX = "203.0.113"
"""The "internet" between the nodes: TEST-NET-3, documentation addresses (RFC 5737)."""
NAT_WAN_ADDRESS = f"{WAN_PREFIX}.1"
NAT_LAN_PREFIX = "192.168.77"
FORM_TIMEOUT = 60.0
"""Seconds to wait for every node to see every other alive before giving up."""
SEED_START_TIMEOUT = 30.0
"""Seconds for the first node's daemon to answer on its control socket."""
TUNNEL_WAIT = 10.0
"""Seconds to wait, once the mesh is up, for every pair's first WireGuard handshake."""
STOP_TIMEOUT = 10.0
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nodes",
        type=int,
        default=DEFAULT_NODES,
        metavar="N",
        help=f"how many nodes ({MIN_NODES}..{MAX_NODES}, default {DEFAULT_NODES}); "
        "the last one is behind a NAT",
    )
    parser.add_argument(
        "--for",
        dest="duration",
        type=float,
        metavar="SECONDS",
        help="keep the mesh up this long, then clean up (default: until Ctrl-C)",
    )


def demo_command(args: argparse.Namespace) -> int:
    """Build the mesh, show it, keep it up, remove it; returns the exit status."""
    nodes: int = args.nodes
    duration: float | None = args.duration
    if not MIN_NODES <= nodes <= MAX_NODES:
        raise UserError(f"--nodes must be between {MIN_NODES} and {MAX_NODES}")
    if duration is not None and not duration > 0:
        raise UserError("--for must be a positive number of seconds")
    _check_host()
    return Demo(nodes, duration).run()


def _check_host() -> None:
    """Refuse, in one line, when this machine cannot run the demo."""
    if os.geteuid() != 0:
        raise UserError(
            "the demo needs root (it creates network namespaces and TUN interfaces): "
            "run it with sudo, or try the simulator: python3 -m sim scenarios/smoke-5.yaml"
        )
    if not os.path.exists("/dev/net/tun"):
        raise UserError("/dev/net/tun is missing: this kernel or container has no TUN support")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            raise UserError(f"'{tool}' is not installed (apt-get install {package})")


class _Stop(Exception):
    """SIGTERM arrived: clean up as for Ctrl-C."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


@dataclass
class DemoNode:
    """One host of the demo: a namespace, a config directory and a ``meshguard run``."""

    name: str
    ns: Namespace
    directory: Path
    address: str
    """Its underlay address: on the WAN, or on the LAN behind the NAT."""
    behind_nat: bool
    identity: Identity
    process: subprocess.Popen[bytes] | None = None

    @property
    def public_key(self) -> str:
        return public_key_to_base64(self.identity.public_key)

    @property
    def mesh_ipv4(self) -> str:
        return str(mesh_ipv4(self.identity.public_key))

    @property
    def log_path(self) -> Path:
        return self.directory / "daemon.log"

    def meshguard_argv(self, *args: str) -> list[str]:
        """``meshguard <args>`` for this node's config directory, run inside its namespace."""
        return self.ns.exec_argv(
            [sys.executable, "-m", "meshguard", "--config-dir", str(self.directory), *args]
        )

    def log_tail(self, lines: int = 15) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def members(self) -> dict[str, MemberStatus] | None:
        """The daemon's member rows by public key; None while it does not answer."""
        try:
            with ControlClient(self.directory, timeout=2) as client:
                return {row["public_key"]: row for row in client.status()["members"]}
        except ControlError:
            return None


@dataclass
class _Progress:
    """How far the mesh has formed: daemons answering, and who sees whom alive."""

    daemons: int
    views: int
    answering: int = 0
    alive: int = 0
    missing: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.alive == self.views

    def summary(self) -> str:
        return (
            f"{self.answering} of {self.daemons} daemons answering, "
            f"{self.alive} of {self.views} node-to-node views alive"
        )


@dataclass
class Demo:
    """One run of the demo: the lab it builds, the nodes in it and what it has shown so far."""

    node_count: int
    duration: float | None
    lab: Lab = field(default_factory=lambda: Lab(prefix=PREFIX))
    workdir: Path | None = None
    nodes: list[DemoNode] = field(default_factory=list)
    shown: bool = False
    """Whether the mesh was shown working: a Ctrl-C after that is the normal way to stop."""

    @property
    def pattern(self) -> str:
        return f"{PREFIX}-*-{self.lab.suffix}"

    def run(self) -> int:
        """The whole demo; cleanup runs whatever happens (Ctrl-C, SIGTERM, a failure)."""
        status = 1
        previous_term = signal.signal(signal.SIGTERM, _raise_stop)
        try:
            status = self._run()
        except (KeyboardInterrupt, _Stop) as stop:
            print("\ninterrupted", flush=True)
            signum = signal.SIGTERM if isinstance(stop, _Stop) else signal.SIGINT
            status = 0 if self.shown else 128 + signum
        except RuntimeError as error:
            print(f"demo failed: {error}", flush=True)
        finally:
            with _signals_ignored():
                if not self._clean_up():
                    status = status or 1
            signal.signal(signal.SIGTERM, previous_term)
        return status

    def _run(self) -> int:
        self._banner()
        self.workdir = Path(tempfile.mkdtemp(prefix="meshguard-demo-"))
        started = time.monotonic()
        self._build_network()
        print(f"network ready in {time.monotonic() - started:.1f} s", flush=True)
        self._write_configs()
        formed = time.monotonic()
        if not self._start_daemons() or not self._wait_for_mesh():
            return 1
        print(
            f"mesh up {time.monotonic() - formed:.1f} s after starting the first daemon: "
            f"every node sees the other {self.node_count - 1} alive",
            flush=True,
        )
        self._wait_for_tunnels(formed)
        print(f"\n$ meshguard status        (on {self.nodes[0].name})", flush=True)
        failures = [] if self._show(self.nodes[0], "status") else ["meshguard status"]
        failures += self._pings()
        self.shown = True
        if failures:
            print(f"\nnot everything worked: {'; '.join(failures)}", flush=True)
        if not self._hold():
            return 1
        return 1 if failures else 0

    def _banner(self) -> None:
        count = self.node_count
        print(f"meshguard demo: {count} nodes, each a network namespace running meshguard run")
        print()
        for index in range(1, count):
            joint = f"┬── WAN (a bridge); every node's seed is n1 {WAN_PREFIX}.11:{PORT}"
            address = f"{WAN_PREFIX}.{10 + index}"
            print(f"  n{index:<7} {address:<12} ──{joint if index == 1 else '┤'}")
        print(f"  {'NAT box':<8} {NAT_WAN_ADDRESS:<12} ──┘")
        print(f"    └─ masquerade ── n{count} {NAT_LAN_PREFIX}.2 (a LAN behind the NAT)")
        print()
        print(f"namespaces: {self.pattern}  (Ctrl-C stops the demo and removes them)", flush=True)

    def _build_network(self) -> None:
        assert self.workdir is not None
        wan = self.lab.namespace("wan")
        bridge = add_bridge(wan, "wan0")
        for index in range(1, self.node_count):
            name = f"n{index}"
            ns = self.lab.namespace(name)
            address = f"{WAN_PREFIX}.{10 + index}"
            plug_into_bridge(self.lab, ns, wan, bridge, f"{address}/24")
            self.nodes.append(self._node(name, ns, address, behind_nat=False))
            print(f"  {name}: namespace {ns.name}, WAN address {address}", flush=True)
        natbox = self.lab.namespace("nat")
        wan_if = plug_into_bridge(self.lab, natbox, wan, bridge, f"{NAT_WAN_ADDRESS}/24")
        name = f"n{self.node_count}"
        ns = self.lab.namespace(name)
        address = f"{NAT_LAN_PREFIX}.2"
        self.lab.link(ns, natbox, f"{address}/24", f"{NAT_LAN_PREFIX}.1/24")
        ns.run(["ip", "route", "add", "default", "via", f"{NAT_LAN_PREFIX}.1"])
        natbox.sysctl("net.ipv4.ip_forward", "1")
        _nft(
            natbox,
            "table ip nat {\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority 100;\n"
            f'    oifname "{wan_if}" masquerade\n'
            "  }\n"
            "}\n",
        )
        print(
            f"  NAT box: namespace {natbox.name}, WAN address {NAT_WAN_ADDRESS}, "
            "nftables masquerade",
            flush=True,
        )
        self.nodes.append(self._node(name, ns, address, behind_nat=True))
        print(f"  {name}: namespace {ns.name}, LAN address {address} behind the NAT", flush=True)

    def _node(self, name: str, ns: Namespace, address: str, *, behind_nat: bool) -> DemoNode:
        assert self.workdir is not None
        directory = self.workdir / name
        directory.mkdir(mode=0o700)
        identity = Identity.generate(os.urandom)
        save_identity(config_paths(directory).private_key, identity)
        return DemoNode(name, ns, directory, address, behind_nat, identity)

    def _write_configs(self) -> None:
        """Every node trusts every other; all seed with n1; the NATed one asks n1 (STUN)
        for its public address so it can advertise it."""
        seed = f"{self.nodes[0].address}:{PORT}"
        for node in self.nodes:
            store = TrustStore(config_paths(node.directory).authorized_keys)
            for other in self.nodes:
                if other is not node:
                    store.add(other.name, other.identity.public_key)
            lines = [
                f"listen_port = {PORT}",
                'swim_profile = "lan"',
                "mdns = false",
                "eager_tunnels = true",
            ]
            if node is not self.nodes[0]:
                lines.append(f'seeds = ["{seed}"]')
            if node.behind_nat:
                lines.append(f'stun_servers = ["{seed}"]')
            config_paths(node.directory).config_file.write_text("\n".join(lines) + "\n")
        print(
            f"config dirs in {self.workdir}: a fresh key per node, every node trusts the others",
            flush=True,
        )

    def _start_daemons(self) -> bool:
        """Start the seed (n1), wait until it answers, then the others all at once.

        A node whose seed is not listening yet only retries on its reconnect timer (seconds
        later), so starting the seed first is what makes the mesh form at once. Returns False
        if the seed did not come up.
        """
        seed, *others = self.nodes
        self._start_daemon(seed)
        deadline = time.monotonic() + SEED_START_TIMEOUT
        while seed.members() is None:
            if self._report_dead():
                return False
            if time.monotonic() > deadline:
                print(f"n1 did not answer within {SEED_START_TIMEOUT:.0f} s; its log:")
                print(seed.log_tail(), flush=True)
                return False
            time.sleep(0.1)
        for node in others:
            self._start_daemon(node)
        return True

    def _start_daemon(self, node: DemoNode) -> None:
        env = {
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])
            )
        }
        with node.log_path.open("ab") as log:
            node.process = node.ns.popen(
                node.meshguard_argv("run"),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        print(
            f"  started meshguard run in {node.ns.name} (pid {node.process.pid}), "
            f"mesh IP {node.mesh_ipv4}",
            flush=True,
        )

    def _dead_daemons(self) -> list[DemoNode]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is not None]

    def _wait_for_mesh(self) -> bool:
        """Wait until every node sees every other alive; explain what is missing if not."""
        print("waiting for the mesh to form...", flush=True)
        started = time.monotonic()
        deadline = started + FORM_TIMEOUT
        progress = self._progress()
        reported = progress.summary()
        while not progress.complete and time.monotonic() < deadline:
            if self._report_dead():
                return False
            time.sleep(0.2)
            progress = self._progress()
            if not progress.complete and progress.summary() != reported:
                reported = progress.summary()
                print(f"  {time.monotonic() - started:4.1f} s: {reported}", flush=True)
        if progress.complete:
            return True
        print(f"the mesh did not form within {FORM_TIMEOUT:.0f} s:", flush=True)
        for line in progress.missing:
            print(f"  {line}")
        for node in self.nodes:
            print(f"--- last lines of {node.name}'s log ---\n{node.log_tail()}")
        return False

    def _progress(self) -> _Progress:
        progress = _Progress(daemons=len(self.nodes), views=len(self.nodes) * (len(self.nodes) - 1))
        for node in self.nodes:
            rows = node.members()
            if rows is None:
                progress.missing.append(f"{node.name}'s daemon does not answer (yet)")
                continue
            progress.answering += 1
            for other in self.nodes:
                row = rows.get(other.public_key)
                if other is node:
                    continue
                if row is not None and row["state"] == "alive":
                    progress.alive += 1
                else:
                    state = "not yet a member" if row is None else row["state"]
                    progress.missing.append(f"{node.name} sees {other.name}: {state}")
        return progress

    def _wait_for_tunnels(self, started: float) -> None:
        """Give the eager handshakes a few seconds so the status table shows them; a tunnel
        that is still missing then is shown as it is (HANDSHAKE never), not waited for."""
        tunnels = self.node_count * (self.node_count - 1)
        deadline = time.monotonic() + TUNNEL_WAIT
        done = self._handshakes_done()
        while done < tunnels and time.monotonic() < deadline:
            time.sleep(0.2)
            done = self._handshakes_done()
        elapsed = time.monotonic() - started
        print(
            f"{done} of {tunnels} node-to-node WireGuard handshakes done "
            f"{elapsed:.1f} s after starting the first daemon",
            flush=True,
        )

    def _handshakes_done(self) -> int:
        done = 0
        for node in self.nodes:
            rows = node.members() or {}
            done += sum(
                1
                for other in self.nodes
                if other.public_key in rows and rows[other.public_key]["last_handshake"] is not None
            )
        return done

    def _report_dead(self) -> bool:
        dead = self._dead_daemons()
        for node in dead:
            assert node.process is not None
            print(
                f"{node.name}'s daemon exited with status {node.process.returncode}; "
                f"its log:\n{node.log_tail()}",
                flush=True,
            )
        return bool(dead)

    def _show(self, node: DemoNode, *args: str) -> bool:
        """Run ``meshguard <args>`` in ``node``'s namespace and print its output as it is."""
        proc = subprocess.run(
            node.meshguard_argv(*args), capture_output=True, text=True, timeout=60, check=False
        )
        output = (proc.stdout + proc.stderr).rstrip()
        print(output, flush=True)
        return proc.returncode == 0

    def _pings(self) -> list[str]:
        """Ping across the WAN and across the NAT, and say honestly what happened; returns the
        pings that got no reply."""
        first, natted = self.nodes[0], self.nodes[-1]
        pairs = [(first, natted, "across the NAT")]
        if self.node_count > 2:
            pairs.insert(0, (first, self.nodes[1], "across the WAN"))
            pairs.append((self.nodes[1], natted, "across the NAT, to a node that is not the seed"))
        failed = []
        for source, target, where in pairs:
            print(
                f"\n$ meshguard ping {target.name} --count 3   (on {source.name}, {where})",
                flush=True,
            )
            if not self._show(source, "ping", target.name, "--count", "3", "--interval", "0.2"):
                failed.append(f"ping {source.name} -> {target.name} ({where})")
                print(f"(no reply: {self._explain_path(source, target)})", flush=True)
        return failed

    def _explain_path(self, source: DemoNode, target: DemoNode) -> str:
        """What ``source``'s status says about its path to ``target``, for a failed ping."""
        row = (source.members() or {}).get(target.public_key)
        if row is None:
            return f"{target.name} is not in {source.name}'s status"
        endpoint = row["endpoint"] or "no endpoint"
        said = f"{source.name}'s status shows path '{row['path']}' to {target.name} via {endpoint}"
        if target.behind_nat and endpoint.startswith(f"{target.address}:"):
            said += f", {target.name}'s LAN address behind the NAT, which the WAN cannot reach"
        return said

    def _hold(self) -> bool:
        """Keep the mesh up for the duration or until Ctrl-C; False if a daemon died."""
        print()
        if self.duration is None:
            print("mesh is up — press Ctrl-C to stop", flush=True)
        else:
            print(f"mesh up for {self.duration:g} s — press Ctrl-C to stop sooner", flush=True)
        first, last = self.nodes[0], self.nodes[-1]
        print("try it from another terminal while it runs:")
        program = "meshguard" if shutil.which("meshguard") else f"{sys.executable} -m meshguard"
        meshguard = f"sudo {program} --config-dir {last.directory}"
        print(f"  sudo ip netns exec {last.ns.name} ping {first.mesh_ipv4}")
        print(f"  {meshguard} status")
        print(f"  {meshguard} peers", flush=True)
        deadline = None if self.duration is None else time.monotonic() + self.duration
        while deadline is None or time.monotonic() < deadline:
            if self._report_dead():
                return False
            remaining = 1.0 if deadline is None else deadline - time.monotonic()
            time.sleep(max(0.0, min(1.0, remaining)))
        return True

    def _clean_up(self) -> bool:
        """Stop the daemons by PID, delete the namespaces and the temporary directory.

        Returns whether every daemon stopped cleanly on SIGTERM.
        """
        running = [n for n in self.nodes if n.process is not None and n.process.poll() is None]
        if running:
            print(f"stopping {len(running)} daemons...", flush=True)
        for node in running:
            assert node.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGTERM)
        problems = 0
        deadline = time.monotonic() + STOP_TIMEOUT
        for node in running:
            assert node.process is not None
            try:
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"  {node.name}'s daemon ignored SIGTERM; killing it", flush=True)
                self.lab.stop(node.process, signal.SIGKILL)
                problems += 1
            if node.process.returncode != 0:
                print(f"  {node.name}'s daemon exited with status {node.process.returncode}")
                problems += 1
        namespaces = len(self.lab.namespaces)
        self.lab.close()
        removed = [f"stopped {len(running)} daemons", f"deleted {namespaces} namespaces "
                   f"({self.pattern})"]  # fmt: skip
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            removed.append(f"removed {self.workdir}")
        print("cleaned up: " + ", ".join(removed), flush=True)
        return not problems


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Let cleanup finish even if the user presses Ctrl-C again or SIGTERM repeats."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _nft(ns: Namespace, ruleset: str) -> None:
    proc = subprocess.run(
        ns.exec_argv(["nft", "-f", "-"]), input=ruleset, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"nft failed in {ns.name}: {proc.stderr.strip()}")
