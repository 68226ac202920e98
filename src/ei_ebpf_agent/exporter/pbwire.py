"""Bulk protobuf encoding of a FlowBatch into serialized `pbflow.Records` messages.

protobuf's Python API costs microseconds per message object, far too slow for a
million flows a second, so the wire bytes are built with numpy instead, one field
(column) at a time for every flow at once:

- every field becomes an (N, w) uint8 matrix of its tag, length/varint and payload
  bytes, with an (N, w) bool mask of the bytes that are present (varints take as many
  7-bit groups as their value needs; proto3 zero scalars are left out, as canonical
  protobuf does);
- a nested message (Timestamp, DataLink, Network, IP, Transport) is the tag, the varint
  of its length (the row sums of its columns' masks), then its columns;
- all columns side by side, `matrix[mask]` reads the present bytes row by row, which is
  the concatenation of the records in order, each one `0x0a <varint length> <record>`:
  exactly the bytes of `Records.entries`.

Fields are written in field-number order, so the output is byte-identical to
`Records.SerializeToString(deterministic=True)` of the same content (a unit test holds
it to that). What is written for each flow (see WIRE.md):

- eth_protocol, direction, bytes, packets, flags (tcp_flags), icmp_type, icmp_code,
  sampling: plain uint32/uint64/enum fields.
- time_flow_start / time_flow_end: Timestamp of first/last_seen_ns + wall_offset_ns.
- data_link: src_mac/dst_mac as the big-endian integer of the 6 bytes.
- network: src/dst address as IP.ipv4 (host-order integer of the address) when
  eth_protocol is 0x0800, IP.ipv6 (16 bytes) when 0x86DD, no address otherwise; dscp.
- transport: src_port, dst_port, protocol.
- interface: the name of if_index in batch.interfaces (left out when unknown).
- agent_ip: batch.agent_ip. duplicate is always false (left out).

The nested messages are always present (possibly empty), addresses only for IP flows.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ei_ebpf_agent.flow.batch import FlowBatch, IPAddress

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD

_NS_PER_S = np.uint64(1_000_000_000)

# (w, N) uint8 bytes, (w, N) bool present, (N,) byte count of each row
Column = tuple[np.ndarray, np.ndarray, np.ndarray]


def _key(field: int, wire_type: int) -> bytes:
    """The tag bytes of a field (itself a varint)."""
    return _varint_bytes((field << 3) | wire_type)


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class _Columns:
    """The columns of one message, left to right, and the byte count of each row.

    Stored transposed, one (w, N) block per column, so that every numpy operation and
    the final concatenation work on contiguous memory.
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.data: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.row_lengths = np.zeros(rows, dtype=np.uint32)

    def add(self, data: np.ndarray, present: np.ndarray, lengths: np.ndarray | int) -> None:
        self.data.append(data)
        self.masks.append(present)
        self.row_lengths += lengths

    def constant(self, data: bytes, present: np.ndarray | None = None) -> None:
        """The same bytes in every row (where `present`, else in all)."""
        shape = (len(data), self.rows)
        block = np.broadcast_to(np.frombuffer(data, dtype=np.uint8)[:, None], shape)
        if present is None:
            self.add(block, np.broadcast_to(True, shape), len(data))
        else:
            mask = np.broadcast_to(present, shape)
            self.add(block, mask, present * np.uint32(len(data)))

    def varint(self, values: np.ndarray, present: np.ndarray | None = None) -> None:
        data, used = _varint(values)
        if present is not None:
            used *= present
        self.add(data, _POSITION[: len(data), None] < used, used)

    def scalar(self, field: int, values: np.ndarray) -> None:
        """A proto3 uint32/uint64/enum field: left out where the value is 0."""
        present = values != 0
        self.constant(_key(field, _VARINT), present)
        self.varint(values, present)

    def message(self, field: int, inner: _Columns) -> None:
        """A nested message that every row has (possibly empty)."""
        self.constant(_key(field, _LEN))
        self.varint(inner.row_lengths)
        self.data.extend(inner.data)
        self.masks.extend(inner.masks)
        self.row_lengths += inner.row_lengths


_POSITION = np.arange(24, dtype=np.uint32)
_SHIFTS = np.arange(10, dtype=np.uint64) * np.uint64(7)
_LIMITS = np.uint64(1) << _SHIFTS


def _varint(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Varint bytes of every value: 7-bit groups, low first, continuation bit 0x80.

    Returns the (w, N) bytes and the count of bytes each value needs.
    """
    biggest = int(values.max()) if len(values) else 0
    width = len(_varint_bytes(biggest))
    # The narrowest unsigned type that holds every value keeps the temporaries small.
    kind = np.uint32 if biggest < (1 << 32) else np.uint64
    values = values.astype(kind, copy=False)
    data = ((values >> _SHIFTS[:width, None].astype(kind)) & kind(0x7F)).astype(np.uint8)
    used = np.ones(len(values), dtype=np.uint32)
    for limit in _LIMITS[1:width].astype(kind):
        used += values >= limit
    data |= (_POSITION[:width, None] + 1 < used).view(np.uint8) << 7
    return data, used


def _timestamp(ns: np.ndarray, offset_ns: int) -> _Columns:
    """google.protobuf.Timestamp{seconds = 1, nanos = 2} of monotonic ns + offset."""
    wall = ns.astype(np.uint64) + np.uint64(offset_ns % (1 << 64))  # wraps like int64 math
    out = _Columns(len(ns))
    out.scalar(1, wall // _NS_PER_S)
    out.scalar(2, wall % _NS_PER_S)
    return out


def _mac_integer(macs: np.ndarray) -> np.ndarray:
    """(N, 6) bytes -> their big-endian integers."""
    padded = np.zeros((len(macs), 8), dtype=np.uint8)
    padded[:, 2:] = macs
    return padded.view(">u8")[:, 0].astype(np.uint64)


def _address(field: int, addresses: np.ndarray, is_v4: np.ndarray, is_v6: np.ndarray) -> Column:
    """Network.src_addr/dst_addr: an IP message, ipv4 or ipv6 by row, absent for non-IP.

    v4 row: key, 5, [0x0d, 4 bytes]; v6 row: key, 18, [0x12, 16, 16 bytes].
    `addresses` are 16 bytes, IPv4 ones mapped (::ffff:a.b.c.d).
    """
    data = np.empty((20, len(addresses)), dtype=np.uint8)
    data[0] = (field << 3) | _LEN
    data[1] = np.where(is_v4, 5, 18)
    data[2] = np.where(is_v4, (1 << 3) | _I32, (2 << 3) | _LEN)
    data[3] = 16
    data[4:] = addresses.T
    # fixed32 of the host-order integer a.b.c.d is its little-endian bytes: d, c, b, a.
    data[3:7] = np.where(is_v4, addresses[:, 15:11:-1].T, data[3:7])
    lengths = np.where(is_v4, np.uint32(7), np.where(is_v6, np.uint32(20), np.uint32(0)))
    return data, _POSITION[:20, None] < lengths, lengths


def _ip_message(address: IPAddress) -> bytes:
    """An IP message (content only) for one address."""
    if address.version == 4:
        return _key(1, _I32) + int(address).to_bytes(4, "little")
    return _key(2, _LEN) + b"\x10" + address.packed


class _Interfaces:
    """Field 10 (string) of every distinct interface of a batch, gathered by row."""

    def __init__(self, if_index: np.ndarray, names: Mapping[int, str]) -> None:
        unique, inverse = np.unique(if_index, return_inverse=True)
        self.inverse = inverse.ravel()
        encoded = []
        for index in unique.tolist():
            name = names.get(index, "").encode()
            encoded.append(_key(10, _LEN) + _varint_bytes(len(name)) + name if name else b"")
        width = max(len(e) for e in encoded)
        self.table = np.zeros((len(unique), width), dtype=np.uint8)
        self.lengths = np.array([len(e) for e in encoded], dtype=np.uint32)
        for row, data in enumerate(encoded):
            self.table[row, : len(data)] = np.frombuffer(data, dtype=np.uint8)
        self.table = self.table.T.copy()

    def column(self, rows: slice) -> Column:
        which = self.inverse[rows]
        lengths = self.lengths[which]
        return self.table[:, which], _POSITION[: len(self.table), None] < lengths, lengths


# Rows encoded together: small enough that every column of a chunk stays in the CPU
# cache while the columns are put side by side (a 3-4x difference at 100k flows).
CHUNK_ROWS = 4096


def encode_entries(batch: FlowBatch) -> tuple[np.ndarray, np.ndarray]:
    """Every flow as a `Records.entries` element.

    Returns (data, lengths): `data` (uint8) is the concatenation of `0x0a <len> <Record>`
    for every row of the batch in order, `lengths[i]` the byte count of row i's part.
    """
    rows = len(batch.records)
    if rows == 0:
        return np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.uint32)
    interfaces = _Interfaces(batch.records["if_index"], batch.interfaces)
    agent = b""
    if batch.agent_ip is not None:
        content = _ip_message(batch.agent_ip)
        agent = _key(12, _LEN) + _varint_bytes(len(content)) + content
    chunks = [
        _encode_chunk(batch, slice(start, start + CHUNK_ROWS), interfaces, agent)
        for start in range(0, rows, CHUNK_ROWS)
    ]
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def _encode_chunk(
    batch: FlowBatch, rows: slice, interfaces: _Interfaces, agent: bytes
) -> tuple[np.ndarray, np.ndarray]:
    rec = batch.records[rows]
    count = len(rec)
    eth = rec["eth_protocol"]
    is_v4 = eth == ETH_P_IP
    is_v6 = eth == ETH_P_IPV6

    record = _Columns(count)
    record.scalar(1, eth)
    record.scalar(2, rec["direction"])
    record.message(3, _timestamp(rec["first_seen_ns"], batch.wall_offset_ns))
    record.message(4, _timestamp(rec["last_seen_ns"], batch.wall_offset_ns))
    data_link = _Columns(count)
    data_link.scalar(1, _mac_integer(rec["src_mac"]))
    data_link.scalar(2, _mac_integer(rec["dst_mac"]))
    record.message(5, data_link)
    network = _Columns(count)
    network.add(*_address(1, rec["src_ip"], is_v4, is_v6))
    network.add(*_address(2, rec["dst_ip"], is_v4, is_v6))
    network.scalar(3, rec["dscp"])
    record.message(6, network)
    transport = _Columns(count)
    transport.scalar(1, rec["src_port"])
    transport.scalar(2, rec["dst_port"])
    transport.scalar(3, rec["protocol"])
    record.message(7, transport)
    record.scalar(8, rec["bytes"])
    record.scalar(9, rec["packets"])
    record.add(*interfaces.column(rows))
    if agent:
        record.constant(agent)
    record.scalar(13, rec["tcp_flags"])
    record.scalar(14, rec["icmp_type"])
    record.scalar(15, rec["icmp_code"])
    record.scalar(29, rec["sampling"])

    entries = _Columns(count)
    entries.message(1, record)
    data = np.concatenate(entries.data)
    mask = np.concatenate(entries.masks)
    # Row by row (flow by flow) through the transposed blocks: the bytes of each record.
    return data.T[mask.T], entries.row_lengths


def encode_batch(batch: FlowBatch, max_flows: int) -> list[bytes]:
    """Serialized `pbflow.Records` messages of at most `max_flows` records each, in order."""
    if max_flows < 1:
        raise ValueError(f"max_flows must be at least 1, not {max_flows}")
    data, lengths = encode_entries(batch)
    ends = np.cumsum(lengths, dtype=np.int64)
    starts = ends - lengths
    messages = []
    for first in range(0, len(lengths), max_flows):
        last = min(first + max_flows, len(lengths)) - 1
        messages.append(data[int(starts[first]) : int(ends[last])].tobytes())
    return messages
