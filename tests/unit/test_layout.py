"""The structs in the committed eBPF objects have exactly the layout of the numpy dtypes.

Reads the BTF of every object in pkg/ebpf with `bpftool btf dump file -j` and compares
each struct's size and every member's offset and size with src/ei_ebpf_agent/ebpf/layout.py,
and every constant of every enum with the constant of the same name there, so bpf/flow.h and
its Python mirror cannot drift silently.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ei_ebpf_agent.ebpf import layout
from ei_ebpf_agent.ebpf.layout import (
    AGENT_CONFIG,
    FLOW_KEY,
    FLOW_RECORD,
    FLOW_SLOT,
    FLOW_VALUE,
)

OBJECT_DIR = Path(__file__).resolve().parents[2] / "pkg" / "ebpf"
OBJECTS = sorted(OBJECT_DIR.glob("flows_*.o"))

pytestmark = pytest.mark.skipif(
    shutil.which("bpftool") is None, reason="bpftool not installed: cannot read the objects' BTF"
)


class Btf:
    """The types of one object's BTF, by id and by name."""

    def __init__(self, obj: Path) -> None:
        out = subprocess.run(
            ["bpftool", "btf", "dump", "file", str(obj), "-j"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        self.types = {t["id"]: t for t in json.loads(out)["types"]}

    def named(self, kind: str, name: str) -> dict:
        found = [t for t in self.types.values() if t["kind"] == kind and t["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name!r} in the BTF, found {len(found)}"
        return found[0]

    def resolve(self, type_id: int) -> dict:
        """The type behind typedefs and qualifiers."""
        t = self.types[type_id]
        while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT"):
            t = self.types[t["type_id"]]
        return t

    def size(self, type_id: int) -> int:
        t = self.resolve(type_id)
        if t["kind"] == "ARRAY":
            return t["nr_elems"] * self.size(t["type_id"])
        return t["size"]

    def flat_members(self, struct: dict, base: int = 0) -> dict[str, tuple[int, int, dict]]:
        """{member name: (byte offset, byte size, resolved type)}, nested structs flattened,
        explicit padding (`_pad*`) left out."""
        members = {}
        for m in struct["members"]:
            assert m["bits_offset"] % 8 == 0, f"{struct['name']}.{m['name']} is a bitfield"
            offset = base + m["bits_offset"] // 8
            t = self.resolve(m["type_id"])
            if t["kind"] == "STRUCT":
                members.update(self.flat_members(t, offset))
            elif not m["name"].startswith("_pad"):
                members[m["name"]] = (offset, self.size(m["type_id"]), t)
        return members


@pytest.fixture(scope="module", params=OBJECTS, ids=lambda p: p.name)
def btf(request: pytest.FixtureRequest) -> Btf:
    return Btf(request.param)


def test_both_byte_orders_are_committed() -> None:
    assert [p.name for p in OBJECTS] == ["flows_bpfeb.o", "flows_bpfel.o"]


@pytest.mark.parametrize(
    "struct_name, dtype",
    [
        ("flow_key", FLOW_KEY),
        ("flow_value", FLOW_VALUE),
        ("flow_record", FLOW_RECORD),
        ("flow_slot", FLOW_SLOT),
        ("agent_config", AGENT_CONFIG),
    ],
)
def test_struct_layout_matches_dtype(btf: Btf, struct_name: str, dtype: np.dtype) -> None:
    struct = btf.named("STRUCT", struct_name)
    assert struct["size"] == dtype.itemsize, f"sizeof(struct {struct_name})"
    members = btf.flat_members(struct)
    assert sorted(members) == sorted(dtype.names), f"fields of struct {struct_name}"
    for name in dtype.names:
        field_dtype, field_offset = dtype.fields[name][:2]
        offset, size, btf_type = members[name]
        assert offset == field_offset, f"offset of {struct_name}.{name}"
        assert size == field_dtype.itemsize, f"size of {struct_name}.{name}"
        # Every shared field is unsigned: an integer, or an array of unsigned bytes.
        elem = field_dtype.base if field_dtype.subdtype else field_dtype
        assert elem.kind == "u", f"dtype of {struct_name}.{name} must be unsigned"
        if btf_type["kind"] == "ARRAY":
            btf_type = btf.resolve(btf_type["type_id"])
        assert btf_type["kind"] == "INT" and btf_type["encoding"] != "SIGNED", (
            f"{struct_name}.{name} must be an unsigned integer (array) in flow.h"
        )
        assert btf_type["size"] == elem.itemsize, f"element size of {struct_name}.{name}"


def test_rodata_holds_only_agent_config(btf: Btf) -> None:
    """The loader writes agent_config as the whole .rodata: nothing else may live there."""
    rodata = btf.named("DATASEC", ".rodata")
    assert len(rodata["vars"]) == 1, ".rodata must contain agent_config only"
    var = rodata["vars"][0]
    assert btf.types[var["type_id"]]["name"] == "agent_config"
    assert var["offset"] == 0
    assert var["size"] == AGENT_CONFIG.itemsize
    assert btf.resolve(btf.types[var["type_id"]]["type_id"])["name"] == "agent_config"


# The enums of bpf/flow.h; flows.bpf.c's btf_enums puts them into the BTF.
SHARED_ENUMS = ("flow_direction", "flow_flag", "slot_state", "agent_counter")


def test_every_shared_enum_is_in_the_btf(btf: Btf) -> None:
    for name in SHARED_ENUMS:
        btf.named("ENUM", name)


def test_enum_values_match_layout_constants(btf: Btf) -> None:
    """Every constant of every enum in the object has its value in layout.py, by name."""
    enums = [t for t in btf.types.values() if t["kind"] in ("ENUM", "ENUM64")]
    assert enums, "no enum in the BTF"
    for enum in enums:
        for member in enum["values"]:
            name, value = member["name"], member["val"]
            assert hasattr(layout, name), f"layout.py has no {name} (enum {enum['name']})"
            assert getattr(layout, name) == value, f"{name} (enum {enum['name']})"
