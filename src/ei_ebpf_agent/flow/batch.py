"""The unit that flows from the tracer to the exporters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ei_ebpf_agent.ebpf.layout import FLOW_RECORD
from ei_ebpf_agent.net import IPAddress


@dataclass(frozen=True)
class FlowBatch:
    """Flows evicted together: one FLOW_RECORD row per flow and direction.

    Times in `records` are CLOCK_MONOTONIC ns, as the kernel wrote them; an exporter
    adds `wall_offset_ns` to get wall-clock ns since the epoch (one conversion per
    batch, not per flow).
    """

    records: np.ndarray  # dtype FLOW_RECORD (host byte order; any explicit order is read too)
    wall_offset_ns: int
    interfaces: Mapping[int, str]  # if_index -> interface name
    agent_ip: IPAddress
    extra: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.records.dtype.newbyteorder("=") != FLOW_RECORD:
            raise TypeError(f"records must have dtype FLOW_RECORD, not {self.records.dtype}")

    def __len__(self) -> int:
        return len(self.records)

    def interface_names(self) -> np.ndarray:
        """Interface name of every row (object array), looked up once per distinct index."""
        index = self.records["if_index"]
        names = np.empty(len(index), dtype=object)
        for if_index in np.unique(index):
            names[index == if_index] = self.interfaces.get(int(if_index), "")
        return names
