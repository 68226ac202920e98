"""Datapath cost: ns per packet of the agent's TC programs from kernel BPF statistics.

The agent and an EMPTY program (`return TC_ACT_UNSPEC`) are attached together, by TCX,
on ingress and egress of both ends of the A–B veth, so both run on exactly the same
packets in the same run. Kernel statistics time every program run (adding a floor of
about 65 ns to each, which the empty program shows); the agent's ns/packet is its
run_time_ns / run_cnt summed over its ingress and egress programs.

Cases, each on a freshly loaded agent. A flow is what the agent records and exports: one
5-tuple seen on one interface in one direction, so every 5-tuple sent from A to B makes
two flows (A egress, B ingress).
  (a) 16 hot flows (8 UDP 5-tuples);
  (b) 50,000 flows (25,000 5-tuples), packets cycling over all of them, so every
      packet finds its flow cache-cold; each packet is two flows (A egress, B ingress),
      which the table keeps side by side, so the second lookup finds the first one's
      lines in cache;
  (b1) 50,000 flows seen once each: 50,000 5-tuples, the agent on A's end only (every
      lookup a cache miss); no target, the cost of a flow no other interface sees;
  (b2) as (b) with 100,000 flows (50,000 5-tuples): no target, shown for scale;
  (c) a new flow in every packet (the table is evicted between rounds);
  (c-lock) the same with the programs kernels before 5.12 get, which fill a new flow's
      slot under a spin lock instead of a compare-and-exchange: no target, for scale.
"""

from __future__ import annotations

import ipaddress
import os
import statistics
from dataclasses import dataclass

import kbpf
import traffic

from ei_ebpf_agent.ebpf.layout import COUNTER_RINGBUF_RECORDS
from ei_ebpf_agent.ebpf.loader import FlowProgram
from ei_ebpf_agent.flow.tracer import FlowTracer

MAX_FLOWS = 150_000  # CACHE_MAX_FLOWS: room for case (b2)'s 100k flows
DIRECTIONS = ("ingress", "egress")


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    tuples: int  # UDP 5-tuples sent (each is two flows); 0: a new one every packet
    max_flows: int  # CACHE_MAX_FLOWS: the flows the case makes (the default for (a))
    target_ns: float | None  # agent ns/packet, stats floor included (from the issue)
    netobserv_ns: str  # the NetObserv program, features off, same machine class (DESIGN §3)
    cmpxchg: bool | None = None  # None: the programs the kernel gets; False: spin lock ones
    ends: str = "ab"  # veth ends the agent is attached to (the empty program: both)


CASES = (
    Case("a", "16 hot flows", 8, 5_000, 180, "~270"),
    Case("b", "50k flows, cache-cold", 25_000, 50_000, 300, "~470-500"),
    Case("b1", "50k flows seen once each, cache-cold", 50_000, 50_000, None, "", ends="a"),
    Case("b2", "100k flows, cache-cold", 50_000, 100_000, None, ""),
    Case("c", "new flow every packet", 0, 150_000, 400, "~900"),
    Case("c-lock", "new flow every packet, spin lock programs", 0, 150_000, None, "",
         cmpxchg=False),
)


def _hooks(topo, ends: str):
    """(namespace, ifindex, direction) of ingress and egress of the veth ends "a", "b"."""
    where = {"a": (topo.a, topo.ifindex_a), "b": (topo.b, topo.ifindex_b)}
    return [(*where[end], d) for end in ends for d in DIRECTIONS]


def attach_empty(topo, prog_fd: int, ends: str = "ab") -> list[int]:
    """TCX links of the empty program on ingress and egress of `ends`; close them to detach."""
    return [ns.call(lambda i=ifindex, d=d: kbpf.tcx_attach(prog_fd, i, d == "egress"))
            for ns, ifindex, d in _hooks(topo, ends)]


def attach_agent(topo, program: FlowProgram, ends: str = "ab") -> None:
    for ns, ifindex, d in _hooks(topo, ends):
        ns.call(lambda i=ifindex, d=d: program.attach(i, d, mode="tcx"))


class _Sampler:
    """run_time_ns/run_cnt deltas of the empty program and the agent's programs."""

    def __init__(self, empty_fd: int, program: FlowProgram) -> None:
        self.fds = {"empty": empty_fd, **{d: program.prog_fds[d] for d in DIRECTIONS}}
        self.start()

    def start(self) -> None:
        self.before = {k: kbpf.prog_stats(fd) for k, fd in self.fds.items()}

    def stop(self) -> dict:
        delta = {k: kbpf.prog_stats(fd) - self.before[k] for k, fd in self.fds.items()}
        agent_ns = sum(delta[d].run_time_ns for d in DIRECTIONS)
        agent_runs = sum(delta[d].run_cnt for d in DIRECTIONS)
        if not agent_runs or not delta["empty"].run_cnt:
            raise RuntimeError("no program run was counted: is the traffic reaching TC?")
        return {
            "empty_ns": delta["empty"].run_time_ns / delta["empty"].run_cnt,
            "agent_ns": agent_ns / agent_runs,
            "runs": agent_runs,
            # 0 for a direction that saw only stray packets (IPv6 neighbour discovery
            # on the idle direction of case b1): their cost says nothing about the case.
            **{f"agent_{d}_ns": delta[d].run_time_ns / delta[d].run_cnt
               if delta[d].run_cnt * 100 >= agent_runs else 0.0 for d in DIRECTIONS},
        }


def _hot(topo, sampler, keys: int, packets: int, rounds: int) -> list[dict]:
    config = traffic.hot_flows(topo, keys)
    traffic.send(topo, config, keys)  # insert every key first: measure updates only
    results = []
    for _ in range(rounds):
        sampler.start()
        traffic.send(topo, config, packets)
        results.append(sampler.stop())
    return results


def _new_flows(topo, program, sampler, packets: int, rounds: int) -> list[dict]:
    tracer = FlowTracer(program, interfaces_lookup=dict,
                        agent_ip=ipaddress.ip_address("127.0.0.1"))
    results = []
    try:
        for r in range(rounds):
            tracer.evict()  # the table the next packets go to is empty
            sampler.start()
            # Source addresses never repeat over the rounds: every packet is a new flow.
            traffic.send(topo, traffic.new_flows(topo, first=r * packets), packets)
            results.append(sampler.stop())
    finally:
        tracer.close()
    return results


def run(topo, quick: bool) -> list[dict]:
    """Measure every case; one dict per case with the medians over its rounds."""
    rounds = 3 if quick else 5
    packets = 100_000 if quick else 250_000
    new_packets = 40_000 if quick else 60_000
    empty_fd = kbpf.load_empty_tc_program()
    links = attach_empty(topo, empty_fd)
    stats_fd = kbpf.enable_stats()
    out = []
    try:
        for case in CASES:
            program = FlowProgram.load(max_flows=case.max_flows, cmpxchg=case.cmpxchg)
            try:
                attach_agent(topo, program, case.ends)
                sampler = _Sampler(empty_fd, program)
                if case.tuples:
                    rows = _hot(topo, sampler, case.tuples, packets, rounds)
                else:
                    rows = _new_flows(topo, program, sampler, new_packets, rounds)
                ringbuf = int(program.read_counters()[COUNTER_RINGBUF_RECORDS])
            finally:
                program.close()
            out.append(_summary(case, rows, ringbuf))
    finally:
        os.close(stats_fd)
        for fd in links:
            os.close(fd)
        os.close(empty_fd)
    return out


def _summary(case: Case, rows: list[dict], ringbuf_records: int) -> dict:
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {
        "case": case.name,
        "title": case.title,
        "empty_ns": median["empty_ns"],
        "agent_ns": median["agent_ns"],
        # Spread over the rounds: how noisy the machine was while this case ran.
        "agent_ns_range": (min(r["agent_ns"] for r in rows), max(r["agent_ns"] for r in rows)),
        "agent_minus_empty_ns": median["agent_ns"] - median["empty_ns"],
        "agent_ingress_ns": median["agent_ingress_ns"],
        "agent_egress_ns": median["agent_egress_ns"],
        "target_ns": case.target_ns,
        "netobserv_ns": case.netobserv_ns,
        "meets": None if case.target_ns is None else median["agent_ns"] <= case.target_ns,
        "rounds": rows,
        # Packets that found the table full went through the ring buffer instead: must
        # be 0, or the case measured the wrong path.
        "ringbuf_records": ringbuf_records,
    }
