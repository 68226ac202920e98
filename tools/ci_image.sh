#!/usr/bin/env bash
# CI step for the agent image (issue 6), as root on a Debian 12 machine, before the test
# suite (tests/integration/test_image.py, test_capabilities.py). Idempotent:
#   1. installs what is missing: Debian's docker.io (dockerd, runc), debootstrap (the
#      local base image), docker-registry (the registry `nox -s image -- --push` pushes to
#      in the test), util-linux's setpriv, systemd's systemd-analyze (unit file check);
#   2. starts dockerd if it is not running (tools/engine.py: no iptables, no bridge) and
#      leaves it running for the tests;
#   3. creates the local bookworm base (tools/make_base_image.py) unless it exists, since no
#      registry can be pulled from here.
# The image itself is built by the tests (tools/image.py; cached layers make it quick).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive CONTAINER_ENGINE=docker
start=$SECONDS
step() { echo "ci_image: [$((SECONDS - start)) s] $*"; }

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v runc >/dev/null || missing+=(runc)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v docker-registry >/dev/null || missing+=(docker-registry)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v systemd-analyze >/dev/null || missing+=(systemd)  # verifies the unit file
if ((${#missing[@]})); then
    step "installing ${missing[*]}"
    apt-get update -qq
    # policy-rc.d: do not start the packages' services (a registry on :5000, a second dockerd).
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
fi

step "docker engine"
python3 tools/engine.py --start-dockerd
step "local base image"
python3 tools/make_base_image.py --engine docker
step "done"
