"""Kernel feature probe: the decisions and messages (the probes themselves run as root in
tests/integration/test_kernel_features.py, on the host and in every VM of `nox -s vm`)."""

from __future__ import annotations

import logging

import pytest

from ei_ebpf_agent.ebpf import features
from ei_ebpf_agent.ebpf.features import KernelFeatures, MissingKernelFeature


def make(**flags: bool) -> KernelFeatures:
    base = {"ringbuf": True, "map_in_map": True, "coarse_clock": True, "cmpxchg": True,
            "tcx": True}
    return KernelFeatures(kernel="5.4.0-1-amd64", **{**base, **flags})


def test_version_fallback_reads_uname_strings() -> None:
    assert features.kernel_version_fallback("5.10.0-46-amd64") == {
        "ringbuf": True, "map_in_map": True, "coarse_clock": False, "cmpxchg": False,
        "tcx": False}
    assert features.kernel_version_fallback("6.12.57+deb13-amd64")["tcx"] is True
    assert features.kernel_version_fallback("6.6.0")["tcx"] is True
    assert features.kernel_version_fallback("5.7.19")["ringbuf"] is False
    assert features.kernel_version_fallback("5.11.0")["coarse_clock"] is True
    assert features.kernel_version_fallback("5.11.0")["cmpxchg"] is False
    assert features.kernel_version_fallback("5.12.0")["cmpxchg"] is True


def test_attach_mode_follows_tcx() -> None:
    assert make().attach_mode == "tcx"
    assert make(tcx=False).attach_mode == "tc"
    assert "clsact" in make(tcx=False).describe()


def test_missing_tcx_is_not_a_problem() -> None:
    make(tcx=False).check()
    assert make(tcx=False).problem() is None


def test_one_line_names_what_is_missing_and_the_kernel_needed() -> None:
    kernel = make(ringbuf=False, map_in_map=False)
    with pytest.raises(MissingKernelFeature) as raised:
        kernel.check()
    message = str(raised.value)
    assert "\n" not in message
    assert "ring buffer" in message and "map-in-map" in message
    assert message.endswith("needs Linux 5.8 or newer")
    assert kernel.missing() == ["ringbuf", "map_in_map"]


@pytest.mark.parametrize("optional", ["coarse_clock", "cmpxchg"])
def test_missing_optional_features_are_not_a_problem(optional: str) -> None:
    make(**{optional: False}).check()
    assert make(**{optional: False}).problem() is None
    assert f"{'coarse clock' if optional == 'coarse_clock' else 'compare-and-exchange'} no" \
        in make(**{optional: False}).describe()


def test_choice_is_logged_once(caplog: pytest.LogCaptureFixture,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "_logged", [])
    with caplog.at_level(logging.INFO, logger="ei_ebpf_agent.ebpf.features"):
        make().log_once()
        make().log_once()
    assert len(caplog.records) == 1
    assert "TCX" in caplog.records[0].getMessage()


def test_a_probe_that_errs_falls_back_to_the_kernel_version(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def denied() -> bool:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(features, "PROBES", {name: denied for name in features.PROBES})
    assert features.probe("6.1.0-56-amd64") == KernelFeatures(
        kernel="6.1.0-56-amd64", ringbuf=True, map_in_map=True, coarse_clock=True, cmpxchg=True,
        tcx=False)
