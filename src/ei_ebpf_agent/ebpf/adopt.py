"""Adopt the pinned maps of an earlier agent, or say why they cannot be adopted.

A restarted agent reuses the earlier one's flow tables, outer map, ring buffer, counters
and slot locks as they are, so that nothing counted since its last export is lost, and
keeps its hash seed (read from the pinned .rodata), so that the new programs find the
flows where the old ones put them. Maps of another size (CACHE_MAX_FLOWS or the ring
buffer changed) cannot be swapped in; the caller drains what it can and starts afresh.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

import numpy as np

from ei_ebpf_agent.ebpf import libbpf
from ei_ebpf_agent.ebpf.layout import AGENT_CONFIG, FLOW_SLOT
from ei_ebpf_agent.ebpf.pins import PinStore

RODATA = "rodata"  # the pin name of the object's .rodata (agent_config)


class NotAdoptable(Exception):
    """The pins exist but do not fit this agent; str() says why, in one line."""

    def __init__(self, reason: str, tables: dict[str, int] | None = None) -> None:
        super().__init__(reason)
        self.tables = tables or {}  # flow table -> fd, still drainable (same layout)


@dataclass
class Adopted:
    fds: dict[str, int]  # map name -> a new fd of the pinned map (the caller closes them)
    hash_seed: int
    active: str | None = field(default=None)  # the table flows_outer[0] points to

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def read_config(rodata_fd: int) -> np.ndarray:
    """agent_config as the pinned .rodata holds it (it sits at offset 0)."""
    info = libbpf.map_info(rodata_fd)
    value = ctypes.create_string_buffer(info.value_size)
    key = ctypes.c_uint32(0)
    libbpf.bpf_map_lookup_elem(rodata_fd, ctypes.byref(key), value)
    return np.frombuffer(value.raw[:AGENT_CONFIG.itemsize], dtype=AGENT_CONFIG)[0]


def find(pins: PinStore, sizes: dict[str, int], tables: tuple[str, ...]) -> Adopted | None:
    """The pinned maps, if every one of `sizes` (name -> max_entries) is pinned with that
    size; None if none is pinned. Raises NotAdoptable (its fds closed, but for the flow
    tables handed to it) when some are missing or of another size."""
    fds: dict[str, int] = {}
    try:
        for name in (*sizes, RODATA):
            fd = pins.get_map(name)
            if fd is not None:
                fds[name] = fd
        if not fds:
            return None
        missing = sorted((set(sizes) | {RODATA}) - set(fds))
        if missing:
            raise NotAdoptable(f"pinned maps incomplete (no {', '.join(missing)})")
        wrong = []
        for name, max_entries in sizes.items():
            info = libbpf.map_info(fds[name])
            if info.max_entries != max_entries:
                wrong.append(f"{name} has {info.max_entries} entries, not {max_entries}")
            elif name in tables and info.value_size != FLOW_SLOT.itemsize:
                wrong.append(f"{name} has {info.value_size}-byte slots")
        if wrong:
            drainable = {t: fds.pop(t) for t in tables
                         if libbpf.map_info(fds[t]).value_size == FLOW_SLOT.itemsize}
            raise NotAdoptable("; ".join(wrong), drainable)
        config = read_config(fds[RODATA])
        return Adopted(fds, hash_seed=int(config["hash_seed"]))
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
