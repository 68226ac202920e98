"""The `stdout` exporter: one JSON line per flow (shape in exporter/jsonflow.py)."""

from __future__ import annotations

import sys
from typing import TextIO

from ei_ebpf_agent.config import Settings
from ei_ebpf_agent.exporter import ExportStats
from ei_ebpf_agent.exporter.jsonflow import batch_lines
from ei_ebpf_agent.flow.batch import FlowBatch


class StdoutExporter:
    """Writes every flow of a batch as a JSON line and flushes after each batch."""

    def __init__(self, stream: TextIO | None = None) -> None:
        # Looked up at construction, not import, so a redirected sys.stdout is honoured.
        self.stream = stream if stream is not None else sys.stdout
        self.stats = ExportStats()

    @classmethod
    def from_settings(cls, settings: Settings) -> StdoutExporter:
        """EXPORT=stdout has no settings of its own."""
        return cls()

    def export(self, batch: FlowBatch) -> None:
        lines = batch_lines(batch)
        if not lines:
            return
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self.stats.exported(len(lines))

    def close(self, timeout: float = 0.0) -> None:
        """Nothing is buffered beyond the stream; flush it."""
        self.stream.flush()


EXPORTER = StdoutExporter
