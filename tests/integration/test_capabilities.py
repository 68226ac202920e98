"""Least privilege: the agent counts exactly with only CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and
CAP_SYS_RESOURCE (uid 0, like the DaemonSet), and without one it needs it exits non-zero
with one line naming the missing capability.

The capabilities are limited with setpriv: a bounding set of the four, no inheritable or
ambient ones, so the root process the agent runs as has exactly those (checked in CapEff).
CAP_SYS_RESOURCE is granted only if this machine's bounding set has it (here it does not:
the kernel charges BPF memory to the cgroup, so the agent must not need it).
"""

from __future__ import annotations

import pytest
from harness import traffic
from harness.assertions import wait_exact
from harness.skips import requires_root_netns, requires_tool

from ei_ebpf_agent.privileges import effective_capabilities

pytestmark = [pytest.mark.root, requires_root_netns(), requires_tool("setpriv")]

FOUR = {"bpf": 39, "perfmon": 38, "net_admin": 12, "sys_resource": 24}


def _bounding_set() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapBnd:"):
                return int(line.split()[1], 16)
    raise AssertionError("no CapBnd in /proc/self/status")


def setpriv(names: list[str]) -> list[str]:
    """setpriv prefix leaving a uid-0 process exactly `names` (∩ this machine's bounding set)."""
    caps = ",".join(f"+{name}" for name in names)
    return ["setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all", "--ambient-caps=-all",
            "--"]


def expected_mask(names: list[str]) -> int:
    mask = 0
    for name in names:
        mask |= 1 << FOUR[name]
    return mask & _bounding_set()


def cap_eff_under(topo, names: list[str]) -> int:
    done = topo.a.run([*setpriv(names), "grep", "^CapEff:", "/proc/self/status"])
    return int(done.stdout.split()[1], 16)


def test_the_four_capabilities_are_exactly_what_the_agent_gets(topo):
    names = list(FOUR)
    assert cap_eff_under(topo, names) == expected_mask(names)
    assert effective_capabilities() is not None


def test_counts_exactly_with_only_the_four_capabilities(topo, grpc_collector, start_agent):
    agent = start_agent({"CACHE_ACTIVE_TIMEOUT": "500ms"}, grpc_collector,
                        prefix=setpriv(list(FOUR)))
    expected = traffic.mixed_traffic(topo.link)
    result = agent.stop()
    assert result.returncode == 0, result.stderr
    wait_exact(expected, grpc_collector.flows, grpc_collector.byte_measure, timeout=15)


@pytest.mark.parametrize("dropped", ["bpf", "perfmon", "net_admin"])
def test_a_missing_capability_is_named(topo, dropped):
    from harness.agent import run_agent_to_exit

    names = [name for name in FOUR if name != dropped]
    assert cap_eff_under(topo, names) == expected_mask(names)
    result = run_agent_to_exit(topo, {"EXPORT": "stdout"}, prefix=setpriv(names), timeout=60)

    assert result.returncode != 0, result.stderr
    wanted = f"CAP_{dropped.upper()}"
    naming = [line for line in result.stderr_lines if f"missing capability {wanted}" in line]
    assert len(naming) == 1, result.stderr
    assert naming[0].startswith("ei-ebpf-agent: "), naming[0]
    # Only the capability that is really missing is named.
    for other in FOUR:
        if other != dropped:
            assert f"CAP_{other.upper()}" not in naming[0].split("(")[0], naming[0]
