"""The IPFIX exporter over real sockets: UDP and TCP sessions, template refresh, a collector
that starts late or restarts, bounded queue. Decoded by tshark and nfdump."""

from __future__ import annotations

import socket
import time

import pytest
from harness.ipfix_collectors import (
    MessageReceiver,
    Nfcapd,
    nfdump_flow,
    synthetic_batch,
    tools_missing,
    tshark_records,
    tshark_template_messages,
)

from ei_ebpf_agent.config import Settings
from ei_ebpf_agent.exporter import DropReason
from ei_ebpf_agent.exporter.ipfix import IpfixExporter, IpfixOptions
from ei_ebpf_agent.net import Transport

needs_tshark = pytest.mark.skipif(tools_missing("tshark") is not None,
                                  reason=str(tools_missing("tshark")))
needs_nfdump = pytest.mark.skipif(tools_missing("nfcapd", "nfdump") is not None,
                                  reason=str(tools_missing("nfcapd", "nfdump")))

MONO_NS = 7_000_000_000_000
OFFSET_NS = time.time_ns() - MONO_NS


def flows(n: int, first_port: int = 10000, v6: bool = False) -> list:
    return [{"src_ip": "fd00::1" if v6 else "10.9.0.1", "dst_ip": "fd00::2" if v6 else "10.9.0.2",
             "eth_protocol": 0x86DD if v6 else 0x0800, "protocol": 17,
             "src_port": first_port + i, "dst_port": 9, "if_index": 2, "packets": i + 1,
             "bytes": (i + 1) * 100, "ip_bytes": (i + 1) * 86, "first_seen_ns": MONO_NS,
             "last_seen_ns": MONO_NS} for i in range(n)]


def batch(n: int, first_port: int = 10000, v6: bool = False):
    return synthetic_batch(flows(n, first_port, v6), OFFSET_NS)


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def all_received(receiver: MessageReceiver, exporter: IpfixExporter) -> list:
    """The receiver's messages once it has every data byte the exporter sent."""
    def done():
        messages = receiver.messages
        data = sum(len(m) for m in messages if int.from_bytes(m[16:18], "big") != 2)
        return messages if data == exporter.bytes_sent else None
    return wait_for(done, what="every message sent to be received")


def ports_of(records) -> list:
    return sorted(int(r["cflow.srcport"]) for r in records)


@needs_tshark
@pytest.mark.parametrize("transport", list(Transport))
def test_flows_of_every_batch_reach_the_collector_with_templates_first(transport):
    receiver = MessageReceiver(transport.value)
    exporter = IpfixExporter(IpfixOptions("127.0.0.1", receiver.port, transport))
    try:
        exporter.export(batch(50))
        exporter.export(batch(30, first_port=20000, v6=True))
        exporter.close(5)
        messages = all_received(receiver, exporter)
    finally:
        receiver.stop()
    assert tshark_template_messages(messages)[0] == 0
    records = tshark_records(messages)
    assert ports_of(records) == list(range(10000, 10050)) + list(range(20000, 20030))
    assert sum(int(r["cflow.octets"]) for r in records) == sum(
        f["ip_bytes"] for f in flows(50) + flows(30))
    if transport is Transport.TCP:
        assert max(len(m) for m in messages) > 1400  # TCP messages are not held to the MTU
    else:
        assert max(len(m) for m in messages) <= 1400
    assert exporter.stats.exported_flows == 80 and exporter.stats.exported_batches == 2
    assert exporter.stats.dropped_flows == 0


@needs_tshark
def test_udp_templates_are_refreshed_every_n_data_messages():
    receiver = MessageReceiver("udp")
    options = IpfixOptions("127.0.0.1", receiver.port, Transport.UDP, max_message_size=512,
                           template_refresh_messages=3, template_refresh_interval=0)
    exporter = IpfixExporter(options)
    try:
        exporter.export(batch(50))  # 5 records of 83 B per 512-B message: 10 data messages
        exporter.close(5)
        messages = all_received(receiver, exporter)
    finally:
        receiver.stop()
    assert len(messages) == 14
    assert tshark_template_messages(messages) == [0, 4, 8, 12]
    assert len(tshark_records(messages)) == 50


@needs_nfdump
@pytest.mark.parametrize("refresh", [0.3, 0])
def test_a_collector_started_after_the_exporter_decodes_after_the_template_refresh(refresh):
    port = free_port(socket.SOCK_DGRAM)
    options = IpfixOptions("127.0.0.1", port, Transport.UDP, template_refresh_interval=refresh,
                           template_refresh_messages=0)
    exporter = IpfixExporter(options)
    nfcapd = Nfcapd(port=port)
    try:
        exporter.export(batch(5))  # nobody listens yet: templates and data are lost
        wait_for(lambda: exporter.stats.exported_batches == 1, what="first batch sent")
        nfcapd.start()
        time.sleep(0.5)  # past the refresh interval
        exporter.export(batch(7, first_port=30000))
        exporter.close(5)
        time.sleep(0.3)
        nfcapd.stop()
        got = [nfdump_flow(r, {}) for r in nfcapd.records()]
    finally:
        exporter.close(1)
        nfcapd.cleanup()
    if refresh:
        assert sorted(f["src_port"] for f in got) == list(range(30000, 30007))
        assert sum(f["packets"] for f in got) == sum(range(1, 8))
    else:  # the negative control: without a refresh the late collector never learns them
        assert got == []


@needs_tshark
def test_tcp_exporter_waits_for_a_late_collector_then_delivers_the_queue():
    port = free_port(socket.SOCK_STREAM)
    exporter = IpfixExporter(IpfixOptions("127.0.0.1", port, Transport.TCP))
    receiver = None
    try:
        exporter.export(batch(10))
        exporter.export(batch(10, first_port=11000))
        wait_for(lambda: exporter.stats.export_errors, what="a failed connect")
        receiver = MessageReceiver("tcp", port=port)
        exporter.close(10)
        messages = all_received(receiver, exporter)
    finally:
        if receiver is not None:
            receiver.stop()
    assert ports_of(tshark_records(messages)) == list(range(10000, 10010)) + \
        list(range(11000, 11010))
    assert exporter.stats.exported_flows == 20


@needs_tshark
def test_tcp_reconnects_after_the_collector_drops_the_connection_with_a_new_session():
    receiver = MessageReceiver("tcp")
    exporter = IpfixExporter(IpfixOptions("127.0.0.1", receiver.port, Transport.TCP))
    try:
        exporter.export(batch(10))
        wait_for(lambda: exporter.stats.exported_batches == 1, what="first batch")
        wait_for(lambda: len(receiver.messages) >= 2, what="first messages")
        receiver.close_connections()
        time.sleep(0.2)
        exporter.export(batch(4, first_port=12000))
        exporter.close(10)
        wait_for(lambda: len(receiver.sessions) == 2 and len(receiver.sessions[1]) >= 2,
                 what="the second session's messages")
        time.sleep(0.2)
        sessions = [list(s) for s in receiver.sessions]
    finally:
        receiver.stop()
    assert len(sessions) == 2
    second = tshark_records(sessions[1])
    assert tshark_template_messages(sessions[1])[0] == 0  # templates first on the new session
    assert ports_of(second) == list(range(12000, 12004))
    assert {r["sequence"] for r in second} == {0}  # sequence numbers restart per session
    assert exporter.stats.exported_flows == 14


def test_a_full_queue_drops_and_counts_batches_and_close_never_hangs():
    port = free_port(socket.SOCK_STREAM)  # nobody listens: the sender retries with backoff
    exporter = IpfixExporter(IpfixOptions("127.0.0.1", port, Transport.TCP, queue_length=2))
    exporter.export(batch(1))
    wait_for(lambda: exporter.queue_length == 0, what="sender picks the first batch")
    for _ in range(4):
        exporter.export(batch(3))
    assert exporter.stats.dropped_by_reason == {DropReason.QUEUE_FULL: 6}
    start = time.monotonic()
    exporter.close(0.5)
    # close(timeout) gives up on the unreachable collector instead of retrying forever
    # (the contract, not a speed: ample slack over the 0.5 s asked for)
    assert time.monotonic() - start < 10
    assert exporter.stats.dropped_by_reason == {DropReason.QUEUE_FULL: 6, DropReason.CLOSED: 1 + 3 + 3}
    assert exporter.stats.dropped_batches_by_reason == {DropReason.QUEUE_FULL: 2, DropReason.CLOSED: 3}
    assert exporter.stats.dropped_flows == 13 and exporter.stats.dropped_batches == 5
    assert exporter.stats.exported_flows == 0


def test_an_unresolvable_collector_never_raises():
    exporter = IpfixExporter(IpfixOptions("collector.invalid", 4739, Transport.UDP))
    exporter.export(batch(2))
    exporter.close(0.5)
    assert exporter.stats.export_errors >= 1
    assert exporter.stats.dropped_by_reason == {DropReason.CLOSED: 2}


def test_options_follow_settings_and_pick_the_transport_from_export():
    options = IpfixOptions.from_settings(Settings(
        export="ipfix+tcp", target_host="collector", target_port=4739, buffers_length=7,
        ipfix_observation_domain_id=9, ipfix_max_message_size=0,
        ipfix_template_refresh_interval=30.0, ipfix_template_refresh_messages=0))
    assert (options.transport, options.host, options.port, options.queue_length,
            options.observation_domain_id, options.message_size) == \
        (Transport.TCP, "collector", 4739, 7, 9, 65535)
    assert IpfixOptions("h", 1, Transport.UDP).message_size == 1400
