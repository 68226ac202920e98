"""The bulk numpy encoder against a plain protobuf-API reference, byte for byte."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest

from ei_ebpf_agent.ebpf.layout import FLOW_RECORD
from ei_ebpf_agent.exporter import pbwire
from ei_ebpf_agent.flow.batch import FlowBatch
from ei_ebpf_agent.pbflow import flow_pb2

WALL_OFFSET_NS = 1_700_000_000_123_456_789
INTERFACES = {1: "eth0", 2: "veth-a1b2c3d4e5", 3: "lo", 7: "a-very-long-interface-name-0123456789"}


def reference(batch: FlowBatch) -> flow_pb2.Records:
    """The same batch built flow by flow with the protobuf Python API."""
    out = flow_pb2.Records()
    for row in batch.records:
        rec = out.entries.add()
        rec.eth_protocol = int(row["eth_protocol"])
        rec.direction = int(row["direction"])
        for stamp, ns in (
            (rec.time_flow_start, row["first_seen_ns"]),
            (rec.time_flow_end, row["last_seen_ns"]),
        ):
            seconds, nanos = divmod(int(ns) + batch.wall_offset_ns, 1_000_000_000)
            stamp.SetInParent()
            stamp.seconds, stamp.nanos = seconds, nanos
        rec.data_link.SetInParent()
        rec.data_link.src_mac = int.from_bytes(bytes(row["src_mac"]), "big")
        rec.data_link.dst_mac = int.from_bytes(bytes(row["dst_mac"]), "big")
        rec.network.SetInParent()
        for ip, raw in (
            (rec.network.src_addr, row["src_ip"]),
            (rec.network.dst_addr, row["dst_ip"]),
        ):
            if row["eth_protocol"] == 0x0800:
                ip.ipv4 = int(ipaddress.IPv6Address(bytes(raw)).ipv4_mapped)
            elif row["eth_protocol"] == 0x86DD:
                ip.ipv6 = bytes(raw)
        rec.network.dscp = int(row["dscp"])
        rec.transport.SetInParent()
        rec.transport.src_port = int(row["src_port"])
        rec.transport.dst_port = int(row["dst_port"])
        rec.transport.protocol = int(row["protocol"])
        rec.bytes = int(row["bytes"])
        rec.packets = int(row["packets"])
        rec.interface = batch.interfaces.get(int(row["if_index"]), "")
        if batch.agent_ip.version == 4:
            rec.agent_ip.ipv4 = int(batch.agent_ip)
        else:
            rec.agent_ip.ipv6 = batch.agent_ip.packed
        rec.flags = int(row["tcp_flags"])
        rec.icmp_type = int(row["icmp_type"])
        rec.icmp_code = int(row["icmp_code"])
        rec.sampling = int(row["sampling"])
    return out


def random_records(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random flows: every byte random, then the fields whose range matters set on purpose."""
    raw = rng.integers(0, 256, (n, FLOW_RECORD.itemsize), dtype=np.uint8)
    rec = raw.view(FLOW_RECORD).ravel().copy()
    rec["eth_protocol"] = rng.choice([0x0800, 0x86DD, 0x0806, 0x88CC, 0, 0xFFFF], n)
    v4 = rec["eth_protocol"] == 0x0800
    rec["src_ip"][v4, :12] = [0] * 10 + [0xFF, 0xFF]
    rec["dst_ip"][v4, :12] = [0] * 10 + [0xFF, 0xFF]
    rec["direction"] = rng.integers(0, 2, n)
    rec["if_index"] = rng.choice([1, 2, 3, 7, 99], n)  # 99: unknown, no name
    # Monotonic times within what a Timestamp (int64 seconds) can hold after the offset.
    rec["first_seen_ns"] = rng.integers(0, 1 << 62, n, dtype=np.uint64)
    rec["last_seen_ns"] = rec["first_seen_ns"] + rng.integers(0, 1 << 40, n, dtype=np.uint64)
    # Counters of every varint length, up to the 10-byte ones.
    for name in ("bytes", "packets"):
        bits = rng.integers(0, 65, n)
        rec[name] = rng.integers(0, 1 << 63, n, dtype=np.uint64) >> (64 - bits).astype(np.uint64)
    if n < 4:
        return rec
    rec["bytes"][:4] = [0, 1, (1 << 64) - 1, 1 << 63]
    rec["packets"][:4] = [(1 << 64) - 1, 0, 127, 128]
    # Zero and maximum values of every small field in the first rows.
    for name in (
        "src_port",
        "dst_port",
        "protocol",
        "tcp_flags",
        "dscp",
        "icmp_type",
        "icmp_code",
        "sampling",
        "src_mac",
        "dst_mac",
    ):
        rec[name][0] = 0
        rec[name][1] = np.iinfo(rec[name].dtype).max if rec[name].ndim == 1 else 0xFF
    return rec


def make_batch(records: np.ndarray, agent_ip: str = "10.1.2.3") -> FlowBatch:
    return FlowBatch(records, WALL_OFFSET_NS, INTERFACES, ipaddress.ip_address(agent_ip))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("agent_ip", ["10.1.2.3", "0.0.0.0", "fd00::1:2"])
def test_encoding_is_byte_identical_to_protobuf(seed: int, agent_ip: str, monkeypatch) -> None:
    # 3000 rows in chunks of 1024: the joins between chunks are checked too.
    monkeypatch.setattr(pbwire, "CHUNK_ROWS", 1024)
    batch = make_batch(random_records(np.random.default_rng(seed), 3000), agent_ip)
    (message,) = pbwire.encode_batch(batch, max_flows=10_000)
    expected = reference(batch)
    parsed = flow_pb2.Records.FromString(message)
    assert len(parsed.entries) == len(batch)
    for got, want in zip(parsed.entries, expected.entries):
        assert got == want
    assert message == expected.SerializeToString(deterministic=True)


@pytest.mark.parametrize("seed", range(2))
def test_big_endian_records_encode_to_the_same_bytes(seed: int) -> None:
    # As on a big-endian host (s390x, flows_bpfeb.o): the kernel writes the same values
    # with every multi-byte field big-endian; the wire bytes must not change.
    native = random_records(np.random.default_rng(seed), 3000)
    big = native.astype(FLOW_RECORD.newbyteorder(">"))
    assert big["bytes"].dtype == np.dtype(">u8") and big["if_index"].dtype == np.dtype(">u4")
    assert big["eth_protocol"].dtype == np.dtype(">u2") and big.tobytes() != native.tobytes()
    (message,) = pbwire.encode_batch(make_batch(big), max_flows=10_000)
    assert message == reference(make_batch(native)).SerializeToString(deterministic=True)


def test_ipv4_address_is_host_order_integer() -> None:
    rec = np.zeros(1, FLOW_RECORD)
    rec["eth_protocol"] = 0x0800
    rec["src_ip"] = np.frombuffer(ipaddress.IPv6Address("::ffff:10.0.0.1").packed, np.uint8)
    rec["dst_ip"] = np.frombuffer(ipaddress.IPv6Address("::ffff:192.168.1.254").packed, np.uint8)
    (message,) = pbwire.encode_batch(make_batch(rec), max_flows=1)
    network = flow_pb2.Records.FromString(message).entries[0].network
    assert network.src_addr.ipv4 == 0x0A000001
    assert network.dst_addr.ipv4 == 0xC0A801FE


def test_non_ip_flow_has_no_addresses() -> None:
    rec = np.zeros(1, FLOW_RECORD)
    rec["eth_protocol"] = 0x0806
    rec["src_ip"] = 7
    (message,) = pbwire.encode_batch(make_batch(rec), max_flows=1)
    entry = flow_pb2.Records.FromString(message).entries[0]
    assert entry.eth_protocol == 0x0806
    assert not entry.network.HasField("src_addr")
    assert not entry.network.HasField("dst_addr")


@pytest.mark.parametrize(
    "n, max_flows", [(1, 1), (10, 3), (10, 10), (40_000, 10_000), (20_001, 7000)]
)
def test_split_into_messages_of_at_most_max_flows(n: int, max_flows: int) -> None:
    rec = random_records(np.random.default_rng(n), n)
    batch = make_batch(rec)
    messages = pbwire.encode_batch(batch, max_flows)
    sizes = [len(flow_pb2.Records.FromString(m).entries) for m in messages]
    assert sizes == [max_flows] * (n // max_flows) + ([n % max_flows] if n % max_flows else [])
    # In order: the messages together are the whole batch.
    first_rows = np.cumsum([0] + sizes[:-1])
    for message, row in zip(messages, first_rows):
        entry = flow_pb2.Records.FromString(message).entries[0]
        assert entry.bytes == int(rec["bytes"][row])
        assert (
            entry.time_flow_start.ToNanoseconds() == int(rec["first_seen_ns"][row]) + WALL_OFFSET_NS
        )


def test_empty_batch_gives_no_message() -> None:
    assert pbwire.encode_batch(make_batch(np.zeros(0, FLOW_RECORD)), 10) == []


def test_max_flows_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_flows"):
        pbwire.encode_batch(make_batch(np.zeros(1, FLOW_RECORD)), 0)


@pytest.mark.parametrize("word_order", ["<u8", ">u8"])  # ">u8": a big-endian host's words
@pytest.mark.parametrize("seed", range(5))
def test_rows_are_joined_exactly_whatever_their_pieces(seed: int, word_order: str) -> None:
    # Pieces are stored 8 bytes at a time: the unused bytes of a row's last pieces
    # (8 of them for an empty last piece) run into the next row and must not survive.
    rng = np.random.default_rng(seed)
    rows, columns = 500, 12
    used = rng.integers(0, 9, (rows, columns))
    used[:, -3:] = rng.integers(0, 2, (rows, 3))  # short and empty pieces at row ends
    used[:, 0] = np.maximum(used[:, 0], 8 - used[:, 1:].sum(axis=1).clip(max=8))  # >= 8
    data = rng.integers(1, 256, (rows, columns, 8), dtype=np.uint8)
    data[np.arange(8) >= used[:, :, None]] = 0  # a word's bytes past its used ones are 0
    pieces = pbwire._Pieces(rows)
    for column in range(columns):
        pieces.words.append(data[:, column].copy().view("<u8").ravel().astype(word_order))
        pieces.used.append(used[:, column].astype(np.uint64))
        pieces.most.append(8)
    expected = b"".join(bytes(data[r, c, : used[r, c]]) for r in range(rows)
                        for c in range(columns))
    data, lengths = pieces.serialize()
    assert data.tobytes() == expected
    assert lengths.tolist() == used.sum(axis=1).tolist()


def test_rows_shorter_than_one_word_are_refused() -> None:
    pieces = pbwire._Pieces(2)
    pieces.piece(np.array([1, 2], dtype=np.uint64), np.array([1, 1], dtype=np.uint64), 1)
    with pytest.raises(ValueError, match="at least 8 bytes"):
        pieces.serialize()
