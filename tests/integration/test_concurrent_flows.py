"""A new flow whose first packets reach the agent on two CPUs at the same moment becomes
one flow record, with every packet of both CPUs counted in it."""

from __future__ import annotations

import os
from collections import Counter

import pytest
from harness import traffic
from harness.assertions import key_of, wait_exact
from harness.skips import requires_root_netns, requires_tool
from harness.truth import IPPROTO_UDP, Sniffer

pytestmark = [pytest.mark.root, requires_root_netns(), requires_tool("trafgen")]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs to send from two at once")
def test_flows_starting_on_two_cpus_at_once_are_one_record_each(topo, grpc_collector,
                                                                start_agent):
    # One eviction only (the final one at stop): every flow must arrive as one record.
    agent = start_agent({"CACHE_ACTIVE_TIMEOUT": "5m", "CACHE_MAX_FLOWS": "20000"},
                        grpc_collector)

    with Sniffer(topo.link) as sniffer:
        traffic.trafgen_udp_flows_on_cpus(topo.link, n_flows=6000, rounds=2, cpus=2)
    seen = sniffer.expectation()  # what really went out, and the replies (ICMP errors)
    ours = [k for k in seen.counts if k.protocol == IPPROTO_UDP and k.src_port >= 22000]
    assert len(ours) == 6000
    expected = seen.restricted_to(ours)
    result = agent.stop()

    assert result.returncode == 0, result.stderr
    flows = wait_exact(expected, grpc_collector.flows, timeout=20)
    records = Counter(key_of(f) for f in flows)
    assert [k.short() for k in ours if records[k] != 1] == []
