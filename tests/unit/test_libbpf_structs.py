"""The ctypes option structs of ebpf/libbpf.py have the layout of the system's C headers."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

libbpf = pytest.importorskip("ei_ebpf_agent.ebpf.libbpf", reason="system libbpf not installed")

# ctypes struct -> (C type, include, "all" when the Python struct mirrors every field,
# so the sizes must be equal too, or "prefix" when it mirrors the leading fields only)
STRUCTS = {
    libbpf.bpf_object_open_opts: ("struct bpf_object_open_opts", "bpf/libbpf.h", "prefix"),
    libbpf.bpf_map_create_opts: ("struct bpf_map_create_opts", "bpf/bpf.h", "prefix"),
    libbpf.bpf_tc_hook: ("struct bpf_tc_hook", "bpf/libbpf.h", "all"),
    libbpf.bpf_tc_opts: ("struct bpf_tc_opts", "bpf/libbpf.h", "all"),
    libbpf.bpf_map_info: ("struct bpf_map_info", "linux/bpf.h", "prefix"),
    libbpf.bpf_test_run_opts: ("struct bpf_test_run_opts", "bpf/bpf.h", "all"),
}


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{(C type, field or None): offset or size} as the C compiler sees it."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler to read the libbpf headers")
    if not Path("/usr/include/bpf/libbpf.h").exists():
        pytest.skip("libbpf headers not installed (/usr/include/bpf, package libbpf-dev)")
    lines = ["#include <stddef.h>", "#include <stdio.h>"]
    lines += sorted({f"#include <{include}>" for _c, include, _m in STRUCTS.values()})
    lines.append("int main(void) {")
    for struct, (ctype, _include, _mode) in STRUCTS.items():
        lines.append(f'printf("{ctype}|-|%zu\\n", sizeof({ctype}));')
        for name, *_ in struct._fields_:
            lines.append(f'printf("{ctype}|{name}|%zu\\n", offsetof({ctype}, {name}));')
            lines.append(
                f'printf("{ctype}|{name}.size|%zu\\n", sizeof((({ctype} *)0)->{name}));'
            )
    lines += ["return 0;", "}"]
    work = tmp_path_factory.mktemp("structs")
    (work / "layout.c").write_text("\n".join(lines))
    subprocess.run([cc, "-o", str(work / "layout"), str(work / "layout.c")], check=True)
    output = subprocess.run([str(work / "layout")], check=True, capture_output=True, text=True)
    layout = {}
    for line in output.stdout.splitlines():
        ctype, field, value = line.split("|")
        layout[(ctype, field)] = int(value)
    return layout


@pytest.mark.parametrize("struct", list(STRUCTS), ids=lambda s: s.__name__)
def test_option_struct_matches_c_header(struct: type, c_layout: dict) -> None:
    ctype, _include, mode = STRUCTS[struct]
    for name, *_ in struct._fields_:
        field = getattr(struct, name)
        assert field.offset == c_layout[(ctype, name)], f"{ctype}.{name} offset"
        assert field.size == c_layout[(ctype, f"{name}.size")], f"{ctype}.{name} size"
    if mode == "all":
        assert ctypes.sizeof(struct) == c_layout[(ctype, "-")], f"sizeof({ctype})"
    else:
        # A prefix: our sz tells libbpf where it ends, which must be inside the C struct.
        assert ctypes.sizeof(struct) <= c_layout[(ctype, "-")]


def test_make_opts_sets_sz_to_our_size() -> None:
    opts = libbpf.make_opts(libbpf.bpf_tc_opts, prog_fd=3)
    assert opts.sz == ctypes.sizeof(libbpf.bpf_tc_opts)
    assert opts.prog_fd == 3


def test_negative_errno_becomes_libbpf_error_naming_the_call() -> None:
    with pytest.raises(libbpf.LibbpfError) as info:
        libbpf.bpf_map__fd(None)  # libbpf returns -EINVAL for a NULL map
    assert info.value.errno == 22
    assert str(info.value) == "bpf_map__fd: Invalid argument (errno 22)"
    assert isinstance(info.value, OSError)


def test_null_pointer_becomes_libbpf_error_with_errno() -> None:
    garbage = ctypes.create_string_buffer(b"not an ELF file" * 8)
    with pytest.raises(libbpf.LibbpfError) as info:
        libbpf.bpf_object__open_mem(garbage, len(garbage), None)
    assert info.value.call == "bpf_object__open_mem"
    assert info.value.errno > 0


def test_libbpf_messages_go_to_python_logging(caplog: pytest.LogCaptureFixture) -> None:
    garbage = ctypes.create_string_buffer(b"\x7fELF" + b"\x00" * 60)
    with caplog.at_level("DEBUG", logger="libbpf"), pytest.raises(libbpf.LibbpfError):
        libbpf.bpf_object__open_mem(garbage, len(garbage), None)
    messages = [r.getMessage() for r in caplog.records if r.name == "libbpf"]
    # Formatted by libc from libbpf's format string and va_list: no "%s" left over.
    assert any("loading object" in m and "from buffer" in m for m in messages), messages
    assert not any("%" in m for m in messages), messages
