"""The `grpc` exporter: pbflow.Records to a collector (NetObserv flowlogs-pipeline ingest).

export() encodes the batch with pbwire (in the caller's thread, in bulk) and queues its
messages; a sender thread calls the unary method `/pbflow.Collector/Send` with the
already serialized bytes. Bounded everywhere:

- the queue holds at most BUFFERS_LENGTH batches; when it is full, a new batch is
  dropped and counted (the collector is down or too slow) and export() returns at once;
- a message that cannot be delivered is retried with jittered exponential backoff
  (0.5 s doubling to 30 s) for at most `retry_time` seconds, then dropped and counted;
  messages the collector rejects (a status other than unavailable / deadline / resource
  exhausted / aborted) are dropped at once;
- close(timeout) stops accepting batches and sends what is queued for at most `timeout`
  seconds; what is left is dropped and counted.

A message whose Send timed out may still have reached the collector, so a retry can
deliver it twice (at-least-once delivery); messages are never reordered
within a batch, and only one is in flight at a time.

Counters (read them as attributes): exported_flows, exported_batches, export_errors
(failed Send calls), dropped_flows, dropped_batches, dropped_by_reason ({reason: flows}),
queue_length.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from ei_ebpf_agent.config import Settings
from ei_ebpf_agent.exporter import pbwire
from ei_ebpf_agent.flow.batch import FlowBatch
from ei_ebpf_agent.pbflow import SEND_METHOD, flow_pb2

log = logging.getLogger(__name__)

# Worth trying again later: the collector is down, restarting or overloaded.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)

REASON_QUEUE_FULL = "queue_full"
REASON_RETRIES_EXHAUSTED = "retries_exhausted"
REASON_REJECTED = "rejected"
REASON_CLOSED = "closed"


@dataclass
class _Batch:
    messages: list[bytes]
    flows: list[int]  # records in each message
    sent: int = 0  # messages already delivered

    def remaining_flows(self) -> int:
        return sum(self.flows[self.sent :])


class _RateLimitedWarning:
    """At most one warning per `period` seconds; the ones in between are summed up."""

    def __init__(self, period: float = 10.0) -> None:
        self.period = period
        self.last = float("-inf")
        self.suppressed = 0
        self.lock = threading.Lock()

    def __call__(self, message: str, *args: object) -> None:
        with self.lock:
            now = time.monotonic()
            if now - self.last < self.period:
                self.suppressed += 1
                return
            suppressed, self.suppressed, self.last = self.suppressed, 0, now
        if suppressed:
            message += " (%d similar warnings suppressed)"
            args = (*args, suppressed)
        log.warning(message, *args)


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise OSError(err.errno, f"cannot read the {what} {path}: {err.strerror}") from err


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """TLS credentials from the TARGET_TLS_* paths; None (plaintext) when none is set."""
    ca = _read(settings.target_tls_ca_cert_path, "TLS CA certificate")
    cert = _read(settings.target_tls_user_cert_path, "TLS client certificate")
    key = _read(settings.target_tls_user_key_path, "TLS client key")
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise ValueError(
            "mutual TLS needs both TARGET_TLS_USER_CERT_PATH and TARGET_TLS_USER_KEY_PATH"
        )
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


class GrpcExporter:
    """Sends flows to a pbflow collector from a background thread; see the module doc."""

    def __init__(
        self,
        settings: Settings,
        *,
        send_timeout: float = 10.0,
        retry_time: float = 60.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        if not settings.target_host or not settings.target_port:
            raise ValueError("the grpc exporter needs TARGET_HOST and TARGET_PORT")
        self.max_flows = settings.grpc_message_max_flows
        self.send_timeout = send_timeout
        self.retry_time = retry_time
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.target = _target(settings.target_host, settings.target_port)

        self.exported_flows = 0
        self.exported_batches = 0
        self.export_errors = 0
        self.dropped_flows = 0
        self.dropped_batches = 0
        self.dropped_by_reason: dict[str, int] = {}
        self.dropped_batches_by_reason: dict[str, int] = {}  # reason -> batches, for metrics

        options = [
            # The channel reconnects by itself; keep its pace close to ours.
            ("grpc.initial_reconnect_backoff_ms", int(backoff_initial * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(backoff_initial * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(backoff_max * 1000)),
            ("grpc.max_send_message_length", -1),
        ]
        credentials = channel_credentials(settings)
        if credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=options)
        else:
            self._channel = grpc.secure_channel(self.target, credentials, options=options)
        self._send = self._channel.unary_unary(
            SEND_METHOD,
            request_serializer=None,  # the bytes are already a serialized Records
            response_deserializer=flow_pb2.CollectorReply.FromString,
        )
        self._queue: queue.Queue[_Batch | None] = queue.Queue(
            maxsize=max(1, settings.buffers_length)
        )
        self._lock = threading.Lock()  # guards the counters
        self._closed = False
        self._deadline = float("inf")  # set by close(): give up sending after it
        self._stop = threading.Event()
        self._warn = _RateLimitedWarning()
        self._thread = threading.Thread(target=self._run, name="grpc-exporter", daemon=True)
        self._thread.start()

    @property
    def queue_length(self) -> int:
        """Batches waiting to be sent."""
        return self._queue.qsize()

    def export(self, batch: FlowBatch) -> None:
        """Encode and queue the batch; drop and count it when the queue is full. Never blocks."""
        if len(batch) == 0:
            return
        messages = pbwire.encode_batch(batch, self.max_flows)
        flows = [self.max_flows] * (len(messages) - 1) + [
            len(batch) - self.max_flows * (len(messages) - 1)
        ]
        item = _Batch(messages, flows)
        if self._closed:
            self._drop(item, REASON_CLOSED)
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._drop(item, REASON_QUEUE_FULL)
            self._warn(
                "grpc exporter: queue of %d batches full (collector %s down or slow), "
                "dropped %d flows",
                self._queue.maxsize,
                self.target,
                len(batch),
            )

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, send what is queued within `timeout` seconds, close the channel."""
        if self._closed:
            return
        self._deadline = time.monotonic() + max(0.0, timeout)
        self._closed = True
        try:
            self._queue.put(None, timeout=self._remaining())  # wakes the sender when idle
        except queue.Full:
            pass  # the sender notices `_closed` once the queue is empty
        self._thread.join(self._remaining())
        self._stop.set()
        self._channel.close()  # also cancels a call still in flight
        self._thread.join(1.0)
        # Whatever the sender did not get to.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._drop(item, REASON_CLOSED)

    def _remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    # -- sender thread --------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._closed and time.monotonic() >= self._deadline:
                break
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._closed:
                    break
                continue
            if item is None:
                if self._queue.empty():
                    break
                continue
            self._deliver(item)

    def _deliver(self, item: _Batch) -> None:
        give_up = time.monotonic() + self.retry_time
        backoff = self.backoff_initial
        while item.sent < len(item.messages):
            now = time.monotonic()
            if self._stop.is_set() or (self._closed and now >= self._deadline):
                self._drop(item, REASON_CLOSED)
                return
            timeout = min(self.send_timeout, max(0.05, self._deadline - now))
            try:
                self._send(item.messages[item.sent], timeout=timeout)
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else None
                with self._lock:
                    self.export_errors += 1
                if code not in RETRYABLE:
                    self._warn(
                        "grpc exporter: collector %s rejected %d flows: %s %s",
                        self.target,
                        item.flows[item.sent],
                        code,
                        _details(err),
                    )
                    self._drop_message(item, REASON_REJECTED)
                    continue
                if time.monotonic() >= give_up:
                    self._warn(
                        "grpc exporter: collector %s unreachable for %.0fs (%s), dropped %d flows",
                        self.target,
                        self.retry_time,
                        code,
                        item.remaining_flows(),
                    )
                    self._drop(item, REASON_RETRIES_EXHAUSTED)
                    return
                self._warn(
                    "grpc exporter: sending to %s failed (%s %s), retrying",
                    self.target,
                    code,
                    _details(err),
                )
                # Jittered exponential backoff, cut short by close().
                pause = min(backoff, self.backoff_max) * random.uniform(0.5, 1.0)
                pause = min(pause, max(0.0, give_up - time.monotonic()))
                if self._closed:
                    pause = min(pause, self._remaining())
                self._stop.wait(pause)
                backoff = min(backoff * 2, self.backoff_max)
                continue
            with self._lock:
                self.exported_flows += item.flows[item.sent]
            item.sent += 1
            backoff = self.backoff_initial
        with self._lock:
            self.exported_batches += 1

    def _drop_message(self, item: _Batch, reason: str) -> None:
        flows = item.flows[item.sent]
        with self._lock:
            self.dropped_flows += flows
            self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + flows
        item.sent += 1

    def _drop(self, item: _Batch, reason: str) -> None:
        flows = item.remaining_flows()
        with self._lock:
            self.dropped_flows += flows
            self.dropped_batches += 1
            self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + flows
            self.dropped_batches_by_reason[reason] = (
                self.dropped_batches_by_reason.get(reason, 0) + 1)
        item.sent = len(item.messages)


def _details(err: grpc.RpcError) -> str:
    return err.details() if hasattr(err, "details") else str(err)
