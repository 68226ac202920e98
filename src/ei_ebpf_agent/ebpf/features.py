"""What the running kernel offers the agent, probed once at start with tiny BPF objects.

Each probe asks the kernel directly (a throw-away map or program, closed at once) rather
than trusting the version number, because distributions backport BPF features:

- ring buffer maps (BPF_MAP_TYPE_RINGBUF, Linux 5.8): required, the full-table fallback;
- map-in-map (BPF_MAP_TYPE_ARRAY_OF_MAPS, Linux 4.12): required, the table swap;
- the coarse clock helper bpf_ktime_get_coarse_ns (Linux 5.11): optional; without it
  the program reads the exact clock, which costs more per packet.
- atomic compare-and-exchange (BPF_CMPXCHG, Linux 5.12, with the other atomic the
  programs use then: atomic OR): optional; without it the loader picks the programs
  that fill a new flow's slot under a spin lock, which costs more per new flow, and OR
  TCP flags without an atomic. Probed by loading *and running* (BPF_PROG_TEST_RUN) a
  tiny program with both instructions: a verifier that knows them is not enough where
  the JIT does not (arm64 before 5.18).

Everything else the program uses is older than the ring buffer: mmapable arrays (the
flow tables, 5.5), bpf_spin_lock (5.1), bounded loops (5.3).
- TCX links (BPF_LINK_CREATE with BPF_TCX_INGRESS, Linux 6.6): optional; without them
  the agent attaches clsact tc filters.

The TCX probe touches no interface: it asks for a TCX link on interface index 0, which a
kernel that knows TCX refuses with ENODEV (no such device) and an older one with EINVAL
(unknown attach type) before looking at the interface.

A probe answers yes or no, or the agent cannot start: an error other than "unsupported"
(no privileges, say) raises AgentStartError with one line, and nothing is guessed from
the kernel version. `current()` probes once per process; the agent's start-up check and
the loader share that one answer.

Usage: `features = current(); features.log_once(); features.check()` (check raises
`MissingKernelFeature` whose message is one line naming the feature and kernel needed).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import platform
import struct
import sys
from dataclasses import asdict, dataclass
from typing import Callable

from ei_ebpf_agent.ebpf import libbpf
from ei_ebpf_agent.ebpf.libbpf import LibbpfError
from ei_ebpf_agent.privileges import start_error

log = logging.getLogger(__name__)

# UAPI enum values (stable ABI)
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_MAP_TYPE_RINGBUF = 27
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_FUNC_KTIME_GET_COARSE_NS = 160

# feature -> (human name, first kernel version, required)
FEATURES: dict[str, tuple[str, str, bool]] = {
    "ringbuf": ("BPF ring buffer maps", "5.8", True),
    "map_in_map": ("BPF map-in-map (ARRAY_OF_MAPS)", "4.12", True),
    "coarse_clock": ("the coarse clock helper bpf_ktime_get_coarse_ns", "5.11", False),
    "cmpxchg": ("BPF atomic compare-and-exchange", "5.12", False),
    "tcx": ("TCX links", "6.6", False),
}


class MissingKernelFeature(RuntimeError):
    """The kernel lacks a feature the agent needs; str() is one line saying which."""


@dataclass(frozen=True)
class KernelFeatures:
    kernel: str
    ringbuf: bool
    map_in_map: bool
    coarse_clock: bool
    cmpxchg: bool
    tcx: bool

    @property
    def attach_mode(self) -> str:
        """"tcx" or "tc" (clsact filter): what the loader's "any" mode ends up using."""
        return "tcx" if self.tcx else "tc"

    def missing(self) -> list[str]:
        """Names of the required features this kernel lacks."""
        return [name for name, (_, _, required) in FEATURES.items()
                if required and not getattr(self, name)]

    def problem(self) -> str | None:
        """None, or one line naming what is missing and the kernel version needed."""
        missing = self.missing()
        if not missing:
            return None
        needed = max((FEATURES[name][1] for name in missing), key=_version_key)
        what = ", ".join(f"{FEATURES[name][0]} (Linux {FEATURES[name][1]})" for name in missing)
        return (f"kernel {self.kernel} lacks {what}: the agent needs Linux {needed} or newer")

    def check(self) -> None:
        problem = self.problem()
        if problem:
            raise MissingKernelFeature(problem)

    def describe(self) -> str:
        def word(flag: bool) -> str:
            return "yes" if flag else "no"

        mode = "TCX links" if self.tcx else "clsact tc filters (no TCX before Linux 6.6)"
        return (f"kernel {self.kernel}: attaching with {mode}; ring buffer {word(self.ringbuf)}, "
                f"map-in-map {word(self.map_in_map)}, coarse clock {word(self.coarse_clock)}, "
                f"compare-and-exchange {word(self.cmpxchg)}")

    def log_once(self) -> None:
        if not _logged:
            _logged.append(True)
            log.info("%s", self.describe())

    def as_dict(self) -> dict:
        return {**asdict(self), "attach_mode": self.attach_mode}


_logged: list[bool] = []


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


# -- the probes ------------------------------------------------------------------------


def _close(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


# errno values meaning "this kernel (or its JIT) cannot do that".
_UNSUPPORTED = {errno.EINVAL, errno.EOPNOTSUPP, 524}  # 524: ENOTSUPP, the JIT's refusal


def _map_type_works(map_type: int) -> bool:
    # libbpf picks sizes valid for the type (a page for a ring buffer, an inner map for
    # map-in-map); 1 = supported, 0 = not, < 0 = it could not tell (e.g. EPERM).
    answer = libbpf.libbpf_probe_bpf_map_type(map_type, None)
    if answer < 0:
        raise LibbpfError("libbpf_probe_bpf_map_type", -answer)
    if answer == 1:
        return True
    # libbpf 1.1 also answers 0 when the process may not create maps at all (no CAP_BPF,
    # lockdown): make sure a plain hash map can be made, else the answer means nothing
    # (this raises LibbpfError with EPERM).
    _close(libbpf.bpf_map_create(BPF_MAP_TYPE_HASH, b"ei_probe", 4, 4, 1, None))
    return False


def probe_ringbuf() -> bool:
    return _map_type_works(BPF_MAP_TYPE_RINGBUF)


def probe_map_in_map() -> bool:
    return _map_type_works(BPF_MAP_TYPE_ARRAY_OF_MAPS)


def probe_coarse_clock() -> bool:
    """Whether TC programs may call bpf_ktime_get_coarse_ns."""
    answer = libbpf.libbpf_probe_bpf_helper(BPF_PROG_TYPE_SCHED_CLS,
                                            BPF_FUNC_KTIME_GET_COARSE_NS, None)
    if answer < 0:
        raise LibbpfError("libbpf_probe_bpf_helper", -answer)
    return answer == 1


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0,
         byteorder: str = sys.byteorder) -> bytes:
    """One struct bpf_insn {u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm} in the
    host's byte order; the register nibbles swap places on big-endian hosts (bit fields)."""
    little = byteorder == "little"
    regs = (dst | src << 4) if little else (dst << 4 | src)
    return struct.pack("<BBhi" if little else ">BBhi", code, regs, off, imm)


_BPF_ALU64_MOV_K, _BPF_EXIT, _BPF_ST_MEM_W, _BPF_LDX_MEM_W = 0xB7, 0x95, 0x62, 0x61
_BPF_STX_ATOMIC_W = 0xC3
_BPF_OR, _BPF_CMPXCHG = 0x40, 0xF1  # imm of an atomic: the operation (cmpxchg fetches)
_R0, _R1, _R10 = 0, 1, 10

# r0 = -1 (TC_ACT_UNSPEC / TCX_NEXT); exit
RETURN_MINUS_ONE = insn(_BPF_ALU64_MOV_K, _R0, imm=-1) + insn(_BPF_EXIT)
# The atomics of the programs, 32-bit as they use them: *(u32 *)(fp - 4) = 0;
# w0 = cmpxchg(fp - 4, w0 = 0, w1 = 1) (stores 1); lock *(u32 *)(fp - 4) |= (w1 = 2);
# return *(u32 *)(fp - 4), which is 3 where both really ran.
_ATOMICS = (insn(_BPF_ST_MEM_W, _R10, off=-4, imm=0)
            + insn(_BPF_ALU64_MOV_K, _R0, imm=0)
            + insn(_BPF_ALU64_MOV_K, _R1, imm=1)
            + insn(_BPF_STX_ATOMIC_W, _R10, _R1, off=-4, imm=_BPF_CMPXCHG)
            + insn(_BPF_ALU64_MOV_K, _R1, imm=2)
            + insn(_BPF_STX_ATOMIC_W, _R10, _R1, off=-4, imm=_BPF_OR)
            + insn(_BPF_LDX_MEM_W, _R0, _R10, off=-4)
            + insn(_BPF_EXIT))
_ATOMICS_RESULT = 3


def load_tc_program(instructions: bytes, name: bytes = b"ei_probe") -> int:
    """Load raw instructions as a SCHED_CLS program; returns its fd (the caller closes it)."""
    insns = ctypes.create_string_buffer(instructions, len(instructions))
    return libbpf.bpf_prog_load(BPF_PROG_TYPE_SCHED_CLS, name, b"GPL", insns,
                                len(instructions) // 8, None)


def probe_cmpxchg() -> bool:
    """Whether the kernel loads *and runs* 32-bit compare-and-exchange and atomic OR."""
    try:
        prog = load_tc_program(_ATOMICS)
    except LibbpfError as error:
        if error.errno in _UNSUPPORTED:  # 5.10's verifier; a JIT that cannot emit them
            return False
        raise
    try:
        packet = ctypes.create_string_buffer(64)  # a TC program runs on at least ETH_HLEN
        opts = libbpf.make_opts(libbpf.bpf_test_run_opts, data_in=ctypes.addressof(packet),
                                data_size_in=len(packet), repeat=1)
        libbpf.bpf_prog_test_run_opts(prog, ctypes.byref(opts))
        return opts.retval == _ATOMICS_RESULT
    finally:
        _close(prog)


def probe_tcx() -> bool:
    """Whether BPF_LINK_CREATE knows the TCX attach types (no interface is touched)."""
    prog = load_tc_program(RETURN_MINUS_ONE)
    try:
        link = libbpf.bpf_link_create(prog, 0, libbpf.BPF_TCX_INGRESS, None)
    except LibbpfError as error:
        if error.errno in (errno.ENODEV, errno.EINVAL):
            return error.errno == errno.ENODEV
        raise
    else:  # cannot happen with index 0; never leave a link behind
        _close(link)
        return True
    finally:
        _close(prog)


PROBES: dict[str, Callable[[], bool]] = {
    "ringbuf": probe_ringbuf,
    "map_in_map": probe_map_in_map,
    "coarse_clock": probe_coarse_clock,
    "cmpxchg": probe_cmpxchg,
    "tcx": probe_tcx,
}


def probe(release: str | None = None) -> KernelFeatures:
    """Probe every feature; AgentStartError (one line) if a probe cannot tell."""
    found = {}
    for name, function in PROBES.items():
        try:
            found[name] = function()
        except OSError as error:
            raise start_error(f"cannot probe the kernel for {FEATURES[name][0]}",
                              error) from error
    return KernelFeatures(kernel=release or platform.release(), **found)


@functools.lru_cache(maxsize=1)
def current() -> KernelFeatures:
    """This kernel's features, probed on first use and then remembered for the process."""
    return probe()
