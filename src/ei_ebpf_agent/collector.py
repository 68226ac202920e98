"""A minimal pbflow collector (`ei-ebpf-agent collect`): prints every received flow.

It serves `/pbflow.Collector/Send` and prints each Record as one JSON line, in the
shape of the stdout exporter (exporter/jsonflow.py), so the same flows give the same
lines whichever way they travelled. Messages that are not a valid pbflow.Records are
refused by gRPC (status INTERNAL) and the collector carries on.
"""

from __future__ import annotations

import signal
import sys
import threading
from concurrent import futures
from typing import Callable, TextIO

import grpc

from ei_ebpf_agent.exporter.jsonflow import record_line
from ei_ebpf_agent.net import host_port
from ei_ebpf_agent.pbflow import SERVICE_NAME, flow_pb2

# Large enough for GRPC_MESSAGE_MAX_FLOWS well beyond its default of 10000.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def serve(
    host: str,
    port: int,
    on_records: Callable[[flow_pb2.Records], None],
    *,
    credentials: grpc.ServerCredentials | None = None,
    workers: int = 4,
) -> tuple[grpc.Server, int]:
    """Start a gRPC server whose Send calls `on_records(records)`; return it and its port.

    `port` 0 picks a free port; `credentials` (grpc.ssl_server_credentials) serve TLS.
    Raises RuntimeError when the address cannot be bound.
    """

    def send(request: flow_pb2.Records, context: grpc.ServicerContext) -> flow_pb2.CollectorReply:
        on_records(request)
        return flow_pb2.CollectorReply()

    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Send": grpc.unary_unary_rpc_method_handler(
                send,
                request_deserializer=flow_pb2.Records.FromString,
                response_serializer=flow_pb2.CollectorReply.SerializeToString,
            )
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        handlers=[handler],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # Without this a second collector on the same port would share it silently.
            ("grpc.so_reuseport", 0),
        ],
    )
    try:
        if credentials is None:
            bound = server.add_insecure_port(host_port(host, port))
        else:
            bound = server.add_secure_port(host_port(host, port), credentials)
    except RuntimeError as err:
        raise RuntimeError(f"cannot listen on {host_port(host, port)}: {err}") from err
    if bound == 0:  # older grpcio reports failure this way
        raise RuntimeError(f"cannot listen on {host_port(host, port)}")
    server.start()
    return server, bound


class JsonLinesPrinter:
    """on_records callback: every Record as one JSON line on `out`, flushed per message."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lock = threading.Lock()  # Send calls run on several threads
        self.flows = 0

    def __call__(self, records: flow_pb2.Records) -> None:
        text = "".join(record_line(record) + "\n" for record in records.entries)
        with self.lock:
            self.out.write(text)
            self.out.flush()
            self.flows += len(records.entries)


def run_collector(host: str, port: int, out: TextIO | None = None) -> int:
    """Serve until SIGTERM/SIGINT, printing flows to `out` (stdout); return the exit status."""
    out = out if out is not None else sys.stdout
    stop = threading.Event()
    try:
        server, bound = serve(host, port, JsonLinesPrinter(out))
    except RuntimeError as err:
        print(f"collector: {err}", file=sys.stderr)
        return 1
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    print(f"collector listening on {host_port(host, bound)}", file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop(grace=5).wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
