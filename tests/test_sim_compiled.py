"""The mypyc-compiled tree (sim.compiled): built outside the sources, keyed by their content,
really compiled, and the same simulation as the interpreted code.

The first test to need the tree builds it under <repo>/.build/mypyc/ (about a minute, once
per source change); later runs reuse it.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sim import compiled

ROOT = compiled.REPO_ROOT
TIMING_FIELDS = {"wall_seconds", "speed_factor", "cpu_seconds", "cpu_seconds_per_worker",
                 "peak_rss_mib_per_worker"}


def _copy_sources(target: Path) -> None:
    for package in compiled.PACKAGES:
        shutil.copytree(ROOT / package, target / package,
                        ignore=shutil.ignore_patterns("__pycache__"))


def _module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


@pytest.fixture(scope="module")
def tree() -> Path:
    return compiled.ensure_tree()


def test_the_key_follows_the_sources_not_their_caches(tmp_path: Path) -> None:
    _copy_sources(tmp_path)
    (tmp_path / "sim" / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "sim" / "__pycache__" / "runner.cpython-311.pyc").write_bytes(b"stale")
    original = compiled.source_key(tmp_path)
    assert original == compiled.source_key(ROOT)

    swim = tmp_path / "meshguard" / "sansio" / "swim.py"
    text = swim.read_text()
    swim.write_text(text + "\n")
    assert compiled.source_key(tmp_path) != original
    swim.write_text(text)
    assert compiled.source_key(tmp_path) == original

    (tmp_path / "sim" / "extra.py").write_text("")
    assert compiled.source_key(tmp_path) != original


def test_the_tree_holds_extensions_in_place_of_the_compiled_sources(tree: Path) -> None:
    assert tree.parent == ROOT / ".build" / "mypyc"
    assert tree.name == compiled.source_key()
    assert compiled.ensure_tree() == tree
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for path in compiled.COMPILED_MODULES:
        assert not (tree / path).exists()
        assert (tree / path).with_suffix(suffix).is_file()
    assert (tree / "sim" / "runner.py").read_bytes() == (ROOT / "sim" / "runner.py").read_bytes()
    assert not list(tree.glob("build")) and not list(tree.rglob("*.c"))


def test_the_tree_imports_as_extensions(tree: Path) -> None:
    names = [_module_name(path) for path in compiled.COMPILED_MODULES]
    program = (
        "import importlib, importlib.machinery, sys\n"
        "from sim import compiled\n"
        "for name in sys.argv[1:]:\n"
        "    loader = importlib.import_module(name).__spec__.loader\n"
        "    assert isinstance(loader, importlib.machinery.ExtensionFileLoader), name\n"
        "print(compiled.running_compiled(), compiled.REPO_ROOT)\n")
    done = subprocess.run([sys.executable, "-P", "-c", program, *names], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(tree)},
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", str(tree)]
    assert not compiled.running_compiled()


def _run_sim(out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sim", *flags, "--quiet", "--out", str(out),
         "scenarios/churn-100.yaml"],
        cwd=ROOT, capture_output=True, text=True, check=False)


def test_a_compiled_run_is_the_interpreted_run(tree: Path, tmp_path: Path) -> None:
    interpreted = _run_sim(tmp_path / "interpreted")
    compiled_run = _run_sim(tmp_path / "compiled", "--compiled")
    assert interpreted.returncode == 0, interpreted.stderr
    assert compiled_run.returncode == 0, compiled_run.stderr
    assert "code interpreted" in interpreted.stdout.splitlines()
    assert "code compiled (mypyc)" in compiled_run.stdout.splitlines()
    assert "building" not in compiled_run.stderr
    trace_lines = [run.stdout.splitlines()[-1] for run in (interpreted, compiled_run)]
    assert trace_lines[0].startswith("seed 1  trace ")
    assert trace_lines[0] == trace_lines[1]

    summaries = [json.loads((tmp_path / mode / "summary.json").read_text())
                 for mode in ("interpreted", "compiled")]
    for summary in summaries:
        for field in TIMING_FIELDS:
            del summary[field]
    assert summaries[0] == summaries[1]
    for name in ("views.csv", "messages.csv"):
        assert ((tmp_path / "compiled" / name).read_bytes()
                == (tmp_path / "interpreted" / name).read_bytes())


def test_a_failed_build_is_one_line_and_exit_3(tmp_path: Path) -> None:
    _copy_sources(tmp_path)
    shutil.copytree(ROOT / "scenarios", tmp_path / "scenarios")
    module = tmp_path / "sim" / "compiled.py"
    module.write_text(module.read_text().replace(
        '    "sim/network.py",\n', '    "sim/network.py",\n    "sim/no_such_module.py",\n'))
    done = subprocess.run(
        [sys.executable, "-m", "sim", "--compiled", "--quiet", "--out", str(tmp_path / "out"),
         "scenarios/smoke-5.yaml"],
        cwd=tmp_path, env={key: value for key, value in os.environ.items()
                           if key not in ("PYTHONPATH", compiled.TREE_ENV)},
        capture_output=True, text=True, check=False)
    assert done.returncode == 3
    lines = done.stderr.splitlines()
    assert lines[0].startswith("building the compiled tree")
    assert lines[1:] == ["--compiled: no such module to compile: sim/no_such_module.py"]
    assert not (tmp_path / "out").exists()
    assert [entry.name for entry in (tmp_path / ".build" / "mypyc").iterdir()] == []


def test_a_mypyc_error_names_the_first_error_and_keeps_the_log(tmp_path: Path) -> None:
    (tmp_path / "typo.py").write_text("def half(value: int) -> int:\n    return value / 2\n")
    log = tmp_path / "build.log"
    with pytest.raises(compiled.BuildError) as raised:
        compiled._compile(tmp_path, ["typo.py"], log)
    message = str(raised.value)
    assert message.startswith("--compiled: mypyc build failed: typo.py:2: error: Incompatible")
    assert message.endswith(f"(full log: {log})")
    assert "\n" not in message
    assert "typo.py:2: error" in log.read_text()
    assert (tmp_path / "typo.py").is_file()


def test_a_builder_that_loses_the_race_uses_the_winners_tree(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _copy_sources(tmp_path)
    key = compiled.source_key(tmp_path)
    winner = tmp_path / ".build" / "mypyc" / key

    def another_builder_finishes_first(staging: Path, modules: object, log: Path) -> None:
        shutil.copytree(staging, winner)
        (winner / "built-by-the-winner").write_text("")

    monkeypatch.setattr(compiled, "_compile", another_builder_finishes_first)
    assert compiled.ensure_tree(tmp_path) == winner
    assert (winner / "built-by-the-winner").is_file()
    assert [entry.name for entry in winner.parent.iterdir()] == [key]


def test_other_keys_trees_are_pruned_once_unused_for_an_hour(tmp_path: Path) -> None:
    _copy_sources(tmp_path)
    base = tmp_path / ".build" / "mypyc"
    current, recent, old, crashed = (base / name for name in (
        compiled.source_key(tmp_path), "recent", "old", ".staging-old-crashed"))
    for directory in (current, recent, old, crashed):
        directory.mkdir(parents=True)
    long_ago = time.time() - compiled.UNUSED_TREE_SECONDS - 60
    for directory in (current, old, crashed):
        os.utime(directory, (long_ago, long_ago))

    assert compiled.ensure_tree(tmp_path) == current
    assert sorted(entry.name for entry in base.iterdir()) == sorted([current.name, "recent"])
    assert current.stat().st_mtime > long_ago + 60
