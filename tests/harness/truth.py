"""Ground truth: what the agent must report, per flow key, as exact packet and byte counts.

Two independent sources: the traffic generators compute expectations analytically (UDP,
ICMP: header sizes are known), and `Sniffer`, an AF_PACKET socket on the peer's veth end,
records every frame (TCP, whose segmentation is not predictable). The sniffer sees the
peer end, which is A's end with directions swapped.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from .netns import Link

ETH_P_ALL = 0x0003
ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
SOL_PACKET, PACKET_STATISTICS = 263, 6
PACKET_OUTGOING = 4
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58

# TCP flags as the wire record reports them (WIRE.md).
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
TCP_SYN_ACK = 0x100


class FlowKey(NamedTuple):
    """A flow as seen on one of A's interfaces. Addresses are canonical text (IPv4 unmapped)."""

    interface: str
    direction: str  # "ingress" | "egress"
    eth_protocol: int
    src_addr: str | None
    dst_addr: str | None
    src_port: int
    dst_port: int
    protocol: int
    icmp_type: int = 0
    icmp_code: int = 0

    def short(self) -> str:
        proto = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6"}.get(self.protocol, self.protocol)
        where = f"{self.interface}/{self.direction}"
        if self.protocol in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            return (f"{where} {proto} {self.src_addr} > {self.dst_addr} "
                    f"type {self.icmp_type} code {self.icmp_code}")
        return (f"{where} {proto} {self.src_addr}:{self.src_port} > "
                f"{self.dst_addr}:{self.dst_port} (eth 0x{self.eth_protocol:04x})")


@dataclass
class Counts:
    packets: int = 0
    frame_bytes: int = 0  # whole Ethernet frame, as TC sees skb->len
    ip_bytes: int = 0  # IP total length (IPv6: 40 + payload length)

    def add(self, packets: int, frame_bytes: int, ip_bytes: int) -> None:
        self.packets += packets
        self.frame_bytes += frame_bytes
        self.ip_bytes += ip_bytes

    def bytes(self, measure: str) -> int:
        return self.frame_bytes if measure == "frame" else self.ip_bytes


@dataclass
class Expectation:
    """Expected counts per FlowKey, plus facts for the field checks.

    endpoints: interface -> (A's MAC, peer's MAC) of the link.
    required_flags: key -> list of (any-of mask, what it means) the OR of TCP flags must hit.
    dscp: key -> DSCP value the flow was sent with (0 when absent).
    """

    counts: dict[FlowKey, Counts] = field(default_factory=dict)
    endpoints: dict[str, tuple[str, str]] = field(default_factory=dict)
    required_flags: dict[FlowKey, list[tuple[int, str]]] = field(default_factory=dict)
    dscp: dict[FlowKey, int] = field(default_factory=dict)

    def add(self, key: FlowKey, packets: int, frame_bytes: int, ip_bytes: int) -> None:
        self.counts.setdefault(key, Counts()).add(packets, frame_bytes, ip_bytes)

    def merge(self, other: Expectation) -> Expectation:
        for key, c in other.counts.items():
            self.add(key, c.packets, c.frame_bytes, c.ip_bytes)
        self.endpoints.update(other.endpoints)
        for key, flags in other.required_flags.items():
            self.required_flags.setdefault(key, []).extend(flags)
        self.dscp.update(other.dscp)
        return self

    def restricted_to(self, keys: Iterable[FlowKey]) -> Expectation:
        keys = set(keys)
        out = Expectation(endpoints=dict(self.endpoints))
        out.counts = {k: Counts(c.packets, c.frame_bytes, c.ip_bytes)
                      for k, c in self.counts.items() if k in keys}
        out.required_flags = {k: list(v) for k, v in self.required_flags.items() if k in keys}
        out.dscp = {k: v for k, v in self.dscp.items() if k in keys}
        return out

    def without_non_ip(self) -> Expectation:
        """Only the IPv4/IPv6 keys (for transports that carry IP flows only)."""
        return self.restricted_to(k for k in self.counts if k.eth_protocol in (ETH_P_IP,
                                                                               ETH_P_IPV6))

    @property
    def total_packets(self) -> int:
        return sum(c.packets for c in self.counts.values())

    def __len__(self) -> int:
        return len(self.counts)


def canonical_addr(addr) -> str | None:
    """Text form used in keys: IPv4-mapped IPv6 becomes IPv4, IPv6 compressed; None stays."""
    if addr is None or addr == "":
        return None
    ip = ipaddress.ip_address(addr)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


# -- frame parsing (the sniffer's view) ------------------------------------------------------

def parse_frame(frame: bytes) -> tuple[int, str | None, str | None, int, int, int, int, int,
                                       int, int]:
    """(eth_protocol, src, dst, sport, dport, proto, icmp_type, icmp_code, ip_bytes, tcp_flags)
    of the first bytes of a frame; unknown fields are zero/None."""
    off = 12
    (eth_type,) = struct.unpack_from("!H", frame, off)
    off += 2
    while eth_type in (ETH_P_8021Q, ETH_P_8021AD) and len(frame) >= off + 4:
        (eth_type,) = struct.unpack_from("!H", frame, off + 2)
        off += 4
    src = dst = None
    sport = dport = proto = itype = icode = ip_bytes = flags = 0
    if eth_type == ETH_P_IP and len(frame) >= off + 20:
        ihl = (frame[off] & 0x0F) * 4
        (ip_bytes,) = struct.unpack_from("!H", frame, off + 2)
        proto = frame[off + 9]
        src = str(ipaddress.IPv4Address(frame[off + 12:off + 16]))
        dst = str(ipaddress.IPv4Address(frame[off + 16:off + 20]))
        l4 = off + ihl
    elif eth_type == ETH_P_IPV6 and len(frame) >= off + 40:
        (plen,) = struct.unpack_from("!H", frame, off + 4)
        ip_bytes = 40 + plen
        proto = frame[off + 6]
        src = str(ipaddress.IPv6Address(frame[off + 8:off + 24]))
        dst = str(ipaddress.IPv6Address(frame[off + 24:off + 40]))
        l4 = off + 40  # the test traffic has no extension headers
    else:
        return eth_type, None, None, 0, 0, 0, 0, 0, 0, 0
    if proto in (IPPROTO_TCP, IPPROTO_UDP) and len(frame) >= l4 + 4:
        sport, dport = struct.unpack_from("!HH", frame, l4)
        if proto == IPPROTO_TCP and len(frame) >= l4 + 14:
            flags = frame[l4 + 13]
    elif proto in (IPPROTO_ICMP, IPPROTO_ICMPV6) and len(frame) >= l4 + 2:
        itype, icode = frame[l4], frame[l4 + 1]
    return eth_type, src, dst, sport, dport, proto, itype, icode, ip_bytes, flags


class SnifferDropped(AssertionError):
    pass


class Sniffer:
    """Records every frame on the peer end of a link, as A's end sees it (directions swapped).

    with Sniffer(link) as sniffer: <traffic>; then sniffer.expectation() (after the with
    block, which waits until the link has been quiet and checks PACKET_STATISTICS: any
    frame the socket dropped fails the test, since the truth would be incomplete).
    """

    def __init__(self, link: Link, rcvbuf: int = 64 << 20, quiet: float = 0.5) -> None:
        self.link = link
        self.rcvbuf = rcvbuf
        self.quiet = quiet
        self.frames: list[tuple[str, int, tuple]] = []  # (A's direction, frame len, parsed)
        self.tcp_flags: dict[FlowKey, int] = {}
        self.drops = 0
        self.seen = 0
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_frame = time.monotonic()

    def __enter__(self):
        # Protocol 0 receives nothing until bind() names the interface and ETH_P_ALL.
        sock = self.link.peer_ns.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        sock.setsockopt(socket.SOL_SOCKET, 33, self.rcvbuf)  # SO_RCVBUFFORCE
        sock.bind((self.link.peer_name, ETH_P_ALL))
        self._sock = sock
        self._stats()  # reading resets the kernel's counters; start from zero
        self.seen = self.drops = 0
        self._thread = threading.Thread(target=self._loop, name="sniffer", daemon=True)
        self._thread.start()
        return self

    def _stats(self) -> tuple[int, int]:
        raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8) if self._sock else b""
        if not raw:
            return 0, 0
        packets, drops = struct.unpack("II", raw)
        self.seen += packets
        self.drops += drops
        return packets, drops

    def _loop(self) -> None:
        buf = bytearray(256)  # headers only; MSG_TRUNC returns the real frame length
        sock = self._sock
        while not self._stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.05)
            if not ready:
                continue
            while True:
                try:
                    n, addr = sock.recvfrom_into(buf, 0, socket.MSG_TRUNC | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                # The peer's outgoing frames are A's ingress, and vice versa.
                direction = "ingress" if addr[2] == PACKET_OUTGOING else "egress"
                self.frames.append((direction, n, parse_frame(bytes(buf[:min(n, 256)]))))
                self._last_frame = time.monotonic()

    def wait_quiet(self, timeout: float = 10.0) -> None:
        """Wait until no frame arrived for `quiet` seconds (trailing ACKs/FINs included)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if time.monotonic() - self._last_frame >= self.quiet:
                return
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        try:
            self.wait_quiet()
        finally:
            self._stop.set()
            self._thread.join()
            self._stats()
            self._sock.close()
        if exc[0] is None and self.drops:
            raise SnifferDropped(f"the ground-truth sniffer on {self.link.peer_name} dropped "
                                 f"{self.drops} of {self.seen} frames; its counts are incomplete")

    def expectation(self) -> Expectation:
        """Every frame seen, as counts per FlowKey on A's end (TCP flags OR-ed per key)."""
        exp = Expectation(endpoints={self.link.local_name: (self.link.local_mac,
                                                            self.link.peer_mac)})
        self.tcp_flags = {}
        for direction, length, parsed in self.frames:
            eth, src, dst, sport, dport, proto, itype, icode, ip_bytes, flags = parsed
            key = FlowKey(self.link.local_name, direction, eth, src, dst, sport, dport, proto,
                          itype, icode)
            exp.add(key, 1, length, ip_bytes)
            if proto == IPPROTO_TCP:
                self.tcp_flags[key] = self.tcp_flags.get(key, 0) | flags
        return exp
