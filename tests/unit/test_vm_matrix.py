"""tools/vm_matrix.py and tools/vm_kernels.py: package resolution and the generated table."""

from __future__ import annotations

import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))

import vm_kernels  # noqa: E402
import vm_matrix  # noqa: E402


def test_package_pattern_takes_only_the_plain_image_of_the_series() -> None:
    names = ["linux-image-5.10.0-46-amd64", "linux-image-5.10.0-46-rt-amd64",
             "linux-image-5.10.0-46-amd64-dbg", "linux-image-6.1.0-56-amd64",
             "linux-image-6.12.118+deb13-amd64", "linux-image-6.12.115+deb13.1-amd64",
             "linux-image-6.12.118+deb13-cloud-amd64", "linux-image-6.12-amd64",
             "linux-image-6.12.118+deb13-amd64-unsigned", "linux-image-6.1-amd64"]

    def match(series: str) -> list[str]:
        return [n for n in names if vm_kernels.package_pattern(series).match(n)]

    assert match("5.10") == ["linux-image-5.10.0-46-amd64"]
    assert match("6.1") == ["linux-image-6.1.0-56-amd64"]
    assert match("6.12") == ["linux-image-6.12.118+deb13-amd64",
                             "linux-image-6.12.115+deb13.1-amd64"]
    assert vm_kernels.package_pattern("6.12").match(names[4]).group(1) == "6.12.118+deb13-amd64"


def test_table_has_one_row_per_kernel_and_lists_failures() -> None:
    def entry(kernel: str, tcx: bool, ok: bool, accel: str) -> dict:
        return {"kernel": kernel, "package": f"linux-image-{kernel}", "accel": accel,
                "wall_seconds": 300.4, "ok": ok, "attach_mode": "tcx" if tcx else "tc",
                "features": {"ringbuf": True, "map_in_map": True, "coarse_clock": True, "tcx": tcx},
                "counts": {"passed": 15 if ok else 14, "failed": 0 if ok else 1},
                "failures": [] if ok else [{"test": "t::x", "outcome": "failed",
                                            "message": "assert 1 == 2"}]}

    text = vm_matrix.render_docs({
        "date": "2026-01-01 00:00 UTC", "commit": "abc123", "subset": "vm",
        "kernels": [entry("5.10.0-46-amd64", False, False, "tcg"),
                    entry("6.18.0", True, True, "none")]})
    rows = [line for line in text.splitlines() if line.startswith("| 5.10") or
            line.startswith("| 6.18")]
    assert len(rows) == 2
    assert "clsact (tc)" in rows[0] and "VM (emulated)" in rows[0] and "FAIL" in rows[0]
    assert "TCX" in rows[1] and "| host |" in rows[1] and "| pass |" in rows[1]
    assert "commit `abc123`" in text
    assert "- 5.10.0-46-amd64: `t::x` (failed): assert 1 == 2" in text


def test_docs_can_be_turned_off_with_an_empty_path() -> None:
    # Path("") is ".", a directory: the table would be written there and fail at the end.
    assert vm_matrix.parse_args(["--docs", ""]).docs == ""
    assert vm_matrix.parse_args([]).docs == str(vm_matrix.DOCS)
