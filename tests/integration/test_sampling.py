"""SAMPLING=10 counts about one packet in ten and says so in every record."""

from __future__ import annotations

import math

import pytest
from harness import traffic
from harness.assertions import sum_by_key
from harness.skips import requires_root_netns

pytestmark = [pytest.mark.root, requires_root_netns()]

N, RATE, PAYLOAD = 20_000, 10, 100
FRAME = 14 + 20 + 8 + PAYLOAD


def test_one_in_ten_packets_is_sampled(topo, grpc_collector, start_agent):
    agent = start_agent({"SAMPLING": str(RATE), "CACHE_ACTIVE_TIMEOUT": "500ms"}, grpc_collector)

    expected = traffic.udp_flows(topo.link, n_flows=1, packets=lambda i: N,
                                 payload=lambda i: PAYLOAD, replies=False)
    result = agent.stop()
    assert result.returncode == 0, result.stderr

    flows = grpc_collector.flows()
    (key,) = expected.counts
    got = sum_by_key(flows).get(key)
    assert got is not None, f"no record of {key.short()}"
    # Each packet is kept with probability 1/10: binomial, mean n/10, sd sqrt(n*0.1*0.9).
    # ±6 sd: a correct agent falls outside with probability ~2e-9.
    mean, sd = N / RATE, math.sqrt(N * (1 / RATE) * (1 - 1 / RATE))
    assert abs(got.packets - mean) <= 6 * sd, (got.packets, mean, sd)
    assert got.frame_bytes == got.packets * FRAME  # every sampled packet has the known size
    assert flows and all(r.get("sampling") == RATE for r in flows), \
        sorted({r.get("sampling") for r in flows})
