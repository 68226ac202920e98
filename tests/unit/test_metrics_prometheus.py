"""A real Prometheus server (Debian's `prometheus`) scrapes the agent's metrics endpoint."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import types
import urllib.parse
import urllib.request

import pytest

from ei_ebpf_agent.exporter import ExportStats
from ei_ebpf_agent.metrics import Metrics

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="prometheus not installed (apt-get install prometheus)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_the_agent_and_a_query_returns_its_series(tmp_path):
    metrics = Metrics()
    metrics.start_server("127.0.0.1", 0)
    metrics.observe_eviction(0.05)
    metrics.watch_exporter(types.SimpleNamespace(stats=ExportStats(exported_flows=42)),
                           "ipfix+udp")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: ei-ebpf-agent\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics.port}']}}]\n")
    web = free_port()
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{web}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        result: list = []
        while time.monotonic() < deadline and server.poll() is None:
            try:
                result = query(web, 'ebpf_agent_exported_flows_total{exporter="ipfix+udp"}')
            except OSError:
                result = []
            if result:
                break
            time.sleep(0.5)
        log.seek(0)
        assert result, f"no series after 60 s; prometheus log:\n{log.read().decode()[-3000:]}"
        assert result[0]["metric"]["job"] == "ei-ebpf-agent"
        assert float(result[0]["value"][1]) == 42
        count = query(web, "ebpf_agent_eviction_duration_seconds_count")
        assert float(count[0]["value"][1]) == 1
        assert query(web, 'up{job="ei-ebpf-agent"}')[0]["value"][1] == "1"
    finally:
        server.terminate()
        server.wait(30)
        log.close()
        metrics.close()
