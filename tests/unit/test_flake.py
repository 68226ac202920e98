"""flake.nix parses and evaluates offline, and stays in step with pyproject.toml.

nixpkgs cannot be fetched here, so the flake's `outputs` function is applied to a stub
nixpkgs (tests/nix/stub-nixpkgs.nix) that has exactly the attributes the flake may use:
a misspelt attribute, a syntax error or a dependency missing from the flake fails.
Needs nix-instantiate (Debian: nix-bin); skipped without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLAKE = ROOT / "flake.nix"
STUB = ROOT / "tests" / "nix" / "stub-nixpkgs.nix"

pytestmark = pytest.mark.skipif(
    shutil.which("nix-instantiate") is None,
    reason="nix-instantiate not installed (apt-get install nix-bin)",
)

SUMMARY = """
let
  flake = import {flake};
  out = flake.outputs {{ self = {{ outPath = "/src"; }}; nixpkgs = import {stub}; }};
  names = map (p: p.name);
  shell = system: out.devShells.${{system}}.default;
  pkg = system: out.packages.${{system}}.default;
  python = system: builtins.head (builtins.filter (p: p ? packages) (shell system).packages);
in builtins.deepSeq out {{
  inputs = builtins.attrNames flake.inputs;
  systems = builtins.attrNames out.packages;
  shellSystems = builtins.attrNames out.devShells;
  x86 = let p = pkg "x86_64-linux"; s = shell "x86_64-linux"; in {{
    inherit (p) pname version;
    main = p.meta.mainProgram;
    dependencies = names p.dependencies;
    buildSystem = names p.build-system;
    shellPackages = names s.packages;
    shellPython = names (python "x86_64-linux").packages;
    shellInputs = names s.buildInputs;
    asmInclude = s.ASM_INCLUDE;
  }};
}}
"""


def _nix(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NIX_CONFIG="build-users-group =")  # no nixbld group needed
    return subprocess.run(
        ["nix-instantiate", *args], capture_output=True, text=True, env=env, check=False
    )


def _summary() -> dict:
    expr = SUMMARY.format(flake=FLAKE, stub=STUB)
    proc = _nix("--eval", "--strict", "--json", "-E", expr)
    assert proc.returncode == 0, f"flake.nix does not evaluate:\n{proc.stderr}"
    return json.loads(proc.stdout)


def _pyproject_dependencies() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.MULTILINE | re.DOTALL)
    assert block, "pyproject.toml has no dependencies list"
    return re.findall(r'"([A-Za-z0-9_.-]+)', block.group(1))


def test_flake_parses() -> None:
    proc = _nix("--parse", str(FLAKE))
    assert proc.returncode == 0, proc.stderr


def test_flake_evaluates_with_stub_nixpkgs() -> None:
    summary = _summary()
    assert summary["inputs"] == ["nixpkgs"]
    assert summary["systems"] == summary["shellSystems"] == ["aarch64-linux", "x86_64-linux"]
    x86 = summary["x86"]
    assert x86["pname"] == "ei-ebpf-agent"
    assert x86["main"] == "ei-ebpf-agent"
    assert x86["buildSystem"] == ["hatchling"]
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version and x86["version"] == version.group(1)


def test_package_and_shell_have_every_pyproject_dependency() -> None:
    x86 = _summary()["x86"]
    for dep in _pyproject_dependencies():
        assert dep in x86["dependencies"], f"flake package lacks {dep}"
        assert dep in x86["shellPython"], f"flake dev shell python lacks {dep}"
    assert "nox" in x86["shellPython"]


def test_shell_has_the_ebpf_toolchain() -> None:
    x86 = _summary()["x86"]
    assert {"clang-19", "llvm-19", "clang-tools-19", "bpftools"} <= set(x86["shellPackages"])
    assert {"libbpf", "linuxHeaders"} <= set(x86["shellInputs"])
    assert x86["asmInclude"].endswith("-linuxHeaders/include")
