"""Fetch Debian kernel images for the VM matrix with an apt configuration of our own.

The machine's apt sources and state are never touched: sources list, state, cache and
configuration parts all live under .cache/vm/apt. A series ("5.10", "6.1", "6.12")
resolves to the newest `linux-image-<series>...-amd64` package any configured suite
offers (bullseye, bookworm, trixie and their security suites), which is downloaded with
`apt-get download` and unpacked with `dpkg-deb -x` (not installed) into
.cache/vm/kernels/<release>/. Offline, the newest cached kernel of the series is used.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "vm"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
SUITES = [(MIRROR, "bullseye"), (SECURITY, "bullseye-security"),
          (MIRROR, "bookworm"), (SECURITY, "bookworm-security"),
          (MIRROR, "trixie"), (SECURITY, "trixie-security")]
LISTS_MAX_AGE = 12 * 3600  # re-run `apt-get update` when the lists are older


@dataclass(frozen=True)
class Kernel:
    series: str
    release: str  # `uname -r` of the kernel, e.g. 5.10.0-46-amd64
    package: str
    version: str
    root: Path  # unpacked package: boot/vmlinuz-<release>, lib/modules/<release>

    @property
    def image(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"


def package_pattern(series: str, arch: str = "amd64") -> re.Pattern:
    """Debian's image package names of a series: 5.10.0-46-amd64, 6.12.57+deb13-amd64."""
    return re.compile(rf"^linux-image-({re.escape(series)}(?:\.0-\d+|\.\d+\+deb\d+(?:\.\d+)?)"
                      rf"-{arch})$")


class Apt:
    """apt-get/apt-cache with every directory under `base`."""

    def __init__(self, base: Path = CACHE / "apt", arch: str = "amd64") -> None:
        self.base = base
        self.arch = arch
        for sub in ("etc/apt.conf.d", "etc/preferences.d", "etc/sources.list.d",
                    "state/lists/partial", "cache/archives/partial"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "state" / "status").touch()
        lines = [f"deb [arch={arch} signed-by={KEYRING}] {url} {suite} main"
                 for url, suite in SUITES]
        sources = base / "etc" / "sources.list"
        text = "\n".join(lines) + "\n"
        if not sources.exists() or sources.read_text() != text:
            sources.write_text(text)

    def options(self) -> list[str]:
        b = self.base
        settings = {
            "Dir::Etc": b / "etc", "Dir::Etc::SourceList": b / "etc/sources.list",
            "Dir::Etc::SourceParts": b / "etc/sources.list.d",
            "Dir::Etc::Parts": b / "etc/apt.conf.d",
            "Dir::Etc::PreferencesParts": b / "etc/preferences.d",
            "Dir::State": b / "state", "Dir::State::status": b / "state/status",
            "Dir::Cache": b / "cache", "Acquire::Languages": "none",
            "APT::Architectures": self.arch, "APT::Architecture": self.arch,
            "APT::Sandbox::User": "root", "Debug::NoLocking": "1",
        }
        return [arg for key, value in settings.items() for arg in ("-o", f"{key}={value}")]

    def run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        done = subprocess.run([tool, *self.options(), *args], capture_output=True, text=True,
                              cwd=cwd, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def update(self, force: bool = False) -> None:
        stamp = self.base / "state" / "updated"
        if not force and stamp.exists() and time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE:
            return
        self.run("apt-get", "-q", "update")
        stamp.touch()

    def candidates(self, pattern: re.Pattern) -> dict[str, str]:
        """package -> candidate version, for the real packages matching `pattern`."""
        names = [n for n in self.run("apt-cache", "pkgnames", "linux-image-").split()
                 if pattern.match(n)]
        if not names:
            return {}
        found, current = {}, None
        for line in self.run("apt-cache", "policy", *names).splitlines():
            if not line.startswith(" "):
                current = line.rstrip(":")
            elif line.strip().startswith("Candidate:") and current:
                version = line.split(":", 1)[1].strip()
                if version != "(none)":
                    found[current] = version
        return found


def _compare(a: str, b: str) -> int:
    if a == b:
        return 0
    newer = subprocess.run(["dpkg", "--compare-versions", a, "gt", b], check=False)
    return 1 if newer.returncode == 0 else -1


def newest(candidates: dict[str, str]) -> tuple[str, str]:
    package = max(candidates, key=functools.cmp_to_key(
        lambda x, y: _compare(candidates[x], candidates[y])))
    return package, candidates[package]


def cached(series: str) -> list[Kernel]:
    kernels = []
    for meta in (CACHE / "kernels").glob("*/kernel.json"):
        info = json.loads(meta.read_text())
        if info["series"] == series:
            kernels.append(Kernel(root=meta.parent, **info))
    return sorted(kernels, key=functools.cmp_to_key(lambda x, y: _compare(x.version, y.version)))


def fetch(series: str, apt: Apt | None = None, log=print) -> Kernel:
    """The newest Debian kernel of `series`, downloaded and unpacked once."""
    apt = apt or Apt()
    pattern = package_pattern(series, apt.arch)
    try:
        apt.update()
        candidates = apt.candidates(pattern)
    except RuntimeError as error:
        offline = cached(series)
        if offline:
            log(f"vm: cannot query Debian ({error}); using cached {offline[-1].release}")
            return offline[-1]
        raise
    if not candidates:
        raise RuntimeError(f"no Debian package matches {pattern.pattern} in "
                           f"{', '.join(s for _, s in SUITES)}")
    package, version = newest(candidates)
    release = pattern.match(package).group(1)
    target = CACHE / "kernels" / release
    meta = target / "kernel.json"
    kernel = Kernel(series, release, package, version, target)
    if meta.exists() and json.loads(meta.read_text()).get("version") == version:
        return kernel
    log(f"vm: downloading {package} {version}")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        apt.run("apt-get", "-q", "download", f"{package}={version}", cwd=Path(tmp))
        (deb,) = Path(tmp).glob("*.deb")
        unpacked = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        if not (unpacked / "boot" / f"vmlinuz-{release}").exists():
            raise RuntimeError(f"{deb.name} has no boot/vmlinuz-{release}")
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        unpacked.rename(target)
    meta.write_text(json.dumps({"series": series, "release": release, "package": package,
                                "version": version}, indent=2) + "\n")
    return kernel


if __name__ == "__main__":
    for wanted in sys.argv[1:] or ["5.10", "6.1", "6.12"]:
        print(fetch(wanted))
    os.sync()
