"""The few bpf(2) commands the benchmarks need, with ctypes (no compiler, no libbpf).

- an EMPTY TC program (`r0 = TC_ACT_UNSPEC; exit`): the floor every measurement is
  compared with;
- TCX attachment of any program fd to an interface (kernel >= 6.6);
- kernel BPF run-time statistics (BPF_ENABLE_STATS: enabled while the returned fd is
  open, so they are switched off again even if the benchmark dies);
- run_time_ns / run_cnt of a program (BPF_OBJ_GET_INFO_BY_FD).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import struct
from dataclasses import dataclass

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long

# __NR_bpf per architecture.
_NR_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}

BPF_PROG_LOAD = 5
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_LINK_CREATE = 28
BPF_ENABLE_STATS = 32
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_STATS_RUN_TIME = 0

_ATTR_SIZE = 128  # larger than every attr we fill; the kernel checks the tail is zero


def _bpf(cmd: int, attr: ctypes.Array, what: str) -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise OSError(f"bpf(2): unknown syscall number on {platform.machine()}")
    ret = _libc.syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({what}) failed: {os.strerror(err)}")
    return ret


def load_empty_tc_program(name: str = "bench_empty") -> int:
    """Load `r0 = -1 (TC_ACT_UNSPEC); exit` as SCHED_CLS; returns the program fd."""
    insns = struct.pack("<BBhi", 0xB7, 0x00, 0, -1)  # BPF_ALU64|BPF_MOV|BPF_K r0 = -1
    insns += struct.pack("<BBhi", 0x95, 0x00, 0, 0)  # BPF_JMP|BPF_EXIT
    insn_buf = ctypes.create_string_buffer(insns, len(insns))
    license_buf = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("<II", attr, 0, BPF_PROG_TYPE_SCHED_CLS, 2)
    struct.pack_into("<QQ", attr, 8, ctypes.addressof(insn_buf), ctypes.addressof(license_buf))
    struct.pack_into("16s", attr, 48, name.encode()[:15])
    return _bpf(BPF_PROG_LOAD, attr, "BPF_PROG_LOAD empty SCHED_CLS")


def tcx_attach(prog_fd: int, ifindex: int, egress: bool) -> int:
    """Append `prog_fd` to the TCX chain of `ifindex`; returns the link fd (close = detach).

    The ifindex is resolved in the calling thread's network namespace.
    """
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    attach_type = BPF_TCX_EGRESS if egress else BPF_TCX_INGRESS
    struct.pack_into("<IIII", attr, 0, prog_fd, ifindex, attach_type, 0)
    return _bpf(BPF_LINK_CREATE, attr, f"BPF_LINK_CREATE tcx ifindex {ifindex}")


def enable_stats() -> int:
    """Turn kernel BPF run-time statistics on until the returned fd is closed."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("<I", attr, 0, BPF_STATS_RUN_TIME)
    return _bpf(BPF_ENABLE_STATS, attr, "BPF_ENABLE_STATS run_time")


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
    """id, name, run_time_ns and run_cnt of a program (struct bpf_prog_info)."""
    info = ctypes.create_string_buffer(232)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("<IIQ", attr, 0, prog_fd, len(info), ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"BPF_OBJ_GET_INFO_BY_FD prog fd {prog_fd}")
    (prog_id,) = struct.unpack_from("<I", info, 4)
    name = info.raw[64:80].split(b"\0", 1)[0].decode()
    run_time_ns, run_cnt = struct.unpack_from("<QQ", info, 192)
    return ProgStats(prog_id, name, run_time_ns, run_cnt)
