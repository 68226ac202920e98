#!/usr/bin/env python3
"""Create the Debian bookworm base image locally, for machines that cannot pull one.

    python3 tools/make_base_image.py [--engine podman|docker] [--name REF] [--force]

debootstrap (--variant=minbase) from the Debian archive into a temporary directory, then
`tar | <engine> import` as REF (default localhost/ei-debian-base:bookworm). Prints
`REF ID` on stdout (ID = the engine's sha256 image id). An existing REF is kept (and
printed) unless --force. Needs root and debootstrap (apt-get install debootstrap).

This stands in for the upstream base that Containerfile.builder pins by digest
(docker.io/library/debian:bookworm-…-slim@sha256:…). It has no registry digest — an
imported image has only its local id, and debootstrap output differs from day to day —
so tools/generate.py pins the builder to this image by its id and records the id in
BUILD-INFO.json. What keeps the objects identical across bases is that
Containerfile.builder pins the exact Debian versions of the toolchain packages.
The agent image (Containerfile) uses the same base.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from engine import EngineError, find_engine  # tools/engine.py (sys.path[0] is tools/)

DEFAULT_NAME = "localhost/ei-debian-base:bookworm"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# The same apt sources as Debian's official bookworm images.
SOURCES = f"""\
Types: deb
URIs: {MIRROR}
Suites: {SUITE} {SUITE}-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: {SUITE}-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


class BaseImageError(RuntimeError):
    """A step of creating the base image failed."""


def image_id(engine: str, ref: str) -> str | None:
    """The image id of ref in the engine's local store, or None."""
    proc = subprocess.run(
        [engine, "image", "inspect", "--format", "{{.Id}}", ref],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def debootstrap(root: Path, mirror: str) -> None:
    """A minimal bookworm in root, without package caches or device nodes."""
    tool = shutil.which("debootstrap")
    if not tool:
        raise BaseImageError("debootstrap is not installed (apt-get install debootstrap)")
    proc = subprocess.run(
        [tool, "--variant=minbase", SUITE, str(root), mirror],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise BaseImageError(f"debootstrap failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    (root / "etc/apt/sources.list.d/debian.sources").write_text(SOURCES)
    # What Debian's images drop too: downloaded .debs, package lists, logs, device nodes.
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*",
                    "var/log/*", "dev/*", "debootstrap"):
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.name != "lock":
                path.unlink()


def import_tree(engine: str, root: Path, name: str) -> str:
    """tar root into `engine import`; the new image id."""
    tar = subprocess.Popen(
        ["tar", "--numeric-owner", "--sort=name", "-C", str(root), "-c", "."],
        stdout=subprocess.PIPE,
    )
    proc = subprocess.run(
        [engine, "import", "--change", 'CMD ["bash"]', "--change", "ENV LANG=C.UTF-8", "-", name],
        stdin=tar.stdout,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tar.stdout is not None
    tar.stdout.close()
    if tar.wait() or proc.returncode:
        raise BaseImageError(f"importing the tree failed: {proc.stderr.strip()}")
    new_id = image_id(engine, name)
    if not new_id:
        raise BaseImageError(f"{engine} import gave no image {name}")
    return new_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", help="podman or docker (default: $CONTAINER_ENGINE, else auto)")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"image reference ({DEFAULT_NAME})")
    parser.add_argument("--mirror", default=MIRROR, help=f"Debian mirror ({MIRROR})")
    parser.add_argument("--force", action="store_true", help="recreate even if the image exists")
    args = parser.parse_args(argv)
    try:
        engine = find_engine(args.engine)
        existing = image_id(engine, args.name)
        if existing and not args.force:
            print(f"{args.name} {existing}")
            return 0
        if os.geteuid() != 0:
            raise BaseImageError("debootstrap needs root")
        with tempfile.TemporaryDirectory(prefix="ei-debian-base-") as tmp:
            root = Path(tmp) / "root"
            print(f"debootstrap {SUITE} (minbase) from {args.mirror} ...", file=sys.stderr)
            debootstrap(root, args.mirror)
            new_id = import_tree(engine, root, args.name)
        print(f"{args.name} {new_id}")
    except (EngineError, BaseImageError) as exc:
        print(f"make_base_image: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
