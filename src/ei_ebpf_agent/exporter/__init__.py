"""Exporters: one file per format behind one small interface, chosen by EXPORT.

An exporter is a module `exporter/<name>.py` (`name` is config's
`EXPORT_KINDS[EXPORT].exporter`) whose `EXPORTER` class implements `Exporter`: it is
built by `from_settings`, and counts what it delivered and dropped in its `stats`.
Exporters that send from their own thread put batches in a `BatchQueue`.
"""

from __future__ import annotations

import enum
import importlib
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from ei_ebpf_agent.config import Settings
    from ei_ebpf_agent.flow.batch import FlowBatch


class DropReason(enum.Enum):
    """Why flows never reached the collector; the value is the metric label."""

    QUEUE_FULL = "queue_full"  # the queue was full: the collector is down or too slow
    SEND_ERROR = "send_error"  # the connection failed while the batch was being sent
    RETRIES_EXHAUSTED = "retries_exhausted"  # unreachable for longer than the retry time
    REJECTED = "rejected"  # the collector refused the message
    CLOSED = "closed"  # exported after close(), or still queued when close() gave up


@dataclass(eq=False)
class ExportStats:
    """Cumulative counters of one exporter, read by metrics at scrape time.

    Updated only through the methods (thread-safe: export() and a sender thread both
    count); read a consistent copy with `snapshot()`.
    """

    exported_flows: int = 0  # flows delivered
    exported_batches: int = 0  # batches delivered
    export_errors: int = 0  # failed attempts to reach or send to the collector
    dropped_flows: int = 0
    dropped_batches: int = 0
    dropped_by_reason: dict[DropReason, int] = field(default_factory=dict)  # flows
    dropped_batches_by_reason: dict[DropReason, int] = field(default_factory=dict)
    # Batches waiting to be sent, for exporters with a queue (set by BatchQueue).
    queue_length: Callable[[], int] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def exported(self, flows: int, batches: int = 1) -> None:
        """`flows` flows (and `batches` whole batches) reached the collector."""
        with self._lock:
            self.exported_flows += flows
            self.exported_batches += batches

    def error(self) -> None:
        """One failed attempt to connect or send."""
        with self._lock:
            self.export_errors += 1

    def drop(self, reason: DropReason, flows: int, batches: int = 1) -> None:
        """`flows` flows (in `batches` batches, 0 for part of one) will never be sent."""
        with self._lock:
            self.dropped_flows += flows
            self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + flows
            if batches:
                self.dropped_batches += batches
                self.dropped_batches_by_reason[reason] = (
                    self.dropped_batches_by_reason.get(reason, 0) + batches)

    def snapshot(self) -> ExportStats:
        """A copy of the counters taken under the lock."""
        with self._lock:
            return replace(self, dropped_by_reason=dict(self.dropped_by_reason),
                           dropped_batches_by_reason=dict(self.dropped_batches_by_reason))


class Exporter(Protocol):
    """What the agent needs from an exporter.

    `export` must return quickly: an exporter that talks to a network peer queues the
    batch (bounded) and sends it from its own thread. `close` flushes what is queued,
    waiting at most `timeout` seconds, then releases everything.
    """

    stats: ExportStats

    @classmethod
    def from_settings(cls, settings: Settings) -> Exporter: ...

    def export(self, batch: FlowBatch) -> None: ...

    def close(self, timeout: float) -> None: ...


def make_exporter(settings: Settings) -> Exporter:
    """The exporter named by EXPORT (config has validated the name)."""
    module = importlib.import_module(f"{__name__}.{settings.exporter}")
    return module.EXPORTER.from_settings(settings)


_T = TypeVar("_T")


class BatchQueue(Generic[_T]):
    """The bounded queue between export() and a sender thread.

    `put` never waits: when the queue is full or closed the item is dropped and its
    flows counted in `stats`. `close` adds an end marker (None) that `get` returns.
    """

    def __init__(self, maxsize: int, stats: ExportStats) -> None:
        self.maxsize = max(1, maxsize)
        self.stats = stats
        self.closed = False
        self._queue: queue.Queue[_T | None] = queue.Queue(maxsize=self.maxsize)
        stats.queue_length = self.__len__

    def __len__(self) -> int:
        return self._queue.qsize()

    def put(self, item: _T, flows: int) -> DropReason | None:
        """Queue `item` of `flows` flows; None, or why it was dropped (and counted)."""
        reason = DropReason.CLOSED if self.closed else None
        if reason is None:
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                reason = DropReason.QUEUE_FULL
        if reason is not None:
            self.stats.drop(reason, flows)
        return reason

    def get(self, timeout: float | None = None) -> _T | None:
        """The next item, or None for the end marker; queue.Empty after `timeout`."""
        return self._queue.get(timeout=timeout)

    def close(self, timeout: float) -> None:
        """Refuse new items and queue the end marker (waiting at most `timeout` seconds
        for room; when there is none the sender must notice `closed` itself)."""
        self.closed = True
        try:
            self._queue.put(None, timeout=max(0.0, timeout))
        except queue.Full:
            pass

    def left(self) -> Iterator[_T]:
        """Take what is still queued (not the end marker), without waiting."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                yield item
