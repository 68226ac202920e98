"""Bulk RFC 7011 (IPFIX) encoding of a FlowBatch: numpy in, ready-to-send messages out.

Each template has fixed-length fields only, so a data record is one row of a packed
big-endian numpy structured array; a batch becomes one array per template, filled
column by column, and is then cut into messages that fit `max_message_size`. No Python
object is made per flow; the per-message work is one header and one slice.

Templates (IANA information elements; docs/ipfix.md lists them with their meaning):
256 IPv4 flows, 257 IPv6 flows, 258 non-IP flows (counted under their EtherType).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ei_ebpf_agent.ebpf.layout import (
    ETH_P_IP,
    ETH_P_IPV6,
    FLOW_DIRECTION_EGRESS,
    FLOW_DIRECTION_INGRESS,
)
from ei_ebpf_agent.flow.batch import FlowBatch

IPFIX_VERSION = 10
MESSAGE_HEADER_LEN = 16
SET_HEADER_LEN = 4
TEMPLATE_SET_ID = 2
MAX_MESSAGE_LEN = 65535  # the header's length field is 16 bits

TEMPLATE_IPV4 = 256
TEMPLATE_IPV6 = 257
TEMPLATE_NON_IP = 258

IPPROTO_TCP = 6

# Private Enterprise Number for fields IANA does not define (RTT, DNS, drops: later).
# 32473 is the PEN that RFC 5612 reserves for documentation: a placeholder to replace
# with the project's registered PEN before any enterprise element is emitted.
PLACEHOLDER_PEN = 32473

# IANA element id -> (name, numpy big-endian format). Lengths follow from the format.
ELEMENTS = {
    1: ("octetDeltaCount", ">u8"),
    2: ("packetDeltaCount", ">u8"),
    4: ("protocolIdentifier", "u1"),
    5: ("ipClassOfService", "u1"),
    6: ("tcpControlBits", ">u2"),
    7: ("sourceTransportPort", ">u2"),
    8: ("sourceIPv4Address", "4u1"),
    10: ("ingressInterface", ">u4"),
    11: ("destinationTransportPort", ">u2"),
    12: ("destinationIPv4Address", "4u1"),
    14: ("egressInterface", ">u4"),
    27: ("sourceIPv6Address", "16u1"),
    28: ("destinationIPv6Address", "16u1"),
    32: ("icmpTypeCodeIPv4", ">u2"),
    56: ("sourceMacAddress", "6u1"),
    61: ("flowDirection", "u1"),
    80: ("destinationMacAddress", "6u1"),
    139: ("icmpTypeCodeIPv6", ">u2"),
    152: ("flowStartMilliseconds", ">u8"),
    153: ("flowEndMilliseconds", ">u8"),
    256: ("ethernetType", ">u2"),
    305: ("samplingPacketInterval", ">u4"),
    352: ("layer2OctetDeltaCount", ">u8"),
}
_ID_BY_NAME = {name: element_id for element_id, (name, _fmt) in ELEMENTS.items()}

_COMMON_HEAD = ("octetDeltaCount", "layer2OctetDeltaCount", "packetDeltaCount",
                "flowStartMilliseconds", "flowEndMilliseconds")
_COMMON_TAIL = ("ingressInterface", "egressInterface", "samplingPacketInterval",
                "flowDirection", "sourceMacAddress", "destinationMacAddress")
_TRANSPORT = ("sourceTransportPort", "destinationTransportPort", "protocolIdentifier",
              "tcpControlBits", "ipClassOfService")

# Template id -> field names, in record order.
TEMPLATES = {
    TEMPLATE_IPV4: _COMMON_HEAD + ("sourceIPv4Address", "destinationIPv4Address") + _TRANSPORT
    + ("icmpTypeCodeIPv4",) + _COMMON_TAIL,
    TEMPLATE_IPV6: _COMMON_HEAD + ("sourceIPv6Address", "destinationIPv6Address") + _TRANSPORT
    + ("icmpTypeCodeIPv6",) + _COMMON_TAIL,
    # Non-IP frames have no IP-layer octets: octetDeltaCount is absent, and
    # layer2OctetDeltaCount carries the frame bytes.
    TEMPLATE_NON_IP: ("layer2OctetDeltaCount", "packetDeltaCount", "flowStartMilliseconds",
                      "flowEndMilliseconds", "ethernetType") + _COMMON_TAIL,
}


def _record_dtype(fields: Sequence[str]) -> np.dtype:
    # A list-of-tuples dtype is packed (no alignment padding), as IPFIX records are.
    return np.dtype([(name, ELEMENTS[_ID_BY_NAME[name]][1]) for name in fields])


RECORD_DTYPES = {template_id: _record_dtype(fields) for template_id, fields in TEMPLATES.items()}

_HEADER = np.dtype([("version", ">u2"), ("length", ">u2"), ("export_time", ">u4"),
                    ("sequence", ">u4"), ("domain", ">u4"), ("set_id", ">u2"),
                    ("set_length", ">u2")])


def template_set() -> bytes:
    """One Template Set with every template (RFC 7011 section 3.4.1)."""
    body = bytearray()
    for template_id, fields in TEMPLATES.items():
        body += np.array([template_id, len(fields)], ">u2").tobytes()
        for name in fields:
            element_id = _ID_BY_NAME[name]
            length = np.dtype(ELEMENTS[element_id][1]).itemsize
            body += np.array([element_id, length], ">u2").tobytes()
    header = np.array([TEMPLATE_SET_ID, SET_HEADER_LEN + len(body)], ">u2").tobytes()
    return header + bytes(body)


_TEMPLATE_SET = template_set()
MIN_MESSAGE_SIZE = max(MESSAGE_HEADER_LEN + len(_TEMPLATE_SET),
                       MESSAGE_HEADER_LEN + SET_HEADER_LEN
                       + max(d.itemsize for d in RECORD_DTYPES.values()))


def _message_header(length: int, export_time: int, sequence: int, domain: int) -> bytes:
    return np.array([(IPFIX_VERSION, length, export_time, sequence & 0xFFFFFFFF, domain, 0, 0)],
                    _HEADER).tobytes()[:MESSAGE_HEADER_LEN]


def _ms(ns: np.ndarray, offset_ns: int) -> np.ndarray:
    # Monotonic ns + (wall - monotonic) offset -> wall-clock ms since the epoch.
    return (ns.astype(np.int64) + np.int64(offset_ns)) // 1_000_000


def _ipv4(addresses: np.ndarray) -> np.ndarray:
    return addresses[:, 12:16]  # IPv4-mapped ::ffff:a.b.c.d


def fill_records(template_id: int, rows: np.ndarray, wall_offset_ns: int) -> np.ndarray:
    """FLOW_RECORD rows -> packed big-endian data records of `template_id`."""
    out = np.empty(len(rows), RECORD_DTYPES[template_id])
    names = out.dtype.names
    if "octetDeltaCount" in names:
        out["octetDeltaCount"] = rows["ip_bytes"]  # RFC 7012: IP header + payload
    out["layer2OctetDeltaCount"] = rows["bytes"]  # the whole frame, as pbflow `bytes`
    out["packetDeltaCount"] = rows["packets"]
    out["flowStartMilliseconds"] = _ms(rows["first_seen_ns"], wall_offset_ns)
    out["flowEndMilliseconds"] = _ms(rows["last_seen_ns"], wall_offset_ns)
    direction = rows["direction"]
    if_index = rows["if_index"]
    out["ingressInterface"] = np.where(direction == FLOW_DIRECTION_INGRESS, if_index, 0)
    out["egressInterface"] = np.where(direction == FLOW_DIRECTION_EGRESS, if_index, 0)
    out["samplingPacketInterval"] = np.maximum(rows["sampling"], 1)  # 0 means every packet
    out["flowDirection"] = direction  # IANA: 0 ingress, 1 egress, as the kernel's
    out["sourceMacAddress"] = rows["src_mac"]
    out["destinationMacAddress"] = rows["dst_mac"]
    if template_id == TEMPLATE_NON_IP:
        out["ethernetType"] = rows["eth_protocol"]
        return out
    if template_id == TEMPLATE_IPV4:
        out["sourceIPv4Address"] = _ipv4(rows["src_ip"])
        out["destinationIPv4Address"] = _ipv4(rows["dst_ip"])
        icmp = "icmpTypeCodeIPv4"
    else:
        out["sourceIPv6Address"] = rows["src_ip"]
        out["destinationIPv6Address"] = rows["dst_ip"]
        icmp = "icmpTypeCodeIPv6"
    protocol = rows["protocol"]
    out["sourceTransportPort"] = rows["src_port"]
    out["destinationTransportPort"] = rows["dst_port"]
    out["protocolIdentifier"] = protocol
    # Low 8 bits are the TCP header flags; 0x100.. are pbflow's combined-flag extras.
    out["tcpControlBits"] = np.where(protocol == IPPROTO_TCP, rows["tcp_flags"] & 0xFF, 0)
    out["ipClassOfService"] = rows["dscp"].astype(np.uint8) << 2  # DSCP is the upper 6 bits
    out[icmp] = (rows["icmp_type"].astype(np.uint16) << 8) | rows["icmp_code"]
    return out


def split_by_template(records: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(template id, FLOW_RECORD rows) for every template that has rows, in id order."""
    eth = records["eth_protocol"]
    is_v4 = eth == ETH_P_IP
    is_v6 = eth == ETH_P_IPV6
    parts = [(TEMPLATE_IPV4, is_v4), (TEMPLATE_IPV6, is_v6), (TEMPLATE_NON_IP, ~(is_v4 | is_v6))]
    out = []
    for template_id, mask in parts:
        rows = records if mask.all() else records[mask]
        if len(rows):
            out.append((template_id, rows))
    return out


@dataclass
class IpfixEncoder:
    """Encoder state of one transport session: the sequence number.

    RFC 7011: the sequence number of a message is the number of data records sent in
    this session before it (mod 2**32); template-only messages do not advance it.
    """

    observation_domain_id: int = 1
    max_message_size: int = 1400
    sequence: int = 0

    def __post_init__(self) -> None:
        if not MIN_MESSAGE_SIZE <= self.max_message_size <= MAX_MESSAGE_LEN:
            raise ValueError(f"IPFIX max message size {self.max_message_size} outside "
                             f"{MIN_MESSAGE_SIZE}..{MAX_MESSAGE_LEN}")
        if not 0 <= self.observation_domain_id <= 0xFFFFFFFF:
            raise ValueError(f"IPFIX observation domain id {self.observation_domain_id} is not "
                             "a 32-bit unsigned integer")

    def templates(self, export_time: int | None = None) -> bytes:
        """A message with the template set (sent first, then refreshed on UDP)."""
        export_time = int(time.time()) if export_time is None else export_time
        length = MESSAGE_HEADER_LEN + len(_TEMPLATE_SET)
        return _message_header(length, export_time, self.sequence,
                               self.observation_domain_id) + _TEMPLATE_SET

    def encode(self, batch: FlowBatch, export_time: int | None = None) -> list[bytes]:
        """Data messages for every flow of `batch`; advances the sequence number."""
        export_time = int(time.time()) if export_time is None else export_time
        messages: list[bytes] = []
        for template_id, rows in split_by_template(batch.records):
            records = fill_records(template_id, rows, batch.wall_offset_ns)
            messages += self._cut(template_id, records, export_time)
        return messages

    def _cut(self, template_id: int, records: np.ndarray, export_time: int) -> list[bytes]:
        size = records.dtype.itemsize
        per_message = (self.max_message_size - MESSAGE_HEADER_LEN - SET_HEADER_LEN) // size
        count = len(records)
        starts = np.arange(0, count, per_message, dtype=np.int64)
        n_records = np.minimum(per_message, count - starts)
        headers = np.empty(len(starts), _HEADER)
        headers["version"] = IPFIX_VERSION
        headers["length"] = MESSAGE_HEADER_LEN + SET_HEADER_LEN + n_records * size
        headers["export_time"] = export_time
        headers["sequence"] = (self.sequence + starts) & 0xFFFFFFFF
        headers["domain"] = self.observation_domain_id
        headers["set_id"] = template_id
        headers["set_length"] = SET_HEADER_LEN + n_records * size
        self.sequence = (self.sequence + count) & 0xFFFFFFFF
        head = headers.tobytes()
        body = records.tobytes()
        step = _HEADER.itemsize
        chunk = per_message * size
        return [head[i * step:(i + 1) * step] + body[i * chunk:(i + 1) * chunk]
                for i in range(len(starts))]


def encode_batch(batch: FlowBatch, max_message_size: int = 1400,
                 observation_domain_id: int = 1) -> list[bytes]:
    """Template message then data messages of one batch, as a fresh session (for bench)."""
    encoder = IpfixEncoder(observation_domain_id, max_message_size)
    return [encoder.templates()] + encoder.encode(batch)
