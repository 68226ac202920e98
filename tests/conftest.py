"""Shared pytest configuration: tests marked `root` are skipped, with the reason, where they
cannot run (not root, no `ip`, no network namespaces)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # makes `harness` importable from every test dir

from harness.skips import root_skip_reason


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    root_items = [item for item in items if item.get_closest_marker("root")]
    if not root_items:
        return
    reason = root_skip_reason()
    if reason is None:
        return
    for item in root_items:
        item.add_marker(pytest.mark.skip(reason=reason))


# In CI (EI_STRICT_SKIPS=1) a skip is a failure: every tool the tests need is installed
# there, so a skip would hide a missing install step. Only skips that no machine running
# the suite as root can avoid are allowed (a kernel older than TCX or than BPF
# compare-and-exchange, a one-CPU machine).
UNAVOIDABLE_SKIPS = ("root reads any file", "kernel lacks TCX (Linux 6.6)",
                     "kernel lacks BPF compare-and-exchange (Linux 5.12)",
                     "needs two CPUs to send from two at once")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or os.environ.get("EI_STRICT_SKIPS") != "1":
        return
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
    if any(allowed in reason for allowed in UNAVOIDABLE_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = f"skipped in strict mode (EI_STRICT_SKIPS=1): {reason}"
