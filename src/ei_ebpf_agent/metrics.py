"""The agent's own health as Prometheus metrics (METRICS_ENABLE and METRICS_* variables).

`Metrics` owns a dedicated CollectorRegistry (never the process-global one, so tests
and several agents in one process stay isolated) and a few verbs the agent calls at the
points where things happen; the agent stays a thin wire. Exporters are not told about
metrics, nor is the tracer: `watch_exporter` and `watch_tracer` read their cumulative
counters at scrape time (an exporter's are its `stats`, an exporter.ExportStats).
Every metric and its labels are listed in docs/metrics.md.
"""

from __future__ import annotations

import os
import platform
import threading
from pathlib import Path
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ei_ebpf_agent import __version__
from ei_ebpf_agent.config import Settings
from ei_ebpf_agent.exporter import Exporter, ExportStats

DEFAULT_PREFIX = "ebpf_agent_"
# Evictions swap maps (an RCU grace period, ~10 ms) then drain and decode: ms to seconds.
EVICTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Every metric of the agent, in one registry; serve it with `start_server`."""

    def __init__(self, prefix: str = DEFAULT_PREFIX,
                 registry: CollectorRegistry | None = None) -> None:
        self.prefix = prefix
        self.registry = registry if registry is not None else CollectorRegistry()
        r, p = self.registry, prefix
        self.eviction_duration = Histogram(
            p + "eviction_duration_seconds",
            "Time of one eviction: map swap, drain, ring-buffer merge and decode.",
            buckets=EVICTION_BUCKETS, registry=r)
        self.sampling_rate = Gauge(p + "sampling_rate",
                                   "Configured sampling: one packet in N (1: every packet).",
                                   registry=r)
        self.interfaces_attached = Gauge(p + "interfaces_attached",
                                         "Interfaces the programs are attached to.", registry=r)
        self.interface_events = Counter(
            p + "interface_events",
            "Interface events: added (attached), removed, attach_failed.",
            ["event"], registry=r)
        self.queue_length = Gauge(p + "queue_length", "Items waiting in a bounded queue.",
                                  ["queue"], registry=r)
        self.build_info = Gauge(p + "build_info", "Agent build; the value is always 1.",
                                ["version", "python_version", "kernel"], registry=r)
        self.sampling_rate.set(1)
        self.build_info.labels(__version__, platform.python_version(), platform.release()).set(1)
        self._exports = _ExportCollector(p)
        r.register(self._exports)
        self._tracer = _TracerCollector(p)
        r.register(self._tracer)
        self._server = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Metrics:
        """Metrics for the agent; the HTTP server is started only when METRICS_ENABLE."""
        metrics = cls(settings.metrics_prefix)
        metrics.sampling_rate.set(max(settings.sampling, 1))
        if settings.metrics_enable:
            metrics.start_server(
                settings.metrics_server_address, settings.metrics_server_port,
                settings.metrics_tls_cert_path, settings.metrics_tls_key_path)
        return metrics

    # --- what the agent calls -------------------------------------------------------

    def watch_tracer(self, tracer: object) -> None:
        """Report the tracer's cumulative counters (evictions, evicted flows/packets/bytes,
        kernel ring-buffer records and losses, table fill ratio) at every scrape."""
        self._tracer.tracer = tracer

    def observe_eviction(self, duration: float) -> None:
        """One eviction took `duration` seconds."""
        self.eviction_duration.observe(duration)

    def interface_event(self, event: str, attached: int) -> None:
        """`event` is added, removed or attach_failed; `attached` is the new total."""
        self.interface_events.labels(event).inc()
        self.interfaces_attached.set(attached)

    def watch_queue(self, name: str, length: Callable[[], int]) -> None:
        """Report `length()` as queue_length{queue=name} at every scrape."""
        self.queue_length.labels(name).set_function(lambda: float(length()))

    def watch_exporter(self, exporter: Exporter, name: str) -> None:
        """Report the exporter's `stats` at every scrape, labelled exporter=name; the
        length of its queue (if it has one) becomes queue_length{queue="export"}."""
        self._exports.watch(name, exporter.stats)
        if exporter.stats.queue_length is not None:
            self.watch_queue("export", exporter.stats.queue_length)

    # --- HTTP server ------------------------------------------------------------------

    def start_server(self, address: str = "0.0.0.0", port: int = 9090,
                     certfile: os.PathLike | None = None,
                     keyfile: os.PathLike | None = None) -> tuple[str, int]:
        """Serve /metrics (HTTPS when a certificate and key are given); (address, port)."""
        from prometheus_client import start_http_server

        if (certfile is None) != (keyfile is None):
            raise ValueError("metrics TLS needs both a certificate and a key")
        tls = {}
        if certfile is not None:
            tls = {"certfile": str(Path(certfile)), "keyfile": str(Path(keyfile))}
        try:
            result = start_http_server(port, address, registry=self.registry, **tls)
        except OSError as error:
            raise OSError(error.errno, f"cannot serve metrics on {address}:{port}: "
                          f"{error.strerror}") from error
        self._server, self._thread = result  # prometheus-client >= 0.17 returns both
        bound = self._server.server_address
        return bound[0], bound[1]

    @property
    def port(self) -> int | None:
        return None if self._server is None else self._server.server_address[1]

    def close(self) -> None:
        """Stop the HTTP server (if any)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _int(obj: object, name: str) -> int:
    return int(getattr(obj, name, 0) or 0)


class _ExportCollector(Collector):
    """Per-exporter counters, read from the watched exporters' stats at scrape time."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._lock = threading.Lock()
        self._watched: list[tuple[str, ExportStats]] = []

    def watch(self, name: str, stats: ExportStats) -> None:
        with self._lock:
            self._watched.append((name, stats))

    def collect(self):
        p = self._prefix
        flows = CounterMetricFamily(p + "exported_flows", "Flows sent to the collector.",
                                    labels=["exporter"])
        batches = CounterMetricFamily(p + "exported_batches",
                                      "Batches (evictions) sent to the collector.",
                                      labels=["exporter"])
        errors = CounterMetricFamily(p + "export_errors",
                                     "Failed attempts to reach or send to the collector.",
                                     labels=["exporter"])
        dropped_flows = CounterMetricFamily(
            p + "dropped_flows", "Flows that never reached the collector, by reason.",
            labels=["exporter", "reason"])
        dropped_batches = CounterMetricFamily(
            p + "dropped_batches", "Batches that never reached the collector, by reason.",
            labels=["exporter", "reason"])
        totals: dict[str, ExportStats] = {}
        with self._lock:
            watched = list(self._watched)
        for name, stats in watched:  # several exporters under one name are summed
            now, total = stats.snapshot(), totals.setdefault(name, ExportStats())
            total.exported(now.exported_flows, now.exported_batches)
            total.export_errors += now.export_errors
            for reason, count in now.dropped_by_reason.items():
                total.drop(reason, count, batches=now.dropped_batches_by_reason.get(reason, 0))
        for name, total in sorted(totals.items()):
            flows.add_metric([name], total.exported_flows)
            batches.add_metric([name], total.exported_batches)
            errors.add_metric([name], total.export_errors)
            for reason, count in sorted((r.value, c) for r, c in total.dropped_by_reason.items()):
                dropped_flows.add_metric([name, reason], count)
            for reason, count in sorted(
                    (r.value, c) for r, c in total.dropped_batches_by_reason.items()):
                dropped_batches.add_metric([name, reason], count)
        return [flows, batches, errors, dropped_flows, dropped_batches]

    def describe(self):
        # Names only, so the registry can detect clashes without reading any exporter.
        p = self._prefix
        return [CounterMetricFamily(p + n, "", labels=["exporter"])
                for n in ("exported_flows", "exported_batches", "export_errors",
                          "dropped_flows", "dropped_batches")]


class _TracerCollector(Collector):
    """The tracer's cumulative counters, read at scrape time (zero until one is watched)."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self.tracer: object = None

    def collect(self):
        p, t = self._prefix, self.tracer
        counters = (
            ("evictions", "Evictions of the kernel flow table.", "evictions"),
            ("evicted_flows", "Flows read from the kernel by evictions.", "evicted_flows"),
            ("evicted_packets", "Packets counted in the evicted flows.", "evicted_packets"),
            ("evicted_bytes", "Bytes (whole frames) counted in the evicted flows.",
             "evicted_bytes"),
            ("ringbuf_records", ("Packets the kernel sent through the ring buffer because the "
             "flow table was full."), "kernel_ringbuf_records"),
            ("ringbuf_lost", "Packets not counted: flow table and ring buffer both full.",
             "kernel_ringbuf_lost"),
        )
        out = []
        for name, help_text, attribute in counters:
            family = CounterMetricFamily(p + name, help_text)
            family.add_metric([], _int(t, attribute))
            out.append(family)
        fill = GaugeMetricFamily(p + "flow_table_fill_ratio",
                                 "Flows in the kernel table at the last eviction / "
                                 "CACHE_MAX_FLOWS.")
        fill.add_metric([], float(getattr(t, "map_fill_ratio", 0.0) or 0.0))
        out.append(fill)
        return out

    def describe(self):
        p = self._prefix
        return [CounterMetricFamily(p + n, "") for n in (
            "evictions", "evicted_flows", "evicted_packets", "evicted_bytes",
            "ringbuf_records", "ringbuf_lost")] + [
            GaugeMetricFamily(p + "flow_table_fill_ratio", "")]


__all__ = ["DEFAULT_PREFIX", "Metrics"]
