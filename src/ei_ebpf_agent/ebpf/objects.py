"""Find the embedded eBPF object and check its sha256 before libbpf sees a byte of it.

An installed wheel carries the objects in the package (`ei_ebpf_agent/ebpf_objects`,
force-included from `pkg/ebpf`); an editable install (`pip install -e .`) does not, so
there the repository's own `pkg/ebpf` next to `src/` is used.
"""

from __future__ import annotations

import hashlib
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from ei_ebpf_agent.errors import AgentStartError

# src/ei_ebpf_agent/ebpf/objects.py -> the checkout's pkg/ebpf (editable installs only)
_CHECKOUT_OBJECTS = Path(__file__).resolve().parents[3] / "pkg" / "ebpf"


def object_name(byteorder: str = sys.byteorder) -> str:
    """File name of the embedded object for this host's byte order."""
    return "flows_bpfel.o" if byteorder == "little" else "flows_bpfeb.o"


def objects_dir() -> Any:
    """The directory of the embedded objects: the package's, else the checkout's."""
    packaged = resources.files("ei_ebpf_agent") / "ebpf_objects"
    if not packaged.is_dir() and (_CHECKOUT_OBJECTS / "SHA256SUMS").is_file():
        return _CHECKOUT_OBJECTS
    return packaged


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
