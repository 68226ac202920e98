"""privileges.missing_capabilities names exactly what the kernel would refuse."""

from __future__ import annotations

import pytest

from ei_ebpf_agent import privileges as p

BPF, PERFMON, NET_ADMIN = 1 << p.CAP_BPF, 1 << p.CAP_PERFMON, 1 << p.CAP_NET_ADMIN
SYS_ADMIN, SYS_RESOURCE = 1 << p.CAP_SYS_ADMIN, 1 << p.CAP_SYS_RESOURCE
THREE = BPF | PERFMON | NET_ADMIN


@pytest.mark.parametrize(("caps", "release", "limited", "missing"), [
    (THREE, "6.18.4", False, []),
    (THREE | SYS_RESOURCE, "5.10.0-30-amd64", True, []),
    (THREE, "5.10.0-30-amd64", True, ["CAP_SYS_RESOURCE"]),
    (THREE, "5.10.0-30-amd64", False, []),  # RLIMIT_MEMLOCK already unlimited
    (PERFMON | NET_ADMIN, "6.1.0", False, ["CAP_BPF"]),
    (BPF | NET_ADMIN, "6.1.0", False, ["CAP_PERFMON"]),
    (BPF | PERFMON, "6.1.0", False, ["CAP_NET_ADMIN"]),
    (0, "6.1.0", False, ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]),
    (SYS_ADMIN | NET_ADMIN, "6.1.0", False, []),  # CAP_SYS_ADMIN covers BPF and PERFMON
    (THREE, "5.4.0", True, ["CAP_SYS_ADMIN", "CAP_SYS_RESOURCE"]),  # before 5.8
    (SYS_ADMIN | NET_ADMIN | SYS_RESOURCE, "5.4.0", True, []),
])
def test_missing_capabilities(caps, release, limited, missing):
    assert p.missing_capabilities(caps, release, memlock_limited=limited) == missing


def test_effective_capabilities_reads_capeff(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000000c000001000\n")
    assert p.effective_capabilities(str(status)) == THREE
    assert p.effective_capabilities(str(tmp_path / "absent")) is None


def test_kernel_version():
    assert p.kernel_version("6.18.44-fc-v669") == (6, 18)
    assert p.kernel_version("5.10.0-30-amd64") == (5, 10)
    assert p.memlock_needs_raising("6.1.0") is False
