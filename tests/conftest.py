"""Shared pytest configuration: tests marked `root` are skipped, with the reason, where they
cannot run (not root, no `ip`, no network namespaces)."""

from __future__ import annotations

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
