"""Independent IPFIX decoders for the tests: tshark's dissector and nfdump's nfcapd.

Nothing here shares code with the agent's encoder; what these tools report is what a
real collector would see.

- `tshark_records(messages)`: writes the messages as UDP datagrams into a pcap and decodes
  it with `tshark -d udp.port==P,cflow -T json`; returns one dict per data record with the
  dissector's fields plus the message header (sequence, domain, template id).
- `Nfcapd`: nfcapd listening on a UDP port (optionally inside a namespace), rotating files
  every 2 s; `records()` reads the finished files with `nfdump -o json`.
- `TsharkIpfixCollector` / `NfcapdIpfixCollector`: the harness Collector interface
  (collectors.py) over UDP or TCP, with flows() normalized like the JSON exporter's records
  and byte_measure "ip" (IPFIX octetDeltaCount carries IP-layer octets).

nfcapd (nfdump 1.7) has no TCP listener: for ipfix+tcp a small relay accepts the
connection, cuts the stream at each message's length field and forwards every message to
nfcapd as one UDP datagram. The relay does not look inside the message.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Callable

from .collectors import Collector, normalize
from .netns import terminate_group

TSHARK_PORT = 4739  # the IANA IPFIX port; only a label inside the pcap
_ETH_P_IP, _ETH_P_IPV6 = 0x0800, 0x86DD


def tools_missing(*tools: str) -> str | None:
    """A skip reason naming the missing commands (with their Debian package), or None."""
    packages = {"tshark": "tshark", "nfcapd": "nfdump", "nfdump": "nfdump",
                "prometheus": "prometheus"}
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return None
    return (f"{', '.join(missing)} not installed (apt-get install "
            f"{' '.join(sorted({packages.get(t, t) for t in missing}))})")


# --- pcap + tshark --------------------------------------------------------------------------

def _ipv4_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def write_pcap(path: str, messages: Sequence[bytes], port: int = TSHARK_PORT) -> None:
    """One IPv4/UDP datagram per message (127.0.0.1 -> 127.0.0.1:port), LINKTYPE_RAW."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 0xFFFF, 101))
        for n, message in enumerate(messages):
            udp = struct.pack("!HHHH", 40000, port, 8 + len(message), 0) + message
            ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), n & 0xFFFF, 0,
                                       64, 17, 0, b"\x7f\0\0\1", b"\x7f\0\0\1"))
            ip[10:12] = struct.pack("!H", _ipv4_checksum(bytes(ip)))
            packet = bytes(ip) + udp
            f.write(struct.pack("<IIII", n, 0, len(packet), len(packet)) + packet)


def _pairs(items: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in items:
        out.setdefault(key, value)  # keep the first of duplicate keys
    return out


def tshark_records(messages: Sequence[bytes], port: int = TSHARK_PORT) -> list[dict]:
    """Every data record tshark decodes from `messages`, in order, as a flat dict of its
    cflow.* fields plus `sequence`, `domain`, `export_time`, `template_id`, `message`
    (index of the message)."""
    if not messages:
        return []
    with tempfile.TemporaryDirectory(prefix="ei-ipfix-") as tmp:
        pcap = os.path.join(tmp, "ipfix.pcap")
        write_pcap(pcap, messages, port)
        env = dict(os.environ, TZ="UTC")
        done = subprocess.run(["tshark", "-n", "-r", pcap, "-d", f"udp.port=={port},cflow",
                               "-T", "json"], capture_output=True, text=True, env=env, check=False,
                              timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"tshark failed ({done.returncode}): {done.stderr[-2000:]}")
    packets = json.loads(done.stdout or "[]", object_pairs_hook=_pairs)
    records = []
    for index, packet in enumerate(packets):
        cflow = packet["_source"]["layers"].get("cflow")
        if cflow is None:
            continue
        header = {"message": index, "sequence": int(cflow["cflow.sequence"]),
                  "domain": int(cflow["cflow.od_id"]),
                  "export_time": int(cflow["cflow.timestamp_tree"]["cflow.exporttime"])}
        for set_name, flow_set in cflow.items():
            if not set_name.startswith("Set ") or not isinstance(flow_set, dict):
                continue
            template_id = int(flow_set["cflow.flowset_id"])
            for flow_name, flow in flow_set.items():
                if flow_name.startswith("Flow ") and isinstance(flow, dict):
                    record = dict(header, template_id=template_id)
                    record.update(_flatten(flow))
                    records.append(record)
    return records


def tshark_template_messages(messages: Sequence[bytes], port: int = TSHARK_PORT) -> list[int]:
    """Indexes of the messages tshark sees a template set in."""
    with tempfile.TemporaryDirectory(prefix="ei-ipfix-") as tmp:
        pcap = os.path.join(tmp, "ipfix.pcap")
        write_pcap(pcap, messages, port)
        done = subprocess.run(["tshark", "-n", "-r", pcap, "-d", f"udp.port=={port},cflow",
                               "-Y", "cflow.template_id", "-T", "fields", "-e", "frame.number"],
                              capture_output=True, text=True, timeout=120, check=False)
    return [int(line) - 1 for line in done.stdout.split()]


def _flatten(tree: dict) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value))
        else:
            out[key] = value
    return out


def _tshark_time_ns(text: str) -> int:
    # "Nov 26, 2026 13:20:19.351000000 UTC" (TZ=UTC) -> ns since the epoch
    stamp, _, _zone = text.rpartition(" ")
    whole, _, frac = stamp.partition(".")
    moment = dt.datetime.strptime(whole, "%b %d, %Y %H:%M:%S").replace(tzinfo=dt.timezone.utc)
    return int(moment.timestamp()) * 1_000_000_000 + int((frac + "000000000")[:9])


def tshark_flow(record: dict, interfaces: Mapping[int, str]) -> dict:
    """A tshark record -> the harness's normalized flow dict."""
    direction = int(record.get("cflow.direction", 0))
    if_index = int(record.get("cflow.inputint" if direction == 0 else "cflow.outputint", 0))
    if "cflow.srcaddr" in record:
        eth, src, dst = _ETH_P_IP, record["cflow.srcaddr"], record["cflow.dstaddr"]
    elif "cflow.srcaddrv6" in record:
        eth, src, dst = _ETH_P_IPV6, record["cflow.srcaddrv6"], record["cflow.dstaddrv6"]
    else:
        eth, src, dst = int(record.get("cflow.ethernet_type", 0)), None, None
    if "cflow.icmp_type_code_ipv4" in record:
        code = int(record["cflow.icmp_type_code_ipv4"], 16)
        icmp_type, icmp_code = code >> 8, code & 0xFF
    else:
        icmp_type = int(record.get("cflow.icmp_ipv6_type", 0))
        icmp_code = int(record.get("cflow.icmp_ipv6_code", 0))
    flow = {
        "interface": interfaces.get(if_index, str(if_index)),
        "if_index": if_index,
        "direction": "ingress" if direction == 0 else "egress",
        "eth_protocol": eth,
        "src_addr": src, "dst_addr": dst,
        "src_port": int(record.get("cflow.srcport", 0)),
        "dst_port": int(record.get("cflow.dstport", 0)),
        "protocol": int(record.get("cflow.protocol", 0)),
        "icmp_type": icmp_type, "icmp_code": icmp_code,
        "packets": int(record["cflow.packets"]),
        "bytes": int(record.get("cflow.octets", 0)),
        "frame_bytes": int(record.get("cflow.layer2_octet_delta_count", 0)),
        "src_mac": record.get("cflow.srcmac"), "dst_mac": record.get("cflow.dstmac"),
        "tcp_flags": int(record.get("cflow.tcpflags", "0"), 16),
        "dscp": int(record.get("cflow.tos", "0"), 16) >> 2,
        "sampling": int(record.get("cflow.sampling_packet_interval", 0)),
        "time_flow_start_ns": _tshark_time_ns(record["cflow.abstimestart"]),
        "time_flow_end_ns": _tshark_time_ns(record["cflow.abstimeend"]),
    }
    return normalize(flow)


# --- nfcapd / nfdump --------------------------------------------------------------------------

class Nfcapd:
    """nfcapd on host:port (UDP), files in a temporary directory, rotated every 2 s.

    `popen` runs the command (default: subprocess.Popen; pass a namespace's popen to run
    it inside that namespace).
    """

    ROTATE = 2  # seconds

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 popen: Callable[..., subprocess.Popen] | None = None) -> None:
        self.host = host
        self.port = port or _free_udp_port(host)
        self._popen = popen or subprocess.Popen
        self.dir = tempfile.mkdtemp(prefix="ei-nfcapd-")
        self._log = tempfile.NamedTemporaryFile("w+", prefix="ei-nfcapd-", suffix=".log")  # noqa: SIM115
        self.proc: subprocess.Popen | None = None

    def start(self) -> Nfcapd:
        argv = ["nfcapd", "-b", self.host, "-p", str(self.port), "-w", self.dir,
                "-t", str(self.ROTATE), "-B", str(8 << 20)]
        self.proc = self._popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=dict(os.environ, TZ="UTC"))
        deadline = time.monotonic() + 10
        while "Startup" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"nfcapd did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        with open(self._log.name) as f:
            return f.read()

    def files(self) -> list[str]:
        return sorted(f for f in glob.glob(os.path.join(self.dir, "nfcapd.*"))
                      if ".current." not in f)

    def records(self) -> list[dict]:
        """Every flow in the finished files (nfdump -o json)."""
        records = []
        for path in self.files():
            done = subprocess.run(["nfdump", "-r", path, "-o", "json"], capture_output=True,
                                  text=True, timeout=60, env=dict(os.environ, TZ="UTC"),
                                  check=False)
            if done.returncode != 0:
                raise AssertionError(f"nfdump -r {path} failed: {done.stderr[-2000:]}")
            text = done.stdout.strip()
            if "No matching flows" in text:  # nfdump's "JSON" for an empty file
                continue
            if text.startswith("["):
                records += json.loads(text)
        return records

    def flush(self) -> None:
        """Wait for the current file to be rotated, so that records() has everything."""
        time.sleep(self.ROTATE + 0.5)

    def stop(self) -> None:
        """SIGTERM: nfcapd writes its last file and exits."""
        terminate_group(self.proc)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        self._log.close()


def _nfdump_time_ns(text: str) -> int:
    # "2026-11-26T13:20:29.199" (TZ=UTC) -> ns since the epoch
    moment = dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=dt.timezone.utc)
    return round(moment.timestamp() * 1000) * 1_000_000


_NFDUMP_FLAGS = "CEUAPRSF"  # nfdump prints flags as "...A..S." in this bit order (MSB first)


def nfdump_flow(record: dict, interfaces: Mapping[int, str]) -> dict:
    """An nfdump JSON record -> the harness's normalized flow dict."""
    direction = int(record.get("direction", 0))
    if_index = int(record.get("input_snmp" if direction == 0 else "output_snmp", 0))
    if "src4_addr" in record:
        eth, src, dst = _ETH_P_IP, record["src4_addr"], record["dst4_addr"]
    elif "src6_addr" in record:
        eth, src, dst = _ETH_P_IPV6, record["src6_addr"], record["dst6_addr"]
    else:
        eth, src, dst = 0, None, None
    flags_text = record.get("tcp_flags", "........")
    tcp_flags = sum(1 << (7 - i) for i, c in enumerate(flags_text) if c != ".")
    flow = {
        "interface": interfaces.get(if_index, str(if_index)),
        "if_index": if_index,
        "direction": "ingress" if direction == 0 else "egress",
        "eth_protocol": eth,
        "src_addr": src, "dst_addr": dst,
        "src_port": int(record.get("src_port", 0)),
        "dst_port": int(record.get("dst_port", 0)),
        "protocol": int(record.get("proto", 0)),
        "icmp_type": int(record.get("icmp_type", 0)),
        "icmp_code": int(record.get("icmp_code", 0)),
        "packets": int(record["in_packets"]),
        "bytes": int(record["in_bytes"]),
        "src_mac": record.get("in_src_mac"), "dst_mac": record.get("in_dst_mac"),
        "tcp_flags": tcp_flags,
        "dscp": int(record.get("src_tos", 0)) >> 2,
        "time_flow_start_ns": _nfdump_time_ns(record["first"]),
        "time_flow_end_ns": _nfdump_time_ns(record["last"]),
    }
    return normalize(flow)


def _free_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --- receivers (UDP datagrams / TCP stream -> messages) ----------------------------------------

def split_stream(data: bytes) -> tuple[list[bytes], bytes]:
    """Cut an IPFIX byte stream at each message's length field: (messages, leftover)."""
    messages, offset = [], 0
    while len(data) - offset >= 4:
        (length,) = struct.unpack_from("!H", data, offset + 2)
        if length < 16:
            raise AssertionError(f"IPFIX message length {length} < 16 at stream offset {offset}")
        if len(data) - offset < length:
            break
        messages.append(data[offset:offset + length])
        offset += length
    return messages, data[offset:]


class MessageReceiver:
    """Receives IPFIX messages on host:port over UDP or TCP, from a socket factory
    (`make_socket(family, type)`, e.g. a namespace's socket method). TCP connections are
    kept apart: `sessions` lists the messages of each connection in order."""

    def __init__(self, transport: str, host: str = "127.0.0.1", port: int = 0,
                 make_socket: Callable[[int, int], socket.socket] = socket.socket,
                 on_message: Callable[[bytes], None] | None = None) -> None:
        self.transport = transport
        self.on_message = on_message
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        self.sock = make_socket(family, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transport == "udp":
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        if transport == "tcp":
            self.sock.listen(8)
        self.sessions: list[list[bytes]] = [] if transport == "tcp" else [[]]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._loop, daemon=True)]
        self._threads[0].start()

    @property
    def messages(self) -> list[bytes]:
        with self._lock:
            return [m for session in self.sessions for m in session]

    def _got(self, session: list[bytes], message: bytes) -> None:
        with self._lock:
            session.append(message)
        if self.on_message is not None:
            self.on_message(message)

    def _loop(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                if self.transport == "udp":
                    data = self.sock.recv(65535)
                    self._got(self.sessions[0], data)
                else:
                    conn, _ = self.sock.accept()
                    conn.settimeout(0.2)
                    with self._lock:
                        self.sessions.append([])
                        session = self.sessions[-1]
                        self._conns.append(conn)
                    thread = threading.Thread(target=self._read, args=(conn, session),
                                              daemon=True)
                    self._threads.append(thread)
                    thread.start()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise

    def _read(self, conn: socket.socket, session: list[bytes]) -> None:
        pending = b""
        while not self._stop.is_set():
            try:
                data = conn.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            messages, pending = split_stream(pending + data)
            for message in messages:
                self._got(session, message)

    def close_connections(self) -> None:
        """Drop every accepted TCP connection (the collector 'restarts')."""
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self.close_connections()
        self.sock.close()
        for thread in self._threads:
            thread.join(2)


# --- harness Collectors -----------------------------------------------------------------------

class TsharkIpfixCollector(Collector):
    """Receives the agent's IPFIX (UDP or TCP) on the namespace's loopback; flows() decodes
    everything received so far with tshark."""

    byte_measure = "ip"

    def __init__(self, transport: str, interfaces: Mapping[int, str], ns=None,
                 host: str = "127.0.0.1", extra_env: dict[str, str] | None = None) -> None:
        self.transport, self.interfaces, self.ns, self.host = transport, interfaces, ns, host
        self.name = f"ipfix+{transport}/tshark"
        self.extra_env = extra_env or {}
        self.receiver: MessageReceiver | None = None

    def start(self) -> tuple[str | None, int | None]:
        make = self.ns.socket if self.ns is not None else socket.socket
        self.receiver = MessageReceiver(self.transport, self.host, 0, make)
        return self.host, self.receiver.port

    def agent_env(self) -> dict[str, str]:
        assert self.receiver is not None, "start() the collector first"
        return {"EXPORT": f"ipfix+{self.transport}", "TARGET_HOST": self.host,
                "TARGET_PORT": str(self.receiver.port), **self.extra_env}

    def records(self) -> list[dict]:
        return tshark_records(self.receiver.messages if self.receiver else [])

    def flows(self) -> list[dict]:
        return [tshark_flow(r, self.interfaces) for r in self.records()]

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()


class NfcapdIpfixCollector(Collector):
    """nfcapd in the namespace (UDP); for TCP a relay forwards each message to it.

    flows() reads nfcapd's finished files; a file is finished every 2 s, so callers poll
    (harness.assertions.wait_exact does)."""

    byte_measure = "ip"

    def __init__(self, transport: str, interfaces: Mapping[int, str], ns=None,
                 host: str = "127.0.0.1", extra_env: dict[str, str] | None = None) -> None:
        self.transport, self.interfaces, self.ns, self.host = transport, interfaces, ns, host
        self.name = f"ipfix+{transport}/nfcapd"
        self.extra_env = extra_env or {}
        self.nfcapd: Nfcapd | None = None
        self.relay: MessageReceiver | None = None
        self._relay_out: socket.socket | None = None
        self.port = 0

    def start(self) -> tuple[str | None, int | None]:
        popen = self.ns.popen if self.ns is not None else None
        port = _ns_free_udp_port(self.ns, self.host)
        self.nfcapd = Nfcapd(self.host, port, popen).start()
        self.port = port
        if self.transport == "tcp":
            make = self.ns.socket if self.ns is not None else socket.socket
            self._relay_out = make(socket.AF_INET, socket.SOCK_DGRAM)
            target = (self.host, port)
            self.relay = MessageReceiver(
                "tcp", self.host, 0, make,
                on_message=lambda m: self._relay_out.sendto(m, target))
            self.port = self.relay.port
        return self.host, self.port

    def agent_env(self) -> dict[str, str]:
        return {"EXPORT": f"ipfix+{self.transport}", "TARGET_HOST": self.host,
                "TARGET_PORT": str(self.port), **self.extra_env}

    def flows(self) -> list[dict]:
        records = self.nfcapd.records() if self.nfcapd else []
        return [nfdump_flow(r, self.interfaces) for r in records]

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.stop()
        if self._relay_out is not None:
            self._relay_out.close()
        if self.nfcapd is not None:
            self.nfcapd.cleanup()


def _ns_free_udp_port(ns, host: str) -> int:
    make = ns.socket if ns is not None else socket.socket
    with make(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --- synthetic batches (unit tests, no kernel) -------------------------------------------------

def synthetic_batch(flows: Sequence[Mapping[str, object]], wall_offset_ns: int = 0):
    """A FlowBatch from dicts of FLOW_RECORD fields; addresses as text (IPv4 is mapped)."""
    import ipaddress

    import numpy as np

    from ei_ebpf_agent.ebpf.layout import FLOW_RECORD
    from ei_ebpf_agent.flow.batch import FlowBatch

    records = np.zeros(len(flows), FLOW_RECORD)
    for row, flow in zip(records, flows):
        for name, value in flow.items():
            if name in ("src_ip", "dst_ip"):
                ip = ipaddress.ip_address(value)
                packed = ip.packed if ip.version == 6 else b"\0" * 10 + b"\xff\xff" + ip.packed
                value = np.frombuffer(packed, np.uint8)
            elif name in ("src_mac", "dst_mac") and isinstance(value, str):
                value = np.frombuffer(bytes.fromhex(value.replace(":", "")), np.uint8)
            row[name] = value
    return FlowBatch(records, wall_offset_ns, {}, ipaddress.ip_address("127.0.0.1"))
