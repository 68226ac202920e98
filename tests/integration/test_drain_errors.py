"""A part of the flow table that cannot be mapped at eviction keeps its flows: they come
out, counted exactly, the next time that table is drained."""

from __future__ import annotations

import ipaddress
import json

import pytest
from harness import traffic
from harness.assertions import assert_exact
from harness.skips import requires_root_netns

from ei_ebpf_agent.ebpf.loader import FlowProgram
from ei_ebpf_agent.exporter.jsonflow import batch_lines
from ei_ebpf_agent.flow import tracer as tracer_module
from ei_ebpf_agent.flow.tracer import DRAIN_WINDOW_SLOTS, FlowTracer

pytestmark = [pytest.mark.root, requires_root_netns()]


def test_a_window_that_cannot_be_mapped_is_drained_next_time(topo, monkeypatch):
    program = FlowProgram.load(max_flows=DRAIN_WINDOW_SLOTS)  # two windows per table
    try:
        for direction in ("ingress", "egress"):
            topo.a.call(lambda d=direction: program.attach(topo.ifindex_a, d, "tc"))
        tracer = FlowTracer(program, interfaces_lookup=lambda: {topo.ifindex_a: topo.veth_a},
                            agent_ip=ipaddress.ip_address("10.0.0.1"))
        expected = traffic.udp_flows(topo.link, n_flows=400)
        program.detach_all()

        real = tracer_module._take_window
        failed = []

        def first_window_fails(fd, first, count):
            if first == 0 and not failed:
                failed.append(first)
                raise OSError(12, "Cannot allocate memory")
            return real(fd, first, count)

        monkeypatch.setattr(tracer_module, "_take_window", first_window_fails)
        batches = [tracer.evict() for _ in range(3)]  # flows_a, flows_b, flows_a again
        tracer.close()
    finally:
        program.close()

    assert failed == [0]
    assert len(batches[0]) < len(expected.counts)  # window 0 stayed in the table...
    assert len(batches[2]) > 0  # ...and came out when flows_a was drained again
    flows = [json.loads(line) for batch in batches for line in batch_lines(batch)]
    assert_exact(expected, flows)
