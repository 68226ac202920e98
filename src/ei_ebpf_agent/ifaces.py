"""Which interfaces to attach to: name filters, and a watcher reporting links as they come and go.

The watcher keeps the set of matching links as {ifindex: name} and reports differences: a new
link is `on_added`, a vanished one `on_removed`, a rename is removed + added. Both modes diff a
full listing of the links instead of decoding individual netlink messages, so a burst of
events, a lost event (receive buffer overrun, ENOBUFS) or a rename all end up in the same,
correct state.

- watch: a netlink socket subscribed to RTMGRP_LINK wakes the thread on every link event;
  the thread drains the pending messages and lists the links once.
- poll: the thread lists the links every poll_period seconds.

Links are listed with socket.if_nameindex() (an RTM_GETLINK dump in libc), in the network
namespace the process is in.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Iterable
from re import Pattern
from typing import Callable

from ei_ebpf_agent.net import compile_entry

log = logging.getLogger(__name__)

RTMGRP_LINK = 0x1
LinkCallback = Callable[[int, str], None]


class InterfaceFilter:
    """include empty = every interface; exact names or /regex/ (full match); exclude wins."""

    def __init__(self, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> None:
        self.include: tuple[str, ...] = tuple(include)
        self.exclude: tuple[str, ...] = tuple(exclude)
        self._include = [compile_entry(e) for e in self.include]
        self._exclude = [compile_entry(e) for e in self.exclude]

    def matches(self, name: str) -> bool:
        if _any_match(self._exclude, name):
            return False
        return not self._include or _any_match(self._include, name)

    def __repr__(self) -> str:
        return f"InterfaceFilter(include={self.include!r}, exclude={self.exclude!r})"


def _any_match(entries: list[str | Pattern[str]], name: str) -> bool:
    for entry in entries:
        if isinstance(entry, str):
            if entry == name:
                return True
        elif entry.fullmatch(name):
            return True
    return False


def list_links() -> dict[int, str]:
    """{ifindex: name} of every link in the current network namespace."""
    return dict(socket.if_nameindex())


class InterfaceWatcher:
    """Reports matching links: those present at start(), then every addition and removal.

    Callbacks run on the caller's thread during start() (for links already present), then
    on the watcher's thread. A callback that raises is logged; the watcher carries on and
    considers the link reported.
    """

    def __init__(
        self,
        mode: str,
        poll_period: float,
        filter: InterfaceFilter,
        on_added: LinkCallback,
        on_removed: LinkCallback,
    ) -> None:
        if mode not in ("watch", "poll"):
            raise ValueError(f"interface watcher mode must be watch or poll, not {mode!r}")
        if poll_period <= 0:
            raise ValueError(f"interface poll period must be > 0, not {poll_period!r}")
        self.mode = mode
        self.poll_period = poll_period
        self.filter = filter
        self._on_added = on_added
        self._on_removed = on_removed
        self._known: dict[int, str] = {}
        self._lock = threading.Lock()  # guards _known for readers of links()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._wake: tuple[int, int] | None = None  # pipe that interrupts select() on stop

    def links(self) -> dict[int, str]:
        """The matching links reported so far and not removed: {ifindex: name}."""
        with self._lock:
            return dict(self._known)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("interface watcher already started")
        if self.mode == "watch":
            # Subscribe before the first listing so that no event falls in between.
            self._sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
            )
            self._sock.bind((0, RTMGRP_LINK))
            self._wake = os.pipe()
            target = self._watch_loop
        else:
            target = self._poll_loop
        self._sync()
        self._thread = threading.Thread(target=target, name=f"ifaces-{self.mode}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the thread and wait for it (at most `timeout` seconds). Idempotent."""
        self._stopping.set()
        if self._wake is not None:
            try:
                os.write(self._wake[1], b"x")
            except OSError:
                pass  # already closed by an earlier stop()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                # A callback is stuck: leave its descriptors open, the daemon thread owns them.
                log.warning("interface watcher thread did not stop within %.1fs", timeout)
                return
        self._close()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._wake is not None:
            for fd in self._wake:
                os.close(fd)
            self._wake = None

    def _poll_loop(self) -> None:
        while not self._stopping.wait(self.poll_period):
            self._sync()

    def _watch_loop(self) -> None:
        assert self._sock is not None and self._wake is not None
        sock, wake = self._sock, self._wake[0]
        while not self._stopping.is_set():
            try:
                ready, _, _ = select.select([sock, wake], [], [])
            except OSError as error:
                log.error("interface watcher: select failed (%s); stopping", error)
                return
            if wake in ready or self._stopping.is_set():
                return
            _drain(sock)
            self._sync()

    def _sync(self) -> None:
        """List the links, report the differences with what was known."""
        try:
            links = list_links()
        except OSError as error:
            # Transient (e.g. a dump interrupted by concurrent changes): the next event or
            # period lists again.
            log.warning("interface watcher: listing links failed: %s", error)
            return
        current = {index: name for index, name in links.items() if self.filter.matches(name)}
        with self._lock:
            known, self._known = self._known, current
        for index, name in sorted(known.items()):
            if current.get(index) != name:
                self._call(self._on_removed, "on_removed", index, name)
        for index, name in sorted(current.items()):
            if known.get(index) != name:
                self._call(self._on_added, "on_added", index, name)

    @staticmethod
    def _call(callback: LinkCallback, what: str, index: int, name: str) -> None:
        try:
            callback(index, name)
        except Exception:
            log.exception("interface watcher: %s(%d, %r) failed", what, index, name)


def _drain(sock: socket.socket) -> None:
    """Discard pending link events: their content is re-read by listing the links."""
    while True:
        try:
            sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as error:
            if error.errno == errno.ENOBUFS:
                continue  # events were lost; the listing that follows recovers the state
            log.warning("interface watcher: reading link events failed: %s", error)
            return
