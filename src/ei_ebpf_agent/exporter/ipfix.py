"""IPFIX exporter (EXPORT=ipfix+udp / ipfix+tcp): queue, encode, send to the collector.

`export` only queues the batch (bounded: a full queue drops the batch and counts it);
one sender thread encodes it with ipfix_encode and sends the messages. The collector
being down never raises: on TCP the thread reconnects with exponential backoff while
the queue absorbs what it can; what cannot be sent is counted in `stats`
(exporter.ExportStats, like every exporter's) and logged on state changes, not per batch.

Transport sessions (RFC 7011 section 10): a TCP connection is a session, so every new
connection starts at sequence number 0 and sends the templates first. On UDP the
session is the exporter's socket; templates are sent first and then refreshed by time
and by number of data messages, so a collector started later learns them.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from dataclasses import dataclass

from ei_ebpf_agent.config import Settings
from ei_ebpf_agent.exporter import BatchQueue, DropReason, ExportStats
from ei_ebpf_agent.exporter.ipfix_encode import MAX_MESSAGE_LEN, IpfixEncoder
from ei_ebpf_agent.flow.batch import FlowBatch
from ei_ebpf_agent.net import Transport

log = logging.getLogger(__name__)

DEFAULT_UDP_MESSAGE_SIZE = 1400  # fits a 1500-byte path MTU with IPv6 + UDP headers
SEND_TIMEOUT = 10.0  # seconds a blocked TCP send may take before the connection is dropped
BACKOFF_MIN, BACKOFF_MAX = 0.2, 30.0  # seconds between reconnection attempts


@dataclass(frozen=True)
class IpfixOptions:
    """What the IPFIX exporter needs from Settings (see `from_settings`)."""

    host: str
    port: int
    transport: Transport = Transport.UDP
    observation_domain_id: int = 1
    max_message_size: int = 0  # 0: 1400 bytes on UDP, 65535 on TCP
    template_refresh_interval: float = 60.0  # seconds, UDP only; 0 disables
    template_refresh_messages: int = 1000  # data messages, UDP only; 0 disables
    queue_length: int = 50  # batches waiting for the sender thread

    @property
    def message_size(self) -> int:
        if self.max_message_size:
            return self.max_message_size
        return DEFAULT_UDP_MESSAGE_SIZE if self.transport is Transport.UDP else MAX_MESSAGE_LEN

    @classmethod
    def from_settings(cls, settings: Settings) -> IpfixOptions:
        """Options from Settings (EXPORT=ipfix+udp|ipfix+tcp, TARGET_*, IPFIX_*, BUFFERS_LENGTH)."""
        return cls(
            host=settings.target_host or "",
            port=settings.target_port or 0,
            transport=settings.transport,
            observation_domain_id=settings.ipfix_observation_domain_id,
            max_message_size=settings.ipfix_max_message_size,
            template_refresh_interval=settings.ipfix_template_refresh_interval,
            template_refresh_messages=settings.ipfix_template_refresh_messages,
            queue_length=settings.buffers_length,
        )


class IpfixExporter:
    """Exporter protocol implementation for IPFIX over UDP or TCP."""

    def __init__(self, options: IpfixOptions) -> None:
        self.options = options
        self.name = f"ipfix+{options.transport.value}"
        self.stats = ExportStats()  # export_errors: failed connects and sends
        # Written by the sender thread only.
        self.messages_sent = 0  # data messages (not templates)
        self.bytes_sent = 0  # bytes of those messages
        # Validate sizes now, at start, rather than in the sender thread.
        IpfixEncoder(options.observation_domain_id, options.message_size)
        self._queue: BatchQueue[FlowBatch] = BatchQueue(options.queue_length, self.stats)
        self._sock: socket.socket | None = None
        self._address: tuple | None = None
        self._encoder: IpfixEncoder | None = None
        self._templates_at = 0.0  # monotonic time templates were last sent (UDP)
        self._messages_since_templates = 0
        self._deadline: float | None = None  # set by close(): give up waiting after it
        self._closing = threading.Event()
        self._down_logged = False
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-exporter",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: Settings) -> IpfixExporter:
        return cls(IpfixOptions.from_settings(settings))

    # --- Exporter protocol --------------------------------------------------------------

    def export(self, batch: FlowBatch) -> None:
        """Queue the batch; drop and count it when the queue is full. Never blocks."""
        if len(batch) == 0:
            return
        if self._queue.put(batch, len(batch)) is DropReason.QUEUE_FULL:
            log.warning("%s: queue full (%d batches), dropped a batch of %d flows",
                        self.name, self.options.queue_length, len(batch))

    def close(self, timeout: float) -> None:
        """Send what is queued, waiting at most `timeout` seconds, then close the socket."""
        if self._queue.closed:
            return
        self._deadline = time.monotonic() + timeout
        self._closing.set()
        self._queue.close(timeout)  # if full, the thread sees the deadline and drops the rest
        self._thread.join(max(self._deadline - time.monotonic(), 0.0) + 1.0)
        if self._thread.is_alive():
            log.warning("%s: sender still busy after %.1fs; giving up", self.name, timeout)

    @property
    def queue_length(self) -> int:
        """Batches waiting to be sent."""
        return len(self._queue)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    # --- sender thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    break
                if self._past_deadline():
                    self.stats.drop(DropReason.CLOSED, len(item))
                    continue
                self._send_batch(item)
        finally:
            self._disconnect()

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _send_batch(self, batch: FlowBatch) -> None:
        if not self._ensure_session():
            self.stats.drop(DropReason.CLOSED, len(batch))
            return
        assert self._encoder is not None
        try:
            messages = self._encoder.encode(batch)
            if self.options.transport is Transport.UDP:
                self._send_udp(messages)
            else:
                self._send_tcp(messages)
        except OSError as error:
            self.stats.error()
            self.stats.drop(DropReason.SEND_ERROR, len(batch))
            log.warning("%s: sending to %s:%d failed (%s); batch of %d flows dropped",
                        self.name, self.options.host, self.options.port, error, len(batch))
            if self.options.transport is Transport.TCP:
                self._disconnect()
            return
        self.messages_sent += len(messages)
        self.bytes_sent += sum(len(m) for m in messages)
        self.stats.exported(len(batch))

    def _send_udp(self, messages: list[bytes]) -> None:
        assert self._sock is not None and self._encoder is not None
        opts = self.options
        for message in messages:
            now = time.monotonic()
            if ((opts.template_refresh_messages
                 and self._messages_since_templates >= opts.template_refresh_messages)
                    or (opts.template_refresh_interval
                        and now - self._templates_at >= opts.template_refresh_interval)):
                self._send_templates_udp(now)
            self._sock.sendto(message, self._address)
            self._messages_since_templates += 1

    def _send_templates_udp(self, now: float) -> None:
        assert self._sock is not None and self._encoder is not None
        self._sock.sendto(self._encoder.templates(), self._address)
        self._templates_at = now
        self._messages_since_templates = 0

    def _send_tcp(self, messages: list[bytes]) -> None:
        assert self._sock is not None
        self._sock.sendall(b"".join(messages))

    # --- sessions -----------------------------------------------------------------------

    def _ensure_session(self) -> bool:
        """Open the socket (with backoff); False if close() gave up meanwhile."""
        if (self._sock is not None and self.options.transport is Transport.TCP
                and self._peer_closed()):
            log.warning("%s: collector %s:%d closed the connection", self.name,
                        self.options.host, self.options.port)
            self._disconnect()
        backoff = BACKOFF_MIN
        while self._sock is None:
            try:
                self._connect()
            except OSError as error:
                self.stats.error()
                if not self._down_logged:
                    log.warning("%s: cannot reach collector %s:%d (%s); retrying with backoff",
                                self.name, self.options.host, self.options.port, error)
                    self._down_logged = True
                if self._deadline is None:
                    self._closing.wait(backoff)  # close() cuts a long backoff short
                else:
                    wait = min(backoff, self._deadline - time.monotonic())
                    if wait <= 0:
                        return False
                    time.sleep(wait)
                backoff = min(backoff * 2, BACKOFF_MAX)
        return True

    def _connect(self) -> None:
        opts = self.options
        tcp = opts.transport is Transport.TCP
        kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
        infos = socket.getaddrinfo(opts.host, opts.port, type=kind)
        last_error: OSError = OSError(f"no address for {opts.host}")
        for family, socktype, proto, _name, address in infos:
            sock = socket.socket(family, socktype, proto)
            try:
                if tcp:
                    timeout = SEND_TIMEOUT
                    if self._deadline is not None:  # closing: do not outlive close()
                        timeout = max(min(timeout, self._deadline - time.monotonic()), 0.05)
                    sock.settimeout(timeout)
                    sock.connect(address)
                    sock.settimeout(SEND_TIMEOUT)
            except OSError as error:
                sock.close()
                last_error = error
                continue
            self._sock, self._address = sock, address
            # A new session: sequence numbers restart and templates go first.
            self._encoder = IpfixEncoder(opts.observation_domain_id, opts.message_size)
            templates = self._encoder.templates()
            if tcp:
                try:
                    sock.sendall(templates)
                except OSError:
                    self._disconnect()
                    raise
            else:
                self._send_templates_udp(time.monotonic())
            if self._down_logged:
                log.info("%s: collector %s:%d reachable again", self.name, opts.host, opts.port)
            self._down_logged = False
            log.debug("%s: session to %s opened", self.name, address)
            return
        raise last_error

    def _peer_closed(self) -> bool:
        # An IPFIX collector never sends on the connection: readable means EOF or error.
        assert self._sock is not None
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
            if not readable:
                return False
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except OSError:
            return True

    def _disconnect(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


EXPORTER = IpfixExporter
