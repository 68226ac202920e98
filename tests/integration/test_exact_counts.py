"""Mixed traffic (IPv4/IPv6 UDP over 200+ flows, ICMP/ICMPv6 echo, a TCP connection) between
two namespaces is reported with exact packet and byte counts and correct fields."""

from __future__ import annotations

import pytest
from harness import traffic
from harness.assertions import check_fields, wait_exact
from harness.skips import requires_root_netns

pytestmark = [pytest.mark.root, requires_root_netns()]

AGENT_IP = "192.0.2.7"


def test_mixed_traffic_is_counted_exactly_with_correct_fields(topo, any_collector, start_agent,
                                                              wall_clock):
    agent = start_agent({"CACHE_ACTIVE_TIMEOUT": "500ms", "AGENT_IP": AGENT_IP}, any_collector)

    expected = traffic.mixed_traffic(topo.link)
    result = agent.stop()
    wall_clock.stop()

    assert result.returncode == 0, result.stderr
    flows = wait_exact(expected, any_collector.flows, any_collector.byte_measure, timeout=15)
    check_fields(expected, flows, t_start_ns=wall_clock.start, t_end_ns=wall_clock.end,
                 sampling={0, 1}, agent_ip=AGENT_IP)
