"""Wires the stages: interfaces -> attach; every CACHE_ACTIVE_TIMEOUT: evict -> export.

The stages know nothing of each other; this module owns their lifetime. Shutdown
detaches first (so nothing more is counted), then drains one last time and flushes
the exporter: every packet that was counted is exported.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import socket
import threading
import time

from ei_ebpf_agent.config import IPAddress, Settings
from ei_ebpf_agent.ebpf import features as kernel_features
from ei_ebpf_agent.ebpf import pins
from ei_ebpf_agent.ebpf.features import KernelFeatures, MissingKernelFeature
from ei_ebpf_agent.ebpf.loader import FlowProgram
from ei_ebpf_agent.errors import AgentStartError
from ei_ebpf_agent.exporter import Exporter, make_exporter
from ei_ebpf_agent.flow.batch import FlowBatch
from ei_ebpf_agent.flow.tracer import FlowTracer
from ei_ebpf_agent.ifaces import InterfaceFilter, InterfaceWatcher
from ei_ebpf_agent.metrics import Metrics

__all__ = ["Agent"]

log = logging.getLogger(__name__)

EXPORT_CLOSE_TIMEOUT = 10.0  # seconds the exporter may take to flush at shutdown


def detect_agent_ip() -> IPAddress:
    """The preferred source address of the default route, else any non-loopback one."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for family in (2, 10):  # AF_INET, AF_INET6
            for route in ipr.get_default_routes(family=family):
                source = route.get_attr("RTA_PREFSRC")
                if source:
                    return ipaddress.ip_address(source)
                oif = route.get_attr("RTA_OIF")
                for addr in ipr.get_addr(family=family, index=oif):
                    return ipaddress.ip_address(addr.get_attr("IFA_ADDRESS"))
        for addr in ipr.get_addr():
            address = ipaddress.ip_address(addr.get_attr("IFA_ADDRESS"))
            if not address.is_loopback and not address.is_link_local:
                return address
    return ipaddress.ip_address("127.0.0.1")


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards the two dicts below (watcher thread vs main)
        self._attached: dict[int, tuple[str, list]] = {}  # if_index -> (name, attachments)
        self._names: dict[int, str] = {}  # every name seen, kept so late flows keep a name
        self._start_error: AgentStartError | None = None  # first attach refusal at start
        self._started = False

    def run(self) -> int:
        settings = self.settings
        self._install_signal_handlers()  # before attaching: a signal must not skip teardown
        agent_ip = settings.agent_ip or detect_agent_ip()
        with contextlib.ExitStack() as stack:
            try:
                self._metrics = metrics = Metrics.from_settings(settings)
            except OSError as error:
                raise AgentStartError(
                    f"cannot serve metrics on {settings.metrics_server_address}:"
                    f"{settings.metrics_server_port}: {error.strerror or error}") from error
            stack.callback(metrics.close)
            features = self._check_kernel()
            pin_store = pins.claim(settings.bpf_fs_path, settings.pin)
            if pin_store is not None:
                stack.callback(pin_store.unlock)  # after program.close() has unpinned
            program = FlowProgram.load(
                sampling=settings.sampling, max_flows=settings.cache_max_flows,
                features=features, pins=pin_store,
            )
            stack.callback(program.close)
            tracer = FlowTracer(program, interfaces_lookup=self._interface_names,
                                agent_ip=agent_ip)
            stack.callback(tracer.close)
            metrics.watch_tracer(tracer)
            exporter = make_exporter(settings)
            stack.callback(exporter.close, EXPORT_CLOSE_TIMEOUT)
            metrics.watch_exporter(exporter, settings.export)
            self._program = program
            # Pop order: detach everything, then the final drain, then flush and close.
            stack.callback(self._final_drain, tracer, exporter)
            stack.callback(self._detach_all)
            watcher = InterfaceWatcher(
                mode=settings.listen_interfaces,
                poll_period=settings.listen_poll_period,
                filter=InterfaceFilter(settings.interfaces, settings.exclude_interfaces),
                on_added=self._on_added,
                on_removed=self._on_removed,
            )
            watcher.start()
            stack.callback(watcher.stop)
            released = program.release_unclaimed([i for i, _ in socket.if_nameindex()])
            if released:
                log.info("detached %d hooks an earlier agent left on interfaces not traced "
                         "now", released)
            with self._lock:
                self._started, start_error = True, self._start_error
            if start_error is not None:
                raise start_error  # e.g. no CAP_NET_ADMIN: one line, exit 1
            log.info("agent started: %d interfaces attached, agent IP %s, exporting to %s",
                     len(self._attached), agent_ip, settings.export)
            while not self._stop.wait(settings.cache_active_timeout):
                try:
                    self._export(self._evict(tracer), exporter)
                except Exception:  # noqa: BLE001 - one bad period must not stop the agent
                    log.exception("eviction failed; retrying at the next period")
            log.info("stopping: detaching, final drain and export")
        log.info("agent stopped")
        return 0

    def _check_kernel(self) -> KernelFeatures:
        """Probe what the kernel offers once; one line if it lacks something needed."""
        features = kernel_features.current()
        features.log_once()
        try:
            features.check()
        except MissingKernelFeature as error:
            raise AgentStartError(str(error)) from error
        if self.settings.tc_attach_mode == "tcx" and not features.tcx:
            raise AgentStartError(
                f"TC_ATTACH_MODE=tcx: kernel {features.kernel} lacks TCX links (Linux 6.6 or "
                "newer); use TC_ATTACH_MODE=any or tc")
        return features

    def _evict(self, tracer: FlowTracer) -> FlowBatch:
        start = time.monotonic()
        batch = tracer.evict()
        self._metrics.observe_eviction(time.monotonic() - start)
        return batch

    def _export(self, batch: FlowBatch, exporter: Exporter) -> None:
        if len(batch):
            exporter.export(batch)
        self._forget_stale_names()

    def _final_drain(self, tracer: FlowTracer, exporter: Exporter) -> None:
        self._export(self._evict(tracer), exporter)

    def _install_signal_handlers(self) -> None:
        def stop(signum, _frame) -> None:
            log.info("received %s", signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def _directions(self) -> tuple[str, ...]:
        if self.settings.direction == "both":
            return ("ingress", "egress")
        return (self.settings.direction,)

    def _on_added(self, if_index: int, name: str) -> None:
        attachments = []
        try:
            for direction in self._directions():
                attachments.append(
                    self._program.attach(if_index, direction, self.settings.tc_attach_mode)
                )
        except AgentStartError as error:
            for attachment in attachments:
                attachment.detach()
            with self._lock:
                at_start = not self._started
                if at_start:
                    self._start_error = self._start_error or error
            if not at_start:
                log.error("cannot attach to %s (index %d): %s", name, if_index, error)
            return
        except OSError as error:
            # The interface may vanish while we attach; anything else is worth a warning.
            for attachment in attachments:
                attachment.detach()
            log.warning("cannot attach to %s (index %d): %s", name, if_index, error)
            self._metrics.interface_event("attach_failed", len(self._attached))
            return
        with self._lock:
            self._attached[if_index] = (name, attachments)
            self._names[if_index] = name
            attached = len(self._attached)
        self._metrics.interface_event("added", attached)
        log.info("attached to %s (index %d, %s)", name, if_index, attachments[0].mode)

    def _on_removed(self, if_index: int, name: str) -> None:
        with self._lock:
            entry = self._attached.pop(if_index, None)
        if entry is None:
            return
        self._metrics.interface_event("removed", len(self._attached))
        for attachment in entry[1]:
            attachment.detach()  # the interface is gone: detach only releases our handle
        log.info("interface %s (index %d) removed", name, if_index)

    def _detach_all(self) -> None:
        with self._lock:
            entries, self._attached = list(self._attached.values()), {}
        for _name, attachments in entries:
            for attachment in attachments:
                attachment.detach()

    def _interface_names(self) -> dict[int, str]:
        with self._lock:
            return dict(self._names)

    def _forget_stale_names(self) -> None:
        # A removed interface's name is kept for one more eviction, for its last flows.
        with self._lock:
            self._names = {i: n for i, n in self._names.items() if i in self._attached}
