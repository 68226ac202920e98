"""Counted once, across a crash: kill -9 and restart under traffic, in TCX and tc mode.

With PIN=true the restarted agent adopts the pinned tables and links of the killed one:
the collector's totals equal what was sent before, during and after the gap, exactly.
With PIN=false the restarted agent replaces the killed agent's tc filters instead of
adding its own beside them: every packet after the restart is counted once, not twice.
A clean stop (SIGTERM) leaves no filter, link or pin behind.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from harness import traffic
from harness.agent import AgentProcess
from harness.assertions import wait_exact
from harness.skips import requires_root_netns

pytestmark = [pytest.mark.root, requires_root_netns()]

# Long enough that the kill lands before the first eviction: nothing of agent 1 is in
# flight to the collector when it dies (the one window a crash can lose; reliability.md).
PERIOD = "3s"


@pytest.fixture
def bpffs(tmp_path):
    """A bpf filesystem of this test's own (pins of other tests cannot meet it)."""
    mount = tmp_path / "bpffs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def pins_left(bpffs) -> list[str]:
    return sorted(str(p.relative_to(bpffs)) for p in bpffs.rglob("*")
                  if not p.name.endswith(".debug"))  # the preloaded iterators of bpffs


def nothing_attached(topo) -> None:
    seen = topo.attachments()
    assert seen["tcx_ingress"] == 0 and seen["tcx_egress"] == 0, seen
    assert seen["tc_ingress"] == [] and seen["tc_egress"] == [], seen


def tc_filters(topo) -> list[str]:
    """The egress filters of A's veth end (`tc filter show` prints two lines for each)."""
    return [line for line in topo.attachments()["tc_egress"] if " handle " in line]


def phase(topo, first_port: int):
    return traffic.udp_flows(topo.link, n_flows=30, first_port=first_port)


def kill9(agent: AgentProcess) -> None:
    os.killpg(agent.proc.pid, signal.SIGKILL)
    agent.proc.wait(10)


@pytest.mark.parametrize("mode", ["tcx", "tc"])
def test_kill9_and_restart_with_pins_counts_every_packet_once(mode, topo, grpc_collector,
                                                              bpffs) -> None:
    env = {"CACHE_ACTIVE_TIMEOUT": PERIOD, "TC_ATTACH_MODE": mode, "PIN": "true",
           "BPF_FS_PATH": str(bpffs / "agent")}
    first = AgentProcess(topo, env, grpc_collector).start()
    expected = phase(topo, 20000)
    kill9(first)
    assert pins_left(bpffs), "a crash leaves the pins, by design"
    expected = expected.merge(phase(topo, 20000))  # no agent runs: the programs still count
    expected = expected.merge(phase(topo, 21000))
    with AgentProcess(topo, env, grpc_collector) as second:
        assert "adopted the tables pinned in" in second.stderr()
        expected = expected.merge(phase(topo, 20000))
        result = second.stop()
    assert result.returncode == 0, result.stderr
    wait_exact(expected, grpc_collector.flows, grpc_collector.byte_measure, timeout=15)
    nothing_attached(topo)
    assert pins_left(bpffs) == []


def test_kill9_in_tc_mode_without_pins_never_counts_twice(topo, grpc_collector) -> None:
    env = {"CACHE_ACTIVE_TIMEOUT": "300ms", "TC_ATTACH_MODE": "tc", "PIN": "false"}
    first = AgentProcess(topo, env, grpc_collector).start()
    kill9(first)
    assert len(tc_filters(topo)) == 1  # the killed agent's filter stays
    with AgentProcess(topo, env, grpc_collector) as second:
        assert "replacing the egress tc filter an earlier agent left" in second.stderr()
        assert len(tc_filters(topo)) == 1  # its own, in the killed one's place
        expected = phase(topo, 22000)
        result = second.stop()
    assert result.returncode == 0, result.stderr
    wait_exact(expected, grpc_collector.flows, grpc_collector.byte_measure, timeout=15)
    nothing_attached(topo)


def test_restart_with_another_table_size_drains_the_old_tables_once(topo, grpc_collector,
                                                                   bpffs) -> None:
    env = {"CACHE_ACTIVE_TIMEOUT": PERIOD, "PIN": "true", "BPF_FS_PATH": str(bpffs / "agent"),
           "CACHE_MAX_FLOWS": "5000"}
    first = AgentProcess(topo, env, grpc_collector).start()
    expected = phase(topo, 23000)
    kill9(first)
    with AgentProcess(topo, {**env, "CACHE_MAX_FLOWS": "6000"}, grpc_collector) as second:
        assert "cannot be adopted" in second.stderr()
        expected = expected.merge(phase(topo, 23000))
        result = second.stop()
    assert result.returncode == 0, result.stderr
    assert "from the earlier agent's flows_" in result.stderr
    wait_exact(expected, grpc_collector.flows, grpc_collector.byte_measure, timeout=15)
    nothing_attached(topo)
    assert pins_left(bpffs) == []


def test_restart_with_pin_false_removes_the_pins_a_crash_left(topo, grpc_collector,
                                                              bpffs) -> None:
    env = {"CACHE_ACTIVE_TIMEOUT": PERIOD, "PIN": "true", "BPF_FS_PATH": str(bpffs / "agent")}
    kill9(AgentProcess(topo, env, grpc_collector).start())
    with AgentProcess(topo, {**env, "PIN": "false", "CACHE_ACTIVE_TIMEOUT": "300ms"},
                      grpc_collector) as second:
        assert pins_left(bpffs) in ([], ["agent"])  # nothing pinned: the old links are gone
        expected = phase(topo, 24000)  # counted by this agent only, not also by the old links
        result = second.stop()
    assert result.returncode == 0, result.stderr
    wait_exact(expected, grpc_collector.flows, grpc_collector.byte_measure, timeout=15)
    nothing_attached(topo)


def test_a_second_agent_on_the_same_bpf_fs_path_exits_with_one_line(topo, grpc_collector,
                                                                    bpffs) -> None:
    env = {"PIN": "true", "BPF_FS_PATH": str(bpffs / "agent")}
    with AgentProcess(topo, env, grpc_collector):
        second = AgentProcess(topo, env, grpc_collector)
        second.spawn()
        result = second.wait(30)
    assert result.returncode == 1
    assert result.stderr_lines[-1] == (
        f"ei-ebpf-agent: another agent is running with BPF_FS_PATH={bpffs / 'agent'}: give "
        "each agent its own BPF_FS_PATH, or set PIN=false")
