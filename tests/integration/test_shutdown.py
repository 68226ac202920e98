"""SIGTERM/SIGINT: the flows still in the kernel table are drained and exported, the agent
exits 0 and leaves nothing attached — and nothing it did not create is removed."""

from __future__ import annotations

import signal

import pytest
from harness import traffic
from harness.assertions import check_fields, wait_exact
from harness.skips import requires_root_netns

pytestmark = [pytest.mark.root, requires_root_netns()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_last_flows_and_detaches(topo, grpc_collector, start_agent, wall_clock,
                                               sig):
    # One minute: nothing is evicted before the signal, only the final drain exports.
    agent = start_agent({"CACHE_ACTIVE_TIMEOUT": "1m"}, grpc_collector)
    running = topo.attachments()
    assert running["tcx_ingress"] + len(running["tc_ingress"]) > 0, running

    expected = traffic.mixed_traffic(topo.link, udp_flows_n=50, tcp_bytes=256 << 10)
    result = agent.stop(sig)
    wall_clock.stop()

    assert result.returncode == 0, result.stderr
    flows = wait_exact(expected, grpc_collector.flows, timeout=15)
    check_fields(expected, flows, t_start_ns=wall_clock.start, t_end_ns=wall_clock.end)
    after = topo.attachments()
    assert after["tcx_ingress"] == after["tcx_egress"] == 0, after
    assert after["tc_ingress"] == after["tc_egress"] == [], after
    assert topo.attached()["tc"] == [], topo.attached()


def test_tc_mode_detaches_its_filters_and_keeps_an_existing_clsact(topo, grpc_collector,
                                                                   start_agent):
    topo.a.run(["tc", "qdisc", "add", "dev", topo.veth_a, "clsact"])
    agent = start_agent({"TC_ATTACH_MODE": "tc", "CACHE_ACTIVE_TIMEOUT": "1m"}, grpc_collector)
    running = topo.attachments()
    assert running["tc_ingress"] and running["tc_egress"], running
    assert running["tcx_ingress"] == running["tcx_egress"] == 0, running

    expected = traffic.udp_flows(topo.link, n_flows=50)
    result = agent.stop()

    assert result.returncode == 0, result.stderr
    wait_exact(expected, grpc_collector.flows, timeout=15)
    after = topo.attachments()
    assert after["tc_ingress"] == after["tc_egress"] == [], after
    assert any("clsact" in q for q in after["qdiscs"]), after
