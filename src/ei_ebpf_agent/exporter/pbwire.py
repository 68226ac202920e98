"""Bulk protobuf encoding of a FlowBatch into serialized `pbflow.Records` messages.

protobuf's Python API costs microseconds per message object, far too slow for a
million flows a second, so the wire bytes are computed with numpy, one field at a time
for every flow at once, never with a Python object per flow:

- Every field is cut into *pieces* of at most 8 bytes: for each flow a uint64 word
  holding the bytes (byte k in bits 8k..8k+7) and the number of those bytes that are
  used (0 when the field is absent; proto3 zero scalars are left out, as canonical
  protobuf does). Varints are built 7-bit group by group with the
  continuation bits; a tag and its value share a word when they fit.
- Consecutive pieces whose longest forms fit in 8 bytes together are merged into one
  (`word | next << 8 * used`), so a flow is about 20 words instead of 100+ bytes, and
  every numpy operation works on whole uint64 columns.
- A nested message (Timestamp, DataLink, Network, IP, Transport) is its tag, the varint
  of its length (the sum of its pieces' lengths), then its pieces.
- Each piece is stored as a whole word at its byte offset in the output (the row's start
  plus the used counts of the row's pieces before it), piece by piece, so later pieces
  overwrite the unused bytes of earlier ones. The rows follow one another, each as
  `0x0a <varint length> <Record>`: exactly the bytes of `Records.entries`.

Byte order is explicit: records are read by value in their dtype's order (the host's, as
the kernel wrote them) and words go out as "<u8", so any host gives the same bytes.
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

from collections.abc import Iterator, Mapping

import numpy as np

from ei_ebpf_agent.ebpf.layout import ETH_P_IP, ETH_P_IPV6
from ei_ebpf_agent.flow.batch import FlowBatch
from ei_ebpf_agent.net import IPAddress

# Rows encoded together. Fewer rows pay numpy's per-call cost more often (1024: +55%
# time), more rows outgrow the CPU caches and raise peak memory (8192: +12 MB RSS for
# no gain); 4096 was the fastest measured (bench/userspace.py).
CHUNK_ROWS = 4096

_VARINT, _LEN, _I32 = 0, 2, 5
_U64 = np.uint64
_WIRE_WORD = np.dtype("<u8")  # how a word's bytes go out: byte 0 first, on any host
_NS_PER_S = _U64(1_000_000_000)
_LOW56 = _U64((1 << 56) - 1)
# _LIMITS[k]: the smallest value whose varint needs k + 1 bytes.
_LIMITS = np.array([0] + [1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)
# Continuation bits (0x80 in every byte but the last) of a varint of n bytes, for the
# first word (bytes 0-7) and the second (bytes 8-9).
_CONT_LOW = np.array(
    [sum(0x80 << (8 * b) for b in range(min(n - 1, 8))) for n in range(11)], dtype=np.uint64
)
_CONT_HIGH = np.array([0x80 if n == 10 else 0 for n in range(11)], dtype=np.uint64)
# Integers below this convert to float64 exactly (so their exponent is their bit length).
_EXACT_FLOAT = 1 << 53
_TABLES: dict[tuple[bytes, bool], tuple[np.ndarray, np.ndarray]] = {}


def _varint_tables(prefix: bytes, skip_zero: bool) -> tuple[np.ndarray, np.ndarray]:
    """By float64 exponent field of the value (0 for 0, 1022 + bit length otherwise):
    the word's fixed bits (prefix and continuation bits) and its used byte count, both
    0 for a skipped zero. Only for prefix + varint within 8 bytes."""
    key = (prefix, skip_zero)
    if key not in _TABLES:
        tag, size = int.from_bytes(prefix, "little"), len(prefix)
        head = np.zeros(1023 + 64, dtype=np.uint64)
        used = np.zeros(1023 + 64, dtype=np.uint64)
        for exponent in [0, *range(1023, 1023 + 64)]:
            bits = exponent - 1022 if exponent else 0
            if bits == 0 and skip_zero:
                continue
            count = max(1, -(-bits // 7))
            head[exponent] = (tag | int(_CONT_LOW[count]) << (8 * size)) % (1 << 64)
            used[exponent] = size + count
        _TABLES[key] = head, used
    return _TABLES[key]


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    """The tag bytes of a field (itself a varint)."""
    return _varint_bytes((field << 3) | wire_type)


def _spread(values: np.ndarray, groups: int) -> np.ndarray:
    """The low 7-bit groups of every value (at most 8), one group per byte, low first."""
    if groups <= 3:
        out = values & _U64(0x7F)
        for k in range(1, groups):
            out |= (values & _U64(0x7F << (7 * k))) << _U64(k)
        return out
    # Insert the spare bits in three halving steps (28 | 28, then 14s, then 7s).
    v = values & _LOW56
    v = (v & _U64(0x0FFFFFFF)) | ((v >> _U64(28)) << _U64(32))
    v = (v & _U64(0x00003FFF00003FFF)) | ((v & _U64(0x0FFFC0000FFFC000)) << _U64(2))
    return (v & _U64(0x007F007F007F007F)) | ((v & _U64(0x3F803F803F803F80)) << _U64(1))


class _Pieces:
    """The bytes of one message for every row, as pieces of at most 8 bytes.

    words[i]: uint64 per row (or one scalar for all rows), bytes past the used ones 0;
    used[i]: byte count per row (uint64 array or int); most[i]: the largest count.
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.words: list = []
        self.used: list = []
        self.most: list[int] = []

    def piece(self, word, used, most: int) -> None:
        if most == 0:
            return
        if self.most and self.most[-1] + most <= 8:
            previous = self.used[-1]
            shift = _U64(8 * previous) if isinstance(previous, int) else previous << _U64(3)
            self.words[-1] = self.words[-1] | (word << shift)
            self.used[-1] = previous + used
            self.most[-1] += most
        else:
            self.words.append(word)
            self.used.append(used)
            self.most.append(most)

    def extend(self, other: _Pieces) -> None:
        for word, used, most in zip(other.words, other.used, other.most):
            self.piece(word, used, most)

    def constant(self, data: bytes) -> None:
        for start in range(0, len(data), 8):
            part = data[start : start + 8]
            self.piece(_U64(int.from_bytes(part, "little")), len(part), len(part))

    def varint(self, prefix: bytes, values: np.ndarray, skip_zero: bool) -> None:
        """`prefix` (a tag) then the varint of each value; no bytes where the value is 0
        if `skip_zero` (proto3 scalars)."""
        values = values.astype(np.uint64, copy=False)  # uint64 shifts under any numpy
        top = int(values.max()) if len(values) else 0
        width = len(_varint_bytes(top))
        size = len(prefix)
        if size + width <= 8 and top < _EXACT_FLOAT:
            # One word. The varint length (and so the used count and continuation bits)
            # follows from the bit length, which is the float64 exponent field (exact
            # below 2**53): two small-table lookups instead of comparing with every
            # 7-bit limit.
            exponent = values.astype(np.float64).view(np.int64) >> 52
            head, used = _varint_tables(prefix, skip_zero)
            low = _spread(values, width) << _U64(8 * size)
            low |= head.take(exponent)
            self.piece(low, used.take(exponent), size + width)
            return
        count = np.ones(len(values), dtype=np.uint64)
        for limit in _LIMITS[1:width]:
            count += values >= limit
        low = _spread(values, min(width, 8)) | _CONT_LOW[count]
        tag = _U64(int.from_bytes(prefix, "little"))
        total = count + _U64(size)
        if skip_zero:
            present = values != 0
            tag = tag * present  # absent rows: all bytes 0 (the value is 0 there)
            total *= present
        if size + width <= 8:
            self.piece(tag | (low << _U64(8 * size)), total, size + width)
            return
        # Tag and varint span two words: bytes 0-7, then the rest (at most 8 more).
        high = low >> _U64(64 - 8 * size)
        if width > 8:
            top = values >> _U64(56)
            high |= (
                (top & _U64(0x7F)) | ((top >> _U64(7)) << _U64(8)) | _CONT_HIGH[count]
            ) << _U64(8 * size)
        first = np.minimum(total, _U64(8))
        self.piece(tag | (low << _U64(8 * size)), first, 8)
        self.piece(high, total - first, size + width - 8)

    def scalar(self, field: int, values: np.ndarray) -> None:
        """A proto3 uint32/uint64/enum field: left out where the value is 0."""
        self.varint(_key(field, _VARINT), values, True)

    def message(self, field: int, inner: _Pieces) -> None:
        """A nested message that every row has (possibly empty)."""
        self.varint(_key(field, _LEN), inner.total(), False)
        self.extend(inner)

    def total(self) -> np.ndarray:
        out = np.zeros(self.rows, dtype=np.uint64)
        for used in self.used:
            out += used
        return out

    def serialize(self) -> tuple[np.ndarray, np.ndarray]:
        """The used bytes of every row, rows one after the other, and each row's length."""
        rows = self.rows
        lengths = self.total()
        if rows == 0:
            return np.empty(0, dtype=np.uint8), lengths
        if lengths.min() < 8:  # the head rewrite below assumes it (entries are >= 12)
            raise ValueError("every row must be at least 8 bytes long")
        sizes = lengths.astype(np.int64)  # offsets are int64, the index type
        starts = np.zeros(rows, dtype=np.int64)
        np.cumsum(sizes[:-1], out=starts[1:])
        total = int(starts[-1] + sizes[-1])
        out = np.empty(total + 8, dtype=np.uint8)
        # One 8-byte store per piece at its byte offset: an array of 8-byte items that
        # start at every byte (stride 1, unaligned; "V8" copies them as plain bytes).
        # A piece's unused bytes are zeros that the next piece of its row overwrites,
        # column by column. Past a row's end they land in the next row's first 8 bytes,
        # in whatever order numpy stores a column; so those are written again, last.
        at = np.ndarray((total + 1,), dtype="V8", buffer=out, strides=(1,))
        offset = starts.copy()
        head = np.zeros(rows, dtype=np.uint64)  # each row's first 8 bytes
        in_head = True
        for word, used in zip(self.words, self.used):
            column = np.ascontiguousarray(word, dtype=_WIRE_WORD)  # shape (1,) if constant
            at[offset] = column.view("V8")
            if in_head:
                relative = offset - starts
                near = relative < 8
                in_head = bool(near.any())
                shift = (np.minimum(relative, 7) * 8).astype(np.uint64)
                head |= np.where(near, column << shift, _U64(0))
            offset += used if isinstance(used, int) else used.astype(np.int64)
        at[starts] = head.astype(_WIRE_WORD, copy=False).view("V8")
        return out[:total], lengths


def _timestamp(ns: np.ndarray, offset_ns: int) -> _Pieces:
    """google.protobuf.Timestamp{seconds = 1, nanos = 2} of monotonic ns + offset."""
    wall = ns.astype(np.uint64) + _U64(offset_ns % (1 << 64))  # wraps like int64 math
    out = _Pieces(len(ns))
    out.scalar(1, wall // _NS_PER_S)
    out.scalar(2, wall % _NS_PER_S)
    return out


def _mac_integer(macs: np.ndarray) -> np.ndarray:
    """(N, 6) bytes -> their big-endian integers."""
    padded = np.zeros((len(macs), 8), dtype=np.uint8)
    padded[:, 2:] = macs
    return padded.view(">u8")[:, 0].astype(np.uint64)


def _address(out: _Pieces, field: int, addresses: np.ndarray, is_v4: np.ndarray, is_v6) -> None:
    """Network.src_addr/dst_addr: an IP message, ipv4 or ipv6 by row, absent for non-IP.

    v4: key, 5, [0x0d, 4 bytes]; v6: key, 18, [0x12, 16, 16 bytes]. `addresses` are
    16 bytes, IPv4 ones mapped (::ffff:a.b.c.d).
    """
    halves = np.ascontiguousarray(addresses).view("<u8")  # (N, 2): bytes 0-7, 8-15
    low, high = halves[:, 0], halves[:, 1]
    # fixed32 of the host-order integer a.b.c.d: its little-endian bytes d, c, b, a.
    v4 = (high >> _U64(32)).astype(np.uint32).byteswap().astype(np.uint64)
    key = (field << 3) | _LEN
    v4_head = _U64(key | 5 << 8 | ((1 << 3) | _I32) << 16) | (v4 << _U64(24))
    v6_head = _U64(key | 18 << 8 | ((2 << 3) | _LEN) << 16 | 16 << 24) | (low << _U64(32))
    zero = _U64(0)
    out.piece(
        np.where(is_v4, v4_head, np.where(is_v6, v6_head, zero)),
        np.where(is_v4, _U64(7), np.where(is_v6, _U64(8), zero)),
        8,
    )
    out.piece(np.where(is_v6, (low >> _U64(32)) | (high << _U64(32)), zero), is_v6 * _U64(8), 8)
    out.piece(np.where(is_v6, high >> _U64(32), zero), is_v6 * _U64(4), 4)


def _ip_message(address: IPAddress) -> bytes:
    """An IP message (content only) for one address."""
    if address.version == 4:
        return _key(1, _I32) + int(address).to_bytes(4, "little")
    return _key(2, _LEN) + b"\x10" + address.packed


class _Interfaces:
    """Field 10 (string) of every distinct interface of a batch, as 8-byte pieces."""

    def __init__(self, if_index: np.ndarray, names: Mapping[int, str]) -> None:
        unique, inverse = np.unique(if_index, return_inverse=True)
        self.inverse = inverse.ravel()
        encoded = []
        for index in unique.tolist():
            name = names.get(index, "").encode()
            encoded.append(_key(10, _LEN) + _varint_bytes(len(name)) + name if name else b"")
        count = (max(len(e) for e in encoded) + 7) // 8
        self.words = np.zeros((len(unique), count), dtype=np.uint64)
        self.used = np.zeros((len(unique), count), dtype=np.uint64)
        for row, data in enumerate(encoded):
            for k in range(0, len(data), 8):
                part = data[k : k + 8]
                self.words[row, k // 8] = int.from_bytes(part, "little")
                self.used[row, k // 8] = len(part)
        self.most = [int(m) for m in self.used.max(axis=0)]

    def add(self, out: _Pieces, rows: slice) -> None:
        which = self.inverse[rows]
        for k, most in enumerate(self.most):
            out.piece(self.words[which, k], self.used[which, k], most)


def _context(batch: FlowBatch) -> tuple[_Interfaces, bytes]:
    """What every chunk of a batch shares: interface names and the agent_ip field."""
    interfaces = _Interfaces(batch.records["if_index"], batch.interfaces)
    agent = b""
    if batch.agent_ip is not None:
        content = _ip_message(batch.agent_ip)
        agent = _key(12, _LEN) + _varint_bytes(len(content)) + content
    return interfaces, agent


def _chunks(batch: FlowBatch, first: int, stop: int, context: tuple[_Interfaces, bytes]
            ) -> Iterator[np.ndarray]:
    """Encoded entries of rows [first, stop), CHUNK_ROWS at a time (bounded temporaries)."""
    for start in range(first, stop, CHUNK_ROWS):
        data, _lengths = _encode_chunk(batch, slice(start, min(start + CHUNK_ROWS, stop)),
                                       *context)
        yield data


def _encode_chunk(
    batch: FlowBatch, rows: slice, interfaces: _Interfaces, agent: bytes
) -> tuple[np.ndarray, np.ndarray]:
    rec = batch.records[rows]
    count = len(rec)
    eth = rec["eth_protocol"]
    is_v4 = eth == ETH_P_IP
    is_v6 = eth == ETH_P_IPV6

    record = _Pieces(count)
    record.scalar(1, eth)
    record.scalar(2, rec["direction"])
    record.message(3, _timestamp(rec["first_seen_ns"], batch.wall_offset_ns))
    record.message(4, _timestamp(rec["last_seen_ns"], batch.wall_offset_ns))
    data_link = _Pieces(count)
    data_link.scalar(1, _mac_integer(rec["src_mac"]))
    data_link.scalar(2, _mac_integer(rec["dst_mac"]))
    record.message(5, data_link)
    network = _Pieces(count)
    _address(network, 1, rec["src_ip"], is_v4, is_v6)
    _address(network, 2, rec["dst_ip"], is_v4, is_v6)
    network.scalar(3, rec["dscp"])
    record.message(6, network)
    transport = _Pieces(count)
    transport.scalar(1, rec["src_port"])
    transport.scalar(2, rec["dst_port"])
    transport.scalar(3, rec["protocol"])
    record.message(7, transport)
    record.scalar(8, rec["bytes"])
    record.scalar(9, rec["packets"])
    interfaces.add(record, rows)
    record.constant(agent)
    record.scalar(13, rec["tcp_flags"])
    record.scalar(14, rec["icmp_type"])
    record.scalar(15, rec["icmp_code"])
    record.scalar(29, rec["sampling"])

    entries = _Pieces(count)
    entries.message(1, record)
    return entries.serialize()


def encode_batch(batch: FlowBatch, max_flows: int) -> list[bytes]:
    """Serialized `pbflow.Records` messages of at most `max_flows` records each, in order.

    Each message is encoded on its own, so memory stays bounded by one message's worth
    of temporaries whatever the batch size.
    """
    if max_flows < 1:
        raise ValueError(f"max_flows must be at least 1, not {max_flows}")
    rows = len(batch.records)
    if rows == 0:
        return []
    context = _context(batch)
    return [b"".join(_chunks(batch, first, min(first + max_flows, rows), context))
            for first in range(0, rows, max_flows)]
