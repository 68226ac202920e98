"""Stubs generated from proto/flow.proto (protobuf package `pbflow`).

Regenerate with `nox -s proto` (tools/gen_proto.py); never edit flow_pb2*.py by hand.
The agent needs only flow_pb2: the exporter and the collector call the one method by
name with pre-serialized bytes, so flow_pb2_grpc (whose import insists on a grpcio at
least as new as the grpcio-tools that generated it) is there for other users.
"""

from __future__ import annotations

# The unary method of service pbflow.Collector, as gRPC names it on the wire.
SEND_METHOD = "/pbflow.Collector/Send"
SERVICE_NAME = "pbflow.Collector"
