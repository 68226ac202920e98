"""The harness itself: assertions catch every kind of difference, frames are built right,
and (root) topologies clean up and the sniffer agrees with the analytic expectations."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from harness import traffic
from harness.assertions import assert_exact, check_fields, exact_diff
from harness.truth import Expectation, FlowKey, parse_frame

KEY = FlowKey("veth0", "egress", 0x0800, "10.0.0.1", "10.0.0.2", 1000, 2000, 17)
BACK = FlowKey("veth0", "ingress", 0x0800, "10.0.0.2", "10.0.0.1", 2000, 1000, 17)


def record(key: FlowKey, packets: int, nbytes: int, **extra) -> dict:
    r = dict(key._asdict(), packets=packets, bytes=nbytes)
    r.update(extra)
    return r


def expectation() -> Expectation:
    exp = Expectation(endpoints={"veth0": ("02:00:00:00:00:01", "02:00:00:00:00:02")})
    exp.add(KEY, 3, 300, 258)
    exp.add(BACK, 1, 100, 86)
    return exp


def test_records_of_one_flow_are_summed():
    flows = [record(KEY, 1, 100), record(KEY, 2, 200), record(BACK, 1, 100)]
    assert_exact(expectation(), flows)


def test_ipv4_mapped_addresses_match_plain_ipv4():
    mapped = dict(record(KEY, 3, 300), src_addr="::ffff:10.0.0.1", dst_addr="::ffff:10.0.0.2")
    assert_exact(expectation(), [mapped, record(BACK, 1, 100)])


@pytest.mark.parametrize(("flows", "word"), [
    ([record(KEY, 3, 300)], "MISSING"),
    ([record(KEY, 2, 200), record(BACK, 1, 100)], "WRONG"),
    ([record(KEY, 3, 301), record(BACK, 1, 100)], "WRONG"),
    ([record(KEY, 3, 300), record(BACK, 1, 100), record(KEY._replace(dst_port=2001), 1, 100)],
     "EXTRA"),
])
def test_every_kind_of_difference_is_reported(flows, word):
    with pytest.raises(AssertionError, match=word):
        assert_exact(expectation(), flows)


def test_ip_byte_measure_uses_ip_octets():
    assert exact_diff(expectation(), [record(KEY, 3, 258), record(BACK, 1, 86)], "ip") == []


def test_field_checks_catch_swapped_macs_and_bad_timestamps():
    good = {"src_mac": "02:00:00:00:00:01", "dst_mac": "02:00:00:00:00:02",
                "time_flow_start_ns": 5_000_000_000, "time_flow_end_ns": 6_000_000_000}
    exp = expectation()
    check_fields(exp, [record(KEY, 3, 300, **good)], t_start_ns=5_000_000_000,
                 t_end_ns=6_000_000_000)
    swapped = dict(good, src_mac=good["dst_mac"], dst_mac=good["src_mac"])
    with pytest.raises(AssertionError, match="MACs"):
        check_fields(exp, [record(KEY, 3, 300, **swapped)], t_start_ns=5_000_000_000,
                     t_end_ns=6_000_000_000)
    late = dict(good, time_flow_end_ns=9_000_000_000)
    with pytest.raises(AssertionError, match="window"):
        check_fields(exp, [record(KEY, 3, 300, **late)], t_start_ns=5_000_000_000,
                     t_end_ns=6_000_000_000)


def test_udp_frame_is_well_formed():
    class FakeLink:
        local_ip4, peer_ip4 = "10.0.0.1", "10.0.0.2"
        local_mac, peer_mac = "02:00:00:00:00:01", "02:00:00:00:00:02"

    frame = traffic.udp_frame(FakeLink, 1000, 2000, b"x" * 100)
    assert len(frame) == 14 + 20 + 8 + 100
    assert traffic._checksum(frame[14:34]) == 0  # IPv4 header checksum verifies
    pseudo = frame[26:34] + bytes([0, 17]) + (8 + 100).to_bytes(2, "big")
    assert traffic._checksum(pseudo + frame[34:]) == 0  # UDP checksum verifies
    eth, src, dst, sport, dport, proto, *_rest, ip_bytes, _flags = parse_frame(frame)
    assert (eth, src, dst, sport, dport, proto, ip_bytes) == (
        0x0800, "10.0.0.1", "10.0.0.2", 1000, 2000, 17, 128)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_topology_is_removed_and_sniffer_agrees_with_analytic_counts():
    from harness.netns import Topology
    from harness.truth import Sniffer

    with Topology() as topo:
        names = [topo.a.name, topo.b.name]
        with Sniffer(topo.link) as sniffer:
            exp = traffic.udp_flows(topo.link, n_flows=50)
            exp.merge(traffic.udp_flows(topo.link, n_flows=5, family=socket.AF_INET6))
            exp.merge(traffic.icmp_echo(topo.link, count=3))
        traffic.cross_check(exp, sniffer.expectation())
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            check=True).stdout
    assert not any(name in listed for name in names), listed
