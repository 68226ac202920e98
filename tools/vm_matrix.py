#!/usr/bin/env python3
"""The integration suite on several kernels: Debian's 5.10, 6.1, 6.12 in virtme-ng VMs,
and the host's own kernel (no VM). `nox -s vm -- [--kernel SERIES ...]`.

Per kernel: fetch the newest Debian image of the series (tools/vm_kernels.py, apt
configuration of its own), boot it once with virtme-ng on the host's root filesystem
(read-only, with tmpfs overlays), and run tests/vm/guest.py inside, which probes the
kernel's BPF features and runs pytest. Results go to .cache/vm/results/<kernel>/
(junit.xml, pytest.log, console.log, summary.json), the matrix to
.cache/vm/results/matrix.json, and the support table to docs/kernels.md.

KVM is used when it can boot a probe kernel; otherwise (no /dev/kvm, or one that cannot
boot stock kernels) the VMs run under software emulation (`--disable-kvm`). The verdict
is taken once per run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vm_kernels  # noqa: E402

ROOT = vm_kernels.ROOT
RESULTS = vm_kernels.CACHE / "results"
DOCS = ROOT / "docs" / "kernels.md"
DEFAULT_KERNELS = ["5.10", "6.1", "6.12", "host"]
# command or file -> Debian package (installed with apt-get when missing and root)
SYSTEM_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "/bin/busybox": "busybox-static",
    "depmod": "kmod",
    "file": "file",
    "ip": "iproute2",
}
KERNEL_LOG = re.compile(r"^\[\s*\d+\.\d+\] ")
# kernel messages worth showing even when the console is quiet
KERNEL_ALERT = re.compile(r"BUG|WARNING|Oops|Call Trace|panic|segfault|bpf|verifier", re.I)


def log(message: str) -> None:
    print(message, flush=True)


# -- prerequisites -----------------------------------------------------------------------


def ensure_system_packages() -> None:
    def present(thing: str) -> bool:
        return os.path.exists(thing) if thing.startswith("/") else bool(shutil.which(thing))

    missing = sorted({pkg for thing, pkg in SYSTEM_PACKAGES.items() if not present(thing)})
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit(f"vm: missing Debian packages {missing}: install them as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log(f"vm: apt-get install {' '.join(missing)}")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                   check=True, env=env)


def bin_dir() -> Path:
    return Path(sys.executable).parent


def ensure_vng() -> Path:
    vng = bin_dir() / "vng"
    if not vng.exists():
        log("vm: pip install virtme-ng")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "virtme-ng"],
                       check=True)
    return vng


def ensure_project() -> None:
    """The guest runs this very interpreter: give it the project and its test deps."""
    if sys.prefix != sys.base_prefix:  # a virtualenv (nox's): ours to install into
        log(f"vm: pip install .[test] into {sys.prefix}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", ".[test]"],
                       check=True, cwd=ROOT)


# -- booting -----------------------------------------------------------------------------

_kvm_verdict: bool | None = None


def vng_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}"}


def kvm_usable(kernel: vm_kernels.Kernel, mode: str) -> bool:
    """Whether KVM boots `kernel` (decided once per run; "yes"/"no" force it)."""
    global _kvm_verdict
    if mode != "auto":
        return mode == "yes"
    if _kvm_verdict is None:
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            _kvm_verdict, why = False, "no usable /dev/kvm"
        else:
            command = [str(ensure_vng()), "--run", str(kernel.image), "--memory", "512M",
                       "-v", "--exec", "echo ei-kvm-ok"]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=90,
                                      cwd=ROOT, env=vng_env(), check=False)
                output = done.stdout + done.stderr
                _kvm_verdict = "ei-kvm-ok" in output
                why = "" if _kvm_verdict else (output.strip().splitlines() or ["?"])[-1]
            except subprocess.TimeoutExpired:
                _kvm_verdict, why = False, "no answer within 90 s"
        log("vm: KVM boots the kernels" if _kvm_verdict
            else f"vm: KVM cannot boot {kernel.release} ({why}): software emulation")
    return _kvm_verdict


def python_binds() -> list[str]:
    """Directories the guest reads Python code from (bound from the cached 9p mount)."""
    dirs = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
    dirs |= {str(ROOT / name) for name in ("src", "tests", "pkg")}
    return sorted(dirs)


GUEST_STARTED = "guest.sh: started"  # first line tests/vm/guest.sh prints
BOOT_ATTEMPTS = 3


def crashed_before_guest(console: str) -> bool:
    """A kernel that panicked before our guest script ran: nothing of ours was loaded yet,
    so the crash is the emulator's (software-emulated boots panic now and then with
    "Oops: int3" while the kernel patches its own code), and booting again is fair.
    A crash after the script started is a test failure and is never retried."""
    return GUEST_STARTED not in console and re.search(r"Kernel panic|Oops", console) is not None


def run_vm(kernel: vm_kernels.Kernel, out: Path, args: argparse.Namespace) -> float:
    started = time.monotonic()
    for attempt in range(1, BOOT_ATTEMPTS + 1):
        boot_vm(kernel, out, args, started + args.timeout)
        console = (out / "console.log").read_text(encoding="utf-8", errors="replace")
        if attempt == BOOT_ATTEMPTS or not crashed_before_guest(console):
            break
        kept = out / f"console.boot{attempt}.log"
        (out / "console.log").rename(kept)
        log(f"vm: {kernel.series}: the kernel crashed while booting, before the tests "
            f"started ({kept.name}); booting again ({attempt + 1} of {BOOT_ATTEMPTS})")
    return time.monotonic() - started


def boot_vm(kernel: vm_kernels.Kernel, out: Path, args: argparse.Namespace,
            deadline: float) -> None:
    """Boot once and run the guest; the console goes to out/console.log."""
    kvm = kvm_usable(kernel, args.kvm)
    guest = [str(ROOT / "tests/vm/guest.sh"), sys.executable, str(out), *python_binds(), "--",
             "--label", kernel.series, "--subset", args.subset, "--where", "vm",
             *(["--strict-skips"] if os.environ.get("EI_STRICT_SKIPS") == "1" else []),
             *args.pytest_args]
    command = [str(ensure_vng()), "--run", str(kernel.image), "--memory", args.memory,
               "--cpus", str(args.cpus), "-v", "--force-9p", f"--rwdir={out}", "--rodir=/mnt=/",
               "--exec", " ".join(guest)]
    if not kvm:
        command.insert(3, "--disable-kvm")
    log(f"vm: booting {kernel.package} {kernel.version} "
        f"({'KVM' if kvm else 'software emulation'})")
    with open(out / "console.log", "w", encoding="utf-8", errors="replace") as console:
        process = subprocess.Popen(command, cwd=ROOT, env=vng_env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace",
                                   start_new_session=True)
        assert process.stdout is not None
        try:
            for line in process.stdout:
                console.write(line)
                if args.verbose or not KERNEL_LOG.match(line) or KERNEL_ALERT.search(line):
                    sys.stdout.write(f"  [{kernel.series}] {line}")
                    sys.stdout.flush()
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(command, args.timeout)
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log(f"vm: {kernel.series}: no result after {args.timeout} s, stopping the VM")
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_host(out: Path, args: argparse.Namespace) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, str(ROOT / "tests/vm/guest.py"), "--out", str(out),
                    "--label", "host", "--subset", args.subset, "--where", "host",
                    *args.pytest_args], cwd=ROOT, check=False)
    return time.monotonic() - started


# -- results -----------------------------------------------------------------------------


def row(label: str, out: Path, seconds: float, kernel: vm_kernels.Kernel | None,
        accel: str) -> dict:
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {
        "kernel": kernel.release if kernel else os.uname().release, "ok": False,
        "features": {}, "counts": {}, "failures": [],
        "error": "no summary: the guest did not finish (see console.log)"}
    return {
        "series": label,
        "package": f"{kernel.package} {kernel.version}" if kernel else "host kernel",
        "accel": accel,
        "wall_seconds": round(seconds, 1),
        **summary,
    }


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    return done.stdout.strip()


def render_docs(matrix: dict) -> str:
    """docs/kernels.md from a matrix.json (the table is never written by hand)."""
    def flag(features: dict, name: str) -> str:
        value = features.get(name)
        return "?" if value is None else ("yes" if value else "no")

    lines = [
        "# Tested kernels",
        "",
        "<!-- Generated by tools/vm_matrix.py (`./noxfile.py -s vm`) from its last run;"
        " do not edit. -->",
        "",
        f"Last run: {matrix['date']}, commit `{matrix['commit']}`"
        f"{' (with uncommitted changes)' if matrix.get('dirty') else ''}, "
        f"{'VM subset' if matrix['subset'] == 'vm' else 'whole integration suite'}"
        f" (see tests/vm/vm_subset.py).",
        "",
        "| kernel | package | runs in | attach mode | ring buffer | map-in-map "
        "| coarse clock | cmpxchg | tests | result | time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in matrix["kernels"]:
        features = entry.get("features") or {}
        counts = entry.get("counts") or {}
        mode = {"tcx": "TCX", "tc": "clsact (tc)"}.get(entry.get("attach_mode"), "?")
        tests = (f"{counts.get('passed', 0)} passed, {counts.get('failed', 0)} failed, "
                 f"{counts.get('errors', 0)} errors, {counts.get('skipped', 0)} skipped")
        where = {"kvm": "VM (KVM)", "tcg": "VM (emulated)", "none": "host"}[entry["accel"]]
        lines.append(
            f"| {entry['kernel']} | {entry['package']} | {where} | {mode} "
            f"| {flag(features, 'ringbuf')} | {flag(features, 'map_in_map')} "
            f"| {flag(features, 'coarse_clock')} | {flag(features, 'cmpxchg')} | {tests} "
            f"| {'pass' if entry.get('ok') else 'FAIL'} | {entry['wall_seconds']:.0f} s |")
    failed = [e for e in matrix["kernels"] if e.get("failures") or e.get("error")]
    if failed:
        lines += ["", "## Failures", ""]
        for entry in failed:
            if entry.get("error"):
                lines.append(f"- {entry['kernel']}: {entry['error']}")
            for failure in entry.get("failures", []):
                lines.append(f"- {entry['kernel']}: `{failure['test']}` ({failure['outcome']}):"
                             f" {failure['message']}")
    lines += [
        "",
        "Attach mode is what the agent's feature probe (src/ei_ebpf_agent/ebpf/features.py)"
        " chose on that kernel: TCX links from Linux 6.6, clsact tc filters before.",
        "Ring buffer (5.8) and map-in-map are required; without the coarse clock (5.11) the"
        " program reads the exact one, and without compare-and-exchange (cmpxchg, 5.12) the"
        " loader loads the programs that fill a new flow's slot under a spin lock.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", action="append", metavar="SERIES",
                        help="5.10, 6.1, 6.12 (any Debian series) or host; repeatable "
                             f"(default: {' '.join(DEFAULT_KERNELS)})")
    parser.add_argument("--subset", choices=("vm", "all"), default="vm",
                        help="vm: tests/vm/vm_subset.py (default); all: every integration test")
    parser.add_argument("--kvm", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per kernel")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--docs", default=str(DOCS), help="table to write ('' = none)")
    parser.add_argument("--docs-only", action="store_true",
                        help="only regenerate the table from the last matrix.json")
    parser.add_argument("--fetch-only", action="store_true", help="download kernels only")
    parser.add_argument("--verbose", "-v", action="store_true", help="show the kernel log")
    parser.add_argument("pytest_args", nargs="*",
                        help="after --: pytest arguments instead of tests/integration")
    return parser.parse_args(argv)


def write_docs(matrix: dict, path: Path | None) -> None:
    if path:
        path.write_text(render_docs(matrix))
        log(f"vm: wrote {path}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    results: Path = args.results.resolve()
    docs = Path(args.docs) if args.docs else None  # not Path(""): that is "."
    if args.docs_only:
        write_docs(json.loads((results / "matrix.json").read_text()), docs)
        return 0
    kernels = args.kernel or DEFAULT_KERNELS
    if os.geteuid() != 0:
        raise SystemExit("vm: needs root (booting kernels, namespaces, BPF)")
    ensure_system_packages()
    fetched = {s: vm_kernels.fetch(s, log=log) for s in kernels if s != "host"}
    if args.fetch_only:
        return 0
    if fetched:
        ensure_vng()
    ensure_project()
    results.mkdir(parents=True, exist_ok=True)
    matrix = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git("rev-parse", "--short=12", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "subset": args.subset,
        "kernels": [],
    }
    total = time.monotonic()
    for series in kernels:
        out = results / series
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        kernel = fetched.get(series)
        if kernel is None:
            log(f"vm: host kernel {os.uname().release} (no VM)")
            seconds, accel = run_host(out, args), "none"
        else:
            seconds = run_vm(kernel, out, args)
            accel = "kvm" if _kvm_verdict or args.kvm == "yes" else "tcg"
        entry = row(series, out, seconds, kernel, accel)
        matrix["kernels"].append(entry)
        log(f"vm: {series} ({entry['kernel']}): {'pass' if entry.get('ok') else 'FAIL'} "
            f"{entry.get('counts')} in {seconds:.0f} s")
    matrix["total_seconds"] = round(time.monotonic() - total, 1)
    (results / "matrix.json").write_text(json.dumps(matrix, indent=2) + "\n")
    write_docs(matrix, docs)
    failed = [e["series"] for e in matrix["kernels"] if not e.get("ok")]
    log(f"vm: {len(kernels) - len(failed)}/{len(kernels)} kernels pass in "
        f"{matrix['total_seconds']:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
