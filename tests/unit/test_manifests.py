"""deployments/: every Kubernetes manifest validates against the Kubernetes schemas (offline,
kubernetes-validate ships them), the agent's settings are documented variables, and the
capability variant, the privileged one and the systemd unit grant what README.md says."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = ROOT / "deployments"
SYSTEMD = DEPLOYMENTS / "systemd"
MANIFESTS = sorted(DEPLOYMENTS.glob("*.yaml"))
FOUR = ["BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"]
# The oldest and newest Kubernetes releases whose schemas kubernetes-validate ships.
VERSIONS = ["1.25", kubernetes_validate.latest_version()]


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> dict[str, dict]:
    return {f"{path.name}:{doc['metadata']['name']}": doc for path in MANIFESTS
            for doc in documents(path) if doc["kind"] == kind}


def agent_container(doc: dict) -> dict:
    (container,) = [c for c in doc["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "ei-ebpf-agent"]
    return container


def documented_variables() -> set[str]:
    text = (ROOT / "docs" / "config.md").read_text()
    return set(re.findall(r"^### `([A-Z0-9_]+)`", text, re.MULTILINE))


def test_there_are_manifests():
    assert {p.name for p in MANIFESTS} >= {"namespace.yaml", "agent-daemonset.yaml",
                                           "agent-daemonset-privileged.yaml",
                                           "collector-flowlogs-pipeline.yaml",
                                           "collector-ei-collect.yaml"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema(path, version):
    docs = documents(path)
    assert docs, f"{path.name} has no documents"
    for doc in docs:
        try:  # strict: unknown fields (typos) are errors too
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{path.name} {doc.get('kind')}/{doc['metadata'].get('name')} "
                        f"is invalid for Kubernetes {version}: {error.message} at "
                        f"{'.'.join(map(str, error.path))}")


def test_the_validator_rejects_a_broken_manifest():
    (doc,) = documents(DEPLOYMENTS / "agent-daemonset.yaml")
    doc["spec"]["template"]["spec"]["hostNetwrk"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)


def test_every_env_name_is_documented():
    known = documented_variables()
    assert "TARGET_HOST" in known and "AGENT_IP" in known
    used = {}
    for name, doc in {**by_kind("DaemonSet"), **by_kind("Deployment")}.items():
        for container in doc["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                used.setdefault(env["name"], name)
    for line in (SYSTEMD / "ei-ebpf-agent.env").read_text().splitlines():
        if line and not line.startswith("#"):
            used.setdefault(line.split("=", 1)[0], "ei-ebpf-agent.env")
    assert used, "no environment variables in deployments/"
    undocumented = {var: where for var, where in used.items() if var not in known}
    assert not undocumented, f"not in docs/config.md: {undocumented}"


def test_capability_daemonset_grants_exactly_the_four():
    (doc,) = documents(DEPLOYMENTS / "agent-daemonset.yaml")
    pod = doc["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    security = agent_container(doc)["securityContext"]
    assert security["runAsUser"] == 0
    assert "privileged" not in security or security["privileged"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert sorted(security["capabilities"]["add"]) == sorted(FOUR)


def test_privileged_daemonset_is_privileged_and_otherwise_the_same():
    (caps,) = documents(DEPLOYMENTS / "agent-daemonset.yaml")
    (priv,) = documents(DEPLOYMENTS / "agent-daemonset-privileged.yaml")
    assert agent_container(priv)["securityContext"]["privileged"] is True
    assert agent_container(priv)["env"] == agent_container(caps)["env"]
    assert agent_container(priv)["resources"] == agent_container(caps)["resources"]
    assert priv["spec"]["template"]["spec"]["hostNetwork"] is True


@pytest.mark.parametrize("name", ["agent-daemonset.yaml", "agent-daemonset-privileged.yaml"])
def test_daemonset_settings(name):
    (doc,) = documents(DEPLOYMENTS / name)
    container = agent_container(doc)
    env = {e["name"]: e for e in container["env"]}
    assert env["AGENT_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert env["EXPORT"]["value"] == "grpc"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from image import DEFAULT_IMG
    finally:
        sys.path.pop(0)
    assert container["image"] == DEFAULT_IMG
    # The agent reaches the collector of collector-flowlogs-pipeline.yaml.
    services = by_kind("Service")
    flp = services["collector-flowlogs-pipeline.yaml:flowlogs-pipeline"]
    host = f"{flp['metadata']['name']}.{flp['metadata']['namespace']}.svc"
    assert env["TARGET_HOST"]["value"] == host
    assert int(env["TARGET_PORT"]["value"]) == flp["spec"]["ports"][0]["port"]


def test_flowlogs_pipeline_config_ingests_grpc_on_the_service_port():
    (config_map,) = [d for d in documents(DEPLOYMENTS / "collector-flowlogs-pipeline.yaml")
                     if d["kind"] == "ConfigMap"]
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    stages = {p["name"]: p for p in config["parameters"]}
    assert [s["name"] for s in config["pipeline"]] == list(stages)
    ingest = stages["ingest"]["ingest"]
    assert ingest["type"] == "grpc"
    service = by_kind("Service")["collector-flowlogs-pipeline.yaml:flowlogs-pipeline"]
    assert ingest["grpc"]["port"] == service["spec"]["ports"][0]["port"]
    assert stages["write"]["write"]["type"] == "stdout"


def _unit() -> dict[str, str]:
    values = {}
    for line in (SYSTEMD / "ei-ebpf-agent.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            values[key] = value
    return values


def test_systemd_unit_has_the_same_four_capabilities():
    unit = _unit()
    expected = {f"CAP_{cap}" for cap in FOUR}
    assert set(unit["CapabilityBoundingSet"].split()) == expected
    assert set(unit["AmbientCapabilities"].split()) == expected
    assert unit["NoNewPrivileges"] == "yes"
    assert unit["EnvironmentFile"].endswith("/ei-ebpf-agent.env")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    # ExecStart must exist for verify: point it at /bin/true, keep everything else.
    text = (SYSTEMD / "ei-ebpf-agent.service").read_text()
    text = re.sub(r"^ExecStart=.*$", "ExecStart=/bin/true", text, flags=re.MULTILINE)
    unit = tmp_path / "ei-ebpf-agent.service"
    unit.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
