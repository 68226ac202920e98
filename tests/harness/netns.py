"""Network namespaces and veth pairs made by the test itself, removed on exit even on failure.

`Topology` is two namespaces, A (the host the agent traces) and B (the peer), joined by one
veth pair with IPv4 and IPv6 addresses and permanent neighbour entries (no ARP/ND during the
test, so the first packets are never queued or dropped while a neighbour resolves). More
links from A to new namespaces can be added (and removed) while the agent runs.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, TypeVar

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()
T = TypeVar("T")


class NetnsError(RuntimeError):
    pass


def terminate_group(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    """SIGTERM a process started with its own session (and its children), SIGKILL if stuck."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


def run(argv: Sequence[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with the command line and its stderr."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False, **kw)
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


class Namespace:
    """One named network namespace (`ip netns`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def argv(self, argv: Sequence[str]) -> list[str]:
        """The command line that runs argv inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = 60, **kw):
        return run(self.argv(argv), check=check, timeout=timeout, **kw)

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(argv), **kw)

    def python(self, code: str, *args: str, check: bool = True, timeout: float = 60):
        """Run a Python snippet inside the namespace (same interpreter as the tests)."""
        return self.run([sys.executable, "-c", code, *args], check=check, timeout=timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run fn() in a short-lived thread that has entered this namespace.

        setns() changes only the calling thread, so the test's own threads never move;
        sockets made inside fn stay in this namespace and are usable from any thread.
        """
        result: dict[str, object] = {}

        def enter_and_call() -> None:
            try:
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({self.name}): {os.strerror(err)}")
                finally:
                    os.close(fd)
                result["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                result["error"] = exc

        thread = threading.Thread(target=enter_and_call, name=f"setns-{self.name}")
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]  # type: ignore[misc]
        return result["value"]  # type: ignore[return-value]

    def socket(self, family: int, type: int, proto: int = 0) -> socket.socket:
        """A socket that lives in this namespace."""
        return self.call(lambda: socket.socket(family, type, proto))

    def link(self, ifname: str) -> dict:
        """`ip -j link show` of one interface."""
        out = self.run(["ip", "-j", "link", "show", "dev", ifname]).stdout
        return json.loads(out)[0]

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"


@dataclass
class Link:
    """A veth pair from `local_ns` (usually A) to `peer_ns`, with addresses on both ends."""

    local_ns: Namespace
    peer_ns: Namespace
    local_name: str
    peer_name: str
    local_mac: str = ""
    peer_mac: str = ""
    local_ifindex: int = 0
    peer_ifindex: int = 0
    local_ip4: str = ""
    peer_ip4: str = ""
    local_ip6: str = ""
    peer_ip6: str = ""

    def ip(self, family: int, side: str) -> str:
        """Address of side "local" or "peer" for socket.AF_INET / AF_INET6."""
        v6 = family == socket.AF_INET6
        return {("local", False): self.local_ip4, ("peer", False): self.peer_ip4,
                ("local", True): self.local_ip6, ("peer", True): self.peer_ip6}[(side, v6)]


class Topology:
    """Namespaces A and B joined by a veth pair; `with Topology() as topo: ...`.

    topo.a, topo.b: Namespace; topo.link: the A–B Link (topo.veth_a / topo.veth_b names,
    topo.mac_a / topo.mac_b, topo.ifindex_a / topo.ifindex_b, topo.ip4_a ... shortcuts).
    add_link() makes a further veth from A to a new namespace; everything is deleted on exit.
    """

    def __init__(self) -> None:
        n = next(_counter)
        self.token = f"{os.getpid()}{n}"  # unique per process and topology
        self.a = Namespace(f"ei-{os.getpid()}-{n}-a")
        self.b = Namespace(f"ei-{os.getpid()}-{n}-b")
        self.namespaces: list[Namespace] = []
        self.links: list[Link] = []
        self.link: Link | None = None
        self._subnet = itertools.count(1)

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self):
        try:
            self._add_namespace(self.a)
            self._add_namespace(self.b)
            self.link = self.add_link(self.b)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Delete every namespace made (their veth ends go with them)."""
        errors = []
        for ns in reversed(self.namespaces):
            done = run(["ip", "netns", "del", ns.name], check=False)
            if done.returncode != 0 and os.path.exists(f"/run/netns/{ns.name}"):
                errors.append(f"{ns.name}: {done.stderr.strip()}")
        self.namespaces.clear()
        if errors:
            raise NetnsError("could not delete namespaces: " + "; ".join(errors))

    def _add_namespace(self, ns: Namespace) -> None:
        run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.run(["ip", "link", "set", "lo", "up"])

    # -- links -----------------------------------------------------------------------------
    def new_namespace(self, suffix: str) -> Namespace:
        ns = Namespace(f"ei-{self.token}-{suffix}")
        self._add_namespace(ns)
        return ns

    def add_link(self, peer: Namespace | None = None, local_name: str | None = None,
                 peer_name: str | None = None) -> Link:
        """A veth pair from A to `peer` (a new namespace when None), addressed and up.

        Link k gets 10.213.k.1/24 (A) and 10.213.k.2/24, fd00:213:k::1/64 and ::2.
        Interface names are at most 15 characters: e<token><k>a and e<token><k>p.
        """
        k = next(self._subnet)
        if peer is None:
            peer = self.new_namespace(f"p{k}")
        local_name = local_name or f"e{self.token}x{k}a"
        peer_name = peer_name or f"e{self.token}x{k}p"
        for name in (local_name, peer_name):
            if len(name) > 15:
                raise NetnsError(f"interface name {name!r} is longer than 15 characters")
        run(["ip", "link", "add", local_name, "netns", self.a.name, "type", "veth",
             "peer", "name", peer_name, "netns", peer.name])
        link = Link(self.a, peer, local_name, peer_name,
                    local_ip4=f"10.213.{k}.1", peer_ip4=f"10.213.{k}.2",
                    local_ip6=f"fd00:213:{k}::1", peer_ip6=f"fd00:213:{k}::2")
        for ns, name, ip4, ip6 in ((self.a, local_name, link.local_ip4, link.local_ip6),
                                   (peer, peer_name, link.peer_ip4, link.peer_ip6)):
            ns.run(["ip", "addr", "add", f"{ip4}/24", "dev", name])
            ns.run(["ip", "-6", "addr", "add", f"{ip6}/64", "dev", name, "nodad"])
            ns.run(["ip", "link", "set", name, "up"])
        info_a, info_p = self.a.link(local_name), peer.link(peer_name)
        link.local_mac, link.local_ifindex = info_a["address"], info_a["ifindex"]
        link.peer_mac, link.peer_ifindex = info_p["address"], info_p["ifindex"]
        # Permanent neighbours: no ARP/ND, so no packet waits in (or is dropped from) the
        # unresolved-neighbour queue before reaching TC egress.
        for ns, name, ip4, ip6, mac in ((self.a, local_name, link.peer_ip4, link.peer_ip6,
                                         link.peer_mac),
                                        (peer, peer_name, link.local_ip4, link.local_ip6,
                                         link.local_mac)):
            for ip in (ip4, ip6):
                ns.run(["ip", "neigh", "replace", ip, "lladdr", mac, "nud", "permanent",
                        "dev", name])
        self.links.append(link)
        return link

    def del_link(self, link: Link) -> None:
        """Delete a link (its peer end goes too); its peer namespace stays until close()."""
        self.a.run(["ip", "link", "del", link.local_name])
        self.links.remove(link)

    # -- shortcuts for the main A–B link --------------------------------------------------
    @property
    def veth_a(self) -> str:
        return self.link.local_name

    @property
    def veth_b(self) -> str:
        return self.link.peer_name

    @property
    def mac_a(self) -> str:
        return self.link.local_mac

    @property
    def mac_b(self) -> str:
        return self.link.peer_mac

    @property
    def ifindex_a(self) -> int:
        return self.link.local_ifindex

    @property
    def ifindex_b(self) -> int:
        return self.link.peer_ifindex

    @property
    def ip4_a(self) -> str:
        return self.link.local_ip4

    @property
    def ip4_b(self) -> str:
        return self.link.peer_ip4

    @property
    def ip6_a(self) -> str:
        return self.link.local_ip6

    @property
    def ip6_b(self) -> str:
        return self.link.peer_ip6

    def link_drops(self, link: Link | None = None) -> dict[str, int]:
        """Drop counters of both ends of a link (veth drops when the peer's backlog is full)."""
        link = link or self.link
        out = {}
        for ns, name in ((link.local_ns, link.local_name), (link.peer_ns, link.peer_name)):
            stats = json.loads(ns.run(["ip", "-j", "-s", "link", "show", "dev", name]).stdout)[0]
            s64 = stats.get("stats64", {})
            out[name] = s64.get("rx", {}).get("dropped", 0) + s64.get("tx", {}).get("dropped", 0)
        return out

    def attached(self, ns: Namespace | None = None) -> dict:
        """`bpftool net show` of a namespace (A by default), as JSON."""
        ns = ns or self.a
        out = ns.run(["bpftool", "-j", "net", "show"]).stdout
        data = json.loads(out)
        return data[0] if isinstance(data, list) and data else (data or {})

    def attachments(self, ifname: str | None = None, ns: Namespace | None = None) -> dict:
        """What is attached at TC on an interface of A (default: the A–B veth end).

        {"tcx_ingress": n, "tcx_egress": n} program counts from BPF_PROG_QUERY (bpftool 7.1
        does not list TCX links per namespace), "tc_ingress"/"tc_egress": `tc filter show`
        lines, "qdiscs": `tc qdisc show` lines.
        """
        ns = ns or self.a
        ifname = ifname or self.veth_a
        ifindex = ns.link(ifname)["ifindex"]
        out: dict = {}
        for key, attach_type in (("tcx_ingress", BPF_TCX_INGRESS), ("tcx_egress", BPF_TCX_EGRESS)):
            out[key] = ns.call(lambda t=attach_type: bpf_prog_query_count(ifindex, t))
        for hook in ("ingress", "egress"):
            done = ns.run(["tc", "filter", "show", "dev", ifname, hook], check=False)
            out[f"tc_{hook}"] = [line for line in done.stdout.splitlines() if line.strip()]
        qd = ns.run(["tc", "qdisc", "show", "dev", ifname]).stdout
        out["qdiscs"] = [line for line in qd.splitlines() if line.strip()]
        return out


BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47


def bpf_prog_query_count(ifindex: int, attach_type: int) -> int:
    """Number of programs attached to ifindex (in the calling thread's netns) at attach_type."""
    from ei_ebpf_agent.ebpf import libbpf

    count = ctypes.c_uint32(0)
    try:
        libbpf.bpf_prog_query(ifindex, attach_type, 0, None, None, ctypes.byref(count))
    except libbpf.LibbpfError as error:
        if error.errno == errno.EINVAL and attach_type in (BPF_TCX_INGRESS, BPF_TCX_EGRESS):
            return 0  # a kernel before 6.6 has no TCX: nothing can be attached there
        raise
    return count.value
