"""Open, configure and load the embedded eBPF object; attach it to interfaces and detach it.

`FlowProgram.load()` verifies the object's sha256 before libbpf sees it, sets the
load-time configuration (.rodata `agent_config`, table sizes), loads it and checks that
slot 0 of `flows_outer` points to `flows_a`. `FlowProgram.attach()` hooks a program on
one direction of one interface with TCX (kernel >= 6.6) or a clsact filter, and returns
an `Attachment` whose `detach()` removes exactly that and nothing else.

Teardown removes only what the agent created: a TCX link is closed; a tc filter is
deleted by the handle and priority the kernel gave it; a clsact qdisc is deleted only
if this process created it and no filter at all is left on it (anybody else's filters
keep it). A qdisc that existed before is never deleted; so is one created by an agent
that died (its next run finds it existing), which is harmless: an empty clsact does
nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import sys
import threading
from importlib import resources
from typing import Any, Callable

import numpy as np

from ei_ebpf_agent.ebpf import libbpf
from ei_ebpf_agent.ebpf.layout import AGENT_CONFIG, FLOW_SLOT
from ei_ebpf_agent.ebpf.libbpf import LibbpfError
from ei_ebpf_agent.privileges import missing_message

log = logging.getLogger(__name__)

# direction -> program, by how a new flow claims its slot: compare-and-exchange (Linux
# 5.12+) or a spin lock (any kernel; a 5.10 verifier refuses the cmpxchg programs).
PROGRAMS = {"ingress": "tc_ingress", "egress": "tc_egress"}
LOCK_PROGRAMS = {"ingress": "tc_ingress_lock", "egress": "tc_egress_lock"}
MAPS = ("flows_outer", "flows_a", "flows_b", "slot_locks", "flows_ringbuf", "counters")
TABLES = ("flows_a", "flows_b")
# Slots per flow of CACHE_MAX_FLOWS: a table at most half full keeps the probe sequences
# short (most flows sit in their home slot or next to it; see MAX_PROBES in the C source).
SLOTS_PER_FLOW = 2
# Machines whose CPUs make plain stores visible to others in program order (x86-TSO):
# there a new flow's counters are written with its key (bpf/flow_table.h, write_slot).
STORES_IN_ORDER_MACHINES = ("x86_64", "i386", "i686")
BPF_MAP_TYPE_ARRAY = 2
BPF_F_MMAPABLE = 1 << 10
MODES = ("any", "tcx", "tc")

MISSING_PRIVILEGES = (
    "needs root or CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN "
    "(and CAP_SYS_RESOURCE on kernels before 5.11)"
)
LOCKDOWN_PATH = "/sys/kernel/security/lockdown"

# errno values meaning "this kernel has no TCX": fall back to a clsact filter.
_NO_TCX = {errno.EINVAL, errno.EOPNOTSUPP, errno.EPROTONOSUPPORT, 524}  # 524: ENOTSUPP
# errno values on detach meaning "already gone with its interface".
_GONE = {errno.ENODEV, errno.ENOENT}

_TC_H_CLSACT_INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
_TC_H_CLSACT_EGRESS = 0xFFFFFFF3

_mode_logged = threading.Event()  # the TCX/tc choice is logged once per process
_tcx_unsupported = threading.Event()  # learnt once: no use trying TCX again


class _ExistingQdiscFilter(logging.Filter):
    """Drop libbpf's warning for an existing clsact qdisc: the agent expects and accepts it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Exclusivity flag on" not in record.getMessage()


logging.getLogger("libbpf").addFilter(_ExistingQdiscFilter())


class AgentStartError(Exception):
    """The agent cannot start; the message is one line for the user (the cause is chained)."""


def object_name(byteorder: str = sys.byteorder) -> str:
    """File name of the embedded object for this host's byte order."""
    return "flows_bpfel.o" if byteorder == "little" else "flows_bpfeb.o"


def objects_dir() -> Any:
    """The directory of the embedded objects, found through the package's resources."""
    return resources.files("ei_ebpf_agent") / "ebpf_objects"


def read_verified_object(directory: Any = None, name: str | None = None) -> bytes:
    """The object's bytes, after checking them against the sha256 listed in SHA256SUMS."""
    directory = objects_dir() if directory is None else directory
    name = name or object_name()
    try:
        data = (directory / name).read_bytes()
        sums = (directory / "SHA256SUMS").read_text()
    except OSError as error:
        raise AgentStartError(f"cannot read the embedded eBPF object {name}: {error}") from error
    expected = None
    for line in sums.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == name:
            expected = parts[0].lower()
    if expected is None:
        raise AgentStartError(f"SHA256SUMS lists no checksum for {name}: refusing to load it")
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise AgentStartError(
            f"eBPF object {name} is corrupt or was modified: sha256 {actual}, "
            f"SHA256SUMS says {expected}; refusing to load it"
        )
    return data


def lockdown_mode(path: str = LOCKDOWN_PATH) -> str | None:
    """The kernel's active lockdown mode ("none", "integrity", ...), None if unknown."""
    try:
        with open(path) as file:
            text = file.read()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def privileges_message(action: str) -> str:
    """One line saying what failed, which capabilities are needed, and lockdown if on."""
    missing = missing_message()  # e.g. "missing capability CAP_BPF"; "" when none is
    message = (f"{action}: {missing} ({MISSING_PRIVILEGES})" if missing
               else f"{action}: {MISSING_PRIVILEGES}")
    mode = lockdown_mode()
    if mode and mode != "none":
        message += f"; the kernel is locked down ({mode}), which can forbid BPF even to root"
    return message


def _is_permission(error: OSError) -> bool:
    return error.errno in (errno.EPERM, errno.EACCES)


class Attachment:
    """One program hooked on one direction of one interface; `detach()` undoes exactly it."""

    def __init__(self, if_index: int, direction: str, mode: str,
                 release: Callable[[], None]) -> None:
        self.if_index = if_index
        self.direction = direction
        self.mode = mode  # "tcx" or "tc": what was actually used
        self._release: Callable[[], None] | None = release
        self._lock = threading.Lock()

    @property
    def attached(self) -> bool:
        return self._release is not None

    def detach(self) -> None:
        """Remove the hook. Idempotent; an interface that is already gone is not an error."""
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            release()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"<Attachment {self.direction} if_index={self.if_index} {self.mode} {state}>"


class _Qdisc:
    """The agent's view of the clsact qdisc of one interface."""

    def __init__(self, created: bool) -> None:
        self.created = created  # by this process: only then may it delete it
        self.users = 0  # our tc filters on it


class FlowProgram:
    """The loaded flow object: program and map fds, and the attachments made with it."""

    def __init__(self, obj: Any, buffer: Any, name: str, cmpxchg: bool = True) -> None:
        self._obj = obj
        self._buffer = buffer  # libbpf reads the ELF from it until the object is closed
        self._stack = contextlib.ExitStack()  # replaced by load() with the real teardown
        self.name = name
        self._lock = threading.Lock()
        self._attachments: list[Attachment] = []
        self._qdiscs: dict[int, _Qdisc] = {}
        self.cmpxchg = cmpxchg
        self.prog_fds = {
            direction: libbpf.bpf_program__fd(self._program(prog))
            for direction, prog in _programs(cmpxchg).items()
        }
        self.map_fds = {name: libbpf.bpf_map__fd(self._map(name)) for name in MAPS}
        self.table_slots = libbpf.bpf_map__max_entries(self._map("flows_a"))
        self.max_flows = self.table_slots // SLOTS_PER_FLOW
        self.ncpus = libbpf.libbpf_num_possible_cpus()

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, *, sampling: int = 0, max_flows: int = 5000,
             ringbuf_bytes: int | None = None, objects: Any = None,
             coarse_clock: bool | None = None, cmpxchg: bool | None = None,
             stores_in_order: bool | None = None) -> FlowProgram:
        """Verify, open, configure and load the embedded object.

        `objects` is a directory (Traversable or Path) holding the object and SHA256SUMS;
        by default the package's `ebpf_objects`. `coarse_clock`: time flows with the
        kernel's tick-precise clock (default: when the kernel has it, Linux 5.11+).
        `cmpxchg`: load the programs that claim a new flow's slot with compare-and-exchange
        rather than a spin lock (default: when the kernel has it, Linux 5.12+).
        `stores_in_order`: write a new flow's first counts with its key, in plain stores,
        which is exact only where CPUs make stores visible in order (default: on x86).
        Raises AgentStartError with one line.
        """
        if coarse_clock is None:
            coarse_clock = _kernel_has("coarse_clock")
        if cmpxchg is None:
            cmpxchg = _kernel_has("cmpxchg")
        if stores_in_order is None:
            stores_in_order = os.uname().machine in STORES_IN_ORDER_MACHINES
        name = object_name()
        data = read_verified_object(objects, name)
        buffer = ctypes.create_string_buffer(data, len(data))
        with contextlib.ExitStack() as stack:
            opts = libbpf.make_opts(libbpf.bpf_object_open_opts, object_name=b"flows")
            try:
                obj = libbpf.bpf_object__open_mem(buffer, len(data), ctypes.byref(opts))
            except LibbpfError as error:
                raise AgentStartError(f"cannot open eBPF object {name}: {error}") from error
            stack.callback(libbpf.bpf_object__close, obj)
            _configure(obj, name, sampling, max_flows, ringbuf_bytes, coarse_clock, cmpxchg,
                       stores_in_order)
            try:
                with contextlib.ExitStack() as tables:
                    _create_tables(obj, SLOTS_PER_FLOW * max_flows, tables)
                    libbpf.bpf_object__load(obj)
            except LibbpfError as error:
                if _is_permission(error):
                    raise AgentStartError(
                        privileges_message(f"cannot load eBPF object {name}")
                    ) from error
                raise AgentStartError(
                    f"cannot load eBPF object {name}: {error} (libbpf's log says why)"
                ) from error
            program = cls(obj, buffer, name, cmpxchg)
            program._stack = stack.pop_all()
        try:
            program._check_maps()
        except BaseException:
            program.close()
            raise
        log.info("loaded %s (libbpf %s): %d flows per table (%d slots), sampling %d, %s clock, "
                 "new flows claim slots by %s", name, libbpf.version(), program.max_flows,
                 program.table_slots, sampling, "coarse" if coarse_clock else "exact",
                 "compare-and-exchange" if cmpxchg else "spin lock")
        return program

    def _map(self, name: str) -> Any:
        return libbpf.bpf_object__find_map_by_name(self._obj, name.encode())

    def _program(self, name: str) -> Any:
        return libbpf.bpf_object__find_program_by_name(self._obj, name.encode())

    def _check_maps(self) -> None:
        for name in TABLES:
            info = libbpf.map_info(self.map_fds[name])
            if info.key_size != 4 or info.value_size != FLOW_SLOT.itemsize:
                raise AgentStartError(
                    f"{self.name}: map {name} has key/value sizes {info.key_size}/"
                    f"{info.value_size}, the agent expects 4/{FLOW_SLOT.itemsize}: "
                    "object and agent versions differ"
                )
        # Slot 0 must point to flows_a (libbpf fills it from `.values`; make sure).
        wanted = libbpf.map_info(self.map_fds["flows_a"]).id
        if self._outer_slot_id() != wanted:
            self.set_active_table("flows_a")
            if self._outer_slot_id() != wanted:
                raise AgentStartError(f"{self.name}: cannot point flows_outer[0] to flows_a")

    def _outer_slot_id(self) -> int | None:
        key, value = ctypes.c_uint32(0), ctypes.c_uint32(0)
        try:
            libbpf.bpf_map_lookup_elem(
                self.map_fds["flows_outer"], ctypes.byref(key), ctypes.byref(value)
            )
        except LibbpfError as error:
            if error.errno == errno.ENOENT:
                return None
            raise
        return value.value  # reading an outer map's slot gives the inner map's id

    def set_active_table(self, name: str) -> None:
        """Point flows_outer[0] to `name` ("flows_a" or "flows_b").

        Returns once no program can still be using the previous table: the kernel waits
        for an RCU grace period on every ARRAY_OF_MAPS update.
        """
        key, fd = ctypes.c_uint32(0), ctypes.c_uint32(self.map_fds[name])
        libbpf.bpf_map_update_elem(
            self.map_fds["flows_outer"], ctypes.byref(key), ctypes.byref(fd), libbpf.BPF_ANY
        )

    # -- attaching ----------------------------------------------------------------------

    def attach(self, if_index: int, direction: str, mode: str = "any") -> Attachment:
        """Hook the program of `direction` ("ingress"/"egress") on interface `if_index`.

        mode "tcx" (kernel >= 6.6), "tc" (clsact filter) or "any" (TCX, else tc).
        Raises AgentStartError when privileges are missing, LibbpfError otherwise.
        """
        if direction not in PROGRAMS:
            raise ValueError(f"direction must be 'ingress' or 'egress', not {direction!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        try:
            if mode == "tcx" or (mode == "any" and not _tcx_unsupported.is_set()):
                try:
                    attachment = self._attach_tcx(if_index, direction)
                except LibbpfError as error:
                    if mode == "tcx" or error.errno not in _NO_TCX:
                        raise
                    _tcx_unsupported.set()
                    log.info("TCX is not available (%s): attaching with clsact tc filters",
                             error)
                    _mode_logged.set()
                    attachment = self._attach_tc(if_index, direction)
                else:
                    if mode == "any" and not _mode_logged.is_set():
                        _mode_logged.set()
                        log.info("attaching with TCX links")
            else:
                attachment = self._attach_tc(if_index, direction)
        except LibbpfError as error:
            if _is_permission(error):
                raise AgentStartError(privileges_message(
                    f"cannot attach the {direction} program to interface index {if_index}"
                )) from error
            raise
        with self._lock:
            self._attachments.append(attachment)
        return attachment

    def _attach_tcx(self, if_index: int, direction: str) -> Attachment:
        attach_type = libbpf.BPF_TCX_INGRESS if direction == "ingress" else libbpf.BPF_TCX_EGRESS
        # libbpf 1.1 passes attach types it does not know straight to the kernel.
        link_fd = libbpf.bpf_link_create(self.prog_fds[direction], if_index, attach_type, None)

        def release() -> None:
            os.close(link_fd)  # the link is ours alone: closing it detaches the program

        return Attachment(if_index, direction, "tcx", self._forget(release))

    def _attach_tc(self, if_index: int, direction: str) -> Attachment:
        point = libbpf.BPF_TC_INGRESS if direction == "ingress" else libbpf.BPF_TC_EGRESS
        with self._lock:
            qdisc = self._qdiscs.get(if_index)
            if qdisc is None:
                hook = libbpf.make_opts(libbpf.bpf_tc_hook, ifindex=if_index,
                                        attach_point=point)
                try:
                    libbpf.bpf_tc_hook_create(ctypes.byref(hook))
                    qdisc = _Qdisc(created=True)
                except LibbpfError as error:
                    if error.errno != errno.EEXIST:
                        raise
                    qdisc = _Qdisc(created=False)  # somebody else's: accept, never delete
                self._qdiscs[if_index] = qdisc
            hook = libbpf.make_opts(libbpf.bpf_tc_hook, ifindex=if_index, attach_point=point)
            opts = libbpf.make_opts(libbpf.bpf_tc_opts, prog_fd=self.prog_fds[direction])
            try:
                # handle and priority 0: the kernel picks free ones, libbpf reports them.
                libbpf.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts))
            except LibbpfError:
                self._release_qdisc(if_index)
                raise
            qdisc.users += 1
            handle, priority = opts.handle, opts.priority

        def release() -> None:
            detach = libbpf.make_opts(libbpf.bpf_tc_opts, handle=handle, priority=priority)
            try:
                libbpf.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(detach))
            except LibbpfError as error:
                if error.errno not in _GONE:
                    raise
            finally:
                with self._lock:
                    self._qdiscs[if_index].users -= 1
                    self._release_qdisc(if_index)

        return Attachment(if_index, direction, "tc", self._forget(release))

    def _release_qdisc(self, if_index: int) -> None:
        """Forget the qdisc once unused; delete it if we created it and it holds no filter."""
        qdisc = self._qdiscs[if_index]
        if qdisc.users > 0:
            return
        del self._qdiscs[if_index]
        if not qdisc.created or _has_tc_filters(if_index) is not False:
            return  # not ours, gone, or unsure: leave it
        hook = libbpf.make_opts(libbpf.bpf_tc_hook, ifindex=if_index,
                                attach_point=libbpf.BPF_TC_INGRESS | libbpf.BPF_TC_EGRESS)
        try:
            libbpf.bpf_tc_hook_destroy(ctypes.byref(hook))
        except LibbpfError as error:
            if error.errno not in _GONE:
                log.warning("cannot delete the clsact qdisc of interface index %d: %s",
                            if_index, error)

    def _forget(self, release: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with self._lock:
                self._attachments = [a for a in self._attachments if a.attached]
            release()

        return run

    @property
    def attachments(self) -> list[Attachment]:
        with self._lock:
            return [a for a in self._attachments if a.attached]

    def detach_all(self) -> None:
        """Detach every attachment still in place, newest first."""
        for attachment in reversed(self.attachments):
            try:
                attachment.detach()
            except OSError as error:
                log.warning("cannot detach %r: %s", attachment, error)

    # -- maps ---------------------------------------------------------------------------

    def read_counters(self) -> np.ndarray:
        """The per-CPU `counters` map summed over CPUs (index: enum agent_counter)."""
        fd = self.map_fds["counters"]
        info = libbpf.map_info(fd)
        per_cpu = np.zeros(self.ncpus, dtype=np.uint64)  # values are 8-byte aligned per CPU
        totals = np.zeros(info.max_entries, dtype=np.uint64)
        for index in range(info.max_entries):
            key = ctypes.c_uint32(index)
            libbpf.bpf_map_lookup_elem(fd, ctypes.byref(key), per_cpu.ctypes.data)
            totals[index] = per_cpu.sum()
        return totals

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Detach everything, then release the object (programs and maps)."""
        self.detach_all()
        self._stack.close()


def _programs(cmpxchg: bool) -> dict[str, str]:
    """direction -> program of the pair that load() loads (the other is never loaded)."""
    return PROGRAMS if cmpxchg else LOCK_PROGRAMS


def _kernel_has(feature: str) -> bool:
    """An optional kernel feature (features.PROBES), probed, else guessed from the version."""
    from ei_ebpf_agent.ebpf import features

    try:
        return features.PROBES[feature]()
    except (OSError, AttributeError):
        return features.kernel_version_fallback(os.uname().release)[feature]


def _configure(obj: Any, name: str, sampling: int, max_flows: int,
               ringbuf_bytes: int | None, coarse_clock: bool, cmpxchg: bool,
               stores_in_order: bool) -> None:
    """Set .rodata agent_config and map sizes before load; pick the programs to load."""

    def find(map_name: str) -> Any:
        try:
            return libbpf.bpf_object__find_map_by_name(obj, map_name.encode())
        except LibbpfError as error:
            raise AgentStartError(f"eBPF object {name} has no map {map_name}") from error

    for programs in (PROGRAMS, LOCK_PROGRAMS):
        for prog in programs.values():
            try:
                found = libbpf.bpf_object__find_program_by_name(obj, prog.encode())
            except LibbpfError as error:
                raise AgentStartError(f"eBPF object {name} has no program {prog}") from error
            libbpf.bpf_program__set_autoload(found, programs is _programs(cmpxchg))
    rodata = find(".rodata")  # found by its real name, whatever prefix libbpf gives it
    size = ctypes.c_size_t(0)
    current = libbpf.bpf_map__initial_value(rodata, ctypes.byref(size))
    if size.value < AGENT_CONFIG.itemsize:
        raise AgentStartError(f"eBPF object {name}: .rodata is smaller than agent_config")
    data = bytearray(ctypes.string_at(current, size.value))
    config = np.zeros(1, dtype=AGENT_CONFIG)
    config["sampling"] = sampling
    config["coarse_clock"] = int(coarse_clock)
    config["table_slots"] = SLOTS_PER_FLOW * max_flows
    config["stores_in_order"] = int(stores_in_order)
    config["hash_seed"] = int.from_bytes(os.urandom(8), "little")
    data[: AGENT_CONFIG.itemsize] = config.tobytes()  # agent_config sits at offset 0
    value = (ctypes.c_char * len(data)).from_buffer(data)
    libbpf.bpf_map__set_initial_value(rodata, value, len(data))
    if ringbuf_bytes:
        libbpf.bpf_map__set_max_entries(find("flows_ringbuf"), ringbuf_bytes)
    if cmpxchg:  # only the *_lock programs take slot locks: keep one instead of 1,024
        libbpf.bpf_map__set_max_entries(find("slot_locks"), 1)
    for map_name in MAPS:
        find(map_name)


def _create_tables(obj: Any, slots: int, stack: contextlib.ExitStack) -> None:
    """Create flows_a and flows_b (`slots` entries each) for libbpf to use.

    flows_outer's template of its inner maps must have their exact size (the kernel
    compares array sizes on every swap), and libbpf 1.1 cannot resize the template it
    makes from the object; so the agent makes the tables and hands flows_a to libbpf as
    the template too. `stack` closes our fds once libbpf has its own copies (after load).
    """
    opts = libbpf.make_opts(libbpf.bpf_map_create_opts, map_flags=BPF_F_MMAPABLE)
    fds = {}
    for table in TABLES:
        try:
            fd = libbpf.bpf_map_create(BPF_MAP_TYPE_ARRAY, table.encode(), 4, FLOW_SLOT.itemsize,
                                       slots, ctypes.byref(opts))
        except LibbpfError as error:
            if _is_permission(error):
                raise AgentStartError(privileges_message(f"cannot create map {table}")) from error
            raise AgentStartError(
                f"cannot create flow table {table} of {slots} slots "
                f"({slots * FLOW_SLOT.itemsize / 2**20:.1f} MiB): {error} "
                "(lower CACHE_MAX_FLOWS?)"
            ) from error
        stack.callback(os.close, fd)
        fds[table] = fd
        libbpf.bpf_map__reuse_fd(libbpf.bpf_object__find_map_by_name(obj, table.encode()), fd)
    outer = libbpf.bpf_object__find_map_by_name(obj, b"flows_outer")
    libbpf.bpf_map__set_inner_map_fd(outer, fds["flows_a"])


def _has_tc_filters(if_index: int) -> bool | None:
    """Whether any tc filter is on the clsact ingress or egress of `if_index`; None if unsure."""
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for parent in (_TC_H_CLSACT_INGRESS, _TC_H_CLSACT_EGRESS):
                if list(ipr.get_filters(index=if_index, parent=parent)):
                    return True
    except Exception as error:  # netlink trouble: keep the qdisc rather than guess
        log.debug("cannot list the tc filters of interface index %d: %s", if_index, error,
                  exc_info=True)
        return None
    return False
