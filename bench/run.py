#!/usr/bin/env python3
"""Benchmarks of the EI eBPF Agent (`nox -s bench`; needs root): one table, one JSON file.

- datapath: ns/packet of the agent's TC programs vs an empty program, from kernel BPF
  statistics, on a veth between two namespaces made here (16 hot flows, 50k flows,
  a new flow every packet);
- throughput: UDP packets/s through that veth with no program, the empty program and
  the agent, interleaved;
- userspace: flows/s from the kernel table to pbflow bytes for 100,000 flows, and the
  peak RSS of a process doing only that.

Every comparison is made side by side in the same run. Nothing is asserted: targets
are printed next to the values. Results go to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(1, ROOT)  # tests.harness (the namespaces and veth of the integration tests)
try:
    import ei_ebpf_agent  # noqa: F401  (installed by nox; else run from the source tree)
except ImportError:
    sys.path.append(os.path.join(ROOT, "src"))

PARTS = ("datapath", "throughput", "userspace")


def main() -> int:
    parser = argparse.ArgumentParser(description="EI eBPF Agent benchmarks (root).")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and packets")
    parser.add_argument("--only", choices=PARTS, action="append",
                        help="run only this part (repeatable)")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "latest.json"),
                        help="where to write the JSON results (default: %(default)s)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/run.py needs root: it makes network namespaces, loads eBPF programs "
              "and turns on kernel BPF statistics.", file=sys.stderr)
        return 1
    if not shutil.which("trafgen"):
        print("bench/run.py needs trafgen (Debian package netsniff-ng).", file=sys.stderr)
        return 1
    parts = args.only or list(PARTS)

    import datapath
    import throughput
    import userspace

    from tests.harness.netns import Topology

    results: dict = {
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "loadavg_start": os.getloadavg()},
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    started = time.monotonic()
    if "datapath" in parts or "throughput" in parts:
        with Topology() as topo:
            if "datapath" in parts:
                _log("datapath: kernel BPF statistics, agent vs empty program")
                results["datapath"] = datapath.run(topo, args.quick)
            if "throughput" in parts:
                _log("throughput: no program / empty program / agent, interleaved")
                results["throughput"] = throughput.run(topo, args.quick)
    if "userspace" in parts:
        _log("userspace: evict + decode + pbflow encode of 100,000 flows")
        results["userspace"] = userspace.run(args.quick)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["seconds"] = round(time.monotonic() - started, 1)

    print(format_table(results))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(results, file, indent=2)
    print(f"\nresults: {args.output}")
    return 0


def _log(message: str) -> None:
    print(f"== {message}", file=sys.stderr, flush=True)


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def _ns(value: float) -> str:
    """A per-direction ns/packet; 0 means that direction ran no packet in the case."""
    return f"{value:.0f}" if value else "-"


def _per_s_range(u: dict) -> str:
    """Slowest-fastest round of the userspace pipeline, in flows/s: the machine's noise."""
    cpu = u["rounds"]["cpu_s"]
    return f"{u['flows'] / max(cpu):,.0f}-{u['flows'] / min(cpu):,.0f}"


def format_table(results: dict) -> str:
    """Every measured value with its target and whether it meets it, as plain text."""
    rows = [("measure", "value", "target", "meets")]
    for case in results.get("datapath", []):
        name = f"datapath ({case['case']}) {case['title']}"
        rows += [
            (f"{name}: empty program (floor)", f"{case['empty_ns']:.0f} ns/pkt", "", ""),
            (f"{name}: agent", f"{case['agent_ns']:.0f} ns/pkt (in {_ns(case['agent_ingress_ns'])}"
                               f", out {_ns(case['agent_egress_ns'])}; rounds "
                               f"{case['agent_ns_range'][0]:.0f}-{case['agent_ns_range'][1]:.0f})",
             "" if case["target_ns"] is None
             else f"<= {case['target_ns']:.0f} (NetObserv {case['netobserv_ns']})",
             "" if case["meets"] is None else _yes(case["meets"])),
            (f"{name}: agent - empty", f"{case['agent_minus_empty_ns']:.0f} ns/pkt", "", ""),
        ]
        if case["ringbuf_records"]:
            rows.append((f"{name}: packets via ring buffer (table full!)",
                         str(case["ringbuf_records"]), "0", "NO"))
    for t in results.get("throughput", []):
        name = f"throughput {t['traffic']}"
        rows += [
            (f"{name}: no program", f"{t['pps']['none']:,.0f} pkt/s", "", ""),
            (f"{name}: empty program", f"{t['ratio_vs_none']['empty']:.3f}x", "", ""),
            (f"{name}: agent", f"{t['ratio_vs_none']['agent']:.3f}x",
             f">= {t['target_ratio']:.2f}x", _yes(t["meets"])),
            (f"{name}: agent, both veth ends", f"{t['ratio_vs_none']['agent, both ends']:.3f}x",
             "", ""),
        ]
    u = results.get("userspace")
    if u:
        n = f"{u['flows']:,}"
        rows += [
            (f"userspace: evict {n} (swap+drain+decode)", f"{u['evict_ms']:.1f} ms", "", ""),
            (f"userspace: pbflow encode {n}", f"{u['encode_ms']:.1f} ms", "", ""),
            ("userspace: drain -> decode -> encode (CPU time, one core)",
             f"{u['flows_per_s']:,.0f} flows/s (rounds {_per_s_range(u)})",
             f">= {u['target_flows_per_s']:,}", _yes(u["meets_flows_per_s"])),
            ("userspace: the same, wall clock (incl. RCU wait of the swap)",
             f"{u['flows_per_s_wall']:,.0f} flows/s", "", ""),
            (f"userspace: IPFIX encode {n} (1400-byte messages)",
             f"{u['ipfix_flows_per_s']:,.0f} flows/s",
             f">= {u['target_flows_per_s']:,}", _yes(u["meets_ipfix_flows_per_s"])),
            ("userspace: peak RSS of that process", f"{u['rss_peak_mb']:.1f} MB",
             f"<= {u['target_rss_mb']} MB", _yes(u["meets_rss"])),
        ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    m = results["machine"]
    lines.append("")
    lines.append(f"kernel {m['kernel']}, {m['cpus']} CPUs, load average "
                 f"{m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}"
                 f"{', quick run' if results['quick'] else ''}, {results['seconds']} s. "
                 "ns/pkt: median of the rounds (their range in brackets), including the "
                 "~50-65 ns that kernel BPF statistics add to every run.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
