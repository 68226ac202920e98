"""Both install kinds run the agent: `pip install -e .` (a developer's checkout, where the
wheel's force-include of pkg/ebpf does not apply) and `pip install .` (a wheel). Each
counts real traffic exactly, reported to a real collector."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest
from harness import traffic
from harness.agent import AgentProcess
from harness.assertions import wait_exact
from harness.skips import requires_root_netns

pytestmark = [pytest.mark.root, requires_root_netns()]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv of its own, with pip, where the tests' package is not importable."""
    if not (REPO / "pyproject.toml").is_file():
        pytest.skip("needs the source checkout (pyproject.toml), not an installed copy")
    path = tmp_path_factory.mktemp("install") / "venv"
    venv.create(path, with_pip=True)
    return path


def pip_install(venv_dir: Path, *args: str) -> None:
    done = subprocess.run([str(venv_dir / "bin" / "python"), "-m", "pip", "install",
                           "--quiet", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr


def where_the_package_is(venv_dir: Path) -> Path:
    done = subprocess.run([str(venv_dir / "bin" / "python"), "-c",
                           "import ei_ebpf_agent; print(ei_ebpf_agent.__file__)"],
                          capture_output=True, text=True, check=True, env={"PATH": "/usr/bin"})
    return Path(done.stdout.strip()).parent


def count_with_installed_agent(topo, collector, venv_dir: Path) -> None:
    command = [str(venv_dir / "bin" / "ei-ebpf-agent")]
    agent = AgentProcess(topo, {"CACHE_ACTIVE_TIMEOUT": "300ms", "PYTHONPATH": ""}, collector,
                         wrap=lambda ns, _command: ns.argv(command))
    with agent:
        expected = traffic.udp_flows(topo.link, n_flows=20)
        result = agent.stop()
    assert result.returncode == 0, result.stderr
    wait_exact(expected, collector.flows, collector.byte_measure, timeout=15)


@pytest.mark.parametrize("kind", ["editable", "wheel"])
def test_installed_agent_counts_exactly(kind, fresh_venv, topo, grpc_collector) -> None:
    if kind == "editable":
        pip_install(fresh_venv, "-e", str(REPO))
        package = where_the_package_is(fresh_venv)
        assert package == REPO / "src" / "ei_ebpf_agent"  # runs from the checkout itself
    else:
        subprocess.run([str(fresh_venv / "bin" / "python"), "-m", "pip", "uninstall", "--yes",
                        "--quiet", "ei-ebpf-agent"], capture_output=True, check=False)
        pip_install(fresh_venv, str(REPO))
        package = where_the_package_is(fresh_venv)
        assert (package / "ebpf_objects" / "SHA256SUMS").is_file()
        assert str(package).startswith(str(fresh_venv))
    count_with_installed_agent(topo, grpc_collector, fresh_venv)

