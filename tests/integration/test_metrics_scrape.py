"""The agent's Prometheus endpoint during an exact-count run: scraped over HTTP inside the
agent's namespace, its counters match what was sent and what the collector received; a real
Prometheus server scrapes it too."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import pytest
from harness import traffic
from harness.assertions import wait_exact
from harness.collectors import GrpcCollector
from harness.ipfix_collectors import TsharkIpfixCollector, tools_missing
from harness.skips import requires_root_netns
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.root, requires_root_netns()]


def free_port(ns) -> int:
    with ns.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(ns, url: str) -> bytes:
    """GET from inside the namespace (the socket is made in a thread that entered it)."""
    def fetch() -> bytes:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read()
    return ns.call(fetch)


def scrape(ns, port: int) -> dict:
    text = get(ns, f"http://127.0.0.1:{port}/metrics").decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_until(check, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.fixture(params=["grpc", "ipfix+udp"])
def collector(request, topo):
    if request.param == "grpc":
        c = GrpcCollector(topo.a)
    else:
        missing = tools_missing("tshark")
        if missing:
            pytest.skip(missing)
        c = TsharkIpfixCollector("udp", {topo.ifindex_a: topo.veth_a}, ns=topo.a)
    c.start()
    yield c
    c.stop()


def test_scraped_counters_match_what_was_sent_and_exported(topo, collector, start_agent):
    port = free_port(topo.a)
    exporter = "grpc" if isinstance(collector, GrpcCollector) else "ipfix+udp"
    agent = start_agent({"CACHE_ACTIVE_TIMEOUT": "300ms", "METRICS_ENABLE": "true",
                         "METRICS_SERVER_ADDRESS": "127.0.0.1",
                         "METRICS_SERVER_PORT": str(port), "METRICS_PREFIX": "ei_"}, collector)
    expected = traffic.udp_flows(topo.link, n_flows=50)
    expected.merge(traffic.udp_flows(topo.link, n_flows=10, family=socket.AF_INET6,
                                     first_port=30000))
    flows = wait_exact(expected, collector.flows, collector.byte_measure, timeout=20)
    none, by_exporter = frozenset(), frozenset({("exporter", exporter)})

    def settled():
        got = scrape(topo.a, port)
        received = len(collector.flows())
        # Every evicted flow was exported, and every exported flow reached the collector.
        assert got[("ei_exported_flows_total", by_exporter)] == received, got
        assert got[("ei_evicted_flows_total", none)] == received
        return got

    got = wait_until(settled)
    assert len(flows) >= len(expected)
    assert got[("ei_evicted_packets_total", none)] >= expected.total_packets
    assert got[("ei_evictions_total", none)] >= 1
    assert got[("ei_eviction_duration_seconds_count", none)] >= 1
    assert got[("ei_exported_batches_total", by_exporter)] >= 1
    assert got[("ei_export_errors_total", by_exporter)] == 0
    assert not [k for k, v in got.items() if k[0] == "ei_dropped_flows_total" and v]
    assert got[("ei_interfaces_attached", none)] == 1  # the veth; lo is excluded
    assert got[("ei_interface_events_total", frozenset({("event", "added")}))] == 1
    assert got[("ei_sampling_rate", none)] == 1
    assert got[("ei_ringbuf_lost_total", none)] == 0
    assert 0 <= got[("ei_flow_table_fill_ratio", none)] <= 1
    assert any(name == "ei_build_info" for name, _ in got)
    assert agent.stop().returncode == 0


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="prometheus not installed (apt-get install prometheus)")
def test_a_prometheus_server_scrapes_the_agent(topo, start_agent, tmp_path):
    collector = GrpcCollector(topo.a)
    collector.start()
    port, web = free_port(topo.a), free_port(topo.a)
    try:
        start_agent({"CACHE_ACTIVE_TIMEOUT": "300ms", "METRICS_ENABLE": "true",
                     "METRICS_SERVER_ADDRESS": "127.0.0.1", "METRICS_SERVER_PORT": str(port)},
                    collector)
        expected = traffic.udp_flows(topo.link, n_flows=20)
        wait_exact(expected, collector.flows, collector.byte_measure, timeout=20)
        config = tmp_path / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n"
                          "  - job_name: agent\n"
                          f"    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n")
        with tempfile.TemporaryFile() as log:
            server = topo.a.popen(["prometheus", f"--config.file={config}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}",
                                   f"--web.listen-address=127.0.0.1:{web}"],
                                  stdout=log, stderr=subprocess.STDOUT)
            try:
                def series():
                    query = urllib.parse.urlencode(
                        {"query": 'ebpf_agent_exported_flows_total{exporter="grpc"}'})
                    try:
                        body = json.loads(get(topo.a, f"http://127.0.0.1:{web}/api/v1/query?"
                                                      + query))
                    except (OSError, ValueError) as error:  # starting: no answer, or empty
                        raise AssertionError(f"prometheus not answering: {error}") from None
                    result = body["data"]["result"]
                    assert result and float(result[0]["value"][1]) == len(collector.flows()), \
                        body
                    return result

                result = wait_until(series, timeout=60)
                assert result[0]["metric"]["job"] == "agent"
            finally:
                server.terminate()
                server.wait(30)
    finally:
        collector.stop()
