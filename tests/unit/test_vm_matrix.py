"""tools/vm_matrix.py and tools/vm_kernels.py: package resolution and the generated table."""

from __future__ import annotations

import sys
import types
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


KERNEL = types.SimpleNamespace(series="6.12")  # what run_vm reads of a vm_kernels.Kernel
BOOT_PANIC = """[    1.451200] PCI: Using host bridge windows from ACPI
[    2.678577] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI
[    2.684165] Kernel panic - not syncing: Fatal exception in interrupt
"""


def test_only_a_crash_before_the_guest_script_is_booted_again() -> None:
    assert vm_matrix.crashed_before_guest(BOOT_PANIC)
    # after the guest started, a crash may be ours (a program the tests loaded): a failure
    after_start = f"{vm_matrix.GUEST_STARTED}\nguest: kernel 6.12\n{BOOT_PANIC}"
    assert not vm_matrix.crashed_before_guest(after_start)
    # a clean boot that ended without results (timeout, 9p error) is not retried either
    assert not vm_matrix.crashed_before_guest("[    6.03] reboot: Power down\n")


def test_the_guest_script_prints_the_marker_first() -> None:
    script = (TOOLS.parent / "tests/vm/guest.sh").read_text().splitlines()
    commands = [line for line in script if line.strip() and not line.startswith("#")]
    assert commands[:2] == ["set -u", f'echo "{vm_matrix.GUEST_STARTED}"']


def test_a_boot_crash_is_booted_again_and_its_console_kept(tmp_path, monkeypatch) -> None:
    consoles = [BOOT_PANIC, f"{vm_matrix.GUEST_STARTED}\nguest: summary ok=True\n"]

    def boot(kernel, out, args, deadline):  # noqa: ANN001, ANN202
        (out / "console.log").write_text(consoles.pop(0))

    monkeypatch.setattr(vm_matrix, "boot_vm", boot)
    args = vm_matrix.parse_args([])
    vm_matrix.run_vm(KERNEL, tmp_path, args)  # type: ignore[arg-type]
    assert consoles == []
    assert (tmp_path / "console.boot1.log").read_text() == BOOT_PANIC
    assert vm_matrix.GUEST_STARTED in (tmp_path / "console.log").read_text()


def test_boot_crashes_stop_after_the_last_attempt(tmp_path, monkeypatch) -> None:
    boots = []

    def boot(kernel, out, args, deadline):  # noqa: ANN001, ANN202
        boots.append(1)
        (out / "console.log").write_text(BOOT_PANIC)

    monkeypatch.setattr(vm_matrix, "boot_vm", boot)
    vm_matrix.run_vm(KERNEL, tmp_path, vm_matrix.parse_args([]))  # type: ignore[arg-type]
    assert len(boots) == vm_matrix.BOOT_ATTEMPTS
    # the last crash stays in console.log, where the failure report points
    assert (tmp_path / "console.log").read_text() == BOOT_PANIC
