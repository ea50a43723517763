"""``meshguard demo`` run as a newcomer runs it: a real subprocess building real namespaces.

One run with ``--for`` is shared by the tests that read its output (the status table, the pings)
and check that it left nothing behind; the Ctrl-C tests interrupt further runs, once while the
mesh forms and once while it is up, the way a terminal does (SIGINT to the foreground process
group), and once more with SIGTERM to the demo process alone, as ``kill`` does.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshguard.netlab import run

REPO = Path(__file__).resolve().parent.parent
NODES = 3


@dataclass
class DemoRun:
    returncode: int
    output: str
    seconds: float

    def field(self, pattern: str) -> str:
        match = re.search(pattern, self.output)
        assert match is not None, f"no {pattern!r} in the demo's output:\n{self.output}"
        return match.group(1)

    @property
    def suffix(self) -> str:
        return self.field(r"namespaces: mgdemo-\*-([0-9a-f]+)")

    @property
    def workdir(self) -> Path:
        return Path(self.field(r"config dirs in (\S+):"))

    @property
    def daemon_pids(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"started meshguard run in \S+ \(pid (\d+)\)",
                                               self.output)]  # fmt: skip


def section(output: str, start: str, end: str) -> str:
    """The part of the demo's output after ``start`` and before the next ``end``."""
    assert start in output, f"no {start!r} in the demo's output:\n{output}"
    return output.split(start, 1)[1].split(end, 1)[0]


def demo_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshguard", "demo", *args]


def demo_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def start_demo(*args: str) -> subprocess.Popen[str]:
    """The demo in its own process group, as a shell runs a foreground job."""
    return subprocess.Popen(
        demo_argv(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=demo_env(),
        cwd=REPO,
        start_new_session=True,
    )


def read_until(proc: subprocess.Popen[str], wanted: str, timeout: float) -> str:
    """The demo's output up to and including the first line containing ``wanted``."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if wanted in line:
            return "".join(lines)
    raise AssertionError(f"the demo never printed {wanted!r}:\n{''.join(lines)}")


def assert_nothing_left(demo: DemoRun) -> None:
    """No namespace, interface, process or directory of this run survives it."""
    suffix = demo.suffix
    namespaces = run(["ip", "netns", "list"]).stdout
    assert f"-{suffix}" not in namespaces, namespaces
    links = run(["ip", "-o", "link", "show"]).stdout
    assert not re.search(rf"v\d+[ab]{suffix}", links), links
    pids = demo.daemon_pids
    assert len(pids) == NODES
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"daemon pid {pid} is still there"
    workdir = os.fsencode(str(demo.workdir))
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert workdir not in cmdline.read_bytes(), f"{cmdline} still uses {workdir!r}"
        except (FileNotFoundError, ProcessLookupError):
            continue
    assert not demo.workdir.exists()
    assert f"deleted {NODES + 2} namespaces (mgdemo-*-{suffix})" in demo.output


@pytest.fixture(scope="module")
def demo() -> DemoRun:
    started = time.monotonic()
    proc = subprocess.run(
        demo_argv("--nodes", str(NODES), "--for", "5"),
        capture_output=True,
        text=True,
        env=demo_env(),
        cwd=REPO,
        timeout=240,
        check=False,
    )
    result = DemoRun(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started)
    print(f"\ndemo took {result.seconds:.1f} s\n{result.output}")
    return result


@pytest.mark.root
@pytest.mark.slow
def test_status_table_shows_every_other_member_alive(demo: DemoRun) -> None:
    table = section(demo.output, "$ meshguard status", "$ meshguard ping")
    assert f"members:   {NODES - 1} ({NODES - 1} alive)" in table
    for name in (f"n{index}" for index in range(2, NODES + 1)):
        row = next((line for line in table.splitlines() if line.startswith(f"{name} ")), None)
        assert row is not None, f"no row for {name} in:\n{table}"
        assert " alive " in row, row


@pytest.mark.root
@pytest.mark.slow
def test_ping_across_the_wan_reports_rtt(demo: DemoRun) -> None:
    wan = section(demo.output, "(on n1, across the WAN)", "$ meshguard")
    assert re.search(r"reply from n2 \(10\.99\.\d+\.\d+\) via direct 203\.0\.113\.12:51821: "
                     r"time=\d+\.\d+ ms", wan), wan  # fmt: skip
    assert "3 sent, 3 received, 0% loss" in wan


@pytest.mark.root
@pytest.mark.slow
def test_pings_across_the_nat_get_replies_and_the_demo_succeeds(demo: DemoRun) -> None:
    for where in ("(on n1, across the NAT)", "(on n2, across the NAT, to a node that is not"):
        pings = section(demo.output, where, "$ meshguard")
        assert re.search(rf"reply from n{NODES} .* time=\d+\.\d+ ms", pings), pings
    assert "not everything worked" not in demo.output
    assert demo.returncode == 0, demo.output


@pytest.mark.root
@pytest.mark.slow
def test_the_run_removes_everything_it_created(demo: DemoRun) -> None:
    assert "cleaned up: stopped 3 daemons" in demo.output
    assert demo.output.rstrip().splitlines()[-1].startswith("cleaned up:")
    assert_nothing_left(demo)


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize(
    ("moment", "status"),
    [("waiting for the mesh to form", 130), ("press Ctrl-C to stop", 0)],
    ids=["while-forming", "while-up"],
)
def test_ctrl_c_stops_the_daemons_and_removes_everything(moment: str, status: int) -> None:
    proc = start_demo("--nodes", str(NODES))
    demo = interrupt(proc, moment, lambda: os.killpg(proc.pid, signal.SIGINT))
    assert demo.returncode == status, demo.output
    assert_nothing_left(demo)


@pytest.mark.root
@pytest.mark.slow
def test_sigterm_to_the_demo_alone_cleans_up_too() -> None:
    proc = start_demo("--nodes", str(NODES))
    demo = interrupt(proc, "waiting for the mesh to form", proc.terminate)
    assert demo.returncode == 128 + signal.SIGTERM, demo.output
    assert_nothing_left(demo)


def interrupt(proc: subprocess.Popen[str], moment: str, send: Callable[[], None]) -> DemoRun:
    """Wait for ``moment`` in the demo's output, ``send`` the signal, collect the rest."""
    try:
        before = read_until(proc, moment, timeout=120)
        send()
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "interrupted" in rest, rest
    return DemoRun(proc.returncode, before + rest, 0.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "1"], "--nodes must be between 2 and 10"),
        (["--nodes", "11"], "--nodes must be between 2 and 10"),
        (["--for", "0"], "--for must be a positive number of seconds"),
    ],
)
def test_bad_arguments_are_one_line_and_status_2(args: list[str], message: str) -> None:
    proc = subprocess.run(
        demo_argv(*args), capture_output=True, text=True, env=demo_env(), cwd=REPO, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr == f"meshguard: error: {message}\n"
    assert proc.stdout == ""


@pytest.mark.root
def test_missing_ip_command_is_one_line_before_anything_is_built() -> None:
    proc = subprocess.run(
        demo_argv(),
        capture_output=True,
        text=True,
        env=demo_env(PATH="/nonexistent"),
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr == "meshguard: error: 'ip' is not installed (apt-get install iproute2)\n"
    assert proc.stdout == ""
