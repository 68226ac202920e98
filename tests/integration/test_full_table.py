"""With a flow table far smaller than the number of flows, the overflow goes through the
ring buffer and the totals stay exact."""

from __future__ import annotations

import pytest
from harness import traffic
from harness.assertions import check_fields, wait_exact
from harness.skips import requires_root_netns

pytestmark = [pytest.mark.root, requires_root_netns()]


def test_flows_beyond_cache_max_flows_are_still_counted_exactly(topo, grpc_collector,
                                                                start_agent, wall_clock):
    agent = start_agent({"CACHE_MAX_FLOWS": "64", "CACHE_ACTIVE_TIMEOUT": "1s"}, grpc_collector)

    # 1,000 flows each way (2,000 keys) against a 64-entry table.
    expected = traffic.udp_flows(topo.link, n_flows=1000, packets=lambda i: 1 + i % 4,
                                 payload=lambda i: 10 + i % 300)
    result = agent.stop()
    wall_clock.stop()

    assert result.returncode == 0, result.stderr
    assert len(expected) == 2000
    flows = wait_exact(expected, grpc_collector.flows, timeout=20)
    check_fields(expected, flows, t_start_ns=wall_clock.start, t_end_ns=wall_clock.end)
