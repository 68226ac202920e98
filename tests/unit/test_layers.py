"""The import graph of src/ has no arrow from a lower layer back up (docs/architecture.md).

Every module of the package has a layer; a module may import modules of lower layers,
and of its own layer only inside its own package (exporter.grpc -> exporter.pbwire).
Imports inside functions count too. A new module must be given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "ei_ebpf_agent"

# low -> high: the kernel's ABI and plain helpers, the eBPF object, flows, settings,
# exporters, metrics, the agent, the command line.
LAYERS = [
    {"ei_ebpf_agent", "errors", "net", "pbflow", "pbflow.flow_pb2",
     "ebpf.libbpf_log_bridge",
     "pbflow.flow_pb2_grpc", "ebpf", "ebpf.libbpf", "ebpf.layout"},
    {"privileges"},
    {"ebpf.objects", "ebpf.features", "ebpf.attach", "ebpf.pins", "ebpf.adopt"},
    {"ebpf.loader"},
    {"flow", "flow.batch"},
    {"flow.tracer"},
    {"config", "ifaces"},
    {"exporter", "exporter.pbwire", "exporter.jsonflow", "exporter.ipfix_encode",
     "exporter.grpc", "exporter.ipfix", "exporter.stdout"},
    {"metrics"},
    {"agent", "collector"},
    {"cli"},
    {"__main__"},
]
LAYER = {module: index for index, modules in enumerate(LAYERS) for module in modules}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    name = ".".join(part for part in parts if part != "__init__")
    return name or "ei_ebpf_agent"


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path) -> set[str]:
    """Modules of the package that `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            names = [f"{base}.{alias.name}" for alias in node.names] or [base]
            names = [n if n.removeprefix("ei_ebpf_agent.") in MODULES else base for n in names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name == "ei_ebpf_agent" or name.startswith("ei_ebpf_agent."):
                found.add(name.removeprefix("ei_ebpf_agent.") if name != "ei_ebpf_agent"
                          else name)
    return found


def package_of(module: str) -> str:
    return module.rpartition(".")[0] if "." in module else module


def test_every_module_has_a_layer() -> None:
    assert sorted(set(MODULES) - set(LAYER)) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    upward = []
    for target in sorted(imported(MODULES[module]) - {module}):
        if target not in LAYER:
            continue  # not a module of the package (checked by the test above)
        if LAYER[target] > LAYER[module] or (
                LAYER[target] == LAYER[module]
                and package_of(target) not in (package_of(module), module)
                and target != package_of(module)):
            upward.append(f"{module} (layer {LAYER[module]}) -> {target} "
                          f"(layer {LAYER[target]})")
    assert upward == []
