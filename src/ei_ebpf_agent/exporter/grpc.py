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

What was delivered and dropped is counted in `stats` (exporter.ExportStats;
export_errors are failed Send calls).
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
from ei_ebpf_agent.exporter import BatchQueue, DropReason, ExportStats, pbwire
from ei_ebpf_agent.flow.batch import FlowBatch
from ei_ebpf_agent.net import host_port
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


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise OSError(err.errno, f"cannot read the {what} {path}: {err.strerror}") from err


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """TLS credentials from the TARGET_TLS_* paths; None (plaintext) when none is set.

    config has checked that a client certificate and key come together."""
    ca = _read(settings.target_tls_ca_cert_path, "TLS CA certificate")
    cert = _read(settings.target_tls_user_cert_path, "TLS client certificate")
    key = _read(settings.target_tls_user_key_path, "TLS client key")
    if ca is None and cert is None and key is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


class GrpcExporter:
    """Sends flows to a pbflow collector from a background thread; see the module doc."""

    def __init__(
        self,
        target: str,
        *,
        max_flows: int = 10000,
        queue_length: int = 50,
        credentials: grpc.ChannelCredentials | None = None,
        send_timeout: float = 10.0,
        retry_time: float = 60.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self.target = target  # "host:port"
        self.max_flows = max_flows
        self.send_timeout = send_timeout
        self.retry_time = retry_time
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stats = ExportStats()

        options = [
            # The channel reconnects by itself; keep its pace close to ours.
            ("grpc.initial_reconnect_backoff_ms", int(backoff_initial * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(backoff_initial * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(backoff_max * 1000)),
            ("grpc.max_send_message_length", -1),
        ]
        if credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=options)
        else:
            self._channel = grpc.secure_channel(self.target, credentials, options=options)
        self._send = self._channel.unary_unary(
            SEND_METHOD,
            request_serializer=None,  # the bytes are already a serialized Records
            response_deserializer=flow_pb2.CollectorReply.FromString,
        )
        self._queue: BatchQueue[_Batch] = BatchQueue(queue_length, self.stats)
        self._deadline = float("inf")  # set by close(): give up sending after it
        self._stop = threading.Event()
        self._warn = _RateLimitedWarning()
        self._thread = threading.Thread(target=self._run, name="grpc-exporter", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: Settings, **tuning: float) -> GrpcExporter:
        """EXPORT=grpc: TARGET_*, GRPC_MESSAGE_MAX_FLOWS, BUFFERS_LENGTH; `tuning` sets
        the timeouts and backoff (tests shorten them)."""
        return cls(
            host_port(settings.target_host or "", settings.target_port or 0),
            max_flows=settings.grpc_message_max_flows,
            queue_length=settings.buffers_length,
            credentials=channel_credentials(settings),
            **tuning,
        )

    @property
    def queue_length(self) -> int:
        """Batches waiting to be sent."""
        return len(self._queue)

    def export(self, batch: FlowBatch) -> None:
        """Encode and queue the batch; drop and count it when the queue is full. Never blocks."""
        if len(batch) == 0:
            return
        messages = pbwire.encode_batch(batch, self.max_flows)
        flows = [self.max_flows] * (len(messages) - 1) + [
            len(batch) - self.max_flows * (len(messages) - 1)
        ]
        if self._queue.put(_Batch(messages, flows), len(batch)) is DropReason.QUEUE_FULL:
            self._warn(
                "grpc exporter: queue of %d batches full (collector %s down or slow), "
                "dropped %d flows",
                self._queue.maxsize,
                self.target,
                len(batch),
            )

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, send what is queued within `timeout` seconds, close the channel."""
        if self._queue.closed:
            return
        self._deadline = time.monotonic() + max(0.0, timeout)
        # The end marker wakes the sender when idle; if the queue stays full, the sender
        # notices `closed` once it is empty.
        self._queue.close(self._remaining())
        self._thread.join(self._remaining())
        self._stop.set()
        self._channel.close()  # also cancels a call still in flight
        self._thread.join(1.0)
        for item in self._queue.left():  # whatever the sender did not get to
            self._drop(item, DropReason.CLOSED)

    def _remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    # -- sender thread --------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._queue.closed and time.monotonic() >= self._deadline:
                break
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._queue.closed:
                    break
                continue
            if item is None:
                if not len(self._queue):
                    break
                continue
            self._deliver(item)

    def _deliver(self, item: _Batch) -> None:
        give_up = time.monotonic() + self.retry_time
        backoff = self.backoff_initial
        while item.sent < len(item.messages):
            now = time.monotonic()
            if self._stop.is_set() or (self._queue.closed and now >= self._deadline):
                self._drop(item, DropReason.CLOSED)
                return
            timeout = min(self.send_timeout, max(0.05, self._deadline - now))
            try:
                self._send(item.messages[item.sent], timeout=timeout)
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else None
                self.stats.error()
                if code not in RETRYABLE:
                    self._warn(
                        "grpc exporter: collector %s rejected %d flows: %s %s",
                        self.target,
                        item.flows[item.sent],
                        code,
                        _details(err),
                    )
                    self.stats.drop(DropReason.REJECTED, item.flows[item.sent], batches=0)
                    item.sent += 1
                    continue
                if time.monotonic() >= give_up:
                    self._warn(
                        "grpc exporter: collector %s unreachable for %.0fs (%s), dropped %d flows",
                        self.target,
                        self.retry_time,
                        code,
                        item.remaining_flows(),
                    )
                    self._drop(item, DropReason.RETRIES_EXHAUSTED)
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
                if self._queue.closed:
                    pause = min(pause, self._remaining())
                self._stop.wait(pause)
                backoff = min(backoff * 2, self.backoff_max)
                continue
            self.stats.exported(item.flows[item.sent], batches=0)
            item.sent += 1
            backoff = self.backoff_initial
        self.stats.exported(0)

    def _drop(self, item: _Batch, reason: DropReason) -> None:
        self.stats.drop(reason, item.remaining_flows())
        item.sent = len(item.messages)


def _details(err: grpc.RpcError) -> str:
    return err.details() if hasattr(err, "details") else str(err)


EXPORTER = GrpcExporter
