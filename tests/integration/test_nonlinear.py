"""Frames sent through trafgen's mmap TX ring keep only the Ethernet header in the linear
part of the skb: the agent must still parse and count every one of them exactly."""

from __future__ import annotations

import pytest
from harness import traffic
from harness.assertions import check_fields, wait_exact
from harness.skips import requires_root_netns, requires_tool
from harness.truth import Sniffer

pytestmark = [pytest.mark.root, requires_root_netns(), requires_tool("trafgen")]


def test_frames_from_trafgen_mmap_ring_are_counted_exactly(topo, grpc_collector, start_agent,
                                                          wall_clock):
    agent = start_agent({"CACHE_ACTIVE_TIMEOUT": "500ms"}, grpc_collector)

    with Sniffer(topo.link) as sniffer:
        expected = traffic.trafgen_udp(topo.link, count=2000, payload_len=300)
    traffic.cross_check(expected, sniffer.expectation())  # trafgen really sent them all
    result = agent.stop()
    wall_clock.stop()

    assert result.returncode == 0, result.stderr
    flows = wait_exact(expected, grpc_collector.flows, timeout=15)
    check_fields(expected, flows, t_start_ns=wall_clock.start, t_end_ns=wall_clock.end)
