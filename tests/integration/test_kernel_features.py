"""The kernel feature probe against the running kernel (the host's, and each VM's in
`nox -s vm`): Debian's kernels have exactly the features of their upstream version."""

from __future__ import annotations

import platform
import re

import pytest
from harness.skips import requires_root_netns

pytestmark = [pytest.mark.root, requires_root_netns()]

# feature -> first upstream Linux version with it (the agent itself never guesses)
FIRST_VERSION = {"ringbuf": (5, 8), "map_in_map": (4, 12), "coarse_clock": (5, 11),
                 "cmpxchg": (5, 12), "tcx": (6, 6)}


def upstream_features(release: str) -> dict[str, bool]:
    """What an upstream kernel of `release` (`uname -r`) has."""
    match = re.match(r"(\d+)\.(\d+)", release)
    assert match, release
    version = (int(match.group(1)), int(match.group(2)))
    return {name: version >= first for name, first in FIRST_VERSION.items()}


def test_upstream_features_reads_debian_releases() -> None:
    assert upstream_features("5.10.0-46-amd64") == {
        "ringbuf": True, "map_in_map": True, "coarse_clock": False, "cmpxchg": False,
        "tcx": False}
    assert upstream_features("6.12.57+deb13-amd64")["tcx"] is True
    assert upstream_features("5.11.0")["cmpxchg"] is False


def test_probe_matches_the_kernel_version() -> None:
    from ei_ebpf_agent.ebpf import features

    found = features.probe()
    expected = upstream_features(platform.release())
    assert {name: getattr(found, name) for name in features.FEATURES} == expected
    found.check()  # every supported kernel (>= 5.8) has what the agent requires
