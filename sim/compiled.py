"""A mypyc-compiled copy of meshguard and sim, for faster simulation runs.

The sources are never compiled in place: a stale extension next to an edited ``.py`` would
silently shadow the edit. Instead ``ensure_tree`` builds ``<repo>/.build/mypyc/<key>/``, a
copy of the ``meshguard`` and ``sim`` packages in which ``COMPILED_MODULES`` are replaced by
mypyc extensions. The key hashes every file of both packages, the Python version and the mypy
version, so any edit (or upgrade) leads to a new tree. ``exec_in_tree`` re-executes the
interpreter with that tree first on the import path; the trace is the same as interpreted.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import blake3

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("meshguard", "sim")
TREE_ENV = "MESHGUARD_COMPILED_TREE"
"""Set (to the tree) in a re-executed interpreter, so it never re-executes again."""

COMPILED_MODULES = (
    "meshguard/sansio/codec.py",
    "meshguard/sansio/codec_wire.py",
    "meshguard/sansio/errors.py",
    "meshguard/sansio/messages.py",
    "meshguard/sansio/natdetect.py",
    "meshguard/sansio/node.py",
    "meshguard/sansio/stun.py",
    "meshguard/sansio/swim.py",
    "meshguard/sansio/swim_broadcast.py",
    "meshguard/sansio/swim_config.py",
    "meshguard/sansio/swim_lifeguard.py",
    "meshguard/sansio/types.py",
    "meshguard/sansio/wireguard/constants.py",
    "meshguard/sansio/wireguard/cookie.py",
    "meshguard/sansio/wireguard/crypto.py",
    "meshguard/sansio/wireguard/device.py",
    "meshguard/sansio/wireguard/events.py",
    "meshguard/sansio/wireguard/keypair.py",
    "meshguard/sansio/wireguard/noise.py",
    "meshguard/sansio/wireguard/peer.py",
    "meshguard/sansio/wireguard/replay.py",
    "meshguard/sansio/wireguard/routing.py",
    "sim/cores.py",
    "sim/nat.py",
    "sim/network.py",
    "sim/reachability.py",
    "sim/traffic.py",
)
"""The modules replaced by extensions: the sans-IO code and the simulator's per-datagram
code, each compiled with the trace unchanged. Left out: ``meshguard/sansio/traversal.py`` (an
internal mypyc error on ``x in (*names, y)``); ``sim/metrics.py`` (mypyc makes the
``ClassVar`` constants of the ``Series`` dataclass read-only instance attributes that its
``__init__`` then assigns); ``sim/runner.py``; ``meshguard/identity`` (thin wrappers around
``cryptography``: nothing measurable to gain); the rest of ``sim`` only loads, plans and
orchestrates. Compiled code checks argument types: a wrongly typed call raises ``TypeError``
where the interpreted code may raise ``LocalProtocolError``."""

UNUSED_TREE_SECONDS = 3600
"""A tree of another key is deleted once unused this long: a run that started in it before
an edit may still import from it."""

_BUILD_SCRIPT = """\
import sys
from setuptools import setup
from mypyc.build import mypycify
setup(name="meshguard-mypyc", packages=[], py_modules=[],
      ext_modules=mypycify(["--ignore-missing-imports", *sys.argv[1:]], opt_level="3"),
      script_args=["--quiet", "build_ext", "--inplace"])
"""


class BuildError(Exception):
    """The compiled tree could not be built; the message is one line."""


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the packages (no caches, no extensions), by POSIX path under root."""
    files: dict[str, bytes] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*")):
            relative = path.relative_to(root)
            if (not path.is_file() or "__pycache__" in relative.parts
                    or path.suffix in (".pyc", ".so", ".pyd")):
                continue
            files[relative.as_posix()] = path.read_bytes()
    return files


def _mypy_version() -> str:
    try:
        return importlib.metadata.version("mypy")
    except importlib.metadata.PackageNotFoundError:
        raise BuildError("--compiled needs mypy (pip install mypy)") from None


def tree_key(files: dict[str, bytes]) -> str:
    """BLAKE3 over the files (path and bytes), the Python version and the mypy version."""
    hasher = blake3.blake3()
    for text in (sys.version, sysconfig.get_config_var("EXT_SUFFIX") or "", _mypy_version()):
        hasher.update(text.encode() + b"\0")
    for name in sorted(files):
        data = files[name]
        hasher.update(name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return hasher.hexdigest()[:32]


def source_key(root: Path = REPO_ROOT) -> str:
    """The key of the packages under root as they are now."""
    return tree_key(_snapshot(root))


def ensure_tree(root: Path = REPO_ROOT) -> Path:
    """The compiled tree of the sources under root, built now if it does not exist yet.

    It is built in a staging directory beside it and renamed into place, so a concurrent
    builder of the same key either wins the rename or finds the finished tree."""
    files = _snapshot(root)
    key = tree_key(files)
    base = root / ".build" / "mypyc"
    tree = base / key
    try:
        if not tree.is_dir():
            base.mkdir(parents=True, exist_ok=True)
            print(f"building the compiled tree {tree} (mypyc, once per source change)",
                  file=sys.stderr, flush=True)
            _build(files, base, tree)
        os.utime(tree)
        _prune(base, keep=key)
    except OSError as error:
        raise BuildError(f"--compiled: cannot build in {base}: {error}") from None
    return tree


def _build(files: dict[str, bytes], base: Path, tree: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{tree.name}-", dir=base))
    try:
        for name, data in files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        _compile(staging, COMPILED_MODULES, base / "last-build.log")
        try:
            staging.rename(tree)
        except OSError:
            if not tree.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _compile(staging: Path, modules: Sequence[str], log_path: Path) -> None:
    """mypyc the modules (paths under staging) in place, then keep only what importing needs;
    the build's output goes to log_path."""
    missing = [name for name in modules if not (staging / name).is_file()]
    if missing:
        raise BuildError(f"--compiled: no such module to compile: {', '.join(missing)}")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", TREE_ENV)}
    try:
        process = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, *modules],
                                 cwd=staging, env=env, capture_output=True, text=True,
                                 check=False)
    except OSError as error:
        raise BuildError(f"--compiled: cannot start the mypyc build: {error}") from None
    log_path.write_text(process.stdout + process.stderr)
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    built = all((staging / name).with_suffix(suffix).is_file() for name in modules)
    if process.returncode != 0 or not built:
        raise BuildError(f"--compiled: mypyc build failed: {_first_error(process)} "
                         f"(full log: {log_path})")
    for name in modules:
        (staging / name).unlink()
    for leftover in ("build", ".mypy_cache"):
        shutil.rmtree(staging / leftover, ignore_errors=True)


def _first_error(process: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in (process.stdout + process.stderr).splitlines()]
    errors = [line for line in lines if "error" in line.lower()]
    chosen = errors or [line for line in lines if line] or [f"exit status {process.returncode}"]
    return chosen[0]


def _prune(base: Path, keep: str) -> None:
    """Delete other keys' trees, and crashed builders' staging directories, unused for
    ``UNUSED_TREE_SECONDS``."""
    cutoff = time.time() - UNUSED_TREE_SECONDS
    for entry in base.iterdir():
        if entry.name == keep or not entry.is_dir():
            continue
        try:
            stale = entry.stat().st_mtime < cutoff
        except FileNotFoundError:
            continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def in_tree() -> bool:
    """Whether this interpreter was re-executed into a compiled tree."""
    return TREE_ENV in os.environ


def running_compiled() -> bool:
    """Whether the ``meshguard.sansio.swim`` this interpreter runs is a compiled extension."""
    module = importlib.import_module("meshguard.sansio.swim")
    return isinstance(module.__spec__.loader if module.__spec__ else None,
                      importlib.machinery.ExtensionFileLoader)


def mode() -> str:
    """How this interpreter runs the code, as the CLI and the benchmark print it."""
    return "compiled (mypyc)" if running_compiled() else "interpreted"


def enter_tree(interpreter_args: Sequence[str]) -> str | None:
    """Re-execute ``python -P <interpreter_args>`` in the compiled tree (building it first;
    this process ends there), or say in one line why not. Inside the tree: check that the
    code really is compiled."""
    if not in_tree():
        try:
            tree = ensure_tree()
        except BuildError as error:
            return str(error)
        exec_in_tree(tree, interpreter_args)
    if not running_compiled():
        return f"--compiled: the tree {os.environ[TREE_ENV]} does not provide the compiled modules"
    return None


def exec_in_tree(tree: Path, interpreter_args: Sequence[str]) -> NoReturn:
    """Replace this process by ``python -P <interpreter_args>`` importing from tree.

    ``-P`` keeps the script's directory (or, with ``-m``, the working directory) off the
    front of ``sys.path``, where the interpreted sources would shadow the tree."""
    env = dict(os.environ)
    env[TREE_ENV] = str(tree)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tree), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-P", *interpreter_args], env)
