"""The agent's own health as Prometheus metrics (METRICS_ENABLE and METRICS_* variables).

`Metrics` owns a dedicated CollectorRegistry (never the process-global one, so tests
and several agents in one process stay isolated) and a few verbs the agent calls at the
points where things happen; the agent stays a thin wire. Exporters are not told about
metrics: `watch_exporter` reads their cumulative `stats` (and queue length) at scrape
time. Every metric and its labels are listed in docs/metrics.md.
"""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Callable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from ei_ebpf_agent import __version__

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
        self.evictions = Counter(p + "evictions", "Evictions of the kernel flow table.",
                                 registry=r)
        self.evicted_flows = Counter(p + "evicted_flows",
                                     "Flows read from the kernel by evictions.", registry=r)
        self.evicted_packets = Counter(p + "evicted_packets",
                                       "Packets counted in the evicted flows.", registry=r)
        self.evicted_bytes = Counter(p + "evicted_bytes",
                                     "Bytes (whole frames) counted in the evicted flows.",
                                     registry=r)
        self.eviction_duration = Histogram(
            p + "eviction_duration_seconds",
            "Time of one eviction: map swap, drain, ring-buffer merge and decode.",
            buckets=EVICTION_BUCKETS, registry=r)
        self.map_fill_ratio = Gauge(
            p + "flow_table_fill_ratio",
            "Flows in the kernel table at the last eviction / CACHE_MAX_FLOWS.", registry=r)
        self.ringbuf_records = Counter(
            p + "ringbuf_records",
            "Packets the kernel sent through the ring buffer because the flow table was full.",
            registry=r)
        self.ringbuf_lost = Counter(
            p + "ringbuf_lost",
            "Packets not counted: flow table and ring buffer both full.", registry=r)
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
        self._kernel_last = {"records": 0, "lost": 0}
        self._server = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: object) -> Metrics:
        """Metrics for the agent; the HTTP server is started only when METRICS_ENABLE."""
        metrics = cls(getattr(settings, "metrics_prefix", DEFAULT_PREFIX))
        metrics.sampling_rate.set(max(int(getattr(settings, "sampling", 0)), 1))
        if getattr(settings, "metrics_enable", False):
            metrics.start_server(
                getattr(settings, "metrics_server_address", "0.0.0.0"),
                int(getattr(settings, "metrics_server_port", 9090)),
                getattr(settings, "metrics_tls_cert_path", None),
                getattr(settings, "metrics_tls_key_path", None))
        return metrics

    # --- what the agent calls -------------------------------------------------------

    def observe_eviction(self, records: np.ndarray, duration: float,
                         fill_ratio: float | None = None) -> None:
        """One eviction that read `records` (FLOW_RECORD rows) in `duration` seconds."""
        self.evictions.inc()
        self.eviction_duration.observe(duration)
        if len(records):
            self.evicted_flows.inc(len(records))
            self.evicted_packets.inc(int(records["packets"].sum()))
            self.evicted_bytes.inc(int(records["bytes"].sum()))
        if fill_ratio is not None:
            self.map_fill_ratio.set(fill_ratio)

    def kernel_counters(self, ringbuf_records: int, ringbuf_lost: int) -> None:
        """Cumulative kernel counters (summed over CPUs); only the increase is added."""
        for name, value, counter in (("records", ringbuf_records, self.ringbuf_records),
                                     ("lost", ringbuf_lost, self.ringbuf_lost)):
            delta = value - self._kernel_last[name]
            if delta > 0:
                counter.inc(delta)
            self._kernel_last[name] = max(value, self._kernel_last[name])

    def interface_event(self, event: str, attached: int) -> None:
        """`event` is added, removed or attach_failed; `attached` is the new total."""
        self.interface_events.labels(event).inc()
        self.interfaces_attached.set(attached)

    def watch_queue(self, name: str, length: Callable[[], int]) -> None:
        """Report `length()` as queue_length{queue=name} at every scrape."""
        self.queue_length.labels(name).set_function(lambda: float(length()))

    def watch_exporter(self, exporter: object, name: str | None = None) -> None:
        """Report an exporter's cumulative `stats` (see ExportStats) at every scrape.

        Its queue, if it has `queue_length()`, becomes queue_length{queue="export:<name>"}.
        """
        name = name or getattr(exporter, "name", type(exporter).__name__)
        stats = getattr(exporter, "stats", None)
        if stats is not None and hasattr(stats, "snapshot"):
            self._exports.watch(name, stats.snapshot)
        queue_length = getattr(exporter, "queue_length", None)
        if callable(queue_length):
            self.watch_queue(f"export:{name}", queue_length)

    def exported(self, exporter: str, flows: int, batches: int = 1) -> None:
        """For exporters without `stats`: flows and batches handed to the collector."""
        self._exports.add(exporter, "flows_exported", flows)
        self._exports.add(exporter, "batches_exported", batches)

    def export_error(self, exporter: str, reason: str) -> None:
        self._exports.add_error(exporter, reason)

    def dropped(self, exporter: str, reason: str, flows: int, batches: int = 1) -> None:
        """Flows lost before reaching a collector (e.g. reason queue_full, send_error)."""
        self._exports.add_drop(exporter, reason, flows, batches)

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


class _ExportCollector(Collector):
    """Per-exporter counters: pushed with add*() and/or read from watched stats."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._lock = threading.Lock()
        self._watched: list[tuple[str, Callable[[], dict]]] = []
        self._pushed: dict[str, dict] = {}

    def watch(self, name: str, snapshot: Callable[[], dict]) -> None:
        with self._lock:
            self._watched.append((name, snapshot))

    def _entry(self, exporter: str) -> dict:
        return self._pushed.setdefault(exporter, {"flows_exported": 0, "batches_exported": 0,
                                                  "errors": {}, "dropped": {}})

    def add(self, exporter: str, key: str, value: int) -> None:
        with self._lock:
            self._entry(exporter)[key] += value

    def add_error(self, exporter: str, reason: str) -> None:
        with self._lock:
            errors = self._entry(exporter)["errors"]
            errors[reason] = errors.get(reason, 0) + 1

    def add_drop(self, exporter: str, reason: str, flows: int, batches: int) -> None:
        with self._lock:
            dropped = self._entry(exporter)["dropped"]
            old = dropped.get(reason, (0, 0))
            dropped[reason] = (old[0] + flows, old[1] + batches)

    def _snapshots(self) -> Iterable[tuple[str, dict]]:
        with self._lock:
            pushed = [(name, {"flows_exported": e["flows_exported"],
                              "batches_exported": e["batches_exported"],
                              "errors": dict(e["errors"]), "dropped": dict(e["dropped"])})
                      for name, e in self._pushed.items()]
            watched = list(self._watched)
        return pushed + [(name, snapshot()) for name, snapshot in watched]

    def collect(self):
        p = self._prefix
        flows = CounterMetricFamily(p + "exported_flows", "Flows sent to the collector.",
                                    labels=["exporter"])
        batches = CounterMetricFamily(p + "exported_batches",
                                      "Batches (evictions) sent to the collector.",
                                      labels=["exporter"])
        errors = CounterMetricFamily(p + "export_errors",
                                     "Errors talking to the collector (connect, send_error...).",
                                     labels=["exporter", "reason"])
        dropped_flows = CounterMetricFamily(
            p + "dropped_flows", "Flows that never reached the collector, by reason.",
            labels=["exporter", "reason"])
        dropped_batches = CounterMetricFamily(
            p + "dropped_batches", "Batches that never reached the collector, by reason.",
            labels=["exporter", "reason"])
        totals: dict[str, dict] = {}
        for name, snap in self._snapshots():
            total = totals.setdefault(name, {"flows_exported": 0, "batches_exported": 0,
                                             "errors": {}, "dropped": {}})
            total["flows_exported"] += int(snap.get("flows_exported", 0))
            total["batches_exported"] += int(snap.get("batches_exported", 0))
            for reason, count in dict(snap.get("errors", {})).items():
                total["errors"][reason] = total["errors"].get(reason, 0) + count
            for reason, (f, b) in dict(snap.get("dropped", {})).items():
                old = total["dropped"].get(reason, (0, 0))
                total["dropped"][reason] = (old[0] + f, old[1] + b)
        for name, total in sorted(totals.items()):
            flows.add_metric([name], total["flows_exported"])
            batches.add_metric([name], total["batches_exported"])
            for reason, count in sorted(total["errors"].items()):
                errors.add_metric([name, reason], count)
            for reason, (f, b) in sorted(total["dropped"].items()):
                dropped_flows.add_metric([name, reason], f)
                dropped_batches.add_metric([name, reason], b)
        return [flows, batches, errors, dropped_flows, dropped_batches]

    def describe(self):
        # Names only, so the registry can detect clashes without calling collect().
        p = self._prefix
        return [CounterMetricFamily(p + n, "", labels=["exporter"])
                for n in ("exported_flows", "exported_batches", "export_errors",
                          "dropped_flows", "dropped_batches")]


__all__ = ["DEFAULT_PREFIX", "Metrics"]
