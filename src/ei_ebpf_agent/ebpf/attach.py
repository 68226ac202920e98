"""Hook the flow programs on interfaces with TCX links or clsact tc filters, and unhook them.

`Attacher.attach()` hooks one direction of one interface and returns an `Attachment`
whose `detach()` removes exactly that and nothing else.

Recognisably ours, across restarts: a tc filter of the agent always sits at priority
TC_PRIORITY with handle TC_HANDLE and runs one of the object's programs (by name). A
restarted agent that finds such a filter (left by a killed agent) replaces its program
in place (BPF_TC_F_REPLACE), so at no moment do two of its programs count a packet; a
filter there that runs any other program is somebody else's and is never touched. With
pins (PIN=true), TCX links are pinned, and a restarted agent swaps its program into the
pinned link (BPF_LINK_UPDATE), atomically too. `release_unclaimed()` then removes what
the earlier agent left on interfaces this one no longer traces.

Teardown removes only what the agent created: a TCX link is closed (and unpinned); a tc
filter is deleted by its handle and priority; a clsact qdisc is deleted only
if this process created it and no filter at all is left on it (anybody else's filters
keep it). A qdisc that existed before is never deleted; so is one created by an agent
that died (its next run finds it existing), which is harmless: an empty clsact does
nothing.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from typing import Callable

from ei_ebpf_agent.ebpf import libbpf
from ei_ebpf_agent.ebpf.libbpf import LibbpfError
from ei_ebpf_agent.ebpf.pins import PinStore
from ei_ebpf_agent.privileges import is_permission_error, start_error

log = logging.getLogger(__name__)

DIRECTIONS = ("ingress", "egress")
MODES = ("any", "tcx", "tc")

# errno values on detach meaning "already gone with its interface".
_GONE = {errno.ENODEV, errno.ENOENT}

# Where the agent's tc filters sit on clsact ingress/egress (documented in
# docs/reliability.md): a fixed place, so that a restarted agent finds its own.
TC_PRIORITY = 0xE1E1
TC_HANDLE = 0xE1E1
BPF_TC_F_REPLACE = 1 << 0

_TC_H_CLSACT_INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
_TC_H_CLSACT_EGRESS = 0xFFFFFFF3


class _ExistingQdiscFilter(logging.Filter):
    """Drop libbpf's warning for an existing clsact qdisc: the agent expects and accepts it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Exclusivity flag on" not in record.getMessage()


logging.getLogger("libbpf").addFilter(_ExistingQdiscFilter())


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


class Attacher:
    """Attaches the programs `prog_fds` (direction -> fd) and keeps track of what it did.

    `tcx`: whether the kernel has TCX links (features.KernelFeatures.tcx, probed once at
    start); mode "any" uses them then, and clsact filters otherwise.
    """

    def __init__(self, prog_fds: dict[str, int], tcx: bool, *, pins: PinStore | None = None,
                 own_programs: frozenset[str] = frozenset()) -> None:
        self.prog_fds = prog_fds
        self.tcx = tcx
        self.pins = pins
        self.own_programs = own_programs  # names of the programs an agent's filter runs
        self._lock = threading.Lock()
        self._attachments: list[Attachment] = []
        self._qdiscs: dict[int, _Qdisc] = {}

    def attach(self, if_index: int, direction: str, mode: str = "any") -> Attachment:
        """Hook the program of `direction` ("ingress"/"egress") on interface `if_index`.

        mode "tcx" (kernel >= 6.6), "tc" (clsact filter) or "any" (TCX if the kernel has
        it, else tc). Raises AgentStartError when privileges are missing, LibbpfError
        otherwise.
        """
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'ingress' or 'egress', not {direction!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        use_tcx = mode == "tcx" or (mode == "any" and self.tcx)
        try:
            attachment = (self._attach_tcx if use_tcx else self._attach_tc)(if_index, direction)
        except LibbpfError as error:
            if is_permission_error(error):
                raise start_error(f"cannot attach the {direction} program to interface "
                                  f"index {if_index}", error) from error
            raise
        with self._lock:
            self._attachments.append(attachment)
        return attachment

    def _attach_tcx(self, if_index: int, direction: str) -> Attachment:
        attach_type = libbpf.BPF_TCX_INGRESS if direction == "ingress" else libbpf.BPF_TCX_EGRESS
        link_fd = self._adopt_link(if_index, direction, attach_type)
        if link_fd is None:
            # libbpf 1.1 passes attach types it does not know straight to the kernel.
            link_fd = libbpf.bpf_link_create(self.prog_fds[direction], if_index, attach_type,
                                             None)
            if self.pins is not None:
                try:
                    self.pins.pin_link(if_index, direction, link_fd)
                except OSError:
                    os.close(link_fd)
                    raise

        def release() -> None:
            if self.pins is not None:
                self.pins.unpin_link(if_index, direction)
            os.close(link_fd)  # the last reference: closing it detaches the program

        return Attachment(if_index, direction, "tcx", self._forget(release))

    def _adopt_link(self, if_index: int, direction: str, attach_type: int) -> int | None:
        """The pinned link of an earlier agent on this hook, now running our program."""
        if self.pins is None:
            return None
        link_fd = self.pins.get_link(if_index, direction)
        if link_fd is None:
            return None
        try:
            if libbpf.tcx_link_target(link_fd) == (if_index, attach_type):
                libbpf.bpf_link_update(link_fd, self.prog_fds[direction], None)
                log.debug("took over the pinned %s link on interface index %d", direction,
                          if_index)
                return link_fd
        except BaseException:
            os.close(link_fd)
            raise
        os.close(link_fd)  # its interface is gone (or the index was reused): drop it
        self.pins.unpin_link(if_index, direction)
        return None

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
            opts = libbpf.make_opts(libbpf.bpf_tc_opts, prog_fd=self.prog_fds[direction],
                                    handle=TC_HANDLE, priority=TC_PRIORITY)
            try:
                left = filter_program(if_index, direction) if not qdisc.created else None
                if left is not None:
                    if left not in self.own_programs:
                        raise LibbpfError("bpf_tc_attach", errno.EEXIST)  # not ours: keep it
                    opts.flags = BPF_TC_F_REPLACE  # an earlier agent's: ours in its place
                    log.info("replacing the %s tc filter an earlier agent left on interface "
                             "index %d", direction, if_index)
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
        if not qdisc.created or has_tc_filters(if_index) is not False:
            return  # not ours, gone, or unsure: leave it
        hook = libbpf.make_opts(libbpf.bpf_tc_hook, ifindex=if_index,
                                attach_point=libbpf.BPF_TC_INGRESS | libbpf.BPF_TC_EGRESS)
        try:
            libbpf.bpf_tc_hook_destroy(ctypes.byref(hook))
        except LibbpfError as error:
            if error.errno not in _GONE:
                log.warning("cannot delete the clsact qdisc of interface index %d: %s",
                            if_index, error)

    def release_unclaimed(self, if_indexes: list[int]) -> int:
        """Remove what an earlier agent left and this one did not take over: pinned links
        and our tc filters on interfaces (of `if_indexes`) this agent does not trace."""
        with self._lock:
            ours = {(a.if_index, a.direction) for a in self._attachments if a.attached}
        released = 0
        if self.pins is not None:
            for if_index, direction in self.pins.pinned_links():
                if (if_index, direction) not in ours:
                    self.pins.unpin_link(if_index, direction)  # the link detaches with it
                    released += 1
        for if_index in if_indexes:
            for direction, point in (("ingress", libbpf.BPF_TC_INGRESS),
                                     ("egress", libbpf.BPF_TC_EGRESS)):
                if (if_index, direction) in ours:
                    continue
                hook = libbpf.make_opts(libbpf.bpf_tc_hook, ifindex=if_index,
                                        attach_point=point)
                try:
                    if filter_program(if_index, direction) not in self.own_programs:
                        continue
                    gone = libbpf.make_opts(libbpf.bpf_tc_opts, handle=TC_HANDLE,
                                            priority=TC_PRIORITY)
                    libbpf.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(gone))
                    released += 1
                except LibbpfError as error:
                    log.debug("cannot check interface index %d for a filter left behind: %s",
                              if_index, error)
        return released

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


def filter_program(if_index: int, direction: str) -> str | None:
    """Name of the program of the tc filter at our priority and handle, None if none.

    Asked of netlink (the filter's TCA_BPF_NAME, "name:[id]"), which needs only
    CAP_NET_ADMIN; looking the program up by id would need CAP_SYS_ADMIN.
    """
    from pyroute2 import IPRoute

    parent = _TC_H_CLSACT_INGRESS if direction == "ingress" else _TC_H_CLSACT_EGRESS
    try:
        with IPRoute() as ipr:
            for message in ipr.get_filters(index=if_index, parent=parent):
                if message["handle"] == TC_HANDLE and message["info"] >> 16 == TC_PRIORITY:
                    options = message.get_attr("TCA_OPTIONS")
                    name = options.get_attr("TCA_BPF_NAME") if options is not None else None
                    return (name or "").split(":[", 1)[0]
    except Exception as error:  # no clsact there, or netlink trouble: nothing of ours
        # seen; attaching without REPLACE then fails rather than count a packet twice.
        log.debug("cannot list the tc filters of interface index %d: %s", if_index, error)
    return None


def has_tc_filters(if_index: int) -> bool | None:
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
