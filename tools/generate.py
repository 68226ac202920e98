#!/usr/bin/env python3
"""`nox -s generate`: rebuild pkg/ebpf/ in the pinned builder container (or locally).

    python3 tools/generate.py                 # build in the builder container
    python3 tools/generate.py --check         # rebuild in a temp dir, exit 1 on drift
    python3 tools/generate.py --local [--check]   # the same with the host toolchain
    options: --engine podman|docker (or $CONTAINER_ENGINE), --base REF (or $BUILDER_BASE),
             --rebuild-image

The builder image is Containerfile.builder on a base image:
- --base/$BUILDER_BASE if given;
- else the digest-pinned upstream default of Containerfile.builder when the engine has it;
- else the local stand-in made by tools/make_base_image.py (localhost/ei-debian-base:bookworm),
  passed by image id (an imported image has no registry digest to pin);
- else it tries to pull the upstream default and, failing that, says how to make the base.
The image is tagged localhost/ei-ebpf-builder:<hash of Containerfile.builder and base>, so
editing either rebuilds it. tools/build_ebpf.py then runs in it with the repository mounted
(read-only for --check), as the invoking user, without network. BUILD-INFO.json records the
builder: engine, image id, base, Containerfile.builder's sha256 and the exact commands.

--check compares the rebuilt objects with the committed ones by sha256 (and SHA256SUMS), and
in the container also that BUILD-INFO.json names the current Containerfile.builder.
Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from engine import EngineError, find_engine, version  # tools/engine.py

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "Containerfile.builder"
OBJECTS = ROOT / "pkg" / "ebpf"
LOCAL_BASE = "localhost/ei-debian-base:bookworm"
BUILDER_REPO = "localhost/ei-ebpf-builder"
MOUNT = "/src"  # where the repository is inside the builder (build_ebpf maps it to ".")


class GenerateError(RuntimeError):
    """The builder could not be made or run, or the build failed."""


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, text=True, check=False, **kw)  # type: ignore[call-overload]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def default_base() -> str:
    """The BUILDER_BASE default of Containerfile.builder."""
    match = re.search(r"^ARG BUILDER_BASE=(\S+)", CONTAINERFILE.read_text(), re.MULTILINE)
    if not match:
        raise GenerateError(f"{CONTAINERFILE.name} has no `ARG BUILDER_BASE=` default")
    return match.group(1)


def image_id(engine: str, ref: str) -> str | None:
    proc = run([engine, "image", "inspect", "--format", "{{.Id}}", ref], capture_output=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def resolve_base(engine: str, forced: str | None) -> tuple[str, str]:
    """(reference to build FROM, name to record) of the builder's base image."""
    if forced:
        return forced, forced
    upstream = default_base()
    if image_id(engine, upstream):
        return upstream, upstream
    local = image_id(engine, LOCAL_BASE)
    if local:  # pinned by id: a locally imported image has no registry digest
        return local, f"{LOCAL_BASE} (tools/make_base_image.py)"
    print(f"generate: pulling {upstream}", file=sys.stderr)
    if run([engine, "pull", upstream], capture_output=True).returncode == 0:
        return upstream, upstream
    raise GenerateError(
        f"no base image: cannot pull {upstream} and there is no {LOCAL_BASE}; "
        "create it with `python3 tools/make_base_image.py` (root, debootstrap), "
        "or use `--local` (host toolchain)"
    )


def ensure_builder(engine: str, base: str, rebuild: bool) -> str:
    """Build the builder image unless it exists; its tag."""
    digest = hashlib.sha256(CONTAINERFILE.read_bytes() + b"\0" + base.encode()).hexdigest()
    tag = f"{BUILDER_REPO}:{digest[:16]}"
    if image_id(engine, tag) and not rebuild:
        return tag
    print(f"generate: building {tag} FROM {base}", file=sys.stderr)
    env = dict(os.environ)
    if engine == "docker":
        # The classic builder resolves FROM <image id> locally; BuildKit needs buildx.
        env["DOCKER_BUILDKIT"] = "0"
    with tempfile.TemporaryDirectory(prefix="ei-builder-ctx-") as ctx:  # the image copies nothing
        proc = run(
            [engine, "build", "--network", "host", "--build-arg", f"BUILDER_BASE={base}",
             "-f", str(CONTAINERFILE), "-t", tag, ctx],
            capture_output=True,
            env=env,
        )
    if proc.returncode:
        raise GenerateError(f"building {tag} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return tag


def user_args(engine: str) -> list[str]:
    """Run as the invoking user so the written files are theirs."""
    if engine == "podman" and os.geteuid() != 0:
        return ["--userns", "keep-id"]
    return ["--user", f"{os.getuid()}:{os.getgid()}"]


def build_in_container(
    engine: str, tag: str, base: tuple[str, str], out: Path, check: bool
) -> None:
    """Run build_ebpf.py in the builder, writing into out."""
    builder = {
        "kind": "container",
        "engine": version(engine),
        "image": tag,
        "image id": image_id(engine, tag) or "unknown",
        "base": base[1],
        "base image id": image_id(engine, base[0]) or "unknown",
        "containerfile sha256": sha256_file(CONTAINERFILE),
    }
    mounts = ["-v", f"{ROOT}:{MOUNT}" + (":ro" if check else "")]
    out_arg = "pkg/ebpf"
    if check:
        mounts += ["-v", f"{out}:/out"]
        out_arg = "/out"
    run_args = ["run", "--rm", "--network", "none", *user_args(engine), "-w", MOUNT]
    inner = ["python3", "tools/build_ebpf.py", "--out", out_arg]
    shown_args = [a.replace(f"{os.getuid()}:{os.getgid()}", "$UID:$GID") for a in run_args]
    builder["command"] = " ".join(
        [engine, *shown_args, "-v", f"$PWD:{MOUNT}", tag, *inner, "--builder-json", "<builder>"]
    )
    cmd = [engine, *run_args, *mounts, tag, *inner, "--builder-json", json.dumps(builder)]
    proc = run(cmd, capture_output=True)
    if proc.returncode:
        raise GenerateError(f"build in {tag} failed:\n{proc.stdout}{proc.stderr}")


def build_locally(out: Path) -> None:
    builder = {"kind": "local", "command": "python3 tools/generate.py --local"}
    os_release = Path("/etc/os-release")
    if os_release.is_file():
        match = re.search(r'^PRETTY_NAME="?([^"\n]*)', os_release.read_text(), re.MULTILINE)
        builder["host"] = match.group(1) if match else "unknown"
    cmd = [sys.executable, str(ROOT / "tools" / "build_ebpf.py"), "--out", str(out),
           "--builder-json", json.dumps(builder)]
    proc = run(cmd, capture_output=True, cwd=ROOT)
    if proc.returncode:
        raise GenerateError(f"local build failed:\n{proc.stdout}{proc.stderr}")


def read_sums(path: Path) -> dict[str, str]:
    sums = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            digest, _, name = line.partition("  ")
            sums[name] = digest
    return sums


def compare(rebuilt: Path, committed: Path) -> list[str]:
    """Differences between a fresh build and the committed objects (empty: none)."""
    problems = []
    fresh = read_sums(rebuilt / "SHA256SUMS")
    recorded = read_sums(committed / "SHA256SUMS")
    for name in sorted(set(fresh) | set(recorded)):
        path = committed / name
        have = sha256_file(path) if path.is_file() else "(missing)"
        want = fresh.get(name, "(not built)")
        status = "ok"
        if have != want:
            status = "DRIFT"
        elif recorded.get(name) != have:
            status = "SHA256SUMS STALE"
        print(f"{status:17} {name}\n  committed {have}\n  rebuilt   {want}")
        if status != "ok":
            problems.append(f"{name}: {status}")
    return problems


def recorded_builder() -> dict[str, str]:
    info_file = OBJECTS / "BUILD-INFO.json"
    if not info_file.is_file():
        return {}
    builder = json.loads(info_file.read_text()).get("builder")
    return builder if isinstance(builder, dict) else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local", action="store_true", help="use the host toolchain")
    parser.add_argument("--check", action="store_true", help="fail if pkg/ebpf has drifted")
    parser.add_argument("--engine", help="podman or docker (default: $CONTAINER_ENGINE, auto)")
    parser.add_argument("--base", default=os.environ.get("BUILDER_BASE"),
                        help="base image of the builder (default: see above)")
    parser.add_argument("--rebuild-image", action="store_true",
                        help="rebuild the builder image even if it exists")
    args = parser.parse_args(argv)
    try:
        if args.local:
            build = build_locally
        else:
            engine = find_engine(args.engine)
            base = resolve_base(engine, args.base)
            tag = ensure_builder(engine, base[0], args.rebuild_image)
            print(f"generate: builder {tag} ({engine}, base {base[1]})", file=sys.stderr)

            def build(out: Path) -> None:
                build_in_container(engine, tag, base, out, args.check)

        if not args.check:
            build(OBJECTS)
            print((OBJECTS / "SHA256SUMS").read_text(), end="")
            return 0
        problems = []
        if not args.local:
            want = sha256_file(CONTAINERFILE)
            have = recorded_builder().get("containerfile sha256")
            if have != want:
                problems.append(
                    f"BUILD-INFO.json records Containerfile.builder {have}, it is now {want}"
                )
        with tempfile.TemporaryDirectory(prefix="ei-ebpf-check-") as tmp:
            os.chmod(tmp, 0o755)
            build(Path(tmp))
            problems += compare(Path(tmp), OBJECTS)
        if problems:
            print("generate --check: pkg/ebpf is not what the pinned builder makes of bpf/:",
                  file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            print("run `nox -s generate` and commit pkg/ebpf", file=sys.stderr)
            return 1
        print("generate --check: pkg/ebpf is up to date", file=sys.stderr)
    except (EngineError, GenerateError) as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
