"""Kernels of the executor; ensure_built() (the engine calls it at start-up; importing builds nothing)
makes torch.ops.openlora.{lora_paged_add_ (each segment's adapter added to the base GEMM's output,
read in place from page memory: the served multi-LoRA op), paged_attention_decode,
paged_attention_decode_async (without the host-side value checks, so without a sync on CUDA),
rms_norm, add_rms_norm, silu_mul, rotary} available, and on CPU {pack_weight, linear_packed}: fp32
base weights packed once into MKL's GEMM layout, and token_bitmask_fill / token_bitmask_fill_:
structured outputs' token masks applied to the logits in one pass (a masked copy), or in place with
any value (the sampler zeroes a grammar row's forbidden tokens in its softmax); off the CPU their
wrappers run the references.

The ops come from the C++/CUDA extension (cpp/, built by ensure_built() through build.py), or, if that cannot
be built, from the pure-PyTorch references — logged as an error, never silent. Every op but the
CPU-only packed ones has a CUDA kernel (cpp/cuda), built where torch sees a GPU and nvcc is present;
on a GPU without nvcc the references run. The executor's --kernel ($OPENLORA_KERNEL) forces
one: "cpp" (a failed build raises) or "reference"; "auto" tries cpp, then falls back. The schemas are
declared once, in cpp/ops.cpp (SCHEMAS reads them from there). load(config) is the executor's
start-up: the build, then the CPU kernels' instruction set, set once.
"""

from __future__ import annotations

import logging
import os
import threading

import torch
from torch import Tensor

from . import build as _build
from .reference import (
    add_rms_norm_ref,
    lora_paged_add_ref,
    paged_attention_decode_ref,
    rms_norm_ref,
    rotary_ref,
    silu_mul_ref,
    token_bitmask_fill_ref,
    token_bitmask_fill_ref_,
)
from .schemas import parse_schemas

__all__ = ["lora_paged_add_", "lora_paged_add_ref", "pack_weight", "linear_packed", "paged_attention_decode", "paged_attention_decode_async",
           "paged_attention_decode_ref", "rms_norm", "rms_norm_ref",
           "add_rms_norm", "add_rms_norm_ref", "silu_mul", "silu_mul_ref", "rotary", "rotary_ref",
           "token_bitmask_fill", "token_bitmask_fill_ref", "token_bitmask_fill_", "token_bitmask_fill_ref_",
           "ensure_built", "kernel_backend", "load", "set_cpu_kernels", "cpu_isa",
           "CUDA_MAX_LORA_RANK", "check_max_lora_rank"]

log = logging.getLogger(__name__)

# Each op's pure-PyTorch reference, which serves it when the extension cannot; the async ops fall back
# to their contract op's reference.
REFERENCES = {
    "linear_packed": lambda x, weight, packed_weight, bias: torch.nn.functional.linear(x, weight, bias),
    "paged_attention_decode": paged_attention_decode_ref,
    "paged_attention_decode_async": paged_attention_decode_ref,
    "lora_paged_add_": lora_paged_add_ref,
    "rms_norm": rms_norm_ref,
    "add_rms_norm": add_rms_norm_ref,
    "silu_mul": silu_mul_ref,
    "rotary": rotary_ref,
    "token_bitmask_fill": token_bitmask_fill_ref,
    "token_bitmask_fill_": token_bitmask_fill_ref_,
}
# op name -> (schema, reference), the schemas read from cpp/ops.cpp, the one place that declares them
SCHEMAS = {name: (schema, REFERENCES[name]) for name, schema in parse_schemas().items() if name in REFERENCES}
_LAYER_FAKES = {  # the layer ops' fake kernels
    "rms_norm": lambda x, weight, eps: torch.empty_like(x),
    "add_rms_norm": lambda x, residual, weight, eps: (torch.empty_like(x), torch.empty_like(x)),
    "silu_mul": lambda gate, up: torch.empty_like(gate),
    "rotary": lambda x, cos, sin: torch.empty_like(x),
}
LAYER_OPS = tuple(_LAYER_FAKES)
_lock = threading.Lock()
_backend: str | None = None


def _register_reference(dispatch_keys: tuple[str, ...], names=tuple(SCHEMAS)) -> None:
    for name in names:
        schema, ref = SCHEMAS[name]
        if not hasattr(torch.ops.openlora, name):
            torch.library.define(f"openlora::{name}", schema)
        torch.library.impl(f"openlora::{name}", dispatch_keys, ref)


def _load(choice: str) -> str:
    if choice not in ("auto", "cpp", "reference"):
        raise ValueError(f"kernel must be auto, cpp or reference, got {choice!r}")
    if choice == "reference":
        log.warning("kernel=reference: the ops run the slow pure-PyTorch references")
        _register_reference(("CPU", "CUDA"))
        return "reference"
    try:
        _build.build()
    except _build.KernelBuildError:
        if choice == "cpp":
            raise
        log.exception("openlora extension failed to build; FALLING BACK to the slow PyTorch references")
        _register_reference(("CPU", "CUDA"))
        return "reference"
    if torch.cuda.is_available() and not _build.cuda_buildable():
        log.error("CUDA is available but nvcc (CUDA_HOME) is not: the ops on CUDA run the references")
        _register_reference(("CUDA",))
    return "cpp"


def ensure_built(kernel: str | None = None) -> str:
    """Build/load the ops once per process (idempotent); returns kernel_backend(). kernel: auto, cpp or
    reference (the executor's --kernel; None -> $OPENLORA_KERNEL, else auto), read by the first call."""
    global _backend
    with _lock:
        if _backend is None:
            _backend = _load(kernel or os.environ.get("OPENLORA_KERNEL", "auto"))
            torch.library.register_fake("openlora::linear_packed")(_linear_packed_fake)
            for name in ("paged_attention_decode", "paged_attention_decode_async"):
                torch.library.register_fake(f"openlora::{name}")(_paged_attention_decode_fake)
            torch.library.register_fake("openlora::lora_paged_add_")(lambda *args: None)
            for name, fake in _LAYER_FAKES.items():
                torch.library.register_fake(f"openlora::{name}")(fake)
            torch.library.register_fake("openlora::token_bitmask_fill")(
                lambda logits, words, rows: torch.empty_like(logits))
            torch.library.register_fake("openlora::token_bitmask_fill_")(lambda *args: None)
    return _backend


def load(config) -> str:
    """The executor's start-up: builds/loads the kernels as its config says (kernel, build_dir,
    cuda_arch) and sets the CPU kernels' instruction set once (cpu_isa); returns kernel_backend()."""
    if config.build_dir:
        _build.BUILD_DIR = config.build_dir
    if config.cuda_arch:
        _build.CUDA_ARCH = config.cuda_arch
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    check_max_lora_rank(device, config.max_lora_rank)
    backend = ensure_built(config.kernel)
    set_cpu_kernels(config.cpu_isa)
    log.info("kernels: %s, CPU instruction set %s", backend, cpu_isa())
    return backend


# The largest rank the CUDA lora_paged_add_ holds (kMaxRank in cpp/cuda/lora_paged.cu: one block's
# shared memory): its kernel adds nothing for a segment of a higher rank (it is never clipped), so
# the executor refuses to start on CUDA with --max-lora-rank above it.
CUDA_MAX_LORA_RANK = 256


def check_max_lora_rank(device: str, max_lora_rank: int) -> None:
    """Raises ConfigError (--max-lora-rank) when the kernels of `device` cannot hold that rank."""
    from services.common.config import check
    if device == "cuda":
        check(max_lora_rank <= CUDA_MAX_LORA_RANK, "max_lora_rank",
              f"must be <= {CUDA_MAX_LORA_RANK} on CUDA (the largest rank cpp/cuda/lora_paged.cu holds), "
              f"got {max_lora_rank}")


def set_cpu_kernels(isa: str = "auto") -> None:
    """The CPU kernels' instruction set (auto, avx512_bf16, avx512, avx2, generic; one this CPU lacks
    raises): set once, never read per call. Nothing to set on the reference backend."""
    if ensure_built() != "cpp":
        return
    torch.ops.openlora.set_cpu_isa(isa)


def cpu_isa() -> str:
    """The instruction set the CPU kernels run ("reference" on the reference backend)."""
    return torch.ops.openlora.cpu_isa() if ensure_built() == "cpp" else "reference"


def kernel_backend() -> str:
    """'cpp' when the compiled extension serves the ops, 'reference' when the fallbacks do."""
    return ensure_built()


def _linear_packed_fake(x, weight, packed_weight, bias):
    torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "x and weight must be 2-D")
    torch._check(weight.shape[1] == x.shape[1], lambda: "weight must be [d_out, d_in]")
    return x.new_empty((x.shape[0], weight.shape[0]))


def lora_paged_add_(y: Tensor, x: Tensor, arena: Tensor, page_index: Tensor, seg_meta: Tensor,
                    seg_scalings: Tensor, lm: int, seg_indptr: Tensor) -> None:
    """Adds each segment's LoRA delta to y in place, reading A and B^T from the adapter arena's pages
    (torch.ops.openlora.lora_paged_add_; CPU: the arena is host memory the kernel reads in place).

    y [T, d_out], x [T, d_in], arena [num_pages, P] (x's dtype, or bfloat16 pages under float32 x:
    --lora-dtype bfloat16), page_index [E] i32,
    seg_meta [G, LM, 2] i32 = (offset into page_index, rank) per segment and (layer, module),
    seg_scalings [G, LM] f32, lm: this projection's (layer, module) index, seg_indptr [G+1] i32.
    With ca = ceil(d_in / P), cb = ceil(d_out / P) and (off, r) = seg_meta[g, lm]:

        A[k]  = concat(arena[page_index[off + k*ca + c]] for c < ca)[:d_in]      # lora_A row k
        Bt[k] = concat(arena[page_index[off + r*ca + k*cb + c]] for c < cb)[:d_out]  # lora_B column k
        y[seg g] += seg_scalings[g, lm] * (x[seg g] @ A.T) @ Bt                    # r = 0: nothing

    Work and bytes read are each segment's true rank's: nothing is padded to a maximum rank.
    """
    torch.ops.openlora.lora_paged_add_.default(y, x, arena, page_index, seg_meta, seg_scalings, lm,
                                               seg_indptr)


def pack_weight(weight: Tensor) -> Tensor | None:
    """weight [d_out, d_in] copied once into MKL's GEMM layout, for linear_packed;
    None where packing does not apply (not a contiguous float32 CPU tensor, the reference backend, a
    torch without MKL). Pack again if the weight's values change: the packed ops refuse a buffer
    that does not match the weight they are given. It reserves ~1.1-9x the weight's bytes, most of
    it never touched (not resident)."""
    if (weight.device.type != "cpu" or weight.dtype != torch.float32 or not weight.is_contiguous()
            or weight.dim() != 2 or weight.numel() == 0 or ensure_built() != "cpp"
            or not torch.ops.openlora.packing_available()):
        return None
    return torch.ops.openlora.pack_weight.default(weight)


def linear_packed(x: Tensor, weight: Tensor, packed_weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias through packed_weight = pack_weight(weight) (float32 CPU)."""
    return torch.ops.openlora.linear_packed.default(x, weight, packed_weight, bias)


def _paged_attention_decode_fake(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window):
    torch._check(q.dim() == 3 and k_cache.dim() == 4, lambda: "q must be [N, H, D], k_cache 4-D")
    torch._check(k_cache.shape[3] == q.shape[2], lambda: "k_cache must be [num_blocks, bs, KVH, D]")
    return q.new_empty(q.shape)


def paged_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           context_lens: Tensor, scale: float, sliding_window: int = 0) -> Tensor:
    """One query token per sequence attending its paged K/V in place (openlora.paged_attention_decode).

    q [N, H, D], k_cache/v_cache [num_blocks, bs, KVH, D] (last dim contiguous), block_tables
    [N, max_blocks] i32, context_lens [N] i32 -> out [N, H, D] in q's dtype (fp32 accumulation):

        c = context_lens[n]; lo = max(0, c - sliding_window) if sliding_window > 0 else 0
        for t in range(lo, c): K[t], V[t] = k_cache/v_cache[block_tables[n, t // bs], t % bs, h // (H // KVH)]
        out[n, h] = softmax(scale * q[n, h] @ K[lo:c].T) @ V[lo:c]
    """
    return torch.ops.openlora.paged_attention_decode.default(
        q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window)


def paged_attention_decode_async(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                                 context_lens: Tensor, scale: float, sliding_window: int = 0) -> Tensor:
    """paged_attention_decode for block tables and context lengths right by construction (the
    executor's): on CUDA they are never copied to the host, so it never waits for the GPU; values out
    of range are bounded on the device (a context clipped to its table, a key in a block outside the
    cache skipped) rather than raised. On CPU it is paged_attention_decode."""
    return torch.ops.openlora.paged_attention_decode_async.default(
        q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window)



# -- the decoder layer's elementwise ops (cpp/layer_ops.cpp) -----------------------------------------

def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * (x * rsqrt(mean(x^2, -1) + eps)): the norm in fp32, rounded to x's dtype before weight."""
    return torch.ops.openlora.rms_norm.default(x, weight, eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(h, weight, eps), h) with h = x + residual (in x's dtype): a residual add and the next
    norm in one pass."""
    return torch.ops.openlora.add_rms_norm.default(x, residual, weight, eps)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, silu(gate) rounded to the dtype first (as eager PyTorch does)."""
    return torch.ops.openlora.silu_mul.default(gate, up)


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin (Hugging Face's RoPE): x [T, H, D], cos/sin [T, D], x's dtype."""
    return torch.ops.openlora.rotary.default(x, cos, sin)


# -- structured outputs' token masks (cpp/token_bitmask.cpp) ------------------------------------------

def token_bitmask_fill(logits: Tensor, words: Tensor, rows: Tensor) -> Tensor:
    """A copy of logits [n, V] with -inf in row rows[j] wherever bit t of words[j] (int32 [k, W], a
    grammar matcher's next-token bitmask) is clear; the other rows as they are. The C++ kernel on
    the CPU (one pass), the reference elsewhere (or where the extension is not built or loaded).
    words and rows are host tensors: the reference moves them to the logits' device."""
    if logits.device.type == "cpu" and _backend == "cpp":      # no build or lock on the step's path
        return torch.ops.openlora.token_bitmask_fill.default(logits, words, rows)
    return token_bitmask_fill_ref(logits, words, rows)


def token_bitmask_fill_(t: Tensor, words: Tensor, rows: Tensor, value: float) -> None:
    """In place: t[rows[j], tok] = value wherever bit tok of words[j] is clear, nothing else touched
    (t [n, V] contiguous; words int32 [k, W], rows int64 [k] host tensors). The C++ kernel on the CPU,
    the reference elsewhere."""
    if t.device.type == "cpu" and _backend == "cpp":
        torch.ops.openlora.token_bitmask_fill_.default(t, words, rows, value)
    else:
        token_bitmask_fill_ref_(t, words, rows, value)
