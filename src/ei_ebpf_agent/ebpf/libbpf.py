"""ctypes binding of the system libbpf (>= 1.1): the functions the agent uses, nothing else.

One table of signatures (`_SIGNATURES`) is applied in one place. libbpf has two error
styles and so two checkers: functions returning an int return -errno on failure
(libbpf >= 1.0), functions returning a pointer return NULL and set errno. Both raise
`LibbpfError`, an OSError that keeps errno and names the call. Symbols newer than 1.1
are bound only when the library has them (`has()` tells).

Option structs mirror the C headers of libbpf 1.1; `sz` is always `ctypes.sizeof` of the
Python struct (libbpf accepts a smaller `sz` from older callers) and
tests/unit/test_libbpf_structs.py compares every size and offset with the C headers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_int,
    c_size_t,
    c_uint,
    c_uint32,
    c_uint64,
    c_void_p,
)
from typing import Any

from ei_ebpf_agent.ebpf import libbpf_log_bridge
from ei_ebpf_agent.ebpf.libbpf_log_bridge import libbpf_print_fn_t

log = logging.getLogger(__name__)


class LibbpfError(OSError):
    """A libbpf call failed: `errno` is the error, `call` the libbpf function's name."""

    def __init__(self, call: str, err: int) -> None:
        super().__init__(err, _strerror(err))
        self.call = call

    def __str__(self) -> str:
        return f"{self.call}: {self.strerror} (errno {self.errno})"


def _strerror(err: int) -> str:
    if err >= _LIBBPF_ERRNO_BASE and "libbpf_strerror" in _bound:
        # libbpf's own codes (4000..): "Invalid BPF object format" and the like.
        buffer = ctypes.create_string_buffer(256)
        _lib.libbpf_strerror(err, buffer, len(buffer))
        return buffer.value.decode(errors="replace")
    return os.strerror(err)


_LIBBPF_ERRNO_BASE = 4000


# -- typed opaque pointers ------------------------------------------------------------


class bpf_object(Structure):
    pass


class bpf_map(Structure):
    pass


class bpf_program(Structure):
    pass


class ring_buffer(Structure):
    pass


# -- option structs (libbpf 1.1 headers) ----------------------------------------------


class bpf_object_open_opts(Structure):
    # Only the leading fields the agent needs; sz tells libbpf where our struct ends.
    _fields_ = [
        ("sz", c_size_t),
        ("object_name", c_char_p),
        ("relaxed_maps", c_bool),
        ("pin_root_path", c_char_p),
    ]


class bpf_map_create_opts(Structure):
    """The leading fields of libbpf's struct (libbpf reads `sz` and zero-fills the rest)."""

    _fields_ = [
        ("sz", c_size_t),
        ("btf_fd", c_uint32),
        ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32),
        ("btf_vmlinux_value_type_id", c_uint32),
        ("inner_map_fd", c_uint32),
        ("map_flags", c_uint32),
    ]


class bpf_tc_hook(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("ifindex", c_int),
        ("attach_point", c_uint),  # enum bpf_tc_attach_point
        ("parent", c_uint32),
    ]


class bpf_tc_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("prog_fd", c_int),
        ("flags", c_uint32),
        ("prog_id", c_uint32),
        ("handle", c_uint32),
        ("priority", c_uint32),
    ]


class bpf_map_info(Structure):
    # Leading part of the UAPI struct: the kernel fills only the info_len bytes we pass.
    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("key_size", c_uint32),
        ("value_size", c_uint32),
        ("max_entries", c_uint32),
        ("map_flags", c_uint32),
        ("name", c_char * 16),
    ]


class bpf_test_run_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


def make_opts(struct_type: type, **fields: Any) -> Any:
    """An option struct zeroed, with `sz` set to the size of our definition."""
    opts = struct_type(**fields)
    opts.sz = ctypes.sizeof(struct_type)
    return opts


# enum bpf_tc_attach_point
BPF_TC_INGRESS = 1 << 0
BPF_TC_EGRESS = 1 << 1

# enum bpf_attach_type values the 1.1 headers may lack (UAPI, kernel >= 6.6)
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47

BPF_ANY = 0

# Callback type of the ring buffer (libbpf_print_fn_t: see libbpf_log_bridge).
ring_buffer_sample_fn = CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)


# -- error checkers ----------------------------------------------------------------------


def _check_int(result: int, func: Any, _args: tuple) -> int:
    if result < 0:
        # libbpf >= 1.0 returns -errno (and sets errno too).
        raise LibbpfError(func.__name__, -result)
    return result


def _check_ptr(result: Any, func: Any, _args: tuple) -> Any:
    if not result:
        raise LibbpfError(func.__name__, ctypes.get_errno() or errno.EINVAL)
    return result


def _check_none(result: Any, _func: Any, _args: tuple) -> Any:
    return result


# name: (argtypes, restype, errcheck, optional)
_SIGNATURES: dict = {
    "libbpf_major_version": ([], c_uint32, _check_none, False),
    "libbpf_minor_version": ([], c_uint32, _check_none, False),
    "libbpf_num_possible_cpus": ([], c_int, _check_int, False),
    "libbpf_set_print": ([libbpf_print_fn_t], c_void_p, _check_none, False),
    "libbpf_strerror": ([c_int, c_char_p, c_size_t], c_int, _check_none, False),
    "bpf_object__open_mem": (
        [c_void_p, c_size_t, POINTER(bpf_object_open_opts)], POINTER(bpf_object),
        _check_ptr, False,
    ),
    "bpf_object__load": ([POINTER(bpf_object)], c_int, _check_int, False),
    "bpf_object__close": ([POINTER(bpf_object)], None, _check_none, False),
    "bpf_object__find_map_by_name": (
        [POINTER(bpf_object), c_char_p], POINTER(bpf_map), _check_ptr, False,
    ),
    "bpf_object__find_program_by_name": (
        [POINTER(bpf_object), c_char_p], POINTER(bpf_program), _check_ptr, False,
    ),
    "bpf_map__set_max_entries": ([POINTER(bpf_map), c_uint32], c_int, _check_int, False),
    "bpf_map__max_entries": ([POINTER(bpf_map)], c_uint32, _check_none, False),
    "bpf_map__reuse_fd": ([POINTER(bpf_map), c_int], c_int, _check_int, False),
    "bpf_map__set_inner_map_fd": ([POINTER(bpf_map), c_int], c_int, _check_int, False),
    "bpf_map_create": (
        [c_int, c_char_p, c_uint32, c_uint32, c_uint32, POINTER(bpf_map_create_opts)], c_int,
        _check_int, False,
    ),
    "bpf_prog_load": (
        [c_int, c_char_p, c_char_p, c_void_p, c_size_t, c_void_p], c_int, _check_int, False,
    ),
    "bpf_prog_test_run_opts": ([c_int, POINTER(bpf_test_run_opts)], c_int, _check_int, False),
    # target_fd doubles as the interface index for TC/TCX queries (a union in the UAPI).
    "bpf_prog_query": (
        [c_int, c_uint, c_uint32, POINTER(c_uint32), POINTER(c_uint32), POINTER(c_uint32)],
        c_int, _check_int, False,
    ),
    "bpf_enable_stats": ([c_int], c_int, _check_int, False),
    "bpf_obj_pin": ([c_int, c_char_p], c_int, _check_int, False),
    "bpf_obj_get": ([c_char_p], c_int, _check_int, False),
    "bpf_link_update": ([c_int, c_int, c_void_p], c_int, _check_int, False),
    # 1 = supported, 0 = not, < 0 = cannot tell: the caller decides, no errcheck.
    "libbpf_probe_bpf_map_type": ([c_int, c_void_p], c_int, _check_none, False),
    "libbpf_probe_bpf_helper": ([c_int, c_int, c_void_p], c_int, _check_none, False),
    "bpf_map__initial_value": (
        [POINTER(bpf_map), POINTER(c_size_t)], c_void_p, _check_ptr, False,
    ),
    "bpf_map__set_initial_value": (
        [POINTER(bpf_map), c_void_p, c_size_t], c_int, _check_int, False,
    ),
    "bpf_map__fd": ([POINTER(bpf_map)], c_int, _check_int, False),
    "bpf_program__fd": ([POINTER(bpf_program)], c_int, _check_int, False),
    "bpf_program__set_autoload": ([POINTER(bpf_program), c_bool], c_int, _check_int, False),
    "bpf_map_update_elem": ([c_int, c_void_p, c_void_p, c_uint64], c_int, _check_int, False),
    "bpf_map_lookup_elem": ([c_int, c_void_p, c_void_p], c_int, _check_int, False),
    "bpf_obj_get_info_by_fd": (
        [c_int, c_void_p, POINTER(c_uint32)], c_int, _check_int, False,
    ),
    # opts is always NULL here: a void pointer spares us mirroring a large union.
    "bpf_link_create": ([c_int, c_int, c_uint, c_void_p], c_int, _check_int, False),
    "bpf_tc_hook_create": ([POINTER(bpf_tc_hook)], c_int, _check_int, False),
    "bpf_tc_hook_destroy": ([POINTER(bpf_tc_hook)], c_int, _check_int, False),
    "bpf_tc_attach": (
        [POINTER(bpf_tc_hook), POINTER(bpf_tc_opts)], c_int, _check_int, False,
    ),
    "bpf_tc_detach": (
        [POINTER(bpf_tc_hook), POINTER(bpf_tc_opts)], c_int, _check_int, False,
    ),
    "bpf_tc_query": (
        [POINTER(bpf_tc_hook), POINTER(bpf_tc_opts)], c_int, _check_int, False,
    ),
    "ring_buffer__new": (
        [c_int, ring_buffer_sample_fn, c_void_p, c_void_p], POINTER(ring_buffer),
        _check_ptr, False,
    ),
    "ring_buffer__poll": ([POINTER(ring_buffer), c_int], c_int, _check_int, False),
    "ring_buffer__consume": ([POINTER(ring_buffer)], c_int, _check_int, False),
    "ring_buffer__epoll_fd": ([POINTER(ring_buffer)], c_int, _check_int, False),
    "ring_buffer__free": ([POINTER(ring_buffer)], None, _check_none, False),
    # libbpf >= 1.2 (bound only when present)
    "bpf_map_get_info_by_fd": (
        [c_int, POINTER(bpf_map_info), POINTER(c_uint32)], c_int, _check_int, True,
    ),
}


def _open_library() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError as error:
        raise OSError(
            f"cannot load the system libbpf ({name}): {error}; install libbpf1 (>= 1.1)"
        ) from error


_lib = _open_library()
_bound: set = set()

for _name, (_argtypes, _restype, _errcheck, _optional) in _SIGNATURES.items():
    if not hasattr(_lib, _name):
        if _optional:
            continue
        raise ImportError(f"the system libbpf lacks {_name}: libbpf >= 1.1 is required")
    _func = getattr(_lib, _name)
    _func.argtypes = _argtypes
    _func.restype = _restype
    _func.errcheck = _errcheck
    globals()[_name] = _func
    _bound.add(_name)


def has(name: str) -> bool:
    """Whether the system libbpf has (and this module bound) the function `name`."""
    return name in _bound


def version() -> str:
    return f"{_lib.libbpf_major_version()}.{_lib.libbpf_minor_version()}"


def map_info(fd: int) -> bpf_map_info:
    """Kernel's description of the map behind `fd` (id, type, sizes, name)."""
    info = bpf_map_info()
    size = c_uint32(ctypes.sizeof(info))
    if has("bpf_map_get_info_by_fd"):
        _lib.bpf_map_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    else:
        _lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    return info


BPF_LINK_TYPE_TCX = 11


def tcx_link_target(fd: int) -> tuple[int, int] | None:
    """(ifindex, attach type) of the TCX link behind `fd`; ifindex 0 once its interface is
    gone; None if it is not a TCX link. struct bpf_link_info: type, id, prog_id, then a
    union aligned to 8 (offset 16) whose `tcx` member is {ifindex, attach_type}."""
    info = (c_uint32 * 16)()
    size = c_uint32(ctypes.sizeof(info))
    _lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size))
    if info[0] != BPF_LINK_TYPE_TCX:
        return None
    return info[4], info[5]


# libbpf's own messages (verifier logs included) go to the `libbpf` logger.
libbpf_log_bridge.route(_lib.libbpf_set_print)
