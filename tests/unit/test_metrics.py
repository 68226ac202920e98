"""Prometheus metrics: what a scrape of the HTTP endpoint returns."""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
import time
import types
import urllib.request

import pytest
from harness.ipfix_collectors import MessageReceiver, synthetic_batch
from prometheus_client.parser import text_string_to_metric_families

from ei_ebpf_agent import __version__
from ei_ebpf_agent.config import Settings
from ei_ebpf_agent.exporter import DropReason, ExportStats
from ei_ebpf_agent.exporter.ipfix import IpfixExporter, IpfixOptions
from ei_ebpf_agent.metrics import Metrics
from ei_ebpf_agent.net import Transport


def scrape(url: str, context: ssl.SSLContext | None = None) -> dict:
    """{(sample name, frozenset(labels)): value} of one scrape."""
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def metrics():
    m = Metrics("test_agent_")
    m.start_server("127.0.0.1", 0)
    yield m
    m.close()


def url(m: Metrics) -> str:
    return f"http://127.0.0.1:{m.port}/metrics"


class FakeTracer:
    """The tracer's counters, as FlowTracer exposes them."""

    evictions = 0
    evicted_flows = evicted_packets = evicted_bytes = 0
    kernel_ringbuf_records = kernel_ringbuf_lost = 0
    map_fill_ratio = 0.0


def test_tracer_counters_are_read_at_scrape_time_with_the_prefix(metrics):
    tracer = FakeTracer()
    metrics.watch_tracer(tracer)
    none = frozenset()
    assert scrape(url(metrics))[("test_agent_evictions_total", none)] == 0
    tracer.evictions, tracer.evicted_flows = 2, 3
    tracer.evicted_packets, tracer.evicted_bytes = 12, 1700
    tracer.kernel_ringbuf_records, tracer.kernel_ringbuf_lost = 15, 2
    tracer.map_fill_ratio = 0.5
    metrics.observe_eviction(0.02)
    metrics.observe_eviction(0.2)
    got = scrape(url(metrics))
    assert got[("test_agent_evictions_total", none)] == 2
    assert got[("test_agent_evicted_flows_total", none)] == 3
    assert got[("test_agent_evicted_packets_total", none)] == 12
    assert got[("test_agent_evicted_bytes_total", none)] == 1700
    assert got[("test_agent_eviction_duration_seconds_count", none)] == 2
    assert got[("test_agent_eviction_duration_seconds_bucket", frozenset({("le", "0.025")}))] == 1
    assert got[("test_agent_flow_table_fill_ratio", none)] == 0.5
    assert got[("test_agent_ringbuf_records_total", none)] == 15
    assert got[("test_agent_ringbuf_lost_total", none)] == 2
    assert not any(name.startswith("ebpf_agent_") for name, _ in got)


def test_interfaces_queues_sampling_and_build_info(metrics):
    metrics.interface_event("added", 1)
    metrics.interface_event("added", 2)
    metrics.interface_event("removed", 1)
    metrics.interface_event("attach_failed", 1)
    depth = [3]
    metrics.watch_queue("evictions", lambda: depth[0])
    metrics.sampling_rate.set(50)
    got = scrape(url(metrics))
    assert got[("test_agent_interfaces_attached", frozenset())] == 1
    assert got[("test_agent_interface_events_total", frozenset({("event", "added")}))] == 2
    assert got[("test_agent_interface_events_total", frozenset({("event", "removed")}))] == 1
    assert got[("test_agent_queue_length", frozenset({("queue", "evictions")}))] == 3
    depth[0] = 0
    assert scrape(url(metrics))[("test_agent_queue_length",
                                 frozenset({("queue", "evictions")}))] == 0
    assert got[("test_agent_sampling_rate", frozenset())] == 50
    info = [labels for name, labels in got if name == "test_agent_build_info"]
    assert len(info) == 1 and ("version", __version__) in info[0]


def counters(**values) -> types.SimpleNamespace:
    """An exporter as watch_exporter sees it: only its stats."""
    return types.SimpleNamespace(stats=ExportStats(**values))


def test_exporter_counters_are_read_at_scrape_time(metrics):
    receiver = MessageReceiver("tcp")
    exporter = IpfixExporter(IpfixOptions("127.0.0.1", receiver.port, Transport.TCP, queue_length=1))
    metrics.watch_exporter(exporter, "ipfix+tcp")
    try:
        batch = synthetic_batch([{"eth_protocol": 0x0800, "packets": 1}] * 5)
        exporter.export(batch)
        exporter.close(5)
        exporter.export(batch)  # after close: dropped, reason closed
    finally:
        receiver.stop()
    metrics.watch_exporter(counters(exported_flows=7, exported_batches=2, export_errors=1,
                                    dropped_by_reason={DropReason.QUEUE_FULL: 4},
                                    dropped_batches_by_reason={DropReason.QUEUE_FULL: 1}),
                           "grpc")
    got = scrape(url(metrics))
    ipfix = frozenset({("exporter", "ipfix+tcp")})
    assert got[("test_agent_exported_flows_total", ipfix)] == 5
    assert got[("test_agent_exported_batches_total", ipfix)] == 1
    assert got[("test_agent_export_errors_total", ipfix)] == 0
    closed = frozenset({("exporter", "ipfix+tcp"), ("reason", "closed")})
    assert got[("test_agent_dropped_flows_total", closed)] == 5
    assert got[("test_agent_dropped_batches_total", closed)] == 1
    grpc = frozenset({("exporter", "grpc")})
    assert got[("test_agent_exported_flows_total", grpc)] == 7
    assert got[("test_agent_export_errors_total", grpc)] == 1
    assert got[("test_agent_dropped_flows_total", grpc | {("reason", "queue_full")})] == 4
    assert got[("test_agent_queue_length", frozenset({("queue", "export")}))] == 0


def test_flows_dropped_from_part_of_a_batch_count_no_dropped_batch(metrics):
    exporter = counters(queue_length=lambda: 4)
    exporter.stats.drop(DropReason.REJECTED, 6, batches=0)  # one message of a batch
    exporter.stats.drop(DropReason.RETRIES_EXHAUSTED, 4)
    exporter.stats.error()
    metrics.watch_exporter(exporter, "grpc")
    got = scrape(url(metrics))
    grpc = frozenset({("exporter", "grpc")})
    assert got[("test_agent_dropped_flows_total", grpc | {("reason", "rejected")})] == 6
    assert ("test_agent_dropped_batches_total", grpc | {("reason", "rejected")}) not in got
    assert got[("test_agent_dropped_flows_total", grpc | {("reason", "retries_exhausted")})] == 4
    assert got[("test_agent_dropped_batches_total",
                grpc | {("reason", "retries_exhausted")})] == 1
    assert got[("test_agent_export_errors_total", grpc)] == 1
    assert got[("test_agent_queue_length", frozenset({("queue", "export")}))] == 4


def test_two_agents_in_one_process_do_not_share_metrics():
    a, b = Metrics(), Metrics()
    a.observe_eviction(0.1)
    assert a.registry.get_sample_value("ebpf_agent_eviction_duration_seconds_count") == 1
    assert b.registry.get_sample_value("ebpf_agent_eviction_duration_seconds_count") == 0


def test_from_settings_serves_only_when_enabled():
    m = Metrics.from_settings(Settings(metrics_enable=False, sampling=0))
    assert m.port is None
    assert m.registry.get_sample_value("ebpf_agent_sampling_rate") == 1

    m = Metrics.from_settings(Settings(
        metrics_enable=True, metrics_server_address="127.0.0.1", metrics_server_port=0,
        metrics_prefix="on_", sampling=10))
    try:
        assert scrape(url(m))[("on_sampling_rate", frozenset())] == 10
    finally:
        m.close()


def test_a_busy_port_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            Metrics().start_server("127.0.0.1", port)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_serves_https_with_the_given_certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    m = Metrics()
    m.start_server("127.0.0.1", 0, certfile=cert, keyfile=key)
    try:
        context = ssl.create_default_context(cafile=str(cert))
        got = scrape(f"https://127.0.0.1:{m.port}/metrics", context)
        assert ("ebpf_agent_evictions_total", frozenset()) in got
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP on TLS
            scrape(url(m))
    finally:
        m.close()
    with pytest.raises(ValueError, match="both a certificate and a key"):
        Metrics().start_server("127.0.0.1", 0, certfile=cert)


def test_close_stops_serving(metrics):
    port = metrics.port
    metrics.close()
    time.sleep(0.1)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
