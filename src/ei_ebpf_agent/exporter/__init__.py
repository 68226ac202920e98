"""Exporters: one file per format behind one small interface, chosen by EXPORT."""

from __future__ import annotations

from typing import Protocol

from ei_ebpf_agent.flow.batch import FlowBatch


class Exporter(Protocol):
    """What the agent needs from an exporter.

    `export` must return quickly: an exporter that talks to a network peer queues the
    batch (bounded) and sends it from its own thread. `close` flushes what is queued,
    waiting at most `timeout` seconds, then releases everything.
    """

    def export(self, batch: FlowBatch) -> None: ...

    def close(self, timeout: float) -> None: ...
