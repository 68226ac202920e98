#!/usr/bin/env python3
"""Find a working container engine (podman or docker); start Debian's dockerd if asked.

    python3 tools/engine.py                  # print the engine that works, exit 1 if none
    python3 tools/engine.py --start-dockerd [--pid-file F]
        # as root: start dockerd if it is installed but not running (its pid into F),
        # then print the engine

Used by tools/generate.py and tools/make_base_image.py (and the agent image build).
The engine is chosen automatically (the first of podman, docker whose `info` works);
--engine or $CONTAINER_ENGINE forces one. Standard library only.

dockerd is started without touching the host network: no iptables rules, no IP
forwarding, no docker0 bridge. Containers then have either `--network host` (image
builds that run apt-get) or `--network none` (compiling). Its log goes to
$DOCKERD_LOG (default /var/log/ei-dockerd.log).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("podman", "docker")
DOCKER_SOCKET = Path("/var/run/docker.sock")
# Leave the host's firewall, forwarding and bridges alone (other things run on this host).
DOCKERD_ARGS = ("--iptables=false", "--ip6tables=false", "--ip-forward=false", "--bridge=none")


class EngineError(RuntimeError):
    """No container engine works, or starting one failed."""


def works(engine: str) -> bool:
    """True if `engine info` succeeds (the CLI exists and its daemon/runtime answers)."""
    if not shutil.which(engine):
        return False
    try:
        proc = subprocess.run(
            [engine, "info"], capture_output=True, text=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def find_engine(forced: str | None = None) -> str:
    """The engine to use: `forced`, else $CONTAINER_ENGINE, else the first that works."""
    wanted = forced or os.environ.get("CONTAINER_ENGINE") or ""
    if wanted:
        if not works(wanted):
            raise EngineError(f"container engine {wanted!r} does not work (`{wanted} info` failed)")
        return wanted
    for engine in ENGINES:
        if works(engine):
            return engine
    hint = ""
    if shutil.which("dockerd"):
        hint = " (dockerd is installed: start it with `python3 tools/engine.py --start-dockerd`)"
    raise EngineError(f"no working container engine: tried {', '.join(ENGINES)}{hint}")


def start_dockerd(log: Path | None = None, wait_s: float = 60.0) -> int | None:
    """Start dockerd in the background unless docker already works; its pid, or None.

    Needs root and Debian's docker.io package (dockerd, containerd, runc).
    """
    if works("docker"):
        return None
    dockerd = shutil.which("dockerd")
    if not dockerd:
        raise EngineError("dockerd is not installed (apt-get install docker.io)")
    if os.geteuid() != 0:
        raise EngineError("starting dockerd needs root")
    log = log or Path(os.environ.get("DOCKERD_LOG", "/var/log/ei-dockerd.log"))
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [dockerd, *DOCKERD_ARGS],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives this script, like a service
        )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EngineError(f"dockerd exited with {proc.returncode}: see {log}")
        if DOCKER_SOCKET.exists() and works("docker"):
            return proc.pid
        time.sleep(0.5)
    raise EngineError(f"dockerd did not answer within {wait_s:.0f} s: see {log}")


def version(engine: str) -> str:
    """`<engine> <server version>`, for the build record."""
    fmt = "{{.Server.Version}}" if engine == "docker" else "{{.Version}}"
    proc = subprocess.run(
        [engine, "version", "--format", fmt], capture_output=True, text=True, check=False
    )
    return f"{engine} {proc.stdout.strip() or 'unknown'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", help="force podman or docker (default: $CONTAINER_ENGINE)")
    parser.add_argument(
        "--start-dockerd", action="store_true", help="start dockerd if installed but not running"
    )
    parser.add_argument(
        "--pid-file", type=Path, help="with --start-dockerd: write the pid of a dockerd it started"
    )
    args = parser.parse_args(argv)
    try:
        if args.start_dockerd and (args.engine or os.environ.get("CONTAINER_ENGINE")) != "podman":
            pid = start_dockerd()
            if pid:
                print(f"started dockerd (pid {pid})", file=sys.stderr)
                if args.pid_file:
                    args.pid_file.write_text(f"{pid}\n")
        print(find_engine(args.engine))
    except EngineError as exc:
        print(f"engine: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
