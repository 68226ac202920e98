#!/usr/bin/env python3
"""Compile bpf/flows.bpf.c into the committed objects in pkg/ebpf/.

    python3 tools/build_ebpf.py [--out DIR] [--builder NAME]   # (re)generate
    python3 tools/build_ebpf.py --check                         # exit 1 if pkg/ebpf drifted
    python3 tools/build_ebpf.py --builder-json '{"kind": ...}'  # record a builder object

Writes flows_bpfel.o and flows_bpfeb.o (one object per byte order: TC programs do not
depend on the CPU architecture), SHA256SUMS (sha256sum format, objects only) and
BUILD-INFO.json (toolchain and exact commands). The output is byte-identical from run to
run: no timestamps, no absolute paths (DWARF is stripped, BTF keeps repo-relative names).

The clang and llvm-strip binaries come from $CLANG / $LLVM_STRIP, else the first of
clang-19, clang / llvm-strip-19, llvm-strip on PATH. Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "bpf/flows.bpf.c"
DEFAULT_OUT = "pkg/ebpf"
# (file name, clang target, byte order)
TARGETS = (
    ("flows_bpfel.o", "bpfel", "little"),
    ("flows_bpfeb.o", "bpfeb", "big"),
)
# v3: JMP32 and ALU32 (kernel >= 5.1); the program needs >= 5.10 anyway (see its header).
MCPU = "v3"


class BuildError(RuntimeError):
    """A tool is missing or a build step failed."""


def find_tool(env_var: str, candidates: tuple[str, ...]) -> str:
    """The binary named by env_var, else the first candidate on PATH."""
    names = (os.environ[env_var],) if os.environ.get(env_var) else candidates
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise BuildError(f"none of {', '.join(names)} found on PATH (set ${env_var})")


def asm_include_dir() -> str:
    """The directory with <asm/types.h> for UAPI headers: $ASM_INCLUDE (the nix dev shell
    sets it), else /usr/include/<multiarch>."""
    multiarch = sysconfig.get_config_var("MULTIARCH")
    candidates = [Path(os.environ["ASM_INCLUDE"])] if os.environ.get("ASM_INCLUDE") else []
    candidates += [Path("/usr/include") / multiarch] if multiarch else []
    candidates += sorted(Path("/usr/include").glob("*-linux-gnu*"))
    candidates.append(Path("/usr/include"))  # distributions without multiarch (Fedora)
    for cand in candidates:
        if (cand / "asm" / "types.h").is_file():
            return str(cand)
    raise BuildError("no /usr/include/<multiarch>/asm/types.h (install linux-libc-dev)")


def first_line(cmd: list[str], pattern: str = "") -> str:
    """First line of cmd's output (that contains pattern): a tool's version."""
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if pattern in line:
            return line.strip()
    return out.splitlines()[0].strip() if out else ""


def libbpf_headers_version(clang: str) -> str:
    """Version of the libbpf headers clang sees (plus the Debian package, if any)."""
    try:
        out = subprocess.run(
            [clang, "-target", "bpfel", "-E", "-dM", "-x", "c", "-"],
            input="#include <bpf/libbpf_version.h>\n",
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except subprocess.CalledProcessError:
        return "unknown"
    found = dict(re.findall(r"#define LIBBPF_(MAJOR|MINOR)_VERSION (\d+)", out))
    version = f"{found.get('MAJOR', '?')}.{found.get('MINOR', '?')}"
    if shutil.which("dpkg-query"):
        pkg = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "libbpf-dev"],
            capture_output=True,
            text=True,
            check=False,
        )
        if pkg.returncode == 0 and pkg.stdout:
            version += f" (libbpf-dev {pkg.stdout.strip()})"
    return version


def shown(path: Path) -> str:
    """A path as recorded in BUILD-INFO.json: repo-relative, or under $OUT."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return "$OUT/" + path.name


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path, builder: str | dict[str, str]) -> dict[str, str]:
    """Build every target into out; return {file name: sha256}."""
    clang = find_tool("CLANG", ("clang-19", "clang"))
    strip = find_tool("LLVM_STRIP", ("llvm-strip-19", "llvm-strip"))
    asm_dir = asm_include_dir()
    out.mkdir(parents=True, exist_ok=True)
    commands = []
    objects = []
    for name, target, order in TARGETS:
        obj = out / name
        compile_args = [
            "-O2",
            "-g",
            "-Wall",
            "-Werror",
            "-target",
            target,
            f"-mcpu={MCPU}",
            f"-fdebug-prefix-map={ROOT}=.",
            f"-ffile-prefix-map={ROOT}=.",
            "-idirafter",
            asm_dir,
            "-c",
            SOURCE,
            "-o",
        ]
        strip_args = ["-g"]
        for tool, args in ((clang, compile_args), (strip, strip_args)):
            proc = subprocess.run(
                [tool, *args, str(obj)], cwd=ROOT, capture_output=True, text=True, check=False
            )
            if proc.returncode:
                raise BuildError(f"{Path(tool).name} failed for {name}:\n{proc.stderr}")
            recorded = [a.replace(str(ROOT), "$PWD") for a in args]  # run from the repo root
            commands.append(" ".join([Path(tool).name, *recorded, shown(obj)]))
        data = obj.read_bytes()
        objects.append(
            {
                "file": name,
                "target": target,
                "endianness": order,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )

    sums = {o["file"]: o["sha256"] for o in objects}
    (out / "SHA256SUMS").write_text("".join(f"{sums[n]}  {n}\n" for n in sorted(sums)))
    info = {
        "generated by": "nox -s generate",
        "builder": builder,
        "source": SOURCE,
        "clang": first_line([clang, "--version"]),
        "llvm-strip": first_line([strip, "--version"], "version"),
        "libbpf headers": libbpf_headers_version(clang),
        "asm include": asm_dir,
        "mcpu": MCPU,
        "commands": commands,
        "objects": objects,
    }
    (out / "BUILD-INFO.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return sums


def check(committed: Path, builder: str | dict[str, str]) -> int:
    """Rebuild in a temp dir and compare object hashes with `committed`; 1 on drift."""
    with tempfile.TemporaryDirectory(prefix="ebpf-check-") as tmp:
        built = build(Path(tmp), builder)
    drift = 0
    recorded = {}
    sums_file = committed / "SHA256SUMS"
    if sums_file.is_file():
        for line in sums_file.read_text().splitlines():
            digest, _, name = line.partition("  ")
            recorded[name] = digest
    for name in sorted(built):
        path = committed / name
        have = sha256(path) if path.is_file() else "(missing)"
        status = "ok"
        if have != built[name]:
            status, drift = "DRIFT", 1
        elif recorded.get(name) != have:
            status, drift = "SHA256SUMS STALE", 1
        print(f"{status:16} {name}\n  committed {have}\n  rebuilt   {built[name]}")
    if drift:
        print(
            f"{shown(committed)} is not what {SOURCE} builds to: run `nox -s generate`",
            file=sys.stderr,
        )
    return drift


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / DEFAULT_OUT,
        help=f"output directory (default {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="rebuild in a temp dir and compare with --out; exit 1 on drift",
    )
    parser.add_argument(
        "--builder", default="local", help='recorded in BUILD-INFO.json (default "local")'
    )
    parser.add_argument(
        "--builder-json",
        help="a JSON object recorded as the builder instead of --builder (tools/generate.py)",
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    builder = args.builder
    if args.builder_json:
        builder = json.loads(args.builder_json)
        if not isinstance(builder, dict):
            parser.error("--builder-json must be a JSON object")
    try:
        if args.check:
            return check(out, builder)
        for name, digest in sorted(build(out, builder).items()):
            print(f"{digest}  {shown(out / name)}")
    except BuildError as exc:
        print(f"build_ebpf: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
