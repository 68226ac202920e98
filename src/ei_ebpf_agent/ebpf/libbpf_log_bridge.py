"""libbpf's messages -> Python logging (the `libbpf` logger), formatted by the C library.

libbpf hands its print callback a printf format and a va_list; only C can format that, so
vasprintf (glibc, musl) or vsnprintf does it. Imports nothing of the agent: ebpf/libbpf.py
installs it once with `route(libbpf_set_print)`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from ctypes import CFUNCTYPE, POINTER, c_char_p, c_int, c_size_t, c_void_p
from typing import Callable

log = logging.getLogger(__name__)
libbpf_log = logging.getLogger("libbpf")

# enum libbpf_print_level
LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2

# va_list is passed as an opaque pointer: on x86_64 it is an array (decays to a pointer),
# on aarch64 a 32-byte struct passed by reference, on i386/ppc64 a char *; in each case
# the pointer can be handed on to vsnprintf unchanged.
libbpf_print_fn_t = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_vasprintf: Callable | None = getattr(_libc, "vasprintf", None)
if _vasprintf is not None:
    _vasprintf.argtypes = [POINTER(c_void_p), c_char_p, c_void_p]
    _vasprintf.restype = c_int
    _free = _libc.free
    _free.argtypes = [c_void_p]
    _free.restype = None
_vsnprintf = _libc.vsnprintf
_vsnprintf.argtypes = [c_void_p, c_size_t, c_char_p, c_void_p]
_vsnprintf.restype = c_int

_FALLBACK_BUFFER = 1 << 16  # vsnprintf only: longer messages (verifier logs) are truncated
_LEVELS = {LIBBPF_WARN: logging.WARNING, LIBBPF_INFO: logging.INFO, LIBBPF_DEBUG: logging.DEBUG}


def _format(fmt: bytes, args: int) -> str:
    # va_list can be walked once only, so format in one call: vasprintf (glibc, musl)
    # sizes its own buffer; otherwise a fixed vsnprintf buffer.
    if _vasprintf is not None:
        out = c_void_p()
        if _vasprintf(ctypes.byref(out), fmt, args) < 0 or not out.value:
            return fmt.decode(errors="replace")
        try:
            return ctypes.string_at(out.value).decode(errors="replace")
        finally:
            _free(out)
    buffer = ctypes.create_string_buffer(_FALLBACK_BUFFER)
    _vsnprintf(buffer, _FALLBACK_BUFFER, fmt, args)
    return buffer.value.decode(errors="replace")


@libbpf_print_fn_t
def _print(level: int, fmt: bytes, args: int) -> int:
    try:
        py_level = _LEVELS.get(level, logging.DEBUG)
        if libbpf_log.isEnabledFor(py_level):  # libbpf sends many DEBUG lines: skip early
            message = _format(fmt, args).rstrip("\n")
            libbpf_log.log(py_level, "%s", message.removeprefix("libbpf: "))
    except Exception:  # an exception must never cross into C
        log.debug("cannot format a libbpf message", exc_info=True)
    return 0


def route(libbpf_set_print: Callable) -> None:
    """Send libbpf's messages (verifier logs included) to the `libbpf` logger."""
    libbpf_set_print(_print)
