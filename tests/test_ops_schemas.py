"""cpp/ops.cpp is the one place the openlora op schemas are declared: Python reads them from there,
and what torch registered from the compiled extension matches what Python read."""

from __future__ import annotations

import re

import pytest
import torch

from services.executor import ops
from services.executor.ops.build import CPP_DIR
from services.executor.ops.schemas import OPS_CPP, parse_schemas


def test_every_registered_op_has_the_schema_ops_cpp_declares():
    if ops.ensure_built() != "cpp":
        pytest.skip("the extension is not built (reference backend): its schemas came from Python")
    declared = parse_schemas()
    assert {"paged_attention_decode", "lora_paged_add_", "rotary", "linear_packed"} <= declared.keys()
    for name, schema in declared.items():
        registered = str(getattr(torch.ops.openlora, name).default._schema)
        assert registered == f"openlora::{name}{schema}", name


def test_python_schemas_are_ops_cpp_ones_and_every_reference_has_a_schema():
    declared = parse_schemas()
    assert set(ops.REFERENCES) <= declared.keys()
    for name, (schema, _ref) in ops.SCHEMAS.items():
        assert schema == declared[name]


def test_no_other_file_declares_schemas():
    for path in [*CPP_DIR.rglob("*.cpp"), *CPP_DIR.rglob("*.cu"), *CPP_DIR.rglob("*.h")]:
        if path == OPS_CPP:
            continue
        text = path.read_text()
        assert not re.search(r"TORCH_LIBRARY(_FRAGMENT)?\(openlora,", text), path
        if path.parent.name != "cuda":  # the CUDA emulation declares its own library, openlora_emu
            assert "m.def(" not in text, path


def test_parse_schemas_joins_literals_and_refuses_a_duplicate(tmp_path):
    src = tmp_path / "ops.cpp"
    src.write_text('TORCH_LIBRARY(x, m) {\n  // m.def("commented(Tensor a) -> Tensor");\n'
                   '  m.def(\n      "f(Tensor a, "\n      "int b) -> Tensor");\n  m.def("g() -> bool", &g);\n}\n')
    assert parse_schemas(src) == {"f": "(Tensor a, int b) -> Tensor", "g": "() -> bool"}
    src.write_text('m.def("f() -> ()");\nm.def("f() -> ()");\n')
    with pytest.raises(ValueError, match="declared twice"):
        parse_schemas(src)
