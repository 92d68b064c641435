"""Kernels of the executor; importing this package makes torch.ops.openlora.lora_linear available.

The op comes from the C++/CUDA extension (cpp/, built on first import by build.py), or, if that cannot
be built, from the pure-PyTorch reference — logged as an error, never silent. $OPENLORA_KERNEL forces
one: "cpp" (a failed build raises) or "reference"; unset or "auto" tries cpp, then falls back.
"""

from __future__ import annotations

import logging
import os
import threading

import torch
from torch import Tensor

from . import build as _build
from .reference import lora_linear_ref
from .segments import build_segments

__all__ = ["lora_linear", "lora_linear_ref", "build_segments", "ensure_built", "kernel_backend"]

log = logging.getLogger(__name__)

SCHEMA = ("(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor scalings, "
          "Tensor ranks, Tensor seg_indptr, Tensor seg_slots) -> Tensor")
_lock = threading.Lock()
_backend: str | None = None


def _register_reference(dispatch_keys: tuple[str, ...]) -> None:
    if not hasattr(torch.ops.openlora, "lora_linear"):
        torch.library.define("openlora::lora_linear", SCHEMA)
    torch.library.impl("openlora::lora_linear", dispatch_keys, lora_linear_ref)


def _load() -> str:
    choice = os.environ.get("OPENLORA_KERNEL", "auto")
    if choice not in ("auto", "cpp", "reference"):
        raise ValueError(f"OPENLORA_KERNEL must be auto, cpp or reference, got {choice!r}")
    if choice == "reference":
        log.warning("OPENLORA_KERNEL=reference: lora_linear runs the slow pure-PyTorch reference")
        _register_reference(("CPU", "CUDA"))
        return "reference"
    try:
        _build.build()
    except _build.KernelBuildError:
        if choice == "cpp":
            raise
        log.exception("lora_linear extension failed to build; FALLING BACK to the slow PyTorch reference")
        _register_reference(("CPU", "CUDA"))
        return "reference"
    if torch.cuda.is_available() and not _build.cuda_buildable():
        log.error("CUDA is available but nvcc (CUDA_HOME) is not: lora_linear on CUDA runs the reference")
        _register_reference(("CUDA",))
    return "cpp"


def ensure_built() -> str:
    """Build/load the op once per process (idempotent); returns kernel_backend()."""
    global _backend
    with _lock:
        if _backend is None:
            _backend = _load()
            torch.library.register_fake("openlora::lora_linear")(_lora_linear_fake)
    return _backend


def kernel_backend() -> str:
    """'cpp' when the compiled extension serves the op, 'reference' when the fallback does."""
    return ensure_built()


def _lora_linear_fake(x, weight, bias, lora_a, lora_b, scalings, ranks, seg_indptr, seg_slots):
    torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "x and weight must be 2-D")
    torch._check(weight.shape[1] == x.shape[1], lambda: "weight must be [d_out, d_in]")
    return x.new_empty((x.shape[0], weight.shape[0]))


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scalings: Tensor, ranks: Tensor, seg_indptr: Tensor, seg_slots: Tensor) -> Tensor:
    """A linear layer with one LoRA adapter per segment of tokens (torch.ops.openlora.lora_linear).

    x [T, d_in], weight [d_out, d_in], bias [d_out] | None,
    lora_a [S, r_max, d_in] (rows :r of slot s = PEFT lora_A.weight),
    lora_b [S, d_out, r_max] (columns :r of slot s = PEFT lora_B.weight),
    scalings [S] f32, ranks [S] i32, seg_indptr [G+1] i32, seg_slots [G] i32 (-1 = base only).

        y = x @ weight.T + bias                                  # [T, d_out], x's dtype
        for g, s in enumerate(seg_slots):
            if s >= 0:
                rows, r = slice(seg_indptr[g], seg_indptr[g+1]), ranks[s]
                y[rows] += scalings[s] * (x[rows] @ lora_a[s, :r].T) @ lora_b[s, :, :r].T
    """
    return torch.ops.openlora.lora_linear.default(
        x, weight, bias, lora_a, lora_b, scalings, ranks, seg_indptr, seg_slots)


ensure_built()
