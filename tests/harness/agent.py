"""The agent as a real process inside a test namespace, configured only by environment.

Which agent runs: EI_AGENT_CMD (a shell-quoted command, e.g. `ei-ebpf-agent` from an installed
wheel) or, by default, `python -m ei_ebpf_agent` with the same package the tests import (the
installed wheel under nox, src/ when run from a source tree). A `prefix` (e.g. setpriv ...) goes between `ip netns exec NS` and the command;
`wrap` replaces the namespace wrapping altogether (e.g. a container runtime).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

STARTED = "agent started"


def agent_command() -> list[str]:
    """The command that runs the agent (its `collect` subcommand is the gRPC collector)."""
    custom = os.environ.get("EI_AGENT_CMD")
    return shlex.split(custom) if custom else [sys.executable, "-m", "ei_ebpf_agent"]


def agent_base_env() -> dict[str, str]:
    """A clean environment: nothing of the test runner's leaks into the agent's settings."""
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "HOME", "TMPDIR")
           if k in os.environ}
    if "EI_AGENT_CMD" not in os.environ:
        import ei_ebpf_agent

        env["PYTHONPATH"] = str(Path(ei_ebpf_agent.__file__).resolve().parents[1])
    env["PYTHONUNBUFFERED"] = "1"
    # Agents of different tests must not share pins: the restart tests pin on a bpffs of
    # their own (BPF_FS_PATH); every other test runs unpinned.
    env["PIN"] = "false"
    return env


@dataclass
class AgentResult:
    returncode: int
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


class AgentError(AssertionError):
    pass


class AgentProcess:
    """`with AgentProcess(topo, {"CACHE_ACTIVE_TIMEOUT": "200ms"}, collector) as agent:`

    Starts the agent in topo.a with the collector's EXPORT/TARGET_* variables (env wins on
    conflicts), waits for `agent started` on stderr; stop() sends SIGTERM and returns an
    AgentResult. Leaving the with block stops it if the test did not (and kills it if it
    does not exit), so no agent outlives its test.
    """

    def __init__(self, topology, env: dict[str, str] | None = None, collector=None, *,
                 prefix: Sequence[str] = (), namespace=None,
                 wrap: Callable[[object, list[str]], list[str]] | None = None,
                 start_timeout: float = 60.0) -> None:
        self.topology = topology
        self.ns = namespace or topology.a
        self.collector = collector
        self.env = agent_base_env()
        if collector is not None:
            self.env.update(collector.agent_env())
        self.env.update(env or {})
        self.prefix = list(prefix)
        self.wrap = wrap
        self.start_timeout = start_timeout
        self._err = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the agent
            "w+", prefix="ei-agent-", suffix=".log")
        self.proc: subprocess.Popen | None = None
        self.result: AgentResult | None = None

    def argv(self) -> list[str]:
        command = self.prefix + agent_command()
        return self.wrap(self.ns, command) if self.wrap else self.ns.argv(command)

    def spawn(self) -> AgentProcess:
        """Start the process without waiting for it to be ready."""
        stdout: IO | None = self.collector.agent_stdout() if self.collector else None
        self.proc = subprocess.Popen(self.argv(), env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=stdout if stdout is not None else subprocess.DEVNULL,
                                     stderr=self._err, start_new_session=True)
        return self

    def start(self) -> AgentProcess:
        """Start and wait for `agent started` on stderr (fails with the stderr so far)."""
        self.spawn()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if STARTED in self.stderr():
                return self
            if self.proc.poll() is not None:
                raise AgentError(f"agent exited with status {self.proc.returncode} before "
                                 f"{STARTED!r}; stderr:\n{self.stderr()}")
            time.sleep(0.05)
        self.kill()
        raise AgentError(f"agent did not log {STARTED!r} within {self.start_timeout:.0f} s; "
                         f"stderr:\n{self.stderr()}")

    def stderr(self) -> str:
        with open(self._err.name) as f:
            return f.read()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> AgentResult:
        """Send sig (SIGTERM) and wait for the exit: (exit code, stderr)."""
        if self.result is not None:
            return self.result
        if self.proc.poll() is None:
            self.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AgentError(f"agent did not exit within {timeout:.0f} s of signal {sig}; "
                                 f"stderr:\n{self.stderr()}") from None
        self.result = AgentResult(self.proc.returncode, self.stderr())
        return self.result

    def wait(self, timeout: float = 60.0) -> AgentResult:
        """Wait for the agent to exit on its own (e.g. a bad configuration)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AgentError(f"agent still running after {timeout:.0f} s; stderr:\n"
                             f"{self.stderr()}") from None
        self.result = AgentResult(self.proc.returncode, self.stderr())
        return self.result

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.alive():
            try:
                self.stop(timeout=30)
            finally:
                self.kill()


def run_agent_to_exit(topology, env: dict[str, str], timeout: float = 60.0, **kw) -> AgentResult:
    """Run the agent and wait for it to exit by itself (bad configuration tests)."""
    return AgentProcess(topology, env, **kw).spawn().wait(timeout)
