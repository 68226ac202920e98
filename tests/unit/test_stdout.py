"""The stdout exporter: one JSON line per flow, keys in a fixed order, flushed per batch."""

from __future__ import annotations

import io
import ipaddress
import json

import numpy as np

from ei_ebpf_agent.ebpf.layout import FLOW_RECORD
from ei_ebpf_agent.exporter.jsonflow import FIELDS
from ei_ebpf_agent.exporter.stdout import StdoutExporter
from ei_ebpf_agent.flow.batch import FlowBatch

WALL = 1_700_000_000_000_000_000


def mapped(address: str) -> np.ndarray:
    ip = ipaddress.ip_address(address)
    packed = ipaddress.IPv6Address(f"::ffff:{ip}").packed if ip.version == 4 else ip.packed
    return np.frombuffer(packed, np.uint8)


def three_flows() -> FlowBatch:
    """An IPv4 TCP egress flow, an IPv6 ICMPv6 ingress flow and an ARP flow."""
    rec = np.zeros(3, FLOW_RECORD)
    rec[0]["eth_protocol"], rec[0]["direction"], rec[0]["if_index"] = 0x0800, 1, 2
    rec[0]["src_ip"], rec[0]["dst_ip"] = mapped("10.0.0.1"), mapped("192.168.7.254")
    rec[0]["src_port"], rec[0]["dst_port"], rec[0]["protocol"] = 43512, 443, 6
    rec[0]["tcp_flags"], rec[0]["dscp"], rec[0]["sampling"] = 0x11B, 46, 1
    rec[0]["src_mac"] = [0x0A, 0x58, 0x0A, 0, 0, 1]
    rec[0]["dst_mac"] = [0xFF] * 6
    rec[0]["bytes"], rec[0]["packets"] = 5230, 12
    rec[0]["first_seen_ns"], rec[0]["last_seen_ns"] = 1_000, 500_001_000
    rec[1]["eth_protocol"], rec[1]["direction"], rec[1]["if_index"] = 0x86DD, 0, 3
    rec[1]["src_ip"], rec[1]["dst_ip"] = mapped("fd00::1"), mapped("2001:db8::a:b")
    rec[1]["protocol"], rec[1]["icmp_type"], rec[1]["icmp_code"] = 58, 128, 0
    rec[1]["bytes"], rec[1]["packets"] = (1 << 64) - 1, 1
    rec[2]["eth_protocol"], rec[2]["if_index"] = 0x0806, 99  # 99: no such interface
    rec[2]["bytes"], rec[2]["packets"] = 60, 1
    return FlowBatch(rec, WALL, {2: "eth0", 3: "veth1"}, ipaddress.ip_address("192.168.1.10"))


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_one_json_line_per_flow_with_fixed_keys() -> None:
    stream = CountingStream()
    exporter = StdoutExporter(stream)
    exporter.export(three_flows())
    assert stream.flushes == 1
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    flows = [json.loads(line) for line in lines]
    assert all(tuple(flow) == FIELDS for flow in flows)
    assert flows[0] == {
        "eth_protocol": 2048,
        "direction": "egress",
        "interface": "eth0",
        "src_mac": "0a:58:0a:00:00:01",
        "dst_mac": "ff:ff:ff:ff:ff:ff",
        "src_addr": "10.0.0.1",
        "dst_addr": "192.168.7.254",
        "src_port": 43512,
        "dst_port": 443,
        "protocol": 6,
        "dscp": 46,
        "icmp_type": 0,
        "icmp_code": 0,
        "tcp_flags": 0x11B,
        "bytes": 5230,
        "packets": 12,
        "time_flow_start_ns": WALL + 1_000,
        "time_flow_end_ns": WALL + 500_001_000,
        "sampling": 1,
        "agent_ip": "192.168.1.10",
    }
    assert flows[1]["direction"] == "ingress"
    assert (flows[1]["src_addr"], flows[1]["dst_addr"]) == ("fd00::1", "2001:db8::a:b")
    assert (flows[1]["icmp_type"], flows[1]["bytes"]) == (128, (1 << 64) - 1)
    assert flows[2]["eth_protocol"] == 0x0806
    assert flows[2]["src_addr"] is None and flows[2]["dst_addr"] is None
    assert flows[2]["interface"] == ""
    assert exporter.stats.exported_flows == 3


def test_empty_batch_writes_nothing() -> None:
    stream = io.StringIO()
    StdoutExporter(stream).export(
        FlowBatch(np.zeros(0, FLOW_RECORD), WALL, {}, ipaddress.ip_address("::1"))
    )
    assert stream.getvalue() == ""


def test_default_stream_is_stdout(capsys) -> None:
    exporter = StdoutExporter()
    exporter.export(three_flows())
    exporter.close(1.0)
    assert len(capsys.readouterr().out.splitlines()) == 3
