"""Which of the capabilities the agent needs the process lacks (read from /proc/self/status).

The agent needs CAP_BPF (load programs, create maps), CAP_PERFMON (the verifier refuses the
programs' pointer use without it) and CAP_NET_ADMIN (attach to interfaces). CAP_SYS_ADMIN
stands in for CAP_BPF and CAP_PERFMON (the kernel accepts either; kernels before 5.8 know only
CAP_SYS_ADMIN). CAP_SYS_RESOURCE is needed only where BPF memory is charged to
RLIMIT_MEMLOCK (kernels before 5.11): libbpf raises the limit there, and leaves it alone
where memory is charged to the cgroup.

Used to name the missing capability in the one-line error when a load or attach is refused
(`privileges_message`), with the kernel's lockdown mode when it is on.
"""

from __future__ import annotations

import errno
import os
import re
import resource

from ei_ebpf_agent.errors import AgentStartError

MISSING_PRIVILEGES = (
    "needs root or CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN "
    "(and CAP_SYS_RESOURCE on kernels before 5.11)"
)
LOCKDOWN_PATH = "/sys/kernel/security/lockdown"

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
CAP_PERFMON = 38
CAP_BPF = 39

NAMES = {
    CAP_NET_ADMIN: "CAP_NET_ADMIN",
    CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
    CAP_SYS_RESOURCE: "CAP_SYS_RESOURCE",
    CAP_PERFMON: "CAP_PERFMON",
    CAP_BPF: "CAP_BPF",
}


def effective_capabilities(status_path: str = "/proc/self/status") -> int | None:
    """The CapEff bit mask of this process, or None if it cannot be read."""
    try:
        with open(status_path) as file:
            for line in file:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        return None
    return None


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of a kernel release string such as '6.18.44-foo' (this kernel's)."""
    match = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def memlock_needs_raising(release: str | None = None) -> bool:
    """True where BPF memory counts against RLIMIT_MEMLOCK (< 5.11) and it is not unlimited."""
    if kernel_version(release) >= (5, 11):
        return False
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return soft != resource.RLIM_INFINITY


def missing_capabilities(effective: int | None = None, release: str | None = None,
                         memlock_limited: bool | None = None) -> list[str]:
    """Names of the capabilities the agent needs and does not have, in a stable order.

    `effective` defaults to this process's CapEff; [] if it cannot be read (then the
    kernel's own error is all there is to report).
    """
    caps = effective_capabilities() if effective is None else effective
    if caps is None:
        return []

    def has(cap: int) -> bool:
        return bool(caps >> cap & 1)

    old_kernel = kernel_version(release) < (5, 8)  # no CAP_BPF / CAP_PERFMON yet
    missing = []
    if old_kernel:
        if not has(CAP_SYS_ADMIN):
            missing.append(NAMES[CAP_SYS_ADMIN])
    else:
        for cap in (CAP_BPF, CAP_PERFMON):
            if not (has(cap) or has(CAP_SYS_ADMIN)):
                missing.append(NAMES[cap])
    if not has(CAP_NET_ADMIN):
        missing.append(NAMES[CAP_NET_ADMIN])
    if memlock_limited is None:
        memlock_limited = memlock_needs_raising(release)
    if memlock_limited and not has(CAP_SYS_RESOURCE):
        missing.append(NAMES[CAP_SYS_RESOURCE])
    return missing


def missing_message() -> str:
    """'missing capability CAP_BPF' (or '... capabilities A, B'), '' when none is missing."""
    missing = missing_capabilities()
    if not missing:
        return ""
    noun = "capability" if len(missing) == 1 else "capabilities"
    return f"missing {noun} {', '.join(missing)}"


def is_permission_error(error: OSError) -> bool:
    return error.errno in (errno.EPERM, errno.EACCES)


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


def start_error(action: str, error: OSError, hint: str = "") -> AgentStartError:
    """The one-line AgentStartError for `action` failing with `error`: the privileges
    line when it was refused, else the error itself (and `hint`)."""
    if is_permission_error(error):
        return AgentStartError(privileges_message(action))
    return AgentStartError(f"{action}: {error}{hint}")
