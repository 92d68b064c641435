"""Builds the C++ (and, where CUDA is usable, CUDA) extension that registers torch.ops.openlora.

Built with torch.utils.cpp_extension.load and ninja into a cache directory keyed by a hash of the
sources, the flags, torch's version and the CPU, so an edit rebuilds and an unchanged tree loads in a
fraction of a second. The directory is $OPENLORA_BUILD_DIR, else ~/.cache/openlora.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import torch
from torch.utils import cpp_extension

CPP_DIR = Path(__file__).resolve().parents[3] / "cpp"
CPU_SOURCES = [CPP_DIR / "lora_linear.cpp", CPP_DIR / "paged_attention.cpp", CPP_DIR / "layer_ops.cpp"]
CUDA_SOURCES = [CPP_DIR / "cuda" / "lora_linear.cu"]
HEADERS = [CPP_DIR / "lora_linear_checks.h", CPP_DIR / "simd512.h"]
# -march=native: the cache key includes the CPU's flags, so a build never runs on a CPU it wasn't made for.
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
CUDA_CFLAGS = ["-O3"]


class KernelBuildError(RuntimeError):
    """The extension failed to compile or load; the message holds the compiler's output."""


def cuda_buildable() -> bool:
    return torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_dir() -> Path:
    return Path(os.environ.get("OPENLORA_BUILD_DIR", Path.home() / ".cache" / "openlora"))


def build(verbose: bool = False) -> Path:
    """Compile (if needed) and load the extension into this process; returns the .so's path."""
    with_cuda = cuda_buildable()
    sources = CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])
    key = hashlib.sha256()
    for path in sources + HEADERS:
        key.update(path.name.encode() + path.read_bytes())
    key.update(repr((CFLAGS, CUDA_CFLAGS, torch.__version__, _cpu_flags(), with_cuda)).encode())
    name = f"openlora_ops_{key.hexdigest()[:16]}"
    directory = build_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name=name,
            sources=[str(p) for p in sources],
            extra_cflags=CFLAGS,
            extra_cuda_cflags=CUDA_CFLAGS if with_cuda else None,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(CPP_DIR)],
            build_directory=str(directory),
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # the compiler's output is in the message (and its __cause__)
        cause = exc.__cause__
        detail = getattr(cause, "output", None)
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        message = f"building {name} in {directory} failed: {exc}"
        if detail and detail not in message:
            message += "\n" + detail
        raise KernelBuildError(message) from exc
    return directory / f"{name}.so"
