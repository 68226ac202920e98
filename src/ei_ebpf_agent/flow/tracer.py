"""Drains the kernel's flow tables and ring buffer into FlowBatch objects.

Eviction is lossless: `evict()` points flows_outer[0] at the idle table, and the kernel
returns from that update only after every program that could still see the old table
has finished (RCU grace period), so the old table is then drained without races: it is
mmapped, its filled slots are copied out and zeroed, and it is ready to be swapped in
again. A packet that found no free slot arrived through the ring buffer instead; its
record is merged into the batch by key.

Shutdown order: detach the programs, `evict()` a last time (it consumes what is left
in the ring buffer), then `close()`.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import select
import threading
import time
from collections.abc import Mapping
from typing import Callable

import numpy as np

from ei_ebpf_agent.ebpf import libbpf
from ei_ebpf_agent.ebpf.layout import (
    COUNTER_RINGBUF_LOST,
    COUNTER_RINGBUF_RECORDS,
    FLOW_KEY,
    FLOW_RECORD,
    FLOW_SLOT,
    FLOW_VALUE,
    SLOT_EMPTY,
    SLOT_KEY_OFFSET,
    SLOT_READY,
    SLOT_VALUE_OFFSET,
)
from ei_ebpf_agent.ebpf.libbpf import LibbpfError
from ei_ebpf_agent.ebpf.loader import FlowProgram
from ei_ebpf_agent.flow.batch import FlowBatch, IPAddress

log = logging.getLogger(__name__)

# Slots mapped at once by the drain (1 MiB): a whole number of pages, since mmap offsets
# must be page-aligned (4 KiB holds 32 slots; 64 KiB pages hold 512).
DRAIN_WINDOW_SLOTS = 8192
POLL_TIMEOUT_MS = 100  # ring buffer poll period; also bounds how long close() waits

_KEY_SIZE = FLOW_KEY.itemsize
_VALUE_SIZE = FLOW_VALUE.itemsize
_RECORD_SIZE = FLOW_RECORD.itemsize
_SLOT_SIZE = FLOW_SLOT.itemsize


class FlowTracer:
    """Turns the loaded program's tables into batches; polls its ring buffer meanwhile."""

    def __init__(self, program: FlowProgram, *,
                 interfaces_lookup: Callable[[], Mapping[int, str]],
                 agent_ip: IPAddress) -> None:
        self._program = program
        self._interfaces_lookup = interfaces_lookup
        self._agent_ip = agent_ip
        self._active = program.active_table()  # where the programs write (an adopted
        # table may be either)
        self._evict_lock = threading.Lock()

        # Stats, read by the metrics module.
        self.evictions = 0
        self.evicted_flows = 0
        self.evicted_packets = 0
        self.evicted_bytes = 0
        self.ringbuf_records = 0  # records received from the ring buffer
        self.map_fill_ratio = 0.0  # flows in the last drained table / its max_entries
        self.kernel_ringbuf_records = 0  # per-CPU `counters` summed
        self.kernel_ringbuf_lost = 0

        # Ring buffer: records are copied under _pending_lock by whoever consumes, which
        # is the poll thread or evict(); _rb_lock keeps them from consuming at once.
        self._pending: list = []
        self._pending_lock = threading.Lock()
        self._rb_lock = threading.Lock()
        self._sample_cb = libbpf.ring_buffer_sample_fn(self._on_sample)  # kept alive
        self._rb = libbpf.ring_buffer__new(
            program.map_fds["flows_ringbuf"], self._sample_cb, None, None
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name="ringbuf", daemon=True)
        self._thread.start()

    # -- ring buffer --------------------------------------------------------------------

    def _on_sample(self, _ctx: int, data: int, size: int) -> int:
        record = ctypes.string_at(data, size)  # the kernel reuses the slot after we return
        with self._pending_lock:
            self._pending.append(record)
        return 0

    def _poll_loop(self) -> None:
        # Wait on libbpf's epoll fd ourselves rather than in ring_buffer__poll, so that the
        # consumer lock is held only while consuming and evict() never waits for a poll.
        poller = select.poll()
        poller.register(libbpf.ring_buffer__epoll_fd(self._rb), select.POLLIN)
        while not self._stop.is_set():
            if poller.poll(POLL_TIMEOUT_MS):
                self._consume()

    def _consume(self) -> None:
        with self._rb_lock:
            if self._rb is None:
                return
            try:
                libbpf.ring_buffer__consume(self._rb)
            except LibbpfError as error:
                if error.errno != errno.EINTR:
                    log.warning("reading the ring buffer failed: %s", error)

    def _take_ring_records(self) -> np.ndarray:
        self._consume()
        with self._pending_lock:
            pending, self._pending = self._pending, []
        good = [r for r in pending if len(r) == _RECORD_SIZE]
        if len(good) != len(pending):
            log.warning("ignored %d ring buffer records of unexpected size",
                        len(pending) - len(good))
        self.ringbuf_records += len(good)
        # bytearray: writable, and padding bytes kept (ndarray.copy() would not keep them)
        return np.frombuffer(bytearray(b"".join(good)), dtype=FLOW_RECORD)

    # -- eviction -----------------------------------------------------------------------

    def evict(self) -> FlowBatch:
        """Swap the tables, drain the old one, merge ring buffer records: one batch."""
        with self._evict_lock:
            old = self._active
            new = "flows_b" if old == "flows_a" else "flows_a"
            self._program.set_active_table(new)  # returns when `old` is quiescent
            self._active = new
            records = self._drain(self._program.map_fds[old], self._program.table_slots)
            records = self._drain_inherited(records)
            count = len(records)
            wall_offset_ns = time.time_ns() - time.monotonic_ns()  # ktime is CLOCK_MONOTONIC
            ring = self._take_ring_records()
            if len(ring):
                records = merge_by_key(_concat(records, ring))

            self.evictions += 1
            self.map_fill_ratio = count / self._program.max_flows
            self.evicted_flows += len(records)
            self.evicted_packets += int(records["packets"].sum())
            self.evicted_bytes += int(records["bytes"].sum())
            self._read_kernel_counters()
            return FlowBatch(
                records=records,
                wall_offset_ns=wall_offset_ns,
                interfaces=dict(self._interfaces_lookup()),
                agent_ip=self._agent_ip,
                extra={"ringbuf_records": len(ring), "table_flows": count},
            )

    def _drain_inherited(self, records: np.ndarray) -> np.ndarray:
        """Add, once, the flows of an earlier agent's tables that could not be adopted."""
        inherited, self._program.inherited_tables = self._program.inherited_tables, {}
        for name, (fd, slots) in inherited.items():
            old = self._drain(fd, slots)
            os.close(fd)
            log.info("exported %d flows from the earlier agent's %s", len(old), name)
            records = merge_by_key(_concat(records, old))
        return records

    def _drain(self, fd: int, slots: int) -> np.ndarray:
        """The filled slots of the idle table `fd` as FLOW_RECORD rows; zeroes them.

        The table is mapped a window at a time, so the agent's resident memory grows by
        one window, not by the table's size. A window that cannot be mapped keeps its
        flows: they are exported when this table is drained next time.
        """
        # np.empty maps pages lazily: only the rows filled below become resident memory.
        records = np.empty(slots, dtype=FLOW_RECORD)
        raw = records.view(np.uint8).reshape(slots, _RECORD_SIZE)
        total = 0
        for first in range(0, slots, DRAIN_WINDOW_SLOTS):
            count = min(DRAIN_WINDOW_SLOTS, slots - first)
            try:
                rows = _take_window(fd, first, count)
            except OSError as error:
                log.error("cannot map flow table slots %d-%d (%s): their flows stay in the "
                          "table until its next drain", first, first + count - 1, error)
                continue
            n = len(rows)
            raw[total:total + n, :_KEY_SIZE] = rows[:, SLOT_KEY_OFFSET:SLOT_KEY_OFFSET + _KEY_SIZE]
            raw[total:total + n, _KEY_SIZE:] = rows[:, SLOT_VALUE_OFFSET:SLOT_VALUE_OFFSET
                                                    + _VALUE_SIZE]
            total += n
        return records[:total]

    def _read_kernel_counters(self) -> None:
        try:
            counters = self._program.read_counters()
        except LibbpfError as error:
            log.warning("cannot read the kernel counters: %s", error)
            return
        lost = int(counters[COUNTER_RINGBUF_LOST])
        if lost > self.kernel_ringbuf_lost:
            log.warning(
                "%d packets were not counted: flow table and ring buffer both full "
                "(raise CACHE_MAX_FLOWS or shorten CACHE_ACTIVE_TIMEOUT)",
                lost - self.kernel_ringbuf_lost,
            )
        self.kernel_ringbuf_lost = lost
        self.kernel_ringbuf_records = int(counters[COUNTER_RINGBUF_RECORDS])

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop the poll thread and free the ring buffer, after one last consume.

        Records read here are kept: a later `evict()` still returns them.
        """
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._consume()
        with self._rb_lock:
            if self._rb is not None:
                libbpf.ring_buffer__free(self._rb)
                self._rb = None


def _take_window(fd: int, first: int, count: int) -> np.ndarray:
    """Copies of the filled slots among `count` slots from `first` (raw bytes, one row
    each). Every slot not empty is zeroed, empty again for the table's next turn as the
    active one: the READY ones taken, and any other (a claim that cannot be unfinished
    in an idle table, but would otherwise hold its slot for good)."""
    with mmap.mmap(fd, count * _SLOT_SIZE, flags=mmap.MAP_SHARED,
                   prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=first * _SLOT_SIZE) as mapped:
        window = np.frombuffer(mapped, dtype=np.uint8, count=count * _SLOT_SIZE)
        window = window.reshape(count, _SLOT_SIZE)
        try:
            state = window[:, :4].view(np.uint32)[:, 0].copy()  # not a view: see below
            rows = window[state == SLOT_READY]
            window[np.flatnonzero(state != SLOT_EMPTY)] = 0
        finally:
            del window  # no view may outlive the mapping
    return rows


def _concat(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    # np.concatenate would change the padded dtype, and a structured assignment would
    # leave the padding uninitialised: copy whole records as bytes.
    out = np.empty(len(first) + len(second), dtype=FLOW_RECORD)
    raw = out.view(np.uint8)
    split = len(first) * _RECORD_SIZE
    raw[:split] = np.ascontiguousarray(first).view(np.uint8)
    raw[split:] = np.ascontiguousarray(second).view(np.uint8)
    return out


def merge_by_key(records: np.ndarray) -> np.ndarray:
    """One row per distinct key: counters summed, first/last seen min/max, TCP flags ORed.

    Other value fields (sampling, DSCP, MACs) come from the first row of each key, so
    put table rows before ring buffer rows.
    """
    if len(records) == 0:
        return records
    # Compare keys by their fields only: padding bytes must not split a flow.
    keys = np.zeros(len(records), dtype=FLOW_KEY)
    for name in FLOW_KEY.names:
        keys[name] = records[name]
    _unique, inverse = np.unique(keys.view(f"V{_KEY_SIZE}"), return_inverse=True)
    inverse = inverse.ravel()
    order = np.argsort(inverse, kind="stable")  # stable: the first row of a key leads
    starts = np.flatnonzero(np.r_[True, inverse[order][1:] != inverse[order][:-1]])
    # Reorder whole records as bytes: structured fancy indexing does not copy padding.
    raw = np.ascontiguousarray(records).view(np.uint8).reshape(len(records), _RECORD_SIZE)
    grouped = raw[order].view(FLOW_RECORD).reshape(-1)
    merged = raw[order[starts]].view(FLOW_RECORD).reshape(-1)
    for name in ("packets", "bytes", "ip_bytes"):
        merged[name] = np.add.reduceat(grouped[name], starts)
    merged["first_seen_ns"] = np.minimum.reduceat(grouped["first_seen_ns"], starts)
    merged["last_seen_ns"] = np.maximum.reduceat(grouped["last_seen_ns"], starts)
    merged["tcp_flags"] = np.bitwise_or.reduceat(grouped["tcp_flags"], starts)
    return merged
