"""Fail if meshguard/sansio imports I/O, a clock or randomness (DESIGN.md §3, rule 1)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

FORBIDDEN = {"socket", "asyncio", "selectors", "time", "os", "random", "threading", "simpy"}


def forbidden_imports(path: Path) -> list[str]:
    """Return one 'file:line: module' entry per forbidden import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            modules = [node.args[0].value]
        for module in modules:
            if module.split(".")[0] in FORBIDDEN:
                found.append(f"{path}:{node.lineno}: imports {module}")
    return found


def main(argv: list[str]) -> int:
    root = (
        Path(argv[1])
        if len(argv) > 1
        else Path(__file__).resolve().parent.parent / "meshguard" / "sansio"
    )
    problems = [p for path in sorted(root.rglob("*.py")) for p in forbidden_imports(path)]
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
