"""``meshguard run --kernel`` on a kernel without the WireGuard module (real, root).

This machine's kernel has no WireGuard module, so the daemon must stop with one line naming
the problem and the alternatives, exit status 2, and leave no interface, control socket or
UDP port behind. (On a kernel with the module the same command creates the interface; that
path could not be run here.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshguard.config import config_paths
from meshguard.control import socket_path
from meshguard.drivers.kernel_wg import NO_MODULE
from meshguard.identity.keyfile import save_identity
from meshguard.identity.keys import Identity
from tests.dataplane_lab import REPO
from tests.netns import Lab

pytestmark = pytest.mark.root


def _kernel_has_wireguard(lab: Lab) -> bool:
    probe = lab.namespace("probe")
    created = probe.run(["ip", "link", "add", "wgprobe", "type", "wireguard"], check=False)
    return created.returncode == 0


@pytest.mark.parametrize("chosen_by", ["flag", "settings"])
def test_kernel_mode_without_module_is_one_line_and_leaves_nothing(
    tmp_path: Path, chosen_by: str
) -> None:
    """``run --kernel`` and ``data_plane = "kernel"`` in the file take the same path."""
    with Lab(prefix="mgk") as lab:
        if _kernel_has_wireguard(lab):
            pytest.skip("this kernel has the WireGuard module; the error path cannot happen")
        ns = lab.namespace("host")
        save_identity(config_paths(tmp_path).private_key, Identity.generate(os.urandom))
        interface = f"wgk{lab.suffix}"
        settings = f'interface = "{interface}"\nlisten_port = 51821\nmdns = false\n'
        flags = ["--kernel"]
        if chosen_by == "settings":
            settings += 'data_plane = "kernel"\n'
            flags = []
        (tmp_path / "meshguard.toml").write_text(settings)
        proc = subprocess.run(
            ns.exec_argv(
                [sys.executable, "-m", "meshguard", "--config-dir", str(tmp_path), "run", *flags]
            ),
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(REPO), "PATH": os.environ["PATH"]},
            cwd=REPO,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 2
        assert proc.stderr == f"meshguard: error: {NO_MODULE}\n"
        assert proc.stdout == ""
        links = ns.run(["ip", "-o", "link", "show"]).stdout
        assert interface not in links
        assert not socket_path(tmp_path).exists()
        sockets = ns.run(["ss", "-uan"]).stdout
        assert ":51821" not in sockets
