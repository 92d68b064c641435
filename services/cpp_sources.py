"""Where the C++/CUDA kernel sources are: the checkout's cpp/ (editable installs, tests), or the copy
a wheel ships inside the package as services/_cpp (setup.py's build_py puts it there), so a
non-editable `pip install .` builds its kernels from what it installed."""

from __future__ import annotations

from pathlib import Path

_PACKAGED = Path(__file__).resolve().parent / "_cpp"
_CHECKOUT = Path(__file__).resolve().parents[1] / "cpp"

CPP_DIR = _PACKAGED if (_PACKAGED / "ops.cpp").is_file() else _CHECKOUT
