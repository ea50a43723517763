"""Shared test configuration.

Tests marked ``root`` need network namespaces, TUN devices or NAT. They skip for a non-root
developer, but in CI (``CI=true``, which runs as root) a skip would hide a failure, so there
they fail instead.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is None or os.geteuid() == 0:
        return
    if _in_ci():
        pytest.fail("root-only test cannot run: CI must run as root", pytrace=False)
    pytest.skip("needs root (network namespaces, TUN, NAT)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """In CI a skipped root test (a missing tool, say) is a failure: it would hide a gap."""
    report = yield
    if _in_ci() and report.skipped and item.get_closest_marker("root") is not None:
        report.outcome = "failed"
        report.longrepr = f"root test skipped in CI: {report.longrepr}"
    return report


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if _in_ci() and report.skipped:
        raise RuntimeError(f"a whole test module was skipped in CI: {report.nodeid}")
