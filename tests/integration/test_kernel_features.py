"""The kernel feature probe against the running kernel (the host's, and each VM's in
`nox -s vm`): Debian's kernels have exactly the features of their upstream version."""

from __future__ import annotations

import platform

import pytest
from harness.skips import requires_root_netns

pytestmark = [pytest.mark.root, requires_root_netns()]


def test_probe_matches_the_kernel_version() -> None:
    from ei_ebpf_agent.ebpf import features

    found = features.probe()
    expected = features.kernel_version_fallback(platform.release())
    assert {name: getattr(found, name) for name in features.FEATURES} == expected
    found.check()  # every supported kernel (>= 5.8) has what the agent requires
