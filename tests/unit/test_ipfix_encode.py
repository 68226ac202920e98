"""The IPFIX encoder, judged by independent decoders: tshark's dissector and nfdump."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from harness.ipfix_collectors import (
    Nfcapd,
    nfdump_flow,
    synthetic_batch,
    tools_missing,
    tshark_flow,
    tshark_records,
)

from ei_ebpf_agent.exporter.ipfix_encode import (
    MIN_MESSAGE_SIZE,
    TEMPLATE_IPV4,
    TEMPLATE_IPV6,
    TEMPLATE_NON_IP,
    IpfixEncoder,
    encode_batch,
)

needs_tshark = pytest.mark.skipif(tools_missing("tshark") is not None,
                                  reason=str(tools_missing("tshark")))
needs_nfdump = pytest.mark.skipif(tools_missing("nfcapd", "nfdump") is not None,
                                  reason=str(tools_missing("nfcapd", "nfdump")))

NOW_NS = time.time_ns() // 1_000_000 * 1_000_000
MONO_NS = 5_000_000_000_000  # a monotonic clock reading; wall = mono + offset
OFFSET_NS = NOW_NS - MONO_NS

FLOWS = [
    {"src_ip": "10.1.0.1", "dst_ip": "10.1.0.2", "eth_protocol": 0x0800, "protocol": 6,
         "src_port": 40000, "dst_port": 5201, "direction": 1, "if_index": 7, "packets": 12, "bytes": 12 * 1514,
         "ip_bytes": 12 * 1500, "first_seen_ns": MONO_NS - 3_000_000_000,
         "last_seen_ns": MONO_NS - 1_000_000_000, "tcp_flags": 0x112 | 0x01, "dscp": 46, "sampling": 0,
         "src_mac": "02:00:00:00:00:01", "dst_mac": "02:00:00:00:00:02"},
    {"src_ip": "10.1.0.2", "dst_ip": "10.1.0.1", "eth_protocol": 0x0800, "protocol": 17,
         "src_port": 53, "dst_port": 33333, "direction": 0, "if_index": 7, "packets": 3, "bytes": 3 * 142,
         "ip_bytes": 3 * 128, "first_seen_ns": MONO_NS - 2_000_000_000, "last_seen_ns": MONO_NS,
         "sampling": 1, "src_mac": "02:00:00:00:00:02", "dst_mac": "02:00:00:00:00:01"},
    {"src_ip": "10.1.0.1", "dst_ip": "10.1.0.2", "eth_protocol": 0x0800, "protocol": 1, "icmp_type": 8,
         "icmp_code": 0, "direction": 1, "if_index": 7, "packets": 4, "bytes": 4 * 98, "ip_bytes": 4 * 84,
         "first_seen_ns": MONO_NS - 500_000_000, "last_seen_ns": MONO_NS - 100_000_000},
    {"src_ip": "fd00:1::1", "dst_ip": "fd00:1::2", "eth_protocol": 0x86DD, "protocol": 6,
         "src_port": 41000, "dst_port": 443, "direction": 1, "if_index": 9, "packets": 5, "bytes": 5 * 1514,
         "ip_bytes": 5 * 1500, "first_seen_ns": MONO_NS - 2_500_000_000,
         "last_seen_ns": MONO_NS - 1_500_000_000, "tcp_flags": 0x18, "dscp": 10,
         "src_mac": "02:00:00:00:01:01", "dst_mac": "02:00:00:00:01:02"},
    {"src_ip": "fd00:1::2", "dst_ip": "fd00:1::1", "eth_protocol": 0x86DD, "protocol": 58,
         "icmp_type": 129, "icmp_code": 0, "direction": 0, "if_index": 9, "packets": 2, "bytes": 2 * 118,
         "ip_bytes": 2 * 104, "first_seen_ns": MONO_NS - 900_000_000, "last_seen_ns": MONO_NS},
]
ARP = {"eth_protocol": 0x0806, "direction": 0, "if_index": 7, "packets": 2, "bytes": 2 * 42,
           "first_seen_ns": MONO_NS - 100_000_000, "last_seen_ns": MONO_NS - 100_000_000,
           "src_mac": "02:00:00:00:00:02", "dst_mac": "ff:ff:ff:ff:ff:ff"}


def expected(flow: dict) -> dict:
    """What a collector must report for one of FLOWS."""
    return {
        "src_addr": flow["src_ip"], "dst_addr": flow["dst_ip"],
        "src_port": flow.get("src_port", 0), "dst_port": flow.get("dst_port", 0),
        "protocol": flow["protocol"], "packets": flow["packets"],
        "bytes": flow["ip_bytes"],  # IP-layer octets, not the frame
        "direction": "ingress" if flow["direction"] == 0 else "egress",
        "if_index": flow["if_index"],
        "icmp_type": flow.get("icmp_type", 0), "icmp_code": flow.get("icmp_code", 0),
        "tcp_flags": flow.get("tcp_flags", 0) & 0xFF,
        "dscp": flow.get("dscp", 0),
        "src_mac": flow.get("src_mac", "00:00:00:00:00:00"),
        "dst_mac": flow.get("dst_mac", "00:00:00:00:00:00"),
        "time_flow_start_ns": flow["first_seen_ns"] + OFFSET_NS,
        "time_flow_end_ns": flow["last_seen_ns"] + OFFSET_NS,
    }


def pick(flow: dict, keys) -> dict:
    return {k: flow[k] for k in keys}


def by_addresses(flows):
    return {(f["src_addr"], f["dst_addr"], f["protocol"]): f for f in flows}


@needs_tshark
def test_tshark_decodes_every_field_of_ipv4_and_ipv6_flows():
    batch = synthetic_batch(FLOWS + [ARP], OFFSET_NS)
    records = tshark_records(encode_batch(batch))
    flows = [tshark_flow(r, {}) for r in records]
    assert len(flows) == len(FLOWS) + 1
    got = by_addresses(flows)
    for flow in FLOWS:
        want = expected(flow)
        assert pick(got[(flow["src_ip"], flow["dst_ip"], flow["protocol"])], want) == want
    # The frame bytes ride along as layer2OctetDeltaCount; sampling 0 is reported as 1.
    for record, flow in zip(sorted(flows, key=lambda f: f["packets"]),
                            sorted(FLOWS + [ARP], key=lambda f: f["packets"])):
        assert record["frame_bytes"] == flow["bytes"]
        assert record["sampling"] == max(flow.get("sampling", 0), 1)
    arp = [f for f in flows if f["eth_protocol"] == 0x0806]
    assert len(arp) == 1 and arp[0]["packets"] == 2 and arp[0]["src_addr"] is None
    assert {r["template_id"] for r in records} == {TEMPLATE_IPV4, TEMPLATE_IPV6, TEMPLATE_NON_IP}


@needs_nfdump
def test_nfdump_reads_exact_counts_addresses_ports_and_protocol():
    batch = synthetic_batch(FLOWS + [ARP], OFFSET_NS)
    nfcapd = Nfcapd().start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for message in encode_batch(batch, observation_domain_id=42):
                sock.sendto(message, (nfcapd.host, nfcapd.port))
        time.sleep(0.3)
        nfcapd.stop()
        records = nfcapd.records()
        log = nfcapd.log()
    finally:
        nfcapd.cleanup()
    flows = [nfdump_flow(r, {}) for r in records]
    got = by_addresses(flows)
    keys = ("src_addr", "dst_addr", "protocol", "packets", "bytes", "direction", "if_index",
            "icmp_type", "icmp_code", "tcp_flags", "dscp", "src_mac", "dst_mac",
            "time_flow_start_ns", "time_flow_end_ns")
    for flow in FLOWS:
        want = expected(flow)
        if flow["protocol"] in (6, 17):
            keys_here = keys + ("src_port", "dst_port")
        else:
            keys_here = keys
        assert pick(got[(flow["src_ip"], flow["dst_ip"], flow["protocol"])], keys_here) == \
            pick(want, keys_here)
    assert sum(f["packets"] for f in flows) == sum(f["packets"] for f in FLOWS) + ARP["packets"]
    assert "Observation domain 42" in log
    assert "Sequence Errors: 0" in log


def many_flows(n: int, seed: int = 1) -> list:
    rng = np.random.default_rng(seed)
    flows = []
    for i in range(n):
        v6 = i % 3 == 0
        flows.append({
            "src_ip": f"fd00::{i + 1:x}" if v6 else f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
            "dst_ip": "fd00::ffff" if v6 else "10.255.255.254",
            "eth_protocol": 0x86DD if v6 else 0x0800, "protocol": 17, "src_port": 1024 + i % 60000,
            "dst_port": 9000, "direction": i % 2, "if_index": 3,
            "packets": int(rng.integers(1, 1000)), "bytes": 0, "ip_bytes": int(rng.integers(28, 10**9)),
            "first_seen_ns": MONO_NS - 1_000_000_000, "last_seen_ns": MONO_NS})
    return flows


@needs_tshark
@pytest.mark.parametrize("max_size", [MIN_MESSAGE_SIZE, 1400, 9000])
def test_messages_fit_the_size_limit_and_sequence_numbers_count_records(max_size):
    flows = many_flows(700)
    encoder = IpfixEncoder(observation_domain_id=7, max_message_size=max_size)
    messages = [encoder.templates()] + encoder.encode(synthetic_batch(flows, OFFSET_NS))
    assert max(len(m) for m in messages) <= max_size
    records = tshark_records(messages)
    assert len(records) == len(flows)
    assert sum(int(r["cflow.packets"]) for r in records) == sum(f["packets"] for f in flows)
    assert sum(int(r["cflow.octets"]) for r in records) == sum(f["ip_bytes"] for f in flows)
    assert {r["domain"] for r in records} == {7}
    # RFC 7011: a message's sequence number = data records sent before it in the session.
    first_of_message = {}
    for n, record in enumerate(records):
        first_of_message.setdefault(record["message"], (n, record["sequence"]))
    assert all(seq == n for n, seq in first_of_message.values())
    assert encoder.sequence == len(flows)


def test_a_full_size_tcp_message_holds_as_many_records_as_fit():
    flows = [f for f in many_flows(2000) if f["eth_protocol"] == 0x0800]
    encoder = IpfixEncoder(max_message_size=65535)
    messages = encoder.encode(synthetic_batch(flows, OFFSET_NS))
    record_len = (len(messages[0]) - 20) // ((65535 - 20) // 83)
    assert record_len == 83
    assert len(messages[0]) == 20 + (65535 - 20) // 83 * 83
    assert sum((len(m) - 20) // 83 for m in messages) == len(flows)


def test_sequence_number_wraps_at_2_to_the_32():
    encoder = IpfixEncoder(max_message_size=512)
    encoder.sequence = 2**32 - 3
    messages = encoder.encode(synthetic_batch(many_flows(20), OFFSET_NS))
    sequences = [int.from_bytes(m[8:12], "big") for m in messages]
    assert sequences[0] == 2**32 - 3
    assert encoder.sequence == 17
    assert all(s < 2**32 for s in sequences)


def test_message_size_below_one_template_set_is_refused():
    with pytest.raises(ValueError, match="max message size"):
        IpfixEncoder(max_message_size=MIN_MESSAGE_SIZE - 1)


def test_empty_batch_gives_no_data_message():
    encoder = IpfixEncoder()
    assert encoder.encode(synthetic_batch([], OFFSET_NS)) == []
    assert encoder.sequence == 0
