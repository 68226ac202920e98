"""Interfaces that appear after start are traced, ones that disappear do no harm, and
INTERFACES / EXCLUDE_INTERFACES (with /regex/ entries) select what is traced."""

from __future__ import annotations

import time

import pytest
from harness import traffic
from harness.assertions import wait_exact
from harness.skips import requires_root_netns

pytestmark = [pytest.mark.root, requires_root_netns()]


def hooked(topo, ifname: str) -> bool:
    """Does A's interface carry a program (TCX or tc filter) on both ingress and egress?"""
    att = topo.attachments(ifname)
    return (att["tcx_ingress"] > 0 or bool(att["tc_ingress"])) and \
        (att["tcx_egress"] > 0 or bool(att["tc_egress"]))


def wait_hooked(topo, ifname: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not hooked(topo, ifname):
        assert time.monotonic() < deadline, f"agent did not attach to {ifname} in {timeout} s"
        time.sleep(0.1)


def no_errors(stderr: str) -> list:
    return [line for line in stderr.splitlines()
            if "Traceback" in line or "ERROR" in line or "CRITICAL" in line]


@pytest.mark.parametrize("mode", ["watch", "poll"])
def test_interface_added_after_start_is_traced_and_removal_is_harmless(topo, grpc_collector,
                                                                     start_agent, mode):
    env = {"LISTEN_INTERFACES": mode, "CACHE_ACTIVE_TIMEOUT": "200ms"}
    if mode == "poll":
        env["LISTEN_POLL_PERIOD"] = "200ms"
    agent = start_agent(env, grpc_collector)

    late = topo.add_link()
    wait_hooked(topo, late.local_name)
    time.sleep(1)  # margin for an agent that reports attachment before it updates its names
    expected = traffic.udp_flows(late, n_flows=10)
    expected.merge(traffic.icmp_echo(late, count=3))
    wait_exact(expected, grpc_collector.flows, timeout=30)

    topo.del_link(late)
    time.sleep(1 if mode == "watch" else 1.5)
    assert agent.alive(), f"agent died after an interface was removed:\n{agent.stderr()}"
    still = traffic.udp_flows(topo.link, n_flows=5, first_port=25000)
    wait_exact(still, grpc_collector.flows, timeout=30)

    result = agent.stop()
    assert result.returncode == 0, result.stderr
    assert no_errors(result.stderr) == [], result.stderr


def _three_links(topo):
    second, third = topo.add_link(), topo.add_link()
    return [topo.link, second, third]


def _traffic_on(links, first_port=20000):
    return [traffic.udp_flows(link, n_flows=5, first_port=first_port) for link in links]


@pytest.mark.parametrize("variable", ["INTERFACES", "EXCLUDE_INTERFACES"])
def test_interface_filters_with_regex_select_traced_interfaces(topo, grpc_collector,
                                                               start_agent, variable):
    links = _three_links(topo)  # names end in x1a, x2a, x3a
    if variable == "INTERFACES":
        # A plain name and a regex (matched against the whole name, docs/config.md): the
        # first and the third are traced.
        env = {"INTERFACES": f"{links[0].local_name},/e.*x3a/"}
        traced = [True, False, True]
    else:
        env = {"EXCLUDE_INTERFACES": "lo,/e.*x[12]a/"}
        traced = [False, False, True]
    env["CACHE_ACTIVE_TIMEOUT"] = "200ms"
    agent = start_agent(env, grpc_collector)
    for link, yes in zip(links, traced):
        assert hooked(topo, link.local_name) == yes, (link.local_name, topo.attachments(
            link.local_name))

    expectations = _traffic_on(links)
    result = agent.stop()
    assert result.returncode == 0, result.stderr

    for _link, yes, expected in zip(links, traced, expectations):
        if yes:
            wait_exact(expected, grpc_collector.flows, timeout=10)
    flows = grpc_collector.flows()
    names = {r.get("interface") for r in flows}
    untraced = {link.local_name for link, yes in zip(links, traced) if not yes}
    assert not names & untraced, f"records from excluded interfaces {names & untraced}"
