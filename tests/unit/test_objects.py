"""The committed eBPF objects are intact, complete, reproducible and fit the oldest kernel.

- SHA256SUMS and BUILD-INFO.json match the files.
- Every program and map the loader expects is in every object (read with a small ELF
  reader: no bpftool or pyelftools needed).
- The bytecode the loader gives a 5.10 kernel (the *_lock programs and the functions
  they call) uses nothing newer: plain atomic add only (no fetch/or/cmpxchg, 5.12),
  helpers up to bpf_redirect_peer (155), no kfunc calls, no cpu v4 instructions. The
  other pair differs only by compare-and-exchange and atomic OR (5.12), which it uses.
- tools/build_ebpf.py gives byte-identical output twice, and (with the recorded clang)
  exactly the committed objects.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OBJECT_DIR = ROOT / "pkg" / "ebpf"
OBJECT_NAMES = ("flows_bpfeb.o", "flows_bpfel.o")
PROGRAMS = {"tc_ingress": "tc", "tc_egress": "tc",  # program -> ELF section
            "tc_ingress_lock": "tc", "tc_egress_lock": "tc"}
LOCK_PROGRAMS = ("tc_ingress_lock", "tc_egress_lock")  # what the loader loads on 5.10/5.11
BPF_OR, BPF_CMPXCHG = 0x40, 0xF1  # BPF_ATOMIC imm (Linux 5.12)
BPF_FUNC_KTIME_GET_COARSE_NS = 160
MAPS = ("flows_outer", "flows_a", "flows_b", "slot_locks", "flows_ringbuf", "counters")
LAST_HELPER_IN_5_10 = 155  # BPF_FUNC_redirect_peer

SHT_SYMTAB = 2
SHF_EXECINSTR = 0x4
STT_OBJECT, STT_FUNC = 1, 2
STB_GLOBAL = 1


@dataclass
class Section:
    name: str
    type: int
    flags: int
    data: bytes


@dataclass
class Symbol:
    name: str
    type: int
    bind: int
    section: str
    value: int
    size: int


class Elf:
    """Sections and symbols of a 64-bit ELF object of either byte order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        raw = path.read_bytes()
        assert raw[:4] == b"\x7fELF" and raw[4] == 2, f"{path.name}: not a 64-bit ELF file"
        self.order = {1: "<", 2: ">"}[raw[5]]
        (self.machine,) = struct.unpack_from(self.order + "H", raw, 0x12)
        (shoff,) = struct.unpack_from(self.order + "Q", raw, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(self.order + "HHH", raw, 0x3A)
        headers = [
            struct.unpack_from(self.order + "IIQQQQIIQQ", raw, shoff + i * shentsize)
            for i in range(shnum)
        ]
        datas = [raw[h[4] : h[4] + h[5]] if h[1] != 8 else b"" for h in headers]  # 8: NOBITS
        names = datas[shstrndx]
        self.sections = [Section(_cstr(names, h[0]), h[1], h[2], d) for h, d in zip(headers, datas)]
        self.symbols = []
        for h, sec in zip(headers, self.sections):
            if sec.type != SHT_SYMTAB:
                continue
            strtab = self.sections[h[6]].data
            for off in range(h[9], len(sec.data), h[9]):  # entry 0 is the null symbol
                name, info, _, shndx, value, size = struct.unpack_from(
                    self.order + "IBBHQQ", sec.data, off
                )
                section = self.sections[shndx].name if 0 < shndx < len(self.sections) else ""
                self.symbols.append(
                    Symbol(_cstr(strtab, name), info & 0xF, info >> 4, section, value, size)
                )

    def section(self, name: str) -> Section:
        found = [s for s in self.sections if s.name == name]
        assert len(found) == 1, f"expected one section {name!r}, found {len(found)}"
        return found[0]


def _cstr(table: bytes, offset: int) -> str:
    return table[offset : table.index(b"\0", offset)].decode()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_sums(path: Path) -> dict[str, str]:
    sums = {}
    for line in path.read_text().splitlines():
        digest, sep, name = line.partition("  ")
        assert sep and len(digest) == 64, f"bad SHA256SUMS line: {line!r}"
        sums[name] = digest
    return sums


@pytest.fixture(scope="module", params=OBJECT_NAMES)
def elf(request: pytest.FixtureRequest) -> Elf:
    return Elf(OBJECT_DIR / request.param)


def test_sha256sums_match_the_objects() -> None:
    sums = _read_sums(OBJECT_DIR / "SHA256SUMS")
    assert sorted(sums) == sorted(p.name for p in OBJECT_DIR.glob("*.o")) == list(OBJECT_NAMES)
    for name, digest in sums.items():
        assert _sha256(OBJECT_DIR / name) == digest, f"{name} differs from SHA256SUMS"
    assert list(sums) == sorted(sums), "SHA256SUMS must be sorted"


def test_build_info_describes_the_objects() -> None:
    info = json.loads((OBJECT_DIR / "BUILD-INFO.json").read_text())
    sums = _read_sums(OBJECT_DIR / "SHA256SUMS")
    assert {o["file"]: o["sha256"] for o in info["objects"]} == sums
    assert {o["file"]: o["endianness"] for o in info["objects"]} == {
        "flows_bpfeb.o": "big",
        "flows_bpfel.o": "little",
    }
    assert info["generated by"] == "nox -s generate"
    assert info["clang"] and info["commands"]
    assert not any(str(ROOT) in c for c in info["commands"]), "absolute paths in commands"


def test_object_byte_order_matches_its_name(elf: Elf) -> None:
    suffix = {"<": "_bpfel.o", ">": "_bpfeb.o"}[elf.order]
    assert elf.path.name.endswith(suffix)
    assert elf.machine == 247, "e_machine must be EM_BPF"


def test_every_program_is_present(elf: Elf) -> None:
    programs = {
        s.name: s.section for s in elf.symbols if s.type == STT_FUNC and s.bind == STB_GLOBAL
    }
    assert programs == PROGRAMS


def test_every_map_is_present(elf: Elf) -> None:
    maps = {s.name for s in elf.symbols if s.section == ".maps" and s.type == STT_OBJECT}
    assert maps == set(MAPS)


def test_rodata_is_agent_config_only(elf: Elf) -> None:
    assert len(elf.section(".rodata").data) == 24
    rodata = [s for s in elf.symbols if s.section == ".rodata" and s.type == STT_OBJECT]
    assert [(s.name, s.value, s.size) for s in rodata] == [("agent_config", 0, 24)]
    assert not [s for s in elf.sections if s.name.startswith((".data", ".bss", ".rodata."))]


def test_license_is_gpl_compatible(elf: Elf) -> None:
    assert elf.section("license").data.rstrip(b"\0") == b"Dual BSD/GPL"


def _instructions(elf: Elf, program: str) -> list[tuple[str, int, int, int, int]]:
    """(where, opcode, src register, offset, imm) of a program's code, with the .text
    functions (BPF-to-BPF calls) every program may call."""
    symbol = next(s for s in elf.symbols if s.name == program and s.type == STT_FUNC)
    parts = [(program, elf.section(symbol.section).data[symbol.value:symbol.value + symbol.size])]
    parts += [(s.name, s.data) for s in elf.sections if s.name == ".text" and s.data]
    out = []
    for name, code in parts:
        for off in range(0, len(code), 8):
            op, regs, insn_off, imm = struct.unpack_from(elf.order + "BBhi", code, off)
            src = regs >> 4 if elf.order == "<" else regs & 0xF
            out.append((f"{name}+{off // 8}", op, src, insn_off, imm))
    return out


def _atomics_and_helpers(elf: Elf, program: str) -> tuple[set[int], set[int]]:
    atomics, helpers = set(), set()
    for where, op, src, _off, imm in _instructions(elf, program):
        if op in (0xC3, 0xDB):  # BPF_STX | BPF_ATOMIC | W/DW
            atomics.add(imm)
        elif op == 0x85:  # BPF_JMP | BPF_CALL
            assert src != 2, f"{where}: kfunc call"
            if src == 0:
                helpers.add(imm)
        assert op & 0x07 != 0x01 or op & 0xE0 != 0x80, f"{where}: sign-extending load (v4)"
        assert op not in (0xD7, 0x06), f"{where}: cpu v4 instruction {op:#x}"
    return atomics, helpers


@pytest.mark.parametrize("program", LOCK_PROGRAMS)
def test_bytecode_runs_on_kernel_5_10(elf: Elf, program: str) -> None:
    atomics, helpers = _atomics_and_helpers(elf, program)
    assert atomics == {0}, f"atomic ops {sorted(atomics)}: only add (0) runs before 5.12"
    assert helpers, "no helper calls found: the reader is broken"
    # bpf_ktime_get_coarse_ns (5.11) sits behind agent_config.coarse_clock, which the
    # loader sets only when the kernel has the helper: on 5.10 the verifier drops that
    # branch unvisited (the 5.10 VM of `nox -s vm` loads the object).
    newer = sorted(h for h in helpers if h > LAST_HELPER_IN_5_10)
    assert newer == [BPF_FUNC_KTIME_GET_COARSE_NS], f"helpers newer than 5.10: {newer}"


@pytest.mark.parametrize("program", ["tc_ingress", "tc_egress"])
def test_the_cmpxchg_programs_differ_only_by_their_5_12_atomics(elf: Elf, program: str) -> None:
    atomics, helpers = _atomics_and_helpers(elf, program)
    # add; or (TCP flags: no flag lost between CPUs); compare-and-exchange (new slots)
    assert atomics == {0, BPF_OR, BPF_CMPXCHG}
    lock_atomics, lock_helpers = _atomics_and_helpers(elf, program + "_lock")
    # They take no spin lock (helpers 93/94): that is what they save per new flow.
    assert helpers == lock_helpers - {93, 94}, (helpers, lock_helpers)


def _clang() -> str | None:
    return shutil.which("clang-19") or shutil.which("clang")


def _build(out: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "build_ebpf.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )


@pytest.mark.skipif(_clang() is None, reason="clang not installed: cannot rebuild the objects")
def test_two_builds_are_byte_identical(tmp_path: Path) -> None:
    _build(tmp_path / "a")
    _build(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["BUILD-INFO.json", "SHA256SUMS", *OBJECT_NAMES]
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        a = (tmp_path / "a" / name).read_bytes()
        assert a == (tmp_path / "b" / name).read_bytes(), f"{name} differs between builds"
        if name.endswith(".o"):
            assert str(ROOT).encode() not in a, f"{name} contains the absolute source path"


@pytest.mark.skipif(_clang() is None, reason="clang not installed: cannot rebuild the objects")
def test_committed_objects_are_what_the_source_builds_to(tmp_path: Path) -> None:
    recorded = json.loads((OBJECT_DIR / "BUILD-INFO.json").read_text())["clang"]
    local = (
        subprocess.run([_clang(), "--version"], capture_output=True, text=True, check=True)
        .stdout.splitlines()[0]
        .strip()
    )
    if local != recorded:
        pytest.skip(f"local clang {local!r} is not the recorded {recorded!r}")
    _build(tmp_path)
    assert _read_sums(tmp_path / "SHA256SUMS") == _read_sums(OBJECT_DIR / "SHA256SUMS"), (
        "pkg/ebpf is stale: run `nox -s generate` (tools/build_ebpf.py)"
    )
