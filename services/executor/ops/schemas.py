"""The openlora op schemas, read from the one C++ file that declares them (cpp/ops.cpp's TORCH_LIBRARY
block), so Python never repeats them by hand. Plain text parsing: no torch, nothing built."""

from __future__ import annotations

import re
from pathlib import Path

from services.cpp_sources import CPP_DIR

OPS_CPP = CPP_DIR / "ops.cpp"

_DEF = re.compile(r"m\.def\(\s*((?:\"(?:[^\"\\]|\\.)*\"\s*)+)")
_LITERAL = re.compile(r"\"((?:[^\"\\]|\\.)*)\"")


def parse_schemas(path: Path = OPS_CPP) -> dict[str, str]:
    """{op name: its schema without the name, e.g. "(Tensor x) -> Tensor"} for every m.def in path,
    adjacent string literals joined as the C++ compiler joins them."""
    text = re.sub(r"//[^\n]*", "", path.read_text())
    schemas: dict[str, str] = {}
    for match in _DEF.finditer(text):
        full = "".join(_LITERAL.findall(match.group(1)))
        name, paren, rest = full.partition("(")
        if not paren or not name.isidentifier():
            raise ValueError(f"{path}: cannot read the schema {full!r}")
        if name in schemas:
            raise ValueError(f"{path}: {name} is declared twice")
        schemas[name] = paren + rest
    return schemas
