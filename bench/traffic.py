"""UDP traffic from namespace A to B with trafgen, and B's packet counter.

trafgen runs with `-q` (through the qdisc layer: its default PACKET_QDISC_BYPASS would
skip TC egress) and `-t 0` (sendto() instead of the mmap TX ring: TX-ring frames have
only the Ethernet header in the linear area, which no socket sender produces, so the
agent would be measured on its slow bpf_skb_load_bytes path). One process (`-P 1`),
so every packet's whole path (send, veth, receive) runs on one CPU.

B has a UDP socket bound to the destination port that is never read: packets go
through the whole receive path, are dropped at the full socket buffer, and B sends no
ICMP port-unreachable back.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

from pyroute2 import IPRoute

DST_PORT = 9
PAYLOAD = 18  # 14 + 20 + 8 + 18 = 60-byte frames (64 on the wire with the FCS)


def hot_flows(topo, count: int) -> str:
    """`count` UDP 5-tuples cycling over source ports 10000.. (same addresses)."""
    return _config(topo, f"ipv4(sa={topo.ip4_a}, da={topo.ip4_b})",
                   f"sp=dinc(10000, {10000 + count - 1})")


def new_flows(topo, first: int) -> str:
    """Every packet a new flow: the source address counts up from 10.0.0.0 + `first`."""
    base = 10 << 24 | first
    sa = ".".join(str(base >> s & 0xFF) for s in (24, 16, 8, 0))
    return _config(topo, f"ipv4(sa={sa}, sa=dinc(), da={topo.ip4_b})", "sp=10000")


def _config(topo, ipv4: str, sport: str) -> str:
    return (f"{{ eth(da={topo.mac_b}, sa={topo.mac_a}), {ipv4}, "
            f"udp({sport}, dp={DST_PORT}), fill(0, {PAYLOAD}) }}")


def _trafgen(topo, count: int, *extra: str) -> list:
    return topo.a.argv(["trafgen", "-o", topo.veth_a, "-q", "-t", "0", "-P", "1", "-C",
                        *extra, "-n", str(count), "-i", "-"])


def send(topo, config: str, count: int) -> None:
    """Send exactly `count` packets and return when they are sent."""
    done = subprocess.run(_trafgen(topo, count), input=config, capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"trafgen failed ({done.returncode}): {done.stderr.strip()}")


class Flood:
    """trafgen sending without end while the `with` block runs."""

    def __init__(self, topo, config: str) -> None:
        self.topo, self.config = topo, config

    def __enter__(self) -> Flood:
        # Own session: trafgen's parent does not pass SIGINT to its sending child.
        self.proc = subprocess.Popen(_trafgen(self.topo, 0, "-H"), stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.proc.stdin.write(self.config.encode())
        self.proc.stdin.close()
        return self

    def __exit__(self, *exc) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"trafgen stopped ({self.proc.returncode}): "
                               f"{self.proc.stderr.read().decode().strip()}")


class Receiver:
    """B's sink socket and exact packet counter (rx_packets of B's veth end)."""

    def __init__(self, topo) -> None:
        self.topo = topo
        self.sock = topo.b.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.bind((topo.ip4_b, DST_PORT))
        self.ipr = IPRoute(netns=topo.b.name)

    def rx_packets(self) -> int:
        link = self.ipr.get_links(self.topo.ifindex_b)[0]
        return link.get_attr("IFLA_STATS64")["rx_packets"]

    def rate(self, seconds: float) -> float:
        """Packets per second received over the next `seconds`."""
        first, start = self.rx_packets(), time.monotonic()
        time.sleep(seconds)
        last, end = self.rx_packets(), time.monotonic()
        return (last - first) / (end - start)

    def close(self) -> None:
        self.ipr.close()
        self.sock.close()
