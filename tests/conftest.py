"""Shared test configuration.

Tests marked ``root`` need network namespaces, TUN devices or NAT. They skip for a non-root
developer, but in CI (``CI=true``, which runs as root) a skip would hide a failure, so there
they fail instead.
"""

from __future__ import annotations

import os

import pytest


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is None or os.geteuid() == 0:
        return
    if _in_ci():
        pytest.fail("root-only test cannot run: CI must run as root", pytrace=False)
    pytest.skip("needs root (network namespaces, TUN, NAT)")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if _in_ci() and report.skipped:
        raise RuntimeError(f"a whole test module was skipped in CI: {report.nodeid}")
