#!/usr/bin/env python3
"""Paired A/B of datapath builds: the benchmark's cases, alternating the builds round by
round in one run, so that a shared, noisy machine moves both alike (root).

    python3 tools/build_ebpf.py --out /tmp/a        # in a checkout of one version
    python3 tools/build_ebpf.py --out /tmp/b        # in a checkout of the other
    .nox/bench/bin/python bench/ab.py --rounds 8 --case b --case c /tmp/a /tmp/b

Each directory holds a flows_bpfel.o and its SHA256SUMS (what `build_ebpf.py --out`
writes). A case is one of bench/datapath.py's (a, b, b1, b2, c, c-lock) or
TUPLES:MAX_FLOWS[:ENDS] (e.g. 6000:12000:a). Prints, per case and build, the median of the
agent's ns/packet above the empty program's, and in how many rounds each later build beat
the first one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(1, os.path.dirname(HERE))  # tests.harness
try:
    import ei_ebpf_agent  # noqa: F401  (installed by nox; else run from the source tree)
except ImportError:
    sys.path.append(os.path.join(os.path.dirname(HERE), "src"))

import datapath  # noqa: E402
import kbpf  # noqa: E402

from ei_ebpf_agent.ebpf.loader import FlowProgram  # noqa: E402

PACKETS = 150_000  # per round of a hot/cold case
NEW_FLOW_PACKETS = 60_000  # per round of a new-flow case


def parse_case(text: str) -> datapath.Case:
    for case in datapath.CASES:
        if case.name == text:
            return case
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[:2]):
        raise argparse.ArgumentTypeError(
            f"{text!r}: not a case of bench/datapath.py nor TUPLES:MAX_FLOWS[:ENDS]")
    return datapath.Case(text, text, int(parts[0]), int(parts[1]), None, "",
                         ends=parts[2] if len(parts) == 3 else "ab")


def measure(topo, empty_fd: int, case: datapath.Case, objects: Path) -> float:
    """Median over two rounds of the agent's ns/packet minus the empty program's."""
    program = FlowProgram.load(max_flows=case.max_flows, cmpxchg=case.cmpxchg,
                               objects=objects)
    try:
        datapath.attach_agent(topo, program, case.ends)
        sampler = datapath._Sampler(empty_fd, program)
        if case.tuples:
            rows = datapath._hot(topo, sampler, case.tuples, PACKETS, 2)
        else:
            rows = datapath._new_flows(topo, program, sampler, NEW_FLOW_PACKETS, 2)
    finally:
        program.close()
    return statistics.median(r["agent_ns"] - r["empty_ns"] for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="+", type=Path, help="object directories (2 or more)")
    parser.add_argument("--case", action="append", type=parse_case, required=True)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if len(set(args.builds)) != len(args.builds) or len(args.builds) < 2:
        parser.error("give at least two different build directories")
    if os.geteuid() != 0:
        print("bench/ab.py needs root (namespaces, eBPF, BPF statistics).", file=sys.stderr)
        return 1

    from tests.harness.netns import Topology

    results = {(c.name, b): [] for c in args.case for b in args.builds}
    with Topology() as topo:
        empty_fd = kbpf.load_empty_tc_program()
        links = datapath.attach_empty(topo, empty_fd)
        stats_fd = kbpf.enable_stats()
        try:
            for r in range(args.rounds):
                for case in args.case:
                    # Alternate which build goes first: neither always runs on a warm cache.
                    for build in (args.builds if r % 2 == 0 else args.builds[::-1]):
                        results[(case.name, build)].append(measure(topo, empty_fd, case, build))
                print(f"round {r + 1}: " + ", ".join(
                    f"{c.name} {b.name} {results[(c.name, b)][-1]:.0f}"
                    for c in args.case for b in args.builds), flush=True)
        finally:
            os.close(stats_fd)
            for fd in links:
                os.close(fd)
            os.close(empty_fd)
    first = args.builds[0]
    for case in args.case:
        base = results[(case.name, first)]
        print(f"case {case.name}: agent - empty, median ns/packet")
        for build in args.builds:
            got = results[(case.name, build)]
            line = f"  {build}: {statistics.median(got):.1f}"
            if build != first:
                wins = sum(x < y for x, y in zip(got, base))
                line += (f"  ({statistics.median(got) / statistics.median(base):.3f}x the "
                         f"first; faster in {wins} of {len(got)} rounds)")
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
