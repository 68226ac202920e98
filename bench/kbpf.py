"""The few BPF calls the benchmarks need beyond the agent's own, on the agent's one
libbpf binding (ei_ebpf_agent.ebpf.libbpf):

- an EMPTY TC program (`r0 = TC_ACT_UNSPEC; exit`): the floor every measurement is
  compared with;
- TCX attachment of any program fd to an interface (kernel >= 6.6);
- kernel BPF run-time statistics (BPF_ENABLE_STATS: enabled while the returned fd is
  open, so they are switched off again even if the benchmark dies);
- run_time_ns / run_cnt of a program (BPF_OBJ_GET_INFO_BY_FD).
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from ei_ebpf_agent.ebpf import libbpf
from ei_ebpf_agent.ebpf.features import RETURN_MINUS_ONE, load_tc_program

BPF_STATS_RUN_TIME = 0


def load_empty_tc_program(name: str = "bench_empty") -> int:
    """Load `r0 = -1 (TC_ACT_UNSPEC); exit` as SCHED_CLS; returns the program fd."""
    return load_tc_program(RETURN_MINUS_ONE, name.encode()[:15])


def tcx_attach(prog_fd: int, ifindex: int, egress: bool) -> int:
    """Append `prog_fd` to the TCX chain of `ifindex`; returns the link fd (close = detach).

    The ifindex is resolved in the calling thread's network namespace.
    """
    attach_type = libbpf.BPF_TCX_EGRESS if egress else libbpf.BPF_TCX_INGRESS
    return libbpf.bpf_link_create(prog_fd, ifindex, attach_type, None)


def enable_stats() -> int:
    """Turn kernel BPF run-time statistics on until the returned fd is closed."""
    return libbpf.bpf_enable_stats(BPF_STATS_RUN_TIME)


@dataclass(frozen=True)
class ProgStats:
    prog_id: int
    name: str
    run_time_ns: int
    run_cnt: int

    def __sub__(self, before: ProgStats) -> ProgStats:
        return ProgStats(self.prog_id, self.name, self.run_time_ns - before.run_time_ns,
                         self.run_cnt - before.run_cnt)


def prog_stats(prog_fd: int) -> ProgStats:
    """id, name, run_time_ns and run_cnt of a program (struct bpf_prog_info, host order)."""
    info = ctypes.create_string_buffer(232)  # up to and including run_cnt
    size = ctypes.c_uint32(len(info))
    libbpf.bpf_obj_get_info_by_fd(prog_fd, info, ctypes.byref(size))
    (prog_id,) = struct.unpack_from("=I", info, 4)
    name = info.raw[64:80].split(b"\0", 1)[0].decode()
    run_time_ns, run_cnt = struct.unpack_from("=QQ", info, 192)
    return ProgStats(prog_id, name, run_time_ns, run_cnt)
