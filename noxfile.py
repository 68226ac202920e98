#!/usr/bin/env python3
"""Every developer, CI and release task of the EI eBPF Agent is a nox session.

Run it as a script (`./noxfile.py -s tests`): it installs nox first when it is missing.
Sessions that need root or system packages say so; as root they install the Debian
packages they need with apt-get, otherwise they skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

if __name__ == "__main__":
    try:
        import nox  # noqa: F401
    except ImportError:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "nox"])
    import nox

    sys.exit(nox.main())

import nox  # noqa: E402

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

ROOT = os.path.dirname(os.path.abspath(__file__))

# Debian packages, by what needs them. The agent itself only needs libbpf at run time.
RUNTIME_PACKAGES = {"libbpf.so.1": "libbpf1"}
TEST_PACKAGES = {
    "ip": "iproute2",
    "tc": "iproute2",
    "bpftool": "bpftool",
    "trafgen": "netsniff-ng",
    "ping": "iputils-ping",
    "cc": "gcc",  # reads libbpf's C headers to check the ctypes option structs
    "tshark": "tshark",  # IPFIX: an independent decoder
    "nfcapd": "nfdump",  # IPFIX: a real collector
    "prometheus": "prometheus",  # a real server scrapes the agent's metrics
    "openssl": "openssl",
}
BUILD_PACKAGES = {
    "clang-19": "clang-19",
    "llvm-strip-19": "llvm-19",
    "/usr/include/bpf/bpf_helpers.h": "libbpf-dev",
}


def _present(thing: str) -> bool:
    if thing.startswith("/"):
        return os.path.exists(thing)
    if thing.endswith(".so.1"):
        import ctypes.util

        return ctypes.util.find_library(thing.split(".so")[0][3:]) is not None
    return shutil.which(thing) is not None


def ensure_system_packages(session: nox.Session, wanted: dict[str, str]) -> bool:
    """Install the Debian packages whose commands/files are missing; False if we cannot."""
    missing = sorted({pkg for thing, pkg in wanted.items() if not _present(thing)})
    if not missing:
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        session.log(f"missing system packages {missing} (install them as root with apt-get)")
        return False
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    session.run("apt-get", "update", "-qq", external=True, env=env)
    session.run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing,
                external=True, env=env)
    return True


def install_agent(session: nox.Session, *extras: str) -> None:
    """Install the package (not editable: the wheel carries the eBPF objects)."""
    target = "." if not extras else f".[{','.join(extras)}]"
    session.install(target)


@nox.session
def tests(session: nox.Session) -> None:
    """Unit and integration tests. Integration tests need root (they make namespaces)."""
    ensure_system_packages(session, {**RUNTIME_PACKAGES, **TEST_PACKAGES, **BUILD_PACKAGES})
    install_agent(session, "test")
    session.run("pytest", "-ra", *(session.posargs or ["tests"]))


@nox.session
def run(session: nox.Session) -> None:
    """Run the agent on this host (root; stdout exporter unless EXPORT/TARGET_* are set)."""
    if os.geteuid() != 0:
        session.error("the agent needs root (or CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN)")
    ensure_system_packages(session, RUNTIME_PACKAGES)
    install_agent(session)
    session.run("ei-ebpf-agent", *session.posargs)


@nox.session
def generate(session: nox.Session) -> None:
    """Rebuild pkg/ebpf/*.o, SHA256SUMS and BUILD-INFO.json from bpf/.

    In the pinned builder container when a container engine is present, with the host
    toolchain with `-- --local`; `-- --check` rebuilds in a temporary directory and fails
    on any drift. See tools/generate.py.
    """
    session.run("python", "tools/generate.py", *session.posargs)


@nox.session
def proto(session: nox.Session) -> None:
    """Regenerate the protobuf/gRPC stubs in src/ei_ebpf_agent/pbflow from proto/flow.proto."""
    session.install("grpcio-tools==1.85.1")  # the committed stubs were made with it
    session.run("python", "tools/gen_proto.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff on the Python sources; clang-format (19, .clang-format) check of bpf/.

    ruff is pinned: its default rule set changes between releases. No mypy: the typed
    surface is small and the ctypes/numpy code would need more ignores than it finds bugs.
    """
    import glob

    clang_format = shutil.which("clang-format-19")
    if not clang_format and ensure_system_packages(session, {"clang-format-19": "clang-format-19"}):
        clang_format = shutil.which("clang-format-19")
    if not clang_format:
        session.error("clang-format-19 is needed to check bpf/ (apt-get install clang-format-19)")
    sources = sorted(glob.glob(os.path.join(ROOT, "bpf", "*.[ch]")))
    session.run(clang_format, "--dry-run", "--Werror", *sources, external=True)
    session.install("ruff==0.17.6")
    session.run("ruff", "check", "src", "tests", "tools", "bench", "noxfile.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks (root): datapath ns/packet, throughput vs no/empty program, userspace flows/s."""
    if os.geteuid() != 0:
        session.skip("the datapath benchmark needs root")
    ensure_system_packages(session, {**RUNTIME_PACKAGES, **TEST_PACKAGES, **BUILD_PACKAGES})
    install_agent(session, "test")
    session.run("python", "bench/run.py", *session.posargs)


@nox.session
def vm(session: nox.Session) -> None:
    """Integration suite inside virtme-ng VMs on Debian kernels (root). See tools/vm_matrix.py."""
    if os.geteuid() != 0:
        session.skip("booting kernels and making namespaces needs root")
    session.run("python", "tools/vm_matrix.py", *session.posargs)


@nox.session
def image(session: nox.Session) -> None:
    """Build the agent image (IMG, default quay.io/<org>/ei-ebpf-agent:dev); `-- --push` pushes."""
    session.run("python", "tools/image.py", *session.posargs)
