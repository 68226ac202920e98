"""Traffic from A to its peer over a Link, each generator returning its exact Expectation.

Counts are as seen on A's end of the link: A's packets are egress, the peer's are ingress.
Every generated packet is accounted for analytically (UDP, ICMP, trafgen) or, for TCP,
by the Sniffer (see truth.py); `mixed_traffic` does both and cross-checks them.
"""

from __future__ import annotations

import resource
import shutil
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .netns import Link
from .truth import (
    ETH_P_IP,
    ETH_P_IPV6,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    TCP_SYN_ACK,
    Expectation,
    FlowKey,
    Sniffer,
)

ETH_HLEN, IPV4_HLEN, IPV6_HLEN, UDP_HLEN, ICMP_HLEN = 14, 20, 40, 8, 8

# Up to ~1,000 sockets per test: lift the soft descriptor limit to the hard one.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _hard == resource.RLIM_INFINITY or _soft < _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard if _hard != resource.RLIM_INFINITY
                                                else 65536, _hard))


def _family_facts(family: int):
    if family == socket.AF_INET6:
        return ETH_P_IPV6, IPV6_HLEN
    return ETH_P_IP, IPV4_HLEN


def _endpoints(link: Link) -> Expectation:
    return Expectation(endpoints={link.local_name: (link.local_mac, link.peer_mac)})


def udp_flows(link: Link, n_flows: int = 200, packets: Callable[[int], int] = lambda i: 1 + i % 3,
              payload: Callable[[int], int] = lambda i: 18 + (i * 7) % 1000,
              family: int = socket.AF_INET, first_port: int = 20000, dst_port: int = 40000,
              replies: bool = True, dscp_flow0: int = 0, duration: float = 0.0) -> Expectation:
    """UDP flows from A (source ports first_port..+n_flows) to the peer's dst_port.

    Flow i sends packets(i) datagrams of payload(i) bytes; with replies the peer answers each
    flow with as many datagrams of payload(i)//2 + 1 bytes. Every sender port is bound and the
    peer's port is bound, so no ICMP unreachable is ever generated. With duration > 0 the
    sends are spread evenly over that many seconds (round by round). dscp_flow0 sets the
    DSCP of flow 0's datagrams from A.
    """
    eth, l3 = _family_facts(family)
    a_ip, p_ip = link.ip(family, "local"), link.ip(family, "peer")
    senders: list[socket.socket] = []
    peer = link.peer_ns.socket(family, socket.SOCK_DGRAM)
    exp = _endpoints(link)
    try:
        peer.bind((p_ip, dst_port))
        for i in range(n_flows):
            s = link.local_ns.socket(family, socket.SOCK_DGRAM)
            senders.append(s)
            s.bind((a_ip, first_port + i))
        if dscp_flow0:
            if family == socket.AF_INET6:
                senders[0].setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, dscp_flow0 << 2)
            else:
                senders[0].setsockopt(socket.IPPROTO_IP, socket.IP_TOS, dscp_flow0 << 2)
        rounds = max(packets(i) for i in range(n_flows))
        start = time.monotonic()
        for r in range(rounds):
            for i, s in enumerate(senders):
                if r >= packets(i):
                    continue
                s.sendto(b"u" * payload(i), (p_ip, dst_port))
                if replies:
                    peer.sendto(b"r" * (payload(i) // 2 + 1), (a_ip, first_port + i))
            if duration:
                # Even pacing: round r ends at start + duration * (r + 1) / rounds.
                delay = start + duration * (r + 1) / rounds - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
    finally:
        for s in senders:
            s.close()
        peer.close()
    for i in range(n_flows):
        n, size = packets(i), payload(i)
        out = FlowKey(link.local_name, "egress", eth, a_ip, p_ip, first_port + i, dst_port,
                      IPPROTO_UDP)
        exp.add(out, n, n * (ETH_HLEN + l3 + UDP_HLEN + size), n * (l3 + UDP_HLEN + size))
        exp.dscp[out] = dscp_flow0 if i == 0 else 0
        if replies:
            back = FlowKey(link.local_name, "ingress", eth, p_ip, a_ip, dst_port, first_port + i,
                           IPPROTO_UDP)
            rsize = size // 2 + 1
            exp.add(back, n, n * (ETH_HLEN + l3 + UDP_HLEN + rsize), n * (l3 + UDP_HLEN + rsize))
            exp.dscp[back] = 0
    return exp


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class TrafficError(AssertionError):
    pass


def icmp_echo(link: Link, count: int = 10, size: int = 56, family: int = socket.AF_INET,
              timeout: float = 10.0) -> Expectation:
    """`ping -c count -s size` from A to the peer, done with a raw socket (no ping needed).

    Expected: count echo requests egress (type 8 / ICMPv6 128), count replies ingress (type 0
    / 129), frames ETH + IP + 8 + size. Fails unless every reply came back.
    """
    eth, l3 = _family_facts(family)
    v6 = family == socket.AF_INET6
    proto = IPPROTO_ICMPV6 if v6 else IPPROTO_ICMP
    req_type, rep_type = (128, 129) if v6 else (8, 0)
    a_ip, p_ip = link.ip(family, "local"), link.ip(family, "peer")
    sock = link.local_ns.socket(family, socket.SOCK_RAW, proto)
    ident = 0x4549
    got = set()
    try:
        sock.bind((a_ip, 0))
        sock.settimeout(0.2)
        for seq in range(count):
            data = bytes((seq + j) & 0xFF for j in range(size))
            header = struct.pack("!BBHHH", req_type, 0, 0, ident, seq)
            if not v6:  # the kernel fills the ICMPv6 checksum for raw ICMPv6 sockets
                header = struct.pack("!BBHHH", req_type, 0, _checksum(header + data), ident, seq)
            sock.sendto(header + data, (p_ip, 0))
            time.sleep(0.005)
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            try:
                pkt = sock.recv(65535)
            except socket.timeout:
                continue
            icmp = pkt if v6 else pkt[(pkt[0] & 0x0F) * 4:]
            typ, _code, _sum, rid, seq = struct.unpack_from("!BBHHH", icmp)
            if typ == rep_type and rid == ident:
                got.add(seq)
    finally:
        sock.close()
    if len(got) != count:
        raise TrafficError(f"icmp_echo: {len(got)} of {count} echo replies came back")
    exp = _endpoints(link)
    frame = ETH_HLEN + l3 + ICMP_HLEN + size
    exp.add(FlowKey(link.local_name, "egress", eth, a_ip, p_ip, 0, 0, proto, req_type, 0),
            count, count * frame, count * (frame - ETH_HLEN))
    exp.add(FlowKey(link.local_name, "ingress", eth, p_ip, a_ip, 0, 0, proto, rep_type, 0),
            count, count * frame, count * (frame - ETH_HLEN))
    return exp


@dataclass
class TcpConnection:
    """One finished TCP connection: its two keys on A's end and the flags they must carry."""

    egress: FlowKey  # client (A) -> server (peer)
    ingress: FlowKey  # server -> client
    required_flags: dict = field(default_factory=dict)


def tcp_transfer(link: Link, nbytes: int = 1 << 20, reply: int = 4096, port: int = 5201,
                 family: int = socket.AF_INET, timeout: float = 30.0) -> TcpConnection:
    """A connection from A to a server in the peer namespace: the client sends nbytes and
    half-closes, the server answers `reply` bytes and closes. Counts are not predictable
    (segmentation, ACKs), so take them from a Sniffer running around this call."""
    eth, _ = _family_facts(family)
    a_ip, p_ip = link.ip(family, "local"), link.ip(family, "peer")
    server = link.peer_ns.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((p_ip, port))
    server.listen(1)
    server.settimeout(timeout)
    received = []
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(timeout)
                n = 0
                while True:
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        break
                    n += len(chunk)
                received.append(n)
                conn.sendall(b"s" * reply)
        except BaseException as exc:  # noqa: BLE001 - reported by the client side
            errors.append(exc)

    thread = threading.Thread(target=serve, name="tcp-server")
    thread.start()
    client = link.local_ns.socket(family, socket.SOCK_STREAM)
    try:
        client.settimeout(timeout)
        client.bind((a_ip, 0))
        client.connect((p_ip, port))
        cport = client.getsockname()[1]
        client.sendall(b"c" * nbytes)
        client.shutdown(socket.SHUT_WR)
        back = 0
        while True:
            chunk = client.recv(1 << 16)
            if not chunk:
                break
            back += len(chunk)
    finally:
        client.close()
        thread.join(timeout)
        server.close()
    if errors:
        raise TrafficError(f"tcp_transfer server failed: {errors[0]!r}")
    if received != [nbytes] or back != reply:
        raise TrafficError(f"tcp_transfer: server got {received}, client got {back} bytes")
    out = FlowKey(link.local_name, "egress", eth, a_ip, p_ip, cport, port, IPPROTO_TCP)
    inn = FlowKey(link.local_name, "ingress", eth, p_ip, a_ip, port, cport, IPPROTO_TCP)
    return TcpConnection(out, inn, {
        out: [(TCP_SYN, "SYN from the client"), (TCP_FIN | TCP_RST, "FIN or RST from the client")],
        inn: [(TCP_SYN_ACK, "SYN+ACK (0x100) from the server")],
    })


def raw_ethernet(link: Link, count: int = 4, size: int = 80, ethertype: int = 0x88B5) -> Expectation:
    """count non-IP frames of `size` bytes (EtherType 0x88B5, local experimental) from A's end
    through a packet socket (qdisc path, so TC egress sees them). Expected: one egress key with
    that EtherType, no addresses or ports, counted as whole frames."""
    sock = link.local_ns.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.bind((link.local_name, 0))
        header = mac(link.peer_mac) + mac(link.local_mac) + struct.pack("!H", ethertype)
        for n in range(count):
            sock.send(header + bytes([n & 0xFF]) * (size - ETH_HLEN))
    finally:
        sock.close()
    exp = _endpoints(link)
    key = FlowKey(link.local_name, "egress", ethertype, None, None, 0, 0, 0)
    exp.add(key, count, count * size, 0)
    return exp


def cross_check(analytic: Expectation, truth: Expectation) -> None:
    """The sniffer must agree with the analytic counts (else the harness itself is wrong)."""
    diffs = []
    for key, want in analytic.counts.items():
        got = truth.counts.get(key)
        if got is None or (got.packets, got.frame_bytes) != (want.packets, want.frame_bytes):
            diffs.append(f"  {key.short()}: analytic {want.packets} pkts/{want.frame_bytes} B, "
                         f"sniffer {got.packets if got else 0} pkts/"
                         f"{got.frame_bytes if got else 0} B")
    if diffs:
        raise TrafficError("ground truth disagrees with the analytic expectation "
                           "(traffic lost on the link?):\n" + "\n".join(diffs[:30]))


def mixed_traffic(link: Link, udp_flows_n: int = 200, tcp_bytes: int = 1 << 20) -> Expectation:
    """The standard mix: IPv4 UDP flows (one with DSCP 46), IPv6 UDP flows, ICMP and ICMPv6
    echo, non-IP frames, and one IPv4 TCP connection; every key's counts are exact and
    cross-checked against the sniffer, TCP's come from it. (Non-IP frames have no IP octets:
    drop them with `without_non_ip()` for collectors that report IP bytes.)"""
    with Sniffer(link) as sniffer:
        analytic = udp_flows(link, n_flows=udp_flows_n, dscp_flow0=46)
        analytic.merge(udp_flows(link, n_flows=20, family=socket.AF_INET6, first_port=30000))
        analytic.merge(icmp_echo(link, count=7, size=100))
        analytic.merge(icmp_echo(link, count=5, size=64, family=socket.AF_INET6))
        analytic.merge(raw_ethernet(link))
        tcp = tcp_transfer(link, nbytes=tcp_bytes)
    truth = sniffer.expectation()
    cross_check(analytic, truth)
    expected = analytic.merge(truth.restricted_to([tcp.egress, tcp.ingress]))
    expected.required_flags.update(tcp.required_flags)
    for key in (tcp.egress, tcp.ingress):
        expected.dscp[key] = 0
        if truth.counts.get(key) is None:
            raise TrafficError(f"the sniffer saw nothing of {key.short()}")
    return expected


# -- trafgen ---------------------------------------------------------------------------------

def udp_frame(link: Link, sport: int, dport: int, payload: bytes) -> bytes:
    """A complete Ethernet/IPv4/UDP frame from A to the peer, with correct checksums."""
    src, dst = socket.inet_aton(link.local_ip4), socket.inet_aton(link.peer_ip4)
    udp_len = UDP_HLEN + len(payload)
    ip_hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, IPV4_HLEN + udp_len, 0x1234, 0x4000, 64,
                         IPPROTO_UDP, 0, src, dst)
    ip_hdr = ip_hdr[:10] + struct.pack("!H", _checksum(ip_hdr)) + ip_hdr[12:]
    pseudo = src + dst + struct.pack("!BBH", 0, IPPROTO_UDP, udp_len)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    csum = _checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    return mac(link.peer_mac) + mac(link.local_mac) + struct.pack("!H", ETH_P_IP) + ip_hdr + udp


def trafgen_udp(link: Link, count: int = 1000, payload_len: int = 300, sport: int = 21000,
                dport: int = 40000, timeout: float = 60.0) -> Expectation:
    """trafgen (mmap TX ring: only the Ethernet header is linear) sends `count` copies of
    one UDP frame out of A's end. `-q` keeps the qdisc path, so TC egress sees them."""
    if shutil.which("trafgen") is None:
        raise FileNotFoundError("trafgen (netsniff-ng) is not installed")
    frame = udp_frame(link, sport, dport, bytes(range(256)) * (payload_len // 256)
                      + bytes(payload_len % 256))
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as cfg:
        cfg.write("{ " + ", ".join(f"0x{b:02x}" for b in frame) + " }\n")
    done = link.local_ns.run(["trafgen", "-o", link.local_name, "-i", cfg.name, "-n", str(count),
                              "-q", "-P", "1", "-C", "-Q"], check=False,
                             timeout=timeout, cwd=tempfile.gettempdir())  # it drops files in cwd
    if done.returncode != 0:
        raise TrafficError(f"trafgen failed ({done.returncode}): {done.stderr.strip()}")
    exp = _endpoints(link)
    key = FlowKey(link.local_name, "egress", ETH_P_IP, link.local_ip4, link.peer_ip4, sport,
                  dport, IPPROTO_UDP)
    exp.add(key, count, count * len(frame), count * (len(frame) - ETH_HLEN))
    exp.dscp[key] = 0
    return exp


def trafgen_udp_flows_on_cpus(link: Link, n_flows: int, rounds: int, cpus: int = 2,
                              sport: int = 22000, dport: int = 40000,
                              timeout: float = 120.0) -> None:
    """trafgen on `cpus` CPUs at once (`-P`), each process sending the same `n_flows` UDP
    flows (source ports sport.. in order) `rounds` times from A's end: the first packets
    of a flow reach the agent on several CPUs at nearly the same moment. Returns nothing:
    how trafgen splits the count over its processes is its business; the Sniffer says
    what went out."""
    if shutil.which("trafgen") is None:
        raise FileNotFoundError("trafgen (netsniff-ng) is not installed")
    config = (f"{{ eth(da={link.peer_mac}, sa={link.local_mac}), "
              f"ipv4(sa={link.local_ip4}, da={link.peer_ip4}), "
              f"udp(sp=dinc({sport}, {sport + n_flows - 1}), dp={dport}), fill(0, 32) }}\n")
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as cfg:
        cfg.write(config)
    done = link.local_ns.run(["trafgen", "-o", link.local_name, "-i", cfg.name,
                              "-n", str(cpus * n_flows * rounds), "-q", "-P", str(cpus),
                              "-C", "-Q"], check=False, timeout=timeout,
                             cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise TrafficError(f"trafgen failed ({done.returncode}): {done.stderr.strip()}")


def mac(text: str) -> bytes:
    """"aa:bb:cc:dd:ee:ff" -> 6 bytes."""
    return bytes.fromhex(text.replace(":", ""))
