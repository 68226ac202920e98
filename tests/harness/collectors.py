"""Where the agent's flows go, behind one small interface, so the same traffic and assertions
serve every transport (gRPC here; IPFIX, containers later).

A Collector:
  byte_measure: "frame" (whole Ethernet frame, the gRPC/JSON `bytes`) or "ip" (IP octets,
                as IPFIX octetDeltaCount reports them)
  start() -> (host, port)        ready to receive (host/port are None for stdout)
  agent_env() -> dict            EXPORT/TARGET_* variables that point the agent here
  agent_stdout()                 file object for the agent's stdout (or None: discard)
  flows() -> list[dict]          every record received so far, normalized: the JSON keys of
                                 the CLI contract, addresses canonical (IPv4 unmapped)
  stop()                         release everything (idempotent)
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from typing import IO

from .agent import agent_base_env, agent_command
from .netns import Namespace, terminate_group
from .truth import canonical_addr


def normalize(record: dict) -> dict:
    """A flow dict with canonical address text and lower-case MACs."""
    out = dict(record)
    for k in ("src_addr", "dst_addr", "agent_ip"):
        if k in out:
            out[k] = canonical_addr(out[k])
    for k in ("src_mac", "dst_mac"):
        if isinstance(out.get(k), str):
            out[k] = out[k].lower()
    return out


def parse_json_lines(text: str, source: str) -> list[dict]:
    """Flow dicts from JSON lines; a line that is not a JSON object fails loudly."""
    flows = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise AssertionError(f"{source} line {n} is not JSON ({exc}): {line[:200]}") from None
        if not isinstance(record, dict):
            raise AssertionError(  # noqa: TRY004 - a test failure, not a caller error
                f"{source} line {n} is not a JSON object: {line[:200]}")
        flows.append(normalize(record))
    return flows


class Collector:
    """Base class; see the module docstring."""

    byte_measure = "frame"
    name = "collector"

    def start(self) -> tuple[str | None, int | None]:
        return None, None

    def agent_env(self) -> dict[str, str]:
        return {}

    def agent_stdout(self) -> IO | None:
        return None

    def flows(self) -> list[dict]:
        raise NotImplementedError

    def stop(self) -> None:
        pass

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class StdoutCollector(Collector):
    """EXPORT=stdout: the agent's own stdout (JSON lines) is the collector."""

    name = "stdout"

    def __init__(self) -> None:
        self._file = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            "w+", prefix="ei-agent-stdout-", suffix=".jsonl")

    def agent_env(self) -> dict[str, str]:
        return {"EXPORT": "stdout"}

    def agent_stdout(self) -> IO | None:
        return self._file

    def flows(self) -> list[dict]:
        with open(self._file.name) as f:
            return parse_json_lines(f.read(), "agent stdout")

    def stop(self) -> None:
        if not self._file.closed:
            self._file.close()


class GrpcCollector(Collector):
    """`ei-ebpf-agent collect` run inside namespace ns (the agent's), on its loopback."""

    name = "grpc"

    def __init__(self, ns: Namespace, port: int = 9999, host: str = "127.0.0.1",
                 timeout: float = 30.0) -> None:
        self.ns, self.host, self.port, self.timeout = ns, host, port, timeout
        # Files, not pipes: the collector never blocks on a full pipe; read back by name.
        self._out = tempfile.NamedTemporaryFile("w+", prefix="ei-collector-", suffix=".jsonl")  # noqa: SIM115
        self._err = tempfile.NamedTemporaryFile("w+", prefix="ei-collector-", suffix=".log")  # noqa: SIM115
        self.proc: subprocess.Popen | None = None

    def start(self) -> tuple[str | None, int | None]:
        argv = agent_command() + ["collect", "--port", str(self.port), "--host", self.host]
        self.proc = self.ns.popen(argv, stdout=self._out, stderr=self._err,
                                  env=agent_base_env(), start_new_session=True)
        deadline = time.monotonic() + self.timeout
        ready = f"collector listening on {self.host}:{self.port}"
        while time.monotonic() < deadline:
            if ready in self.stderr():
                return self.host, self.port
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"gRPC collector did not print {ready!r} "
                             f"(exit {self.proc.returncode}); stderr:\n{self.stderr()}")

    def stderr(self) -> str:
        with open(self._err.name) as f:
            return f.read()

    def agent_env(self) -> dict[str, str]:
        return {"EXPORT": "grpc", "TARGET_HOST": self.host, "TARGET_PORT": str(self.port)}

    def flows(self) -> list[dict]:
        with open(self._out.name) as f:
            text = f.read()
        # The collector may be writing right now: a last line without "\n" is not complete.
        if text and not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]
        return parse_json_lines(text, "gRPC collector stdout")

    def stop(self) -> None:
        terminate_group(self.proc)
