"""Flows evicted every 100 ms while traffic runs for seconds: no packet lost or counted
twice across evictions (the double-buffered flow table)."""

from __future__ import annotations

from collections import Counter

import pytest
from harness import traffic
from harness.assertions import check_fields, key_of, wait_exact
from harness.skips import requires_root_netns

pytestmark = [pytest.mark.root, requires_root_netns()]


def test_counts_stay_exact_across_frequent_evictions(topo, grpc_collector, start_agent,
                                                     wall_clock):
    agent = start_agent({"CACHE_ACTIVE_TIMEOUT": "100ms"}, grpc_collector)

    # 100 flows x 40 packets each way, paced over 5 s: ~50 evictions during the traffic.
    expected = traffic.udp_flows(topo.link, n_flows=100, packets=lambda i: 40,
                                 payload=lambda i: 50 + i, duration=5.0)
    result = agent.stop()
    wall_clock.stop()

    assert result.returncode == 0, result.stderr
    flows = wait_exact(expected, grpc_collector.flows, timeout=15)
    check_fields(expected, flows, t_start_ns=wall_clock.start, t_end_ns=wall_clock.end)
    # The flows really were split over evictions (else this test would prove nothing).
    records_per_key = Counter(key_of(r) for r in flows if key_of(r) in expected.counts)
    assert max(records_per_key.values()) >= 5, records_per_key.most_common(3)
