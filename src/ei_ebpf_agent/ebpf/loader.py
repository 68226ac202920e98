"""Open, configure and load the embedded eBPF object; the loaded programs and maps.

`FlowProgram.load()` reads the object verified by `objects`, sets the load-time
configuration (.rodata `agent_config`, table sizes), loads it and checks that the tables
have the size asked for and slot 0 of `flows_outer` points to `flows_a`. Attaching is
`attach.Attacher`'s job; `FlowProgram.attach()` hands it on.

With a `PinStore` (PIN=true), the maps are pinned under BPF_FS_PATH, and a restarted
agent adopts the pinned maps of the earlier one (`adopt`): its tables, with what they
counted since its last export, its ring buffer and its hash seed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
from typing import Any

import numpy as np

from ei_ebpf_agent.ebpf import adopt, libbpf
from ei_ebpf_agent.ebpf import features as kernel_features
from ei_ebpf_agent.ebpf.attach import Attacher, Attachment
from ei_ebpf_agent.ebpf.layout import AGENT_CONFIG, FLOW_SLOT
from ei_ebpf_agent.ebpf.libbpf import LibbpfError
from ei_ebpf_agent.ebpf.objects import object_name, read_verified_object
from ei_ebpf_agent.ebpf.pins import PinStore
from ei_ebpf_agent.errors import AgentStartError
from ei_ebpf_agent.privileges import start_error

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


class FlowProgram:
    """The loaded flow object: program and map fds, and the attachments made with it."""

    def __init__(self, obj: Any, buffer: Any, name: str, *, cmpxchg: bool, table_slots: int,
                 tcx: bool, pins: PinStore | None = None) -> None:
        self._obj = obj
        self._buffer = buffer  # libbpf reads the ELF from it until the object is closed
        self._stack = contextlib.ExitStack()  # replaced by load() with the real teardown
        self.name = name
        self.cmpxchg = cmpxchg
        self.prog_fds = {
            direction: libbpf.bpf_program__fd(self._program(prog))
            for direction, prog in _programs(cmpxchg).items()
        }
        self.map_fds = {name: libbpf.bpf_map__fd(self._map(name)) for name in MAPS}
        self.table_slots = table_slots  # what agent_config and both tables were given
        self.max_flows = table_slots // SLOTS_PER_FLOW
        self.ncpus = libbpf.libbpf_num_possible_cpus()
        self._pins = pins
        self.adopted = False  # the maps are an earlier agent's (pinned), set by load()
        # Flow tables of an earlier agent that could not be adopted (another size): the
        # tracer drains them once; name -> (fd, slots).
        self.inherited_tables: dict[str, tuple[int, int]] = {}
        self._attacher = Attacher(self.prog_fds, tcx, pins=pins,
                                  own_programs=frozenset(PROGRAMS.values())
                                  | frozenset(LOCK_PROGRAMS.values()))

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, *, sampling: int = 0, max_flows: int = 5000,
             ringbuf_bytes: int | None = None, objects: Any = None,
             features: kernel_features.KernelFeatures | None = None,
             coarse_clock: bool | None = None, cmpxchg: bool | None = None,
             stores_in_order: bool | None = None, pins: PinStore | None = None
             ) -> FlowProgram:
        """Verify, open, configure and load the embedded object.

        `objects` is a directory (Traversable or Path) holding the object and SHA256SUMS;
        by default the package's (objects.objects_dir). `features`: what the kernel has
        (default: features.current(), probed once per process). `coarse_clock`: time
        flows with the kernel's tick-precise clock (default: when the kernel has it).
        `cmpxchg`: load the programs that claim a new flow's slot with compare-and-exchange
        rather than a spin lock (default: when the kernel has it).
        `stores_in_order`: write a new flow's first counts with its key, in plain stores,
        which is exact only where CPUs make stores visible in order (default: on x86).
        `pins`: pin the maps there, adopting those an earlier agent pinned.
        Raises AgentStartError with one line.
        """
        features = features or kernel_features.current()
        if coarse_clock is None:
            coarse_clock = features.coarse_clock
        if cmpxchg is None:
            cmpxchg = features.cmpxchg
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
            table_slots = SLOTS_PER_FLOW * max_flows
            seed = int.from_bytes(os.urandom(8), "little")
            _configure(obj, name, sampling, table_slots, ringbuf_bytes, coarse_clock, cmpxchg,
                       stores_in_order, seed)
            adopted, inherited = _find_pinned(obj, pins, table_slots)
            if adopted is not None:  # the earlier agent's seed: its flows' home slots
                stack.callback(adopted.close)
                _configure(obj, name, sampling, table_slots, ringbuf_bytes, coarse_clock,
                           cmpxchg, stores_in_order, adopted.hash_seed)
            try:
                with contextlib.ExitStack() as tables:
                    if adopted is not None:
                        _reuse_maps(obj, adopted.fds)
                    else:
                        _create_tables(obj, table_slots, tables)
                    libbpf.bpf_object__load(obj)
            except LibbpfError as error:
                raise start_error(f"cannot load eBPF object {name}", error,
                                  " (libbpf's log says why)") from error
            program = cls(obj, buffer, name, cmpxchg=cmpxchg, table_slots=table_slots,
                          tcx=features.tcx, pins=pins)
            program.adopted = adopted is not None
            program.inherited_tables = inherited
            program._stack = stack.pop_all()
        try:
            program._check_maps()
            if pins is not None and not program.adopted:
                program._pin_maps()
        except BaseException:
            program.close()
            raise
        log.info("loaded %s (libbpf %s): %d flows per table (%d slots), sampling %d, %s clock, "
                 "new flows claim slots by %s%s", name, libbpf.version(), program.max_flows,
                 program.table_slots, sampling, "coarse" if coarse_clock else "exact",
                 "compare-and-exchange" if cmpxchg else "spin lock",
                 f"; adopted the tables pinned in {pins.base}" if program.adopted
                 else f"; pinned in {pins.base}" if pins else "")
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
            if info.max_entries != self.table_slots:  # the program masks hashes with it
                raise AgentStartError(
                    f"{self.name}: map {name} has {info.max_entries} slots, agent_config "
                    f"says {self.table_slots}"
                )
        if self.adopted:  # flows_outer[0] stays where the earlier agent left it
            self.active_table()
            return
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

    def active_table(self) -> str:
        """The table flows_outer[0] points to: "flows_a" or "flows_b"."""
        current = self._outer_slot_id()
        for name in TABLES:
            if libbpf.map_info(self.map_fds[name]).id == current:
                return name
        raise AgentStartError(f"{self.name}: flows_outer[0] points to neither flow table")

    def _pin_maps(self) -> None:
        self._pins.prepare()
        for name, fd in self.map_fds.items():
            self._pins.pin_map(name, fd)
        self._pins.pin_map(adopt.RODATA, libbpf.bpf_map__fd(self._map(".rodata")))

    def release_unclaimed(self, if_indexes: list[int]) -> int:
        """Detach what an earlier agent left that this one did not take over (see
        Attacher.release_unclaimed); the number released."""
        return self._attacher.release_unclaimed(if_indexes)

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
        """Hook the program of `direction` on interface `if_index` (see Attacher.attach)."""
        return self._attacher.attach(if_index, direction, mode)

    @property
    def attachments(self) -> list[Attachment]:
        return self._attacher.attachments

    def detach_all(self) -> None:
        """Detach every attachment still in place, newest first."""
        self._attacher.detach_all()

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
        """Detach everything, unpin, then release the object (programs and maps)."""
        self.detach_all()
        if self._pins is not None:
            self._pins.remove()  # a clean stop leaves nothing behind
        for fd, _slots in self.inherited_tables.values():
            os.close(fd)
        self.inherited_tables = {}
        self._stack.close()


def _programs(cmpxchg: bool) -> dict[str, str]:
    """direction -> program of the pair that load() loads (the other is never loaded)."""
    return PROGRAMS if cmpxchg else LOCK_PROGRAMS


def _configure(obj: Any, name: str, sampling: int, table_slots: int,
               ringbuf_bytes: int | None, coarse_clock: bool, cmpxchg: bool,
               stores_in_order: bool, hash_seed: int) -> None:
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
    config["table_slots"] = table_slots
    config["stores_in_order"] = int(stores_in_order)
    config["hash_seed"] = hash_seed
    data[: AGENT_CONFIG.itemsize] = config.tobytes()  # agent_config sits at offset 0
    value = (ctypes.c_char * len(data)).from_buffer(data)
    libbpf.bpf_map__set_initial_value(rodata, value, len(data))
    if ringbuf_bytes:
        libbpf.bpf_map__set_max_entries(find("flows_ringbuf"), ringbuf_bytes)
    if cmpxchg:  # only the *_lock programs take slot locks: keep one instead of 1,024
        libbpf.bpf_map__set_max_entries(find("slot_locks"), 1)
    for map_name in MAPS:
        find(map_name)


def _find_pinned(obj: Any, pins: PinStore | None, table_slots: int
                 ) -> tuple[adopt.Adopted | None, dict[str, tuple[int, int]]]:
    """The earlier agent's pinned maps if they fit (else its tables, to drain once)."""
    if pins is None:
        return None, {}
    sizes = {name: libbpf.bpf_map__max_entries(libbpf.bpf_object__find_map_by_name(
        obj, name.encode())) for name in MAPS}
    sizes.update({table: table_slots for table in TABLES})
    try:
        return adopt.find(pins, sizes, TABLES), {}
    except adopt.NotAdoptable as error:
        inherited = {t: (fd, libbpf.map_info(fd).max_entries) for t, fd in error.tables.items()}
        log.warning("the maps pinned in %s cannot be adopted (%s): %s; starting afresh",
                    pins.base, error,
                    "draining their flow tables once" if inherited else "their counts are lost")
        pins.remove()  # its links detach: no two programs count a packet
        return None, inherited


def _reuse_maps(obj: Any, fds: dict[str, int]) -> None:
    """Hand the adopted maps to libbpf instead of creating new ones."""
    for name in MAPS:
        libbpf.bpf_map__reuse_fd(libbpf.bpf_object__find_map_by_name(obj, name.encode()),
                                 fds[name])
    outer = libbpf.bpf_object__find_map_by_name(obj, b"flows_outer")
    libbpf.bpf_map__set_inner_map_fd(outer, fds["flows_a"])


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
            raise start_error(f"cannot create flow table {table} of {slots} slots "
                              f"({slots * FLOW_SLOT.itemsize / 2**20:.1f} MiB)", error,
                              " (lower CACHE_MAX_FLOWS?)") from error
        stack.callback(os.close, fd)
        fds[table] = fd
        libbpf.bpf_map__reuse_fd(libbpf.bpf_object__find_map_by_name(obj, table.encode()), fd)
    outer = libbpf.bpf_object__find_map_by_name(obj, b"flows_outer")
    libbpf.bpf_map__set_inner_map_fd(outer, fds["flows_a"])
