"""The agent image: built here with `tools/image.py` (docker, local Debian base), run as a
container in the test topology's namespace A, it exports the test traffic with exact counts;
`nox -s image -- --push` pushes it to a real registry and pulling it back gives the digest.

How the container gets namespace A (the "host" network the agent traces):
- with runc (the OCI runtime under docker, containerd and CRI-O): a bundle made from the
  image's filesystem whose config.json joins /run/netns/A by path, with exactly the
  capabilities under test. This is how the four-capability mode is tested, because the
  docker daemon here (Debian's 20.10) refuses `--cap-add BPF` / `PERFMON` ("unknown
  capability") and `--privileged` (it asks runc for CAP_SYS_RESOURCE, which this machine's
  bounding set lacks);
- with docker (testcontainers): a holder container with `--network none` owns a fresh
  namespace, which the test binds to /run/netns/A and builds the topology in; the agent
  container joins it with `--network container:<holder>` (a Kubernetes pod's pause
  container does the same). It runs with every capability docker 20.10 knows except
  CAP_SYS_RESOURCE (no CAP_BPF/CAP_PERFMON: the kernel accepts CAP_SYS_ADMIN instead), i.e.
  what a pre-CAP_BPF runtime's privileged container gets.
Both need root; the module is skipped (with the reason) where no docker engine can start.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from harness import traffic
from harness.agent import AgentProcess
from harness.assertions import wait_exact
from harness.collectors import GrpcCollector
from harness.netns import Namespace, Topology, run
from harness.skips import requires_root_netns

pytestmark = [pytest.mark.root, requires_root_netns()]

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from engine import EngineError, find_engine, start_dockerd  # noqa: E402

sys.path.pop(0)

TAG = f"localhost/ei-ebpf-agent:test-{os.getpid()}"
AGENT_IP = "192.0.2.9"
FOUR = ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_RESOURCE"]
# Capability numbers (include/uapi/linux/capability.h).
CAP_NAMES = ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
             "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
             "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
             "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
             "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
             "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
             "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE"]


def host_bounding_set() -> list[str]:
    with open("/proc/self/status") as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith("CapBnd:"))
    return [f"CAP_{name}" for bit, name in enumerate(CAP_NAMES) if mask >> bit & 1]


def grantable(caps: list[str]) -> list[str]:
    """caps ∩ this machine's bounding set (no runtime can grant more than it has)."""
    have = set(host_bounding_set())
    return [cap for cap in caps if cap in have]


# -- engine, image ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def docker():
    """A working docker, started with tools/engine.py if installed; stopped if we started it."""
    started = None
    try:
        find_engine("docker")
    except EngineError as error:
        if not shutil.which("dockerd"):
            pytest.skip(f"no container engine: {error} (apt-get install docker.io)")
        try:
            started = start_dockerd()
        except EngineError as start_error:
            pytest.skip(f"cannot start dockerd: {start_error}")
    yield "docker"
    if started:
        os.kill(started, 15)


@pytest.fixture(scope="module")
def image(docker):
    """Build the image (local base created if missing) as TAG; removed afterwards."""
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "image.py"), "--engine", docker,
                           "--tag", TAG], capture_output=True, text=True, timeout=1800,
                          check=False)
    assert done.returncode == 0, f"tools/image.py failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.split()[-2:][0] == TAG, done.stdout
    yield TAG
    subprocess.run([docker, "rmi", "-f", TAG], capture_output=True, check=False)


def test_image_labels_and_contents(docker, image):
    config = json.loads(run([docker, "image", "inspect", image]).stdout)[0]["Config"]
    labels = config["Labels"]
    # The commit the image was built from (HEAD then; commits may have landed since).
    revision = labels["org.opencontainers.image.revision"].removesuffix("-dirty")
    assert len(revision) == 40, revision
    run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", revision, "HEAD"])
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert labels["org.opencontainers.image.title"] == "ei-ebpf-agent"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert config["Entrypoint"] == ["ei-ebpf-agent"]
    # No compiler, no kernel headers, no pip; everything readable by any user; the package
    # (with its embedded objects) runs as nobody on a read-only root.
    script = ("set -e; for c in cc gcc clang pip pip3; do if command -v $c; then exit 1; fi; "
              "done; test ! -e /usr/include/linux; "
              "test -z \"$(find /opt/ei-ebpf-agent ! -perm -004 -print -quit)\"; "
              "python3 -c 'import ei_ebpf_agent.ebpf.objects as o; print(len(o.read_verified_object()))'")
    done = run([docker, "run", "--rm", "--network", "none", "--read-only", "--user", "65534",
                "--entrypoint", "sh", image, "-c", script])
    assert int(done.stdout.split()[-1]) > 1000, done.stdout


# -- running the image in namespace A ---------------------------------------------------------
@pytest.fixture(scope="module")
def bundle_rootfs(docker, image, tmp_path_factory):
    """The image's filesystem, for runc bundles."""
    rootfs = tmp_path_factory.mktemp("rootfs")
    cid = run([docker, "create", image]).stdout.strip()
    try:
        export = subprocess.Popen([docker, "export", cid], stdout=subprocess.PIPE)
        untar = subprocess.run(["tar", "-x", "--numeric-owner", "-C", str(rootfs)],
                               stdin=export.stdout, capture_output=True, text=True, check=False)
        assert export.wait() == 0 and untar.returncode == 0, untar.stderr
    finally:
        run([docker, "rm", "-f", cid], check=False)
    config = json.loads(run([docker, "image", "inspect", image]).stdout)[0]["Config"]
    return rootfs, config


def runc_wrap(rootfs_config, tmp_path: Path, caps: list[str], env: dict[str, str],
              args: list[str] | None = None):
    """An AgentProcess wrap: `runc run` of the image in namespace ns with exactly caps."""
    rootfs, image_config = rootfs_config
    if shutil.which("runc") is None:
        pytest.skip("needs runc")

    def wrap(ns: Namespace, _command: list[str]) -> list[str]:
        bundle = tmp_path / "bundle"
        bundle.mkdir(parents=True)
        run(["runc", "spec", "--bundle", str(bundle)])
        spec = json.loads((bundle / "config.json").read_text())
        image_env = [e for e in image_config["Env"] if not e.startswith(tuple(env))]
        spec["root"] = {"path": str(rootfs), "readonly": True}
        spec["process"].update(
            terminal=False, args=args or image_config["Entrypoint"], cwd="/", noNewPrivileges=True,
            env=image_env + [f"{key}={value}" for key, value in env.items()],
            capabilities={"bounding": caps, "effective": caps, "permitted": caps},
            user={"uid": 0, "gid": 0})
        spec["hostname"] = "ei-agent"
        spec["linux"]["namespaces"] = [
            {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
            {"type": "network", "path": f"/run/netns/{ns.name}"}]
        (bundle / "config.json").write_text(json.dumps(spec))
        return ["runc", "run", "--bundle", str(bundle), f"ei-agent-{os.getpid()}-{ns.name}"]

    return wrap


def agent_settings(collector) -> dict[str, str]:
    return {**collector.agent_env(), "CACHE_ACTIVE_TIMEOUT": "500ms", "AGENT_IP": AGENT_IP}


def cap_mask(caps: list[str]) -> int:
    return sum(1 << CAP_NAMES.index(cap.removeprefix("CAP_")) for cap in caps)


@pytest.mark.parametrize("mode", ["four-capabilities", "privileged"])
def test_image_counts_exactly_under_runc(mode, bundle_rootfs, topo, grpc_collector, tmp_path):
    caps = grantable(FOUR) if mode == "four-capabilities" else host_bounding_set()
    # The agent process in this bundle has exactly these capabilities.
    probe = runc_wrap(bundle_rootfs, tmp_path / "probe", caps, {},
                      args=["grep", "^CapEff:", "/proc/self/status"])(topo.a, [])
    cap_eff = int(run(probe).stdout.split()[1], 16)
    assert cap_eff == cap_mask(caps), (hex(cap_eff), caps)
    settings = agent_settings(grpc_collector)
    agent = AgentProcess(topo, settings, grpc_collector,
                         wrap=runc_wrap(bundle_rootfs, tmp_path, caps, settings))
    with agent:
        expected = traffic.mixed_traffic(topo.link)
        result = agent.stop()
    assert result.returncode == 0, result.stderr
    wait_exact(expected, grpc_collector.flows, grpc_collector.byte_measure, timeout=15)


class HolderTopology(Topology):
    """A Topology whose namespace A is the network namespace of process `pid`."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid

    def _add_namespace(self, ns: Namespace) -> None:
        if ns is not self.a:
            return super()._add_namespace(ns)
        if not os.path.isdir("/run/netns"):  # let iproute2 set /run/netns up first
            run(["ip", "netns", "add", f"{ns.name}-probe"])
            run(["ip", "netns", "del", f"{ns.name}-probe"])
        Path(f"/run/netns/{ns.name}").touch()
        run(["mount", "--bind", f"/proc/{self.pid}/ns/net", f"/run/netns/{ns.name}"])
        self.namespaces.append(ns)
        # docker disables IPv6 in a --network none namespace; the traffic mix needs it.
        ns.python("for c in ('all', 'default'):\n"
                  "    open(f'/proc/sys/net/ipv6/conf/{c}/disable_ipv6', 'w').write('0')")
        ns.run(["ip", "link", "set", "lo", "up"])


def test_image_counts_exactly_under_docker_with_testcontainers(docker, image):
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")  # no reaper image here
    containers = pytest.importorskip("testcontainers.core.container")
    holder = containers.DockerContainer(image, entrypoint="sleep", command="infinity",
                                        network_mode="none")
    with holder:
        wrapped = holder.get_wrapped_container()
        wrapped.reload()
        with HolderTopology(wrapped.attrs["State"]["Pid"]) as topo:
            collector = GrpcCollector(topo.a)
            collector.start()
            try:
                settings = agent_settings(collector)

                def wrap(_ns: Namespace, _command: list[str]) -> list[str]:
                    # The agent container in the holder's namespace; `docker run` (not -d)
                    # forwards SIGTERM and returns the agent's exit status.
                    return [docker, "run", "--rm", "--network", f"container:{wrapped.id}",
                            "--read-only", "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
                            *[x for key in settings for x in ("-e", key)], image]

                with AgentProcess(topo, settings, collector, wrap=wrap) as agent:
                    expected = traffic.mixed_traffic(topo.link)
                    result = agent.stop()
                assert result.returncode == 0, result.stderr
                wait_exact(expected, collector.flows, collector.byte_measure, timeout=15)
            finally:
                collector.stop()


# -- push to a real registry and pull back ----------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def registry(tmp_path):
    """Debian's docker-registry (distribution 2.8) on a loopback port, storage in tmp."""
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.skip("needs Debian's docker-registry package")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                      f"    rootdirectory: {tmp_path / 'storage'}\nhttp:\n"
                      f"  addr: 127.0.0.1:{port}\n")
    log = open(tmp_path / "registry.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((tmp_path / "registry.log").read_text()) from None
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def manifest_digest(registry: str, repo: str, tag: str) -> str:
    request = urllib.request.Request(
        f"http://{registry}/v2/{repo}/manifests/{tag}", method="HEAD",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json, "
                           "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers["Docker-Content-Digest"]


def test_nox_image_push_then_pull_gives_the_same_digest(docker, image, registry):
    img = f"{registry}/ei-ebpf-agent:push-test"
    nox = shutil.which("nox")
    if nox is None:
        pytest.skip("needs nox on PATH (./noxfile.py installs it)")
    env = {**os.environ, "IMG": img, "CONTAINER_ENGINE": docker}
    done = subprocess.run([nox, "-f", str(ROOT / "noxfile.py"), "-s", "image", "--", "--push"],
                          capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT,
                          check=False)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    pushed = next(line for line in (done.stdout + done.stderr).splitlines()
                  if line.startswith(f"{registry}/") and "@sha256:" in line)
    assert pushed.startswith(f"{registry}/ei-ebpf-agent@sha256:"), pushed
    digest = pushed.split("@", 1)[1]
    assert manifest_digest(registry, "ei-ebpf-agent", "push-test") == digest

    run([docker, "rmi", img])
    run([docker, "pull", img])
    repo_digests = json.loads(run([docker, "image", "inspect", img]).stdout)[0]["RepoDigests"]
    assert f"{registry}/ei-ebpf-agent@{digest}" in repo_digests
    run([docker, "rmi", img], check=False)
