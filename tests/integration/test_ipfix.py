"""End to end with IPFIX: the agent exports the standard traffic mix with EXPORT=ipfix+udp
and ipfix+tcp, and two independent collectors (nfdump's nfcapd, tshark's dissector) report
exactly the packets and IP-layer bytes that were sent, with the right fields."""

from __future__ import annotations

import time

import pytest
from harness import traffic
from harness.assertions import check_fields, wait_exact
from harness.ipfix_collectors import NfcapdIpfixCollector, TsharkIpfixCollector, tools_missing
from harness.skips import requires_root_netns

pytestmark = [pytest.mark.root, requires_root_netns()]

COLLECTORS = {"nfcapd": (NfcapdIpfixCollector, ("nfcapd", "nfdump")),
              "tshark": (TsharkIpfixCollector, ("tshark",))}


@pytest.fixture(params=[(t, c) for c in COLLECTORS for t in ("udp", "tcp")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def ipfix_collector(request, topo):
    transport, kind = request.param
    cls, tools = COLLECTORS[kind]
    missing = tools_missing(*tools)
    if missing:
        pytest.skip(missing)
    collector = cls(transport, {topo.ifindex_a: topo.veth_a}, ns=topo.a)
    collector.start()
    yield collector
    collector.stop()


def test_mixed_traffic_is_reported_exactly_by_real_ipfix_collectors(topo, ipfix_collector,
                                                                     start_agent, wall_clock):
    agent = start_agent({"CACHE_ACTIVE_TIMEOUT": "500ms"}, ipfix_collector)
    expected = traffic.mixed_traffic(topo.link)
    result = agent.stop()
    wall_clock.stop()
    assert result.returncode == 0, result.stderr

    if isinstance(ipfix_collector, NfcapdIpfixCollector):
        expected = expected.without_non_ip()  # nfdump does not report ethernetType
    # tcpControlBits has the 8 header flags only: pbflow's SYN+ACK (0x100) extra is SYN|ACK.
    for key, required in expected.required_flags.items():
        expected.required_flags[key] = [(_ipfix_flags(mask), meaning) for mask, meaning in required]
    flows = wait_exact(expected, ipfix_collector.flows, ipfix_collector.byte_measure,
                       timeout=20)
    check_fields(expected, flows, t_start_ns=wall_clock.start, t_end_ns=wall_clock.end,
                 sampling={1} if isinstance(ipfix_collector, TsharkIpfixCollector) else None)


def _ipfix_flags(mask: int) -> int:
    extras = {0x100: 0x02, 0x200: 0x01, 0x400: 0x04}  # SYN+ACK, FIN+ACK, RST+ACK
    return (mask & 0xFF) | sum(bit for extra, bit in extras.items() if mask & extra)


def test_a_collector_started_after_the_agent_decodes_after_the_template_refresh(topo,
                                                                                start_agent):
    missing = tools_missing("nfcapd", "nfdump")
    if missing:
        pytest.skip(missing)
    collector = NfcapdIpfixCollector("udp", {topo.ifindex_a: topo.veth_a}, ns=topo.a,
                                     extra_env={"IPFIX_TEMPLATE_REFRESH_INTERVAL": "1s"})
    # Reserve the port, but let the agent start (and send its first templates) before nfcapd.
    collector.port = collector_port = _free_port(topo)
    agent = start_agent({"CACHE_ACTIVE_TIMEOUT": "300ms", "TARGET_PORT": str(collector_port)},
                        collector)
    try:
        traffic.udp_flows(topo.link, n_flows=5)  # exported while nobody listens: lost
        time.sleep(1.0)
        from harness.ipfix_collectors import Nfcapd
        collector.nfcapd = Nfcapd(collector.host, collector_port, topo.a.popen).start()
        time.sleep(1.5)  # at least one template refresh reaches nfcapd
        expected = traffic.udp_flows(topo.link, n_flows=10, first_port=25000)
        result = agent.stop()
        assert result.returncode == 0, result.stderr
        wait_exact(expected, collector.flows, collector.byte_measure, timeout=20)
    finally:
        collector.stop()


def _free_port(topo) -> int:
    import socket

    with topo.a.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
