"""What the running kernel offers the agent, probed once at start with tiny BPF objects.

Each probe asks the kernel directly (a throw-away map or program, closed at once) rather
than trusting the version number, because distributions backport BPF features:

- ring buffer maps (BPF_MAP_TYPE_RINGBUF, Linux 5.8): required, the full-table fallback;
- map-in-map (BPF_MAP_TYPE_ARRAY_OF_MAPS, Linux 4.12): required, the table swap;
- the coarse clock helper bpf_ktime_get_coarse_ns (Linux 5.11): optional; without it
  the program reads the exact clock, which costs more per packet.
- atomic compare-and-exchange (BPF_CMPXCHG, Linux 5.12, with the other atomics the
  programs use then: atomic OR): optional; without it the loader picks the programs
  that fill a new flow's slot under a spin lock, which costs more per new flow, and OR
  TCP flags without an atomic.

Everything else the program uses is older than the ring buffer: mmapable arrays (the
flow tables, 5.5), bpf_spin_lock (5.1), bounded loops (5.3).
- TCX links (BPF_LINK_CREATE with BPF_TCX_INGRESS, Linux 6.6): optional; without them
  the agent attaches clsact tc filters.

The TCX probe touches no interface: it asks for a TCX link on interface index 0, which a
kernel that knows TCX refuses with ENODEV (no such device) and an older one with EINVAL
(unknown attach type) before looking at the interface.

Usage: `features = probe(); features.log_once(); features.check()` (check raises
`MissingKernelFeature` whose message is one line naming the feature and kernel needed).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import struct
import sys
from dataclasses import asdict, dataclass
from typing import Callable

from ei_ebpf_agent.ebpf import libbpf
from ei_ebpf_agent.ebpf.libbpf import LibbpfError

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


def _map_type_works(map_type: int) -> bool:
    # libbpf picks sizes valid for the type (a page for a ring buffer, an inner map for
    # map-in-map); 1 = supported, 0 = not, < 0 = it could not tell (e.g. EPERM).
    if _lib["libbpf_probe_bpf_map_type"](map_type, None) == 1:
        return True
    # libbpf 1.1 also answers 0 when the process may not create maps at all (no CAP_BPF,
    # lockdown): make sure a plain hash map can be made, else the answer means nothing
    # (this raises LibbpfError, and probe() falls back to the kernel version).
    _close(_lib["bpf_map_create"](BPF_MAP_TYPE_HASH, b"ei_probe", 4, 4, 1, None))
    return False


def probe_ringbuf() -> bool:
    return _map_type_works(BPF_MAP_TYPE_RINGBUF)


def probe_map_in_map() -> bool:
    return _map_type_works(BPF_MAP_TYPE_ARRAY_OF_MAPS)


def probe_coarse_clock() -> bool:
    """Whether TC programs may call bpf_ktime_get_coarse_ns."""
    answer = _lib["libbpf_probe_bpf_helper"](BPF_PROG_TYPE_SCHED_CLS, BPF_FUNC_KTIME_GET_COARSE_NS,
                                             None)
    if answer < 0:
        raise LibbpfError("libbpf_probe_bpf_helper", -answer)
    return answer == 1


# r0 = -1 (TC_ACT_UNSPEC / TCX_NEXT); exit. struct bpf_insn: u8 code, u8 regs, s16 off, s32 imm
_RETURN_MINUS_ONE = struct.pack("=BBhi", 0xB7, 0, 0, -1) + struct.pack("=BBhi", 0x95, 0, 0, 0)
# *(u32 *)(r10 - 4) = 0; r0 = 0; r1 = 1; w0 = cmpxchg32(r10 - 4, w0, w1); then the above.
# regs: dst in the low nibble, src in the high one (little-endian hosts only: the agent
# runs the bpfel object there; on big-endian ones the probe errs and the version decides).
_CMPXCHG32 = (struct.pack("=BBhi", 0x62, 0x0A, -4, 0)        # BPF_ST | BPF_MEM | BPF_W
              + struct.pack("=BBhi", 0xB7, 0x00, 0, 0)
              + struct.pack("=BBhi", 0xB7, 0x01, 0, 1)
              + struct.pack("=BBhi", 0xC3, 0x1A, -4, 0xF1)   # BPF_STX | BPF_ATOMIC | BPF_W
              + _RETURN_MINUS_ONE)


def probe_cmpxchg() -> bool:
    """Whether the verifier accepts BPF_CMPXCHG (5.10 rejects its instruction outright)."""
    if sys.byteorder != "little":
        raise OSError(errno.ENOTSUP, "the probe's instructions are little-endian")
    insns = ctypes.create_string_buffer(_CMPXCHG32, len(_CMPXCHG32))
    try:
        prog = _lib["bpf_prog_load"](BPF_PROG_TYPE_SCHED_CLS, b"ei_probe", b"GPL", insns,
                                    len(_CMPXCHG32) // 8, None)
    except LibbpfError as error:
        if error.errno == errno.EINVAL:
            return False
        raise
    _close(prog)
    return True


def probe_tcx() -> bool:
    """Whether BPF_LINK_CREATE knows the TCX attach types (no interface is touched)."""
    insns = ctypes.create_string_buffer(_RETURN_MINUS_ONE, len(_RETURN_MINUS_ONE))
    prog = _lib["bpf_prog_load"](BPF_PROG_TYPE_SCHED_CLS, b"ei_probe", b"GPL", insns,
                                len(_RETURN_MINUS_ONE) // 8, None)
    try:
        link = libbpf.bpf_link_create(prog, 0, libbpf.BPF_TCX_INGRESS, None)
    except LibbpfError as error:
        return error.errno == errno.ENODEV
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


def kernel_version_fallback(release: str) -> dict[str, bool]:
    """Feature flags guessed from a `uname -r` string (used only when a probe errs)."""
    numbers = []
    for part in release.split("-")[0].split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        numbers.append(int(digits or 0))
    version = tuple(numbers + [0] * (2 - len(numbers)))
    return {name: version >= _version_key(FEATURES[name][1]) for name in FEATURES}


def probe(release: str | None = None) -> KernelFeatures:
    """Probe every feature. A probe that fails for another reason than "unsupported"
    (no privileges, say) falls back to the kernel version, logged at debug level."""
    release = release or platform.release()
    guess = kernel_version_fallback(release)
    found = {}
    for name, function in PROBES.items():
        try:
            found[name] = function()
        except (OSError, AttributeError) as error:
            log.debug("probing %s failed (%s): assuming %s from kernel %s",
                      name, error, guess[name], release)
            found[name] = guess[name]
    return KernelFeatures(kernel=release, **found)


# libbpf >= 1.0 functions only the probes need, bound here (same error style as
# libbpf.py: a negative errno raises LibbpfError).
def _bind() -> dict[str, Callable]:
    lib = ctypes.CDLL(libbpf._lib._name, use_errno=True)  # own handle: own argtypes
    bound = {}
    signatures = {
        "libbpf_probe_bpf_map_type": ([ctypes.c_int, ctypes.c_void_p], ctypes.c_int, None),
        "libbpf_probe_bpf_helper": (
            [ctypes.c_int, ctypes.c_int, ctypes.c_void_p], ctypes.c_int, None,
        ),
        "bpf_map_create": (
            [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
             ctypes.c_void_p], ctypes.c_int, libbpf._check_int,
        ),
        "bpf_prog_load": (
            [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t,
             ctypes.c_void_p], ctypes.c_int, libbpf._check_int,
        ),
    }
    for name, (argtypes, restype, errcheck) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
        if errcheck:
            function.errcheck = errcheck
        bound[name] = function
    return bound


_lib = _bind()
