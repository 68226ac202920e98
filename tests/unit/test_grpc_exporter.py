"""GrpcExporter against a real in-process gRPC collector on 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ei_ebpf_agent.collector import serve
from ei_ebpf_agent.config import Settings
from ei_ebpf_agent.ebpf.layout import FLOW_RECORD
from ei_ebpf_agent.exporter import DropReason
from ei_ebpf_agent.exporter.grpc import GrpcExporter
from ei_ebpf_agent.flow.batch import FlowBatch

grpc = pytest.importorskip("grpc")

FAST = {"send_timeout": 2.0, "retry_time": 30.0, "backoff_initial": 0.05, "backoff_max": 0.3}


class Received:
    """What the collector got: one list of Records per Send call."""

    def __init__(self) -> None:
        self.messages: list = []
        self.lock = threading.Lock()

    def __call__(self, records) -> None:
        with self.lock:
            self.messages.append(records)

    def byte_counts(self) -> list[int]:
        with self.lock:
            return sorted(e.bytes for m in self.messages for e in m.entries)

    def wait_for(self, flows: int, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(self.byte_counts()) >= flows:
                return
            time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_batch(n: int, first: int = 1) -> FlowBatch:
    """n IPv4 TCP flows; `bytes` is a unique id (first, first+1, ...)."""
    rec = np.zeros(n, FLOW_RECORD)
    rec["eth_protocol"] = 0x0800
    rec["src_ip"][:, 10:12] = 0xFF
    rec["src_ip"][:, 12:] = [10, 0, 0, 1]
    rec["dst_ip"][:, 10:12] = 0xFF
    rec["dst_ip"][:, 12:] = [10, 0, 0, 2]
    rec["protocol"] = 6
    rec["src_port"] = np.arange(n) % 65536
    rec["dst_port"] = 443
    rec["if_index"] = 1
    rec["bytes"] = np.arange(first, first + n)
    rec["packets"] = 1
    return FlowBatch(rec, 1_700_000_000 * 10**9, {1: "eth0"}, ipaddress.ip_address("10.0.0.9"))


def settings(port: int, **kw) -> Settings:
    return Settings(export="grpc", target_host="127.0.0.1", target_port=port, **kw)


@pytest.fixture
def collector():
    received = Received()
    server, port = serve("127.0.0.1", 0, received)
    yield received, port
    server.stop(grace=None)


def test_all_flows_arrive_exactly_once(collector) -> None:
    received, port = collector
    exporter = GrpcExporter.from_settings(settings(port), **FAST)
    exporter.export(make_batch(3000, first=1))
    exporter.export(make_batch(2000, first=3001))
    exporter.close(timeout=20)
    assert received.byte_counts() == list(range(1, 5001))
    assert exporter.stats.exported_flows == 5000
    assert exporter.stats.exported_batches == 2
    assert exporter.stats.dropped_flows == 0


def test_batches_are_split_at_grpc_message_max_flows(collector) -> None:
    received, port = collector
    exporter = GrpcExporter.from_settings(settings(port, grpc_message_max_flows=1000), **FAST)
    exporter.export(make_batch(2500))
    exporter.close(timeout=20)
    assert sorted(len(m.entries) for m in received.messages) == [500, 1000, 1000]
    assert received.byte_counts() == list(range(1, 2501))


def test_close_flushes_the_queue(collector) -> None:
    received, port = collector
    exporter = GrpcExporter.from_settings(settings(port, buffers_length=100), **FAST)
    for k in range(20):
        exporter.export(make_batch(100, first=1 + 100 * k))
    exporter.close(timeout=20)
    assert received.byte_counts() == list(range(1, 2001))
    assert exporter.queue_length == 0


def test_delivers_after_the_collector_comes_up() -> None:
    port = free_port()
    exporter = GrpcExporter.from_settings(settings(port), **FAST)
    exporter.export(make_batch(500))
    time.sleep(0.5)  # a few failed attempts
    assert exporter.stats.export_errors > 0
    received = Received()
    server, _ = serve("127.0.0.1", port, received)
    try:
        received.wait_for(500)
        assert received.byte_counts() == list(range(1, 501))
        assert exporter.stats.exported_flows == 500
    finally:
        exporter.close(timeout=5)
        server.stop(grace=None)


def test_queue_overflow_drops_and_counts_without_blocking() -> None:
    exporter = GrpcExporter.from_settings(settings(free_port(), buffers_length=2), **FAST)
    for k in range(10):
        exporter.export(make_batch(100, first=1 + 100 * k))
    # Nothing listens: at most the queue (2) and the batch being retried (1) are kept; the
    # other batches were dropped, so export() returned without waiting for room.
    assert exporter.stats.dropped_batches >= 7
    assert exporter.stats.dropped_by_reason[DropReason.QUEUE_FULL] == 100 * exporter.stats.dropped_batches
    exporter.close(timeout=0.5)
    assert exporter.stats.exported_flows == 0
    assert exporter.stats.dropped_flows == 1000
    assert (
        exporter.stats.dropped_by_reason[DropReason.CLOSED]
        == 1000 - exporter.stats.dropped_by_reason[DropReason.QUEUE_FULL]
    )


def test_export_after_close_is_dropped_not_raised(collector) -> None:
    _, port = collector
    exporter = GrpcExporter.from_settings(settings(port), **FAST)
    exporter.close(timeout=1)
    exporter.export(make_batch(10))
    assert exporter.stats.dropped_by_reason == {DropReason.CLOSED: 10}


# -- TLS ------------------------------------------------------------------------------


def _certificates_with_cryptography(directory: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write(stem: str, key, cert) -> None:
        (directory / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def builder(subject: str, issuer: str, key) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        builder("test-ca", "test-ca", ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    write("ca", ca_key, ca)
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    for stem, usage, san in (
        (
            "server",
            ExtendedKeyUsageOID.SERVER_AUTH,
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
        ),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("agent")]),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            builder(stem, "test-ca", key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(aki, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write(stem, key, cert)


def _certificates_with_openssl(directory: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
    )
    for stem, usage, san in (
        ("server", "serverAuth", "IP:127.0.0.1,DNS:localhost"),
        ("client", "clientAuth", "DNS:agent"),
    ):
        (directory / f"{stem}.ext").write_text(
            f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\nsubjectAltName={san}\n"
        )
        run(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            f"{stem}.key",
            "-out",
            f"{stem}.csr",
            "-subj",
            f"/CN={stem}",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{stem}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{stem}.crt",
            "-days",
            "1",
            "-extfile",
            f"{stem}.ext",
        )


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    try:
        _certificates_with_cryptography(directory)
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl CLI is available")
        _certificates_with_openssl(directory)
    return directory


def _tls_collector(certificates: Path, require_client_auth: bool):
    credentials = grpc.ssl_server_credentials(
        [((certificates / "server.key").read_bytes(), (certificates / "server.crt").read_bytes())],
        root_certificates=(certificates / "ca.crt").read_bytes(),
        require_client_auth=require_client_auth,
    )
    received = Received()
    server, port = serve("127.0.0.1", 0, received, credentials=credentials)
    return received, server, port


def test_tls(certificates: Path) -> None:
    received, server, port = _tls_collector(certificates, require_client_auth=False)
    try:
        exporter = GrpcExporter.from_settings(
            settings(port, target_tls_ca_cert_path=certificates / "ca.crt"), **FAST
        )
        exporter.export(make_batch(300))
        exporter.close(timeout=20)
        assert received.byte_counts() == list(range(1, 301))
    finally:
        server.stop(grace=None)


def test_mutual_tls(certificates: Path) -> None:
    received, server, port = _tls_collector(certificates, require_client_auth=True)
    try:
        exporter = GrpcExporter.from_settings(
            settings(
                port,
                target_tls_ca_cert_path=certificates / "ca.crt",
                target_tls_user_cert_path=certificates / "client.crt",
                target_tls_user_key_path=certificates / "client.key",
            ),
            **FAST,
        )
        exporter.export(make_batch(300))
        exporter.close(timeout=20)
        assert received.byte_counts() == list(range(1, 301))
    finally:
        server.stop(grace=None)


def test_mutual_tls_without_client_certificate_is_not_delivered(certificates: Path) -> None:
    received, server, port = _tls_collector(certificates, require_client_auth=True)
    try:
        exporter = GrpcExporter.from_settings(
            settings(port, target_tls_ca_cert_path=certificates / "ca.crt"), **FAST
        )
        exporter.export(make_batch(300))
        time.sleep(0.5)
        exporter.close(timeout=0.5)
        assert received.byte_counts() == []
        assert exporter.stats.export_errors > 0
        assert exporter.stats.dropped_flows == 300
    finally:
        server.stop(grace=None)


def test_unreadable_ca_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    with pytest.raises(OSError, match="TLS CA certificate"):
        GrpcExporter.from_settings(settings(1, target_tls_ca_cert_path=missing))
