#!/usr/bin/env python3
"""`nox -s image`: build the agent image from Containerfile, tag it IMG, optionally push it.

    python3 tools/image.py [--push] [--engine podman|docker|buildah] [--base REF]
                           [--platforms linux/amd64,linux/arm64] [--start-dockerd]

    IMG=quay.io/myaccount/ei-ebpf-agent:dev nox -s image -- --push   # the release path

- IMG (env or --tag) names the image; default quay.io/netobserv-ei/ei-ebpf-agent:dev
  (`netobserv-ei` is a placeholder organisation: set IMG to your own repository).
- The engine: --engine or $CONTAINER_ENGINE, else the first of podman, docker, buildah that
  works (tools/engine.py; --start-dockerd starts Debian's dockerd when it is installed but
  not running, as root).
- The base (Containerfile's BASE): --base or $BASE_IMAGE; else Containerfile's digest-pinned
  Debian default when the engine has it; else the local stand-in of tools/make_base_image.py
  (localhost/ei-debian-base:bookworm, passed by image id), created first if it is missing and
  the upstream default cannot be pulled.
- The build context is a temporary directory with Containerfile and wheels/: the agent's
  wheel (built here, eBPF objects embedded) and its dependencies as binary wheels for the
  image's Python and each platform, fetched with this host's pip configuration. The build
  then needs the network only for apt-get; .git, .nox and local files never reach it.
- --push pushes IMG with the engine's own credentials (`<engine> login` beforehand) and
  prints the pushed digest. --platforms builds a multi-arch manifest list (podman/buildah
  `--manifest`; needs qemu-user binfmt for foreign architectures); docker without buildx
  cannot, and says so.

The last line on stdout is `IMG IMAGE_ID` (and `IMG@DIGEST` after --push). Standard library.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import EngineError, find_engine, start_dockerd, works  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "Containerfile"
DEFAULT_IMG = "quay.io/netobserv-ei/ei-ebpf-agent:dev"
LOCAL_BASE = "localhost/ei-debian-base:bookworm"
IMAGE_PYTHON = "3.11"  # Debian bookworm's python3
ARCHES = {"amd64": "x86_64", "arm64": "aarch64", "ppc64le": "ppc64le", "s390x": "s390x"}


class ImageError(RuntimeError):
    """The image could not be built or pushed."""


def run(cmd: list[str], env: dict[str, str] | None = None,
        capture: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, text=True, check=False, env=env,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.STDOUT if capture else None)


def choose_engine(forced: str | None) -> str:
    """--engine / $CONTAINER_ENGINE, else podman, docker, then buildah (the first that works)."""
    wanted = forced or os.environ.get("CONTAINER_ENGINE") or ""
    if wanted == "buildah" or (not wanted and not works("podman") and not works("docker")
                               and shutil.which("buildah")):
        if not shutil.which("buildah"):
            raise ImageError("buildah is not installed")
        return "buildah"
    try:
        return find_engine(wanted or None)
    except EngineError as error:
        raise ImageError(str(error)) from error


def image_id(engine: str, ref: str) -> str | None:
    proc = run([engine, "inspect", "--type", "image", "--format", "{{.Id}}", ref]
               if engine != "buildah" else
               [engine, "inspect", "--type", "image", "--format", "{{.FromImageID}}", ref])
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def default_base() -> str:
    match = re.search(r"^ARG BASE=(\S+)", CONTAINERFILE.read_text(), re.MULTILINE)
    if not match:
        raise ImageError("Containerfile has no `ARG BASE=` default")
    return match.group(1)


def resolve_base(engine: str, forced: str | None) -> tuple[str, str, str]:
    """(FROM reference, name to record, digest or id to record) of the base image."""
    if forced:
        return forced, forced, image_id(engine, forced) or ""
    upstream = default_base()
    digest = upstream.partition("@")[2]
    if image_id(engine, upstream):
        return upstream, upstream, digest
    local = image_id(engine, LOCAL_BASE)
    if local:  # pinned by id: an imported image has no registry digest
        return local, LOCAL_BASE, local
    pull = [engine, "pull", upstream]
    print(f"image: pulling {upstream}", file=sys.stderr)
    if run(pull).returncode == 0:
        return upstream, upstream, digest
    print(f"image: cannot pull the base; creating {LOCAL_BASE} (tools/make_base_image.py)",
          file=sys.stderr)
    made = run([sys.executable, str(ROOT / "tools" / "make_base_image.py"),
                "--engine", engine, "--name", LOCAL_BASE])
    local = image_id(engine, LOCAL_BASE)
    if made.returncode or not local:
        raise ImageError(f"no base image: cannot pull {upstream}, and making {LOCAL_BASE} "
                         f"failed:\n{made.stdout[-2000:]}")
    return local, LOCAL_BASE, local


def project_version() -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(),
                      re.MULTILINE)
    return match.group(1) if match else "0.0.0"


def revision() -> str:
    """The git commit, with -dirty when tracked files differ from it; 'unknown' outside git."""
    head = run(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    if head.returncode:
        return "unknown"
    dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def wheel_platforms(platform: str) -> list[str]:
    """pip --platform tags a bookworm (glibc 2.36) image of that OCI platform can run."""
    arch = ARCHES.get(platform.removeprefix("linux/"))
    if arch is None:
        raise ImageError(f"unsupported platform {platform!r} (known: {', '.join(ARCHES)})")
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(36, 16, -1)]
    return tags + [f"manylinux2014_{arch}"]


def host_platform() -> str:
    machine = os.uname().machine
    for oci, arch in ARCHES.items():
        if arch == machine:
            return f"linux/{oci}"
    raise ImageError(f"unknown host architecture {machine}")


def make_context(directory: Path, platforms: list[str]) -> None:
    """Containerfile + wheels/: the agent's wheel and its dependencies for each platform."""
    shutil.copy2(CONTAINERFILE, directory / "Containerfile")
    wheels = directory / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    proc = run([*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(ROOT)])
    if proc.returncode:
        raise ImageError(f"building the agent's wheel failed:\n{proc.stdout[-3000:]}")
    (agent_wheel,) = wheels.glob("ei_ebpf_agent-*.whl")
    for platform in platforms or [host_platform()]:
        tags = [x for tag in wheel_platforms(platform) for x in ("--platform", tag)]
        proc = run([*pip, "download", "--quiet", "--only-binary=:all:", *tags,
                    "--python-version", IMAGE_PYTHON, "--implementation", "cp",
                    "--dest", str(wheels), str(agent_wheel)])
        if proc.returncode:
            raise ImageError(f"downloading the dependencies for {platform} failed:\n"
                             f"{proc.stdout[-3000:]}")


def build(engine: str, img: str, base: tuple[str, str, str], platforms: list[str]) -> None:
    args = {"BASE": base[0], "BASE_NAME": base[1], "BASE_DIGEST": base[2],
            "VERSION": project_version(), "REVISION": revision()}
    build_args = [x for key, value in args.items() for x in ("--build-arg", f"{key}={value}")]
    env = dict(os.environ)
    if engine == "docker":
        if platforms:
            raise ImageError("a multi-arch build with docker needs buildx, which is not used "
                             "here: use podman or buildah for --platforms")
        env["DOCKER_BUILDKIT"] = "0"  # the classic builder resolves FROM <image id> locally
        cmd = ["docker", "build", "--force-rm", "--network", "host", "-t", img]
    else:
        cmd = [engine, "build" if engine == "podman" else "bud", "--network", "host",
               "--layers"]
        if platforms:
            # A manifest list named IMG, one image per platform.
            run([engine, "manifest", "rm", img])
            cmd += ["--manifest", img, "--platform", ",".join(platforms)]
        else:
            cmd += ["-t", img]
    with tempfile.TemporaryDirectory(prefix="ei-image-ctx-") as tmp:
        ctx = Path(tmp)
        make_context(ctx, platforms)
        cmd += [*build_args, "-f", str(ctx / "Containerfile"), str(ctx)]
        print(f"image: building {img} FROM {base[1]} with {engine}", file=sys.stderr)
        proc = run(cmd, env=env)
    if proc.returncode:
        raise ImageError(f"building {img} failed:\n{proc.stdout[-6000:]}")


def push(engine: str, img: str, platforms: list[str]) -> str:
    """Push IMG; the registry's digest of what was pushed."""
    with tempfile.TemporaryDirectory(prefix="ei-image-push-") as tmp:
        if engine == "docker":
            proc = run(["docker", "push", img])
            text = proc.stdout
        else:
            digest_file = Path(tmp) / "digest"
            sub = ["manifest", "push", "--all"] if platforms else ["push"]
            proc = run([engine, *sub, "--digestfile", str(digest_file), img, f"docker://{img}"])
            text = digest_file.read_text() if digest_file.exists() else proc.stdout
    if proc.returncode:
        raise ImageError(f"pushing {img} failed (log in with `{engine} login` first?):\n"
                         f"{proc.stdout[-3000:]}")
    match = re.search(r"(sha256:[0-9a-f]{64})", text.split("digest:")[-1])
    if not match:
        raise ImageError(f"pushed {img}, but found no digest in:\n{text[-2000:]}")
    return match.group(1)


def repository(ref: str) -> str:
    """ref without its tag or digest: 127.0.0.1:5000/ei:dev -> 127.0.0.1:5000/ei."""
    ref = ref.split("@", 1)[0]
    name, _, tag = ref.rpartition(":")
    return name if name and "/" not in tag else ref


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default=os.environ.get("IMG") or DEFAULT_IMG,
                        help=f"image reference (default: $IMG, else {DEFAULT_IMG})")
    parser.add_argument("--engine", help="podman, docker or buildah (default: $CONTAINER_ENGINE)")
    parser.add_argument("--base", default=os.environ.get("BASE_IMAGE"),
                        help="base image reference (default: see the module docstring)")
    parser.add_argument("--platforms", default="",
                        help="comma-separated platforms for a manifest list (podman/buildah)")
    parser.add_argument("--push", action="store_true", help="push IMG after building it")
    parser.add_argument("--start-dockerd", action="store_true",
                        help="start dockerd first if it is installed but not running (root)")
    args = parser.parse_args(argv)
    platforms = [p for p in args.platforms.split(",") if p]
    try:
        if args.start_dockerd:
            start_dockerd()
        engine = choose_engine(args.engine)
        base = resolve_base(engine, args.base)
        build(engine, args.tag, base, platforms)
        print(f"{args.tag} {image_id(engine, args.tag) or '(manifest list)'}")
        if args.push:
            digest = push(engine, args.tag, platforms)
            print(f"{repository(args.tag)}@{digest}")
    except (ImageError, EngineError) as error:
        print(f"image: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
