"""The one JSON shape of a flow, printed by the stdout exporter and by the collector.

One flow per line, one flat JSON object, keys always present and always in this order:

| key | type | meaning |
| --- | --- | --- |
| eth_protocol | int | EtherType (2048 = IPv4, 34525 = IPv6, ...) |
| direction | string | "ingress" or "egress" (the number if neither) |
| interface | string | interface name ("" when unknown) |
| src_mac, dst_mac | string | "aa:bb:cc:dd:ee:ff" |
| src_addr, dst_addr | string or null | "10.0.0.1", "fd00::1"; null for non-IP flows |
| src_port, dst_port | int | 0 when the protocol has no ports |
| protocol | int | IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...) |
| dscp | int | DSCP of the flow's packets |
| icmp_type, icmp_code | int | ICMP/ICMPv6 type and code, 0 otherwise |
| tcp_flags | int | OR of TCP flags (FIN 0x01 .. CWR 0x80; 0x100/0x200/0x400: SYN/FIN/RST+ACK) |
| bytes | int | bytes of whole frames (Ethernet header included) |
| packets | int | packets |
| time_flow_start_ns, time_flow_end_ns | int | first/last packet, wall clock, ns since epoch |
| sampling | int | sampling rate in force (0 or 1: every packet) |
| agent_ip | string or null | address of the host running the agent |

Example:

    {"eth_protocol":2048,"direction":"egress","interface":"eth0","src_mac":"0a:58:0a:00:00:01",
     "dst_mac":"0a:58:0a:00:00:02","src_addr":"10.0.0.1","dst_addr":"10.0.0.2","src_port":43512,
     "dst_port":443,"protocol":6,"dscp":0,"icmp_type":0,"icmp_code":0,"tcp_flags":27,
     "bytes":5230,"packets":12,"time_flow_start_ns":1700000000123456789,
     "time_flow_end_ns":1700000000623456789,"sampling":0,"agent_ip":"192.168.1.10"}

(on one line). `batch_lines` builds it from a FlowBatch, `record_line` from a received
pbflow Record; both give the same line for the same flow.
"""

from __future__ import annotations

import functools
import ipaddress
import json

import numpy as np

from ei_ebpf_agent.ebpf.layout import (
    ETH_P_IP,
    ETH_P_IPV6,
    FLOW_DIRECTION_EGRESS,
    FLOW_DIRECTION_INGRESS,
)
from ei_ebpf_agent.flow.batch import FlowBatch
from ei_ebpf_agent.pbflow import flow_pb2

FIELDS = (
    "eth_protocol",
    "direction",
    "interface",
    "src_mac",
    "dst_mac",
    "src_addr",
    "dst_addr",
    "src_port",
    "dst_port",
    "protocol",
    "dscp",
    "icmp_type",
    "icmp_code",
    "tcp_flags",
    "bytes",
    "packets",
    "time_flow_start_ns",
    "time_flow_end_ns",
    "sampling",
    "agent_ip",
)

# The kernel's direction numbers, which pbflow's Direction enum shares (pbwire copies them).
_DIRECTIONS = {FLOW_DIRECTION_INGRESS: '"ingress"', FLOW_DIRECTION_EGRESS: '"egress"'}

# Filled with text already in JSON form: faster than json.dumps of a dict per flow, and
# the one place that fixes the key order.
_TEMPLATE = "{{" + ",".join(f'"{name}":{{}}' for name in FIELDS) + "}}"


@functools.lru_cache(maxsize=4096)
def _json_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _quoted(text: str | None) -> str:
    """An address or MAC (plain ASCII) as a JSON string, or null."""
    return "null" if text is None else f'"{text}"'


def _line(
    eth: int, direction: int, interface: str, src_mac: str, dst_mac: str,
    src_addr: str | None, dst_addr: str | None, src_port: int, dst_port: int, protocol: int,
    dscp: int, icmp_type: int, icmp_code: int, tcp_flags: int, n_bytes: int, packets: int,
    start_ns: int, end_ns: int, sampling: int, agent_ip: str | None,
) -> str:  # fmt: skip
    return _TEMPLATE.format(
        eth, _DIRECTIONS.get(direction, direction), _json_string(interface),
        _quoted(src_mac), _quoted(dst_mac), _quoted(src_addr), _quoted(dst_addr),
        src_port, dst_port, protocol, dscp, icmp_type, icmp_code, tcp_flags, n_bytes, packets,
        start_ns, end_ns, sampling, _quoted(agent_ip),
    )  # fmt: skip


def _macs(macs: np.ndarray) -> list[str]:
    raw = np.ascontiguousarray(macs).tobytes()
    return [raw[i : i + 6].hex(":") for i in range(0, len(raw), 6)]


def _addresses(addresses: np.ndarray, eth: np.ndarray) -> list:
    """Text of each 16-byte (IPv4-mapped for IPv4) address; None for non-IP flows."""
    raw = np.ascontiguousarray(addresses).tobytes()
    out: list = [None] * len(eth)
    for row, kind in enumerate(eth.tolist()):
        if kind == ETH_P_IP:
            a, b, c, d = raw[row * 16 + 12 : row * 16 + 16]
            out[row] = f"{a}.{b}.{c}.{d}"
        elif kind == ETH_P_IPV6:
            out[row] = str(ipaddress.IPv6Address(raw[row * 16 : row * 16 + 16]))
    return out


def batch_lines(batch: FlowBatch) -> list[str]:
    """One JSON line (without newline) per flow of the batch, in order."""
    rec = batch.records
    if len(rec) == 0:
        return []
    eth = rec["eth_protocol"]
    offset = batch.wall_offset_ns
    agent = str(batch.agent_ip) if batch.agent_ip is not None else None
    columns = zip(
        eth.tolist(),
        rec["direction"].tolist(),
        batch.interface_names().tolist(),
        _macs(rec["src_mac"]),
        _macs(rec["dst_mac"]),
        _addresses(rec["src_ip"], eth),
        _addresses(rec["dst_ip"], eth),
        rec["src_port"].tolist(),
        rec["dst_port"].tolist(),
        rec["protocol"].tolist(),
        rec["dscp"].tolist(),
        rec["icmp_type"].tolist(),
        rec["icmp_code"].tolist(),
        rec["tcp_flags"].tolist(),
        rec["bytes"].tolist(),
        rec["packets"].tolist(),
        [ns + offset for ns in rec["first_seen_ns"].tolist()],
        [ns + offset for ns in rec["last_seen_ns"].tolist()],
        rec["sampling"].tolist(),
    )
    return [_line(*values, agent) for values in columns]


def _ip_text(ip: flow_pb2.IP) -> str | None:
    family = ip.WhichOneof("ip_family")
    if family == "ipv4":
        return str(ipaddress.IPv4Address(ip.ipv4))
    if family == "ipv6":
        if len(ip.ipv6) == 16:
            return str(ipaddress.IPv6Address(ip.ipv6))
        return ip.ipv6.hex()  # malformed, but still shown rather than dropped
    return None


def _mac_text(value: int) -> str:
    return (value & 0xFFFF_FFFF_FFFF).to_bytes(6, "big").hex(":")


def _timestamp_ns(stamp) -> int:
    return stamp.seconds * 1_000_000_000 + stamp.nanos


def record_line(record: flow_pb2.Record) -> str:
    """The JSON line (without newline) of one received pbflow Record."""
    network, transport = record.network, record.transport
    return _line(
        record.eth_protocol,
        record.direction,
        record.interface,
        _mac_text(record.data_link.src_mac),
        _mac_text(record.data_link.dst_mac),
        _ip_text(network.src_addr),
        _ip_text(network.dst_addr),
        transport.src_port,
        transport.dst_port,
        transport.protocol,
        network.dscp,
        record.icmp_type,
        record.icmp_code,
        record.flags,
        record.bytes,
        record.packets,
        _timestamp_ns(record.time_flow_start),
        _timestamp_ns(record.time_flow_end),
        record.sampling,
        _ip_text(record.agent_ip) if record.HasField("agent_ip") else None,
    )
