"""A host of a namespace test that runs a real ``meshguard run`` with its own config dir.

The tests that start daemons (mesh, real NAT traversal, UAPI mode) share this base: a fresh
identity, trust between hosts, launching the daemon inside the host's namespace with its log
in the config dir, the CLI for that config dir, and the control socket's view of members.
Each test subclasses it for its own settings file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshguard.config import config_paths
from meshguard.control import ControlClient, ControlError
from meshguard.identity.keyfile import save_identity
from meshguard.identity.keys import Identity, public_key_to_base64
from meshguard.identity.meshaddr import mesh_ipv4, mesh_ipv6
from meshguard.identity.trust import TrustStore
from meshguard.netlab import Namespace
from tests.dataplane_lab import REPO


@dataclass
class DaemonHost:
    name: str
    ns: Namespace
    directory: Path
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True)
        identity = Identity.generate(os.urandom)
        save_identity(config_paths(self.directory).private_key, identity)
        self.key = identity.public_key
        self.public_key = public_key_to_base64(identity.public_key)
        self.ipv4, self.ipv6 = str(mesh_ipv4(self.key)), str(mesh_ipv6(self.key))
        self.log_path = self.directory / "daemon.log"

    def trust(self, other: DaemonHost) -> None:
        TrustStore(config_paths(self.directory).authorized_keys).add(other.name, other.key)

    def write_settings(self, text: str) -> None:
        (self.directory / "meshguard.toml").write_text(text)

    def launch(self, *run_flags: str) -> int:
        """Start ``meshguard run`` in the namespace; returns how many starts the log had."""
        starts = self.log().count("event=started")
        with self.log_path.open("ab") as log:
            self.process = self.ns.popen(
                [sys.executable, "-m", "meshguard", "--config-dir", str(self.directory), "run",
                 *run_flags],
                env={"PYTHONPATH": str(REPO), "PATH": os.environ["PATH"]},
                cwd=REPO,
                stdout=log,
                stderr=log,
            )  # fmt: skip
        return starts

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def started(self, starts: int = 0) -> bool:
        """Whether the daemon logged a start after ``starts``; fails if it exited instead."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited:\n{self.log()[-3000:]}")
        return self.log().count("event=started") > starts

    def cli(
        self, *args: str, in_namespace: bool = False, directory: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``meshguard ARGS`` for this host's config dir (or ``directory``)."""
        command = [
            sys.executable, "-m", "meshguard", "--config-dir", str(directory or self.directory),
            *args,
        ]  # fmt: skip
        return subprocess.run(
            self.ns.exec_argv(command) if in_namespace else command,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
            timeout=60,
            check=False,
        )

    def status(self) -> Any:
        with ControlClient(self.directory, timeout=3) as client:
            return client.status()

    def members(self, by: str = "public_key") -> dict[str, dict[str, Any]]:
        """This host's member rows keyed by ``by`` ({} if the daemon does not answer)."""
        try:
            rows = self.status()["members"]
        except ControlError:
            return {}
        return {row[by]: dict(row) for row in rows}

    def sees_alive(self, others: list[DaemonHost]) -> bool:
        rows = self.members()
        return all(rows.get(o.public_key, {}).get("state") == "alive" for o in others)
