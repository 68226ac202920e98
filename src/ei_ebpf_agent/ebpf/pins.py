"""What the agent pins under bpffs so that a restarted agent adopts it and loses no count.

Layout, under BPF_FS_PATH (default /sys/fs/bpf/ei-ebpf-agent):

    <BPF_FS_PATH>/<layout>/maps/<map>               the flow tables, outer map, ring
                                                    buffer, counters, slot locks, .rodata
    <BPF_FS_PATH>/<layout>/links/<ifindex>-<dir>    TCX links (tc filters need no pin:
                                                    they stay on their interface anyway)

`<layout>` names the record layout (`layout_version()`: a hash of the structs the kernel
and the agent share): an agent finds the pins of its own layout and adopts them; pins of
another layout are of an incompatible object and are removed (`discard_other_layouts`).
Pins outlive the process by design: a crash leaves them (and the programs keep counting
through the pinned links); a clean stop removes them all (`remove`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import logging
import os
from pathlib import Path

from ei_ebpf_agent.ebpf import libbpf
from ei_ebpf_agent.ebpf.layout import AGENT_CONFIG, FLOW_RECORD, FLOW_SLOT
from ei_ebpf_agent.ebpf.libbpf import LibbpfError
from ei_ebpf_agent.errors import AgentStartError

log = logging.getLogger(__name__)

BPF_FS_MAGIC = 0xCAFE4A11


def layout_version() -> str:
    """A short name for the shared record layout: equal layouts, adoptable tables."""
    described = repr((FLOW_SLOT.descr, FLOW_RECORD.descr, AGENT_CONFIG.descr))
    return "layout-" + hashlib.sha256(described.encode()).hexdigest()[:12]


def is_bpffs(path: Path) -> bool:
    """Whether `path` (or, if it does not exist yet, its nearest parent) is on bpffs."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return _fs_magic(candidate) == BPF_FS_MAGIC
    return False


def _fs_magic(path: Path) -> int | None:
    # os.statvfs has no f_type; statfs(2) has: the first member of struct statfs.
    buffer = (ctypes.c_long * 32)()  # larger than struct statfs on every ABI
    if _libc.statfs(os.fsencode(path), buffer) != 0:
        return None
    return buffer[0] & 0xFFFFFFFF


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def claim(root: Path, pin: bool) -> PinStore | None:
    """The pin store of this agent under `root` (BPF_FS_PATH), locked for this process.

    None when `pin` is false or `root` is not on bpffs (a warning: restarts then lose
    what was not exported). With `pin` false, pins an earlier agent left are removed, so
    its links detach. Raises AgentStartError if another running agent holds `root`.
    """
    root = Path(root)
    if not is_bpffs(root):
        if pin:
            log.warning("BPF_FS_PATH %s is not on a bpf filesystem (mount bpffs at "
                        "/sys/fs/bpf, see docs/reliability.md): nothing is pinned, and a "
                        "restart loses what was counted since the last export", root)
        return None
    store = PinStore(root)
    try:
        store.lock()
    except BlockingIOError:
        raise AgentStartError(
            f"another agent is running with BPF_FS_PATH={root}: give each agent its own "
            "BPF_FS_PATH, or set PIN=false") from None
    except OSError as error:
        raise AgentStartError(f"cannot use BPF_FS_PATH={root}: {error}") from error
    removed = store.discard_other_layouts(keep=store.base.name if pin else None)
    if removed:
        log.info("removed the pins of an earlier agent in %s: %s", root, ", ".join(removed))
    if not pin:
        store.unlock()
        return None
    return store


class PinStore:
    """The pins of this agent's layout under `root` (BPF_FS_PATH)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.base = self.root / layout_version()
        self.maps_dir = self.base / "maps"
        self.links_dir = self.base / "links"
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Hold an exclusive flock on `root` until unlock() or the process ends."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def prepare(self) -> None:
        """Create the directories (bpffs allows plain directories)."""
        self.maps_dir.mkdir(parents=True, exist_ok=True)
        self.links_dir.mkdir(parents=True, exist_ok=True)

    # -- maps ---------------------------------------------------------------------------

    def get_map(self, name: str) -> int | None:
        """A new fd of the pinned map `name`, or None if it is not pinned."""
        return _get(self.maps_dir / name)

    def pin_map(self, name: str, fd: int) -> None:
        _pin(fd, self.maps_dir / name)

    def unpin_maps(self) -> None:
        _unlink_all(self.maps_dir)

    # -- links --------------------------------------------------------------------------

    def link_path(self, if_index: int, direction: str) -> Path:
        return self.links_dir / f"{if_index}-{direction}"

    def get_link(self, if_index: int, direction: str) -> int | None:
        return _get(self.link_path(if_index, direction))

    def pin_link(self, if_index: int, direction: str, fd: int) -> None:
        _pin(fd, self.link_path(if_index, direction))

    def unpin_link(self, if_index: int, direction: str) -> None:
        _unlink(self.link_path(if_index, direction))

    def pinned_links(self) -> list[tuple[int, str]]:
        """(ifindex, direction) of every pinned link."""
        found = []
        for entry in _list(self.links_dir):
            index, _, direction = entry.name.partition("-")
            if index.isdigit() and direction in ("ingress", "egress"):
                found.append((int(index), direction))
        return found

    # -- the whole store ----------------------------------------------------------------

    def remove(self) -> None:
        """Unpin everything of this layout (a clean stop leaves nothing behind)."""
        _unlink_all(self.links_dir)
        _unlink_all(self.maps_dir)
        for directory in (self.links_dir, self.maps_dir, self.base, self.root):
            try:
                directory.rmdir()
            except OSError:
                pass  # not empty (another layout's pins) or already gone
        self.unlock()

    def discard_other_layouts(self, keep: str | None) -> list[str]:
        """Remove the pins of every layout but `keep`: their links detach, their maps are
        freed (an incompatible object's, or all of them when nothing is pinned now)."""
        removed = []
        for entry in _list(self.root):
            if entry.is_dir() and entry.name != keep and entry.name.startswith("layout-"):
                for sub in ("links", "maps"):
                    _unlink_all(entry / sub)
                    _rmdir(entry / sub)
                _rmdir(entry)
                removed.append(entry.name)
        return removed


def _get(path: Path) -> int | None:
    try:
        return libbpf.bpf_obj_get(os.fsencode(path))
    except LibbpfError as error:
        if error.errno == errno.ENOENT:
            return None
        raise


def _pin(fd: int, path: Path) -> None:
    _unlink(path)  # a stale pin of the same name (its object is replaced)
    libbpf.bpf_obj_pin(fd, os.fsencode(path))


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _list(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _unlink_all(directory: Path) -> None:
    for entry in _list(directory):
        if not entry.is_dir():
            _unlink(entry)


def _rmdir(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError as error:
        log.debug("cannot remove %s: %s", directory, error)
