"""The collector: prints what it receives in the stdout exporter's shape; survives garbage."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from test_pbwire import make_batch, random_records

from ei_ebpf_agent.collector import JsonLinesPrinter, serve
from ei_ebpf_agent.config import Settings
from ei_ebpf_agent.exporter.grpc import GrpcExporter
from ei_ebpf_agent.exporter.stdout import StdoutExporter
from ei_ebpf_agent.pbflow import SEND_METHOD, flow_pb2

grpc = pytest.importorskip("grpc")

SRC = Path(__file__).resolve().parents[2] / "src"


def stdout_lines(batch) -> list[str]:
    stream = io.StringIO()
    StdoutExporter(stream).export(batch)
    return stream.getvalue().splitlines()


def test_collector_process_prints_the_stdout_exporter_lines() -> None:
    batch = make_batch(random_records(np.random.default_rng(7), 500), "fd00::9")
    env = dict(os.environ, PYTHONPATH=str(SRC))
    code = (
        "import sys\nfrom ei_ebpf_agent.collector import run_collector\n"
        "sys.exit(run_collector('127.0.0.1', 0))"
    )
    lines: list[str] = []
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        ready = proc.stderr.readline()
        match = re.fullmatch(r"collector listening on 127\.0\.0\.1:(\d+)\n", ready)
        assert match, ready
        exporter = GrpcExporter.from_settings(
            Settings(
                export="grpc",
                target_host="127.0.0.1",
                target_port=int(match[1]),
                grpc_message_max_flows=200,
            ),
            send_timeout=5.0,
        )
        # Read while sending: the pipe is smaller than 500 lines.
        reader = threading.Thread(
            target=lambda: lines.extend(proc.stdout.readline().rstrip("\n") for _ in range(500))
        )
        reader.start()
        exporter.export(batch)
        exporter.close(timeout=20)
        assert exporter.stats.exported_flows == 500
        reader.join(timeout=20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Messages may arrive in any order across Send calls, but here they are sent one
    # after the other, so the lines are in batch order.
    assert lines == stdout_lines(batch)


def test_garbage_is_refused_and_the_collector_keeps_serving() -> None:
    out = io.StringIO()
    server, port = serve("127.0.0.1", 0, JsonLinesPrinter(out))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            send = channel.unary_unary(
                SEND_METHOD, response_deserializer=flow_pb2.CollectorReply.FromString
            )
            for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05\x08", b"\x0a\xff\xff\xff\xff\x0f"):
                with pytest.raises(grpc.RpcError) as raised:
                    send(garbage, timeout=5)
                assert raised.value.code() == grpc.StatusCode.INTERNAL
            valid = flow_pb2.Records(entries=[flow_pb2.Record(eth_protocol=0x0806, bytes=60)])
            send(valid.SerializeToString(), timeout=5)
    finally:
        server.stop(grace=None)
    (line,) = out.getvalue().splitlines()
    assert '"eth_protocol":2054' in line and '"bytes":60' in line


def test_odd_but_valid_records_are_printed() -> None:
    """A peer's record with an IPv6 field of the wrong length still gives a line."""
    out = io.StringIO()
    printer = JsonLinesPrinter(out)
    record = flow_pb2.Record(eth_protocol=0x86DD)
    record.network.src_addr.ipv6 = b"\x01\x02\x03"
    printer(flow_pb2.Records(entries=[record]))
    assert '"src_addr":"010203"' in out.getvalue()


def test_busy_port_is_reported() -> None:
    server, port = serve("127.0.0.1", 0, lambda records: None)
    try:
        with pytest.raises(RuntimeError, match="cannot listen"):
            serve("127.0.0.1", port, lambda records: None)
    finally:
        server.stop(grace=None)
