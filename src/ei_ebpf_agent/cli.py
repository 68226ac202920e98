"""Command line: `ei-ebpf-agent` runs the agent; `ei-ebpf-agent collect` runs a collector."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ei_ebpf_agent import __version__

EXIT_BAD_CONFIG = 2
EXIT_START_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ei-ebpf-agent",
        description="Collect every network flow of this host with eBPF and export it. "
        "Configured by environment variables (see docs/config.md).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="run the agent (the default)")
    collect = commands.add_parser(
        "collect", help="run a gRPC (pbflow) collector that prints every flow as a JSON line"
    )
    collect.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    collect.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "collect":
        from ei_ebpf_agent.collector import run_collector

        return run_collector(args.host, args.port)
    return _run_agent()


def _run_agent() -> int:
    from ei_ebpf_agent.config import ConfigError, describe, load_settings

    try:
        settings = load_settings(os.environ)
    except ConfigError as error:
        print(f"ei-ebpf-agent: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    _configure_logging(settings.log_level)
    logging.getLogger("ei_ebpf_agent").info(describe(settings))

    from ei_ebpf_agent.agent import Agent
    from ei_ebpf_agent.errors import AgentStartError

    try:
        return Agent(settings).run()
    except AgentStartError as error:
        print(f"ei-ebpf-agent: {error}", file=sys.stderr)
        return EXIT_START_FAILED


def _configure_logging(level: str) -> None:
    from ei_ebpf_agent.config import log_level_number

    logging.basicConfig(
        level=log_level_number(level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
