#!/usr/bin/env bash
# CI step of the reproducible toolchain (issue 3), as root on a Debian 12 machine:
#   1. installs debootstrap, Debian's docker.io and nix-bin when missing;
#   2. starts dockerd (no iptables, no bridge: the host network is left alone);
#   3. creates the bookworm base image locally (tools/make_base_image.py), since no
#      registry is reachable, unless it exists;
#   4. builds the pinned builder (Containerfile.builder) and runs `nox -s generate -- --check`
#      in it: fails if pkg/ebpf is not exactly what the builder makes of bpf/;
#   5. parses flake.nix (its stub evaluation is tests/unit/test_flake.py, in the test suite).
# A dockerd it started is stopped at the end, unless containers still run in it.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive CONTAINER_ENGINE="${CONTAINER_ENGINE:-docker}"
start=$SECONDS
step() { echo "ci_toolchain: [$((SECONDS - start)) s] $*"; }

missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v dockerd >/dev/null || missing+=(docker.io)
command -v nix-instantiate >/dev/null || missing+=(nix-bin)
if ((${#missing[@]})); then
    step "installing ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

pid_file=$(mktemp)
stop_dockerd() {
    local pid
    pid=$(cat "$pid_file" 2>/dev/null || true)
    # Leave it running if something else is using it (a container still runs).
    if [[ -n "$pid" && -z "$(docker ps -q 2>/dev/null)" ]]; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    fi
    rm -f "$pid_file"
}
trap stop_dockerd EXIT
if [[ "$CONTAINER_ENGINE" == docker ]]; then
    step "starting dockerd if needed"
    DOCKERD_LOG="${DOCKERD_LOG:-/tmp/ei-dockerd.log}" \
        python3 tools/engine.py --start-dockerd --pid-file "$pid_file"
fi

step "base image"
python3 tools/make_base_image.py
step "nox -s generate -- --check (builds the builder image when needed)"
./noxfile.py -s generate -- --check
step "flake.nix parses"
NIX_CONFIG="build-users-group =" nix-instantiate --parse flake.nix >/dev/null
step "done"
