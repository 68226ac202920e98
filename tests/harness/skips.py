"""Why a root integration test cannot run here (computed once), as pytest skip marks."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest


@functools.cache
def root_skip_reason() -> str | None:
    """None when root tests can run, else a sentence saying what is missing."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and BPF programs)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` command"
    probe = f"ei-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          check=False)
    if made.returncode != 0:
        return f"cannot create network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def requires_root_netns() -> pytest.MarkDecorator:
    """Module-level mark: `pytestmark = [pytest.mark.root, requires_root_netns()]`."""
    reason = root_skip_reason()
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def requires_tool(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(name) is None, reason=f"needs `{name}` on PATH")
