"""Kernel feature probe: the decisions and messages (the probes themselves run as root in
tests/integration/test_kernel_features.py, on the host and in every VM of `nox -s vm`)."""

from __future__ import annotations

import logging

import pytest

from ei_ebpf_agent.ebpf import features
from ei_ebpf_agent.ebpf.features import KernelFeatures, MissingKernelFeature
from ei_ebpf_agent.errors import AgentStartError


def make(**flags: bool) -> KernelFeatures:
    base = {"ringbuf": True, "map_in_map": True, "coarse_clock": True, "cmpxchg": True,
            "tcx": True}
    return KernelFeatures(kernel="5.4.0-1-amd64", **{**base, **flags})


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


def test_a_probe_denied_stops_the_start_with_the_privileges_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def denied() -> bool:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(features, "PROBES", {**features.PROBES, "cmpxchg": denied})
    monkeypatch.setattr(features, "_map_type_works", lambda _type: True)
    monkeypatch.setattr(features, "probe_coarse_clock", lambda: True)
    with pytest.raises(AgentStartError) as raised:
        features.probe("6.1.0-56-amd64")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("cannot probe the kernel for BPF atomic compare-and-exchange")
    assert "needs root or CAP_BPF" in message


def test_a_probe_that_cannot_tell_is_an_error_not_a_guess(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> bool:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(features, "PROBES", {name: broken for name in features.PROBES})
    with pytest.raises(AgentStartError, match="cannot probe the kernel for BPF ring buffer "
                       "maps: .*Input/output error"):
        features.probe("6.1.0-56-amd64")


def test_instructions_are_encoded_for_either_byte_order() -> None:
    # w? = cmpxchg32(r9 - 0, ...) as clang wrote it into flows_bpfel.o and flows_bpfeb.o
    assert features.insn(0xC3, 9, 1, 0, 0xF1, byteorder="little").hex(" ") == \
        "c3 19 00 00 f1 00 00 00"
    assert features.insn(0xC3, 9, 1, 0, 0xF1, byteorder="big").hex(" ") == \
        "c3 91 00 00 00 00 00 f1"
    assert features.insn(0x62, 10, 0, -4, 0, byteorder="big").hex(" ") == \
        "62 a0 ff fc 00 00 00 00"
