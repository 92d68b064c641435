"""The projections' base GEMM: prepacked float32, and weight-only int8 / int4 (quantized at load, or
repacked from GPTQ / AWQ checkpoints by model/quant_checkpoints.py).

    y = proj.base(x)        # x [T, d_in] -> [T, d_out] in x's dtype, bias added; the LoRA part follows

Weights only: adapters are added unchanged afterwards, and x stays in the serving dtype except that
the quantized GEMM multiplies it rounded to bfloat16 (on every CPU path; a no-op for bfloat16 serving):
    int8: w[n, k] = q[n, k] * s[n]                      per output channel, symmetric (|q| <= 127)
    int4: w[n, k] = (q[n, j] - z[n, g]) * s[n, g]       j = position of input k in perm (identity
                                                          unless act-order), g = j // group_size
    y = linear_reference(x, w, bias) = bf16(x) @ w.T + bias, summed in float32
The weights' integers are exact in bfloat16, so the products are exact and only x's rounding departs
from float32: at 32 tokens a decode step is compute-bound on a CPU core, and bfloat16 products
(vdpbf16ps) are what make the quantized base faster than the float32 one (docs/quantization.md).
Each format has a pure-torch dequantize beside it (the tests' reference). On CPU the GEMMs are
cpp/quant_gemm*.cpp, built once as their own extension (openlora_quant): with AVX512-BF16 the
*_bf16dot kernels on weights packed for them (pack_int8 / pack_int4), elsewhere int8_linear /
int4_linear (tiles dequantized into cache, then MKL's sgemm or oneDNN's bf16 GEMM); where it cannot
build, torch's own kernels (aten._weight_int8pack_mm, aten._weight_int4pack_mm_for_cpu: fast for
bfloat16 and few tokens only). On CUDA int4 runs aten._weight_int4pack_mm (bfloat16), int8 a matmul
with q converted at each call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import structlog
import torch
from torch import Tensor

from services.executor import ops

log = structlog.get_logger(__name__)

METHODS = ("none", "int8", "int4")
INT4_KERNEL_GROUPS = (32, 64, 128, 256)   # what the int4 kernels take; larger groups are split


class QuantizationError(ValueError):
    """A weight or checkpoint the quantized path cannot take (one line naming what)."""


@functools.cache
def cpu_kernels() -> bool:
    """Builds (once, cached on disk like the other kernels) and loads cpp/quant_gemm*.cpp; False, logged,
    where it cannot build (the torch kernels then run)."""
    from services.executor.ops import build
    flags = [*build.CFLAGS, *_isa_flags()]
    try:
        path = build._load("openlora_quant", [build.CPP_DIR / "quant_gemm.cpp"], (flags,), False,
                           included=(build.CPP_DIR / "quant_gemm.h",),
                           isa_objects={build.CPP_DIR / "quant_gemm_avx512_bf16.cpp": build.ISA_FLAGS["avx512_bf16"]},
                           extra_cflags=flags, extra_ldflags=["-fopenmp"], extra_include_paths=[str(build.CPP_DIR)])
        torch.ops.load_library(str(path))
        return True
    except Exception:   # any build failure: the slower torch kernels still serve
        log.exception("quant_kernels_unavailable", fallback="torch's _weight_int8pack_mm / _int4pack_mm")
        return False


def bf16dot() -> bool:
    """Whether the *_bf16dot kernels serve here (built, and the CPU has AVX512-BF16)."""
    return cpu_kernels() and torch.ops.openlora_quant.has_avx512_bf16()


def cpu_kernel(device: torch.device) -> str:
    """Which GEMM a quantized projection on device runs: "bf16dot", "tiled" (cpp/quant_gemm.cpp's
    row-major kernels), "torch" (aten's) or "cuda"."""
    if device.type != "cpu":
        return "cuda"
    if not cpu_kernels():
        return "torch"
    return "bf16dot" if bf16dot() else "tiled"


def linear_reference(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """What every quantized GEMM computes, in float64: bf16(x) @ w.T + bias -> x's dtype (the kernels
    sum in float32). w: the dequantized weight [d_out, d_in]."""
    y = x.to(torch.bfloat16).double() @ w.double().T
    return (y if bias is None else y + bias.double()).to(x.dtype)


def _bf16_rounded(x: Tensor) -> Tensor:
    return x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16).to(x.dtype)


def _pad_rows(t: Tensor, multiple: int, value: float = 0) -> Tensor:
    pad = -t.shape[0] % multiple
    return t if pad == 0 else torch.cat([t, t.new_full((pad, *t.shape[1:]), value)])


def pack_int8(q: Tensor) -> Tensor:
    """q [N, K] int8 -> the bf16dot layout [ceil(N / 16), K / 2, 16, 2] (cpp/quant_gemm.h): per 16 rows,
    each pair of inputs as 16 rows x 2."""
    n, k = q.shape
    return _pad_rows(q, 16).reshape(-1, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def unpack_int8(packed: Tensor, n: int) -> Tensor:
    """pack_int8's inverse -> [n, K]."""
    b, pairs = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(b * 16, pairs * 2)[:n]


def pack_int4(q: Tensor) -> Tensor:
    """q [N, K] uint8 0..15 -> the bf16dot layout [ceil(N / 16), K / 4, 16, 2] uint8: per 16 rows and
    4 inputs 4c..4c+3, byte (r, j) = q[r, 4c + j] | q[r, 4c + 2 + j] << 4."""
    n, k = q.shape
    q = _pad_rows(q, 16).reshape(-1, 16, k // 4, 2, 2)          # [b, r, c, half, j]
    return (q[:, :, :, 0] | q[:, :, :, 1] << 4).permute(0, 2, 1, 3).contiguous()


def _pack_groups(t: Tensor, value: float) -> Tensor:
    """[N, K // g] -> [ceil(N / 16), K // g, 16] float32 (per 16 rows, each group's 16 values)."""
    return _pad_rows(t.float(), 16, value).reshape(-1, 16, t.shape[1]).transpose(1, 2).contiguous()


class BaseLinear(Protocol):
    d_in: int
    d_out: int

    def __call__(self, x: Tensor) -> Tensor: ...          # [T, d_in] -> [T, d_out]

    @property
    def nbytes(self) -> int: ...                           # bytes the GEMM reads (weights, scales, bias)

    def dequantize(self) -> Tensor: ...                    # the weight it multiplies by [d_out, d_in]


@dataclass
class Prepacked:
    """float32 CPU: the weight copied once into MKL's GEMM layout (ops.pack_weight)."""

    weight: Tensor        # [d_out, d_in]
    packed: Tensor
    bias: Tensor | None

    d_in = property(lambda self: self.weight.shape[1])
    d_out = property(lambda self: self.weight.shape[0])
    nbytes = property(lambda self: _bytes(self.packed, self.bias))

    def __call__(self, x: Tensor) -> Tensor:
        return ops.linear_packed(x, self.weight, self.packed, self.bias)

    def dequantize(self) -> Tensor:
        return self.weight


def _isa_flags() -> list[str]:
    """The vector instructions this CPU has, for the dequantizing loops (the build is keyed by them)."""
    try:
        cpu = open("/proc/cpuinfo").read().split()
    except OSError:
        cpu = []
    flags = ["-mavx2", "-mfma", "-mf16c"] if {"avx2", "fma", "f16c"} <= set(cpu) else []
    if flags and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(cpu):
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=512"]
        if "avx512_bf16" in cpu:
            flags.append("-mavx512bf16")
    return flags


# --- int8, per output channel ---------------------------------------------------------------------

def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] -> (q [N, K] int8, s [N] float32): symmetric per row, s = max|w| / 127."""
    w = w.float()
    s = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


def dequantize_int8(q: Tensor, s: Tensor) -> Tensor:
    """-> w [N, K] float32."""
    return q.float() * s.float()[:, None]


class Int8Linear:
    def __init__(self, q: Tensor, s: Tensor, bias: Tensor | None, dtype: torch.dtype):
        self.d_out, self.d_in = q.shape
        self.dtype = dtype
        self.bias = bias
        self.kernel = cpu_kernel(q.device)
        if self.kernel == "bf16dot" and self.d_in % 2 == 0:
            self.packed = pack_int8(q)                          # [ceil(N / 16), K / 2, 16, 2]
            self.s = _pad_rows(s.float(), 16).contiguous()     # [16 ceil(N / 16)]
            return
        if self.kernel == "bf16dot":
            self.kernel = "tiled"
        self.packed = q.contiguous()                           # [N, K] int8
        # [N]: float32 for cpp/quant_gemm.cpp, else the dtype torch's kernels take
        self.s = s.to(torch.float32 if self.kernel == "tiled" else dtype).contiguous()

    @property
    def q(self) -> Tensor:
        """[N, K] int8."""
        return unpack_int8(self.packed, self.d_out) if self.kernel == "bf16dot" else self.packed

    @property
    def nbytes(self) -> int:
        return _bytes(self.packed, self.s, self.bias)

    def __call__(self, x: Tensor) -> Tensor:
        if self.kernel == "bf16dot":
            return torch.ops.openlora_quant.int8_linear_bf16dot(x, self.packed, self.s, self.d_out, self.bias)
        if self.kernel == "tiled":
            return torch.ops.openlora_quant.int8_linear(x, self.packed, self.s, self.bias)
        x = _bf16_rounded(x)
        if self.kernel == "torch":
            y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.packed, self.s)
        else:   # torch has no int8 weight-only CUDA kernel: q is converted whole at each call (slow)
            y = (x @ self.packed.to(x.dtype).T) * self.s
        return y if self.bias is None else y.add_(self.bias)

    def dequantize(self) -> Tensor:
        return dequantize_int8(self.q, self.s[:self.d_out]).to(self.dtype)


# --- int4, group-wise with zero points --------------------------------------------------------------

@dataclass
class Int4Weight:
    """The format every int4 source is brought to (our quantizer, GPTQ, AWQ).

    w[:, perm[j]] = (q[:, j] - z[:, j // group_size]) * s[:, j // group_size]
    """

    q: Tensor               # [N, K] uint8, 0..15, columns in perm order
    s: Tensor               # [N, K // group_size] float32
    z: Tensor               # [N, K // group_size] float32 (integers for GPTQ / AWQ)
    group_size: int
    perm: Tensor | None = None   # [K] long: input column of each q column (act-order); None: identity

    def dequantize(self) -> Tensor:
        """-> w [N, K] float32 in the input's column order (the reference)."""
        g = self.group_size
        w = (self.q.float() - self.z.repeat_interleave(g, dim=1)) * self.s.repeat_interleave(g, dim=1)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out


def quantize_int4(w: Tensor, group_size: int) -> Int4Weight:
    """w [N, K] -> asymmetric min/max int4 per group of group_size inputs (zero points in 0..15)."""
    n, k = w.shape
    if k % group_size:
        raise QuantizationError(f"int4 group size {group_size} does not divide the input dimension {k} "
                                "(--quantization-group-size)")
    wg = w.float().reshape(n, k // group_size, group_size)
    lo = wg.amin(dim=-1).clamp(max=0)
    hi = wg.amax(dim=-1).clamp(min=0)
    s = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    z = torch.round(-lo / s).clamp_(0, 15)
    q = torch.round(wg / s[..., None] + z[..., None]).clamp_(0, 15).to(torch.uint8)
    return Int4Weight(q.reshape(n, k), s, z, group_size)


def _kernel_groups(wt: Int4Weight) -> tuple[Tensor, Tensor, int]:
    """(s, z, group) with group one the kernels take: a group above 256 is cut into equal groups."""
    g = wt.group_size
    if g in INT4_KERNEL_GROUPS:
        return wt.s, wt.z, g
    kg = next((c for c in reversed(INT4_KERNEL_GROUPS) if g % c == 0), None)
    if g < INT4_KERNEL_GROUPS[0] or kg is None:
        raise QuantizationError(f"int4 group size {g} is not supported (32, 64, 128, 256 or a multiple)")
    return wt.s.repeat_interleave(g // kg, dim=1), wt.z.repeat_interleave(g // kg, dim=1), kg


class Int4Linear:
    """On CPU cpp/quant_gemm*.cpp: with AVX512-BF16 the bf16dot layout (pack_int4, groups a multiple of
    4), else two inputs a byte in row-major order (any even group); otherwise torch's int4 GEMM, where
    w = (q - 8) * s + zero, so zero = (8 - z) * s carries the zero points."""

    def __init__(self, wt: Int4Weight, bias: Tensor | None, dtype: torch.dtype, device: torch.device):
        n, k = wt.q.shape
        if k % wt.group_size:
            raise QuantizationError(f"int4 group size {wt.group_size} does not divide the input dimension {k}")
        self.d_out, self.d_in, self.dtype = n, k, dtype
        self.bias = bias
        self.perm = None if wt.perm is None else wt.perm.to(device)
        self.kernel = cpu_kernel(device)
        if self.kernel == "bf16dot" and wt.group_size % 4 == 0:
            self.group = wt.group_size
            self.packed = pack_int4(wt.q)                                     # [ceil(N / 16), K / 4, 16, 2]
            self.sz = (_pack_groups(wt.s, 0), _pack_groups(128 + wt.z.float(), 128))   # [.., K // g, 16]
            return
        if self.kernel == "bf16dot" or (self.kernel == "tiled" and wt.group_size % 2):
            self.kernel = "tiled" if wt.group_size % 2 == 0 else "torch"
        if self.kernel == "tiled":
            self.group = wt.group_size
            g = wt.q.reshape(n, k // self.group, 2, self.group // 2)         # each group's two halves
            self.packed = (g[:, :, 1] << 4 | g[:, :, 0]).reshape(n, k // 2).contiguous()   # [N, K / 2]
            self.sz = (wt.s.float().contiguous(), wt.z.float().contiguous())      # [N, K // group] each
            return
        s, z, self.group = _kernel_groups(wt)
        sz = torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1)          # [K // g, N, 2]
        if device.type == "cuda":
            if n % 8 or k % 32:
                raise QuantizationError(f"int4 on CUDA needs d_out % 8 == 0 and d_in % 32 == 0, got {n}x{k}")
            inner = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
            packed = (wt.q[:, ::2] << 4 | wt.q[:, 1::2]).contiguous()       # [N, K / 2] uint8
            self.packed = torch.ops.aten._convert_weight_to_int4pack(packed.to(device), inner)
            self.sz = sz.to(device=device, dtype=torch.bfloat16).contiguous()
            self.dtype = torch.bfloat16
        else:
            if n % 16:
                raise QuantizationError(f"int4 on CPU needs d_out % 16 == 0, got {n}")
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(wt.q.to(torch.int32), 1)
            self.sz = sz.to(dtype).contiguous()

    @property
    def nbytes(self) -> int:
        return _bytes(self.packed, *(self.sz if isinstance(self.sz, tuple) else (self.sz,)), self.bias, self.perm)

    def __call__(self, x: Tensor) -> Tensor:
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if self.kernel == "bf16dot":
            y = torch.ops.openlora_quant.int4_linear_bf16dot(x, self.packed, *self.sz, self.group, self.d_out)
        elif self.kernel == "tiled":
            y = torch.ops.openlora_quant.int4_linear(x, self.packed, *self.sz, self.group)
        elif x.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), self.packed,
                                                   self.group, self.sz).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(_bf16_rounded(x).contiguous(), self.packed,
                                                           self.group, self.sz)
        return y if self.bias is None else y.add_(self.bias)

    def dequantize(self) -> Tensor:
        """The weight the kernel multiplies by [d_out, d_in], read back through it (the packed layout
        is the kernel's own): rows of W.T = the kernel applied to rows of the identity."""
        bias, self.bias = self.bias, None
        try:
            eye = torch.eye(self.d_in, dtype=self.dtype, device=self.packed.device)
            cols = [self(eye[i:i + 1024]) for i in range(0, self.d_in, 1024)]
        finally:
            self.bias = bias
        w_t = torch.cat(cols)                                     # [d_in (x's order), d_out]
        return w_t.T.contiguous()


# --- the model --------------------------------------------------------------------------------------

def _bytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def quantize_projections(model, method: str, group_size: int, dtype: torch.dtype | None = None) -> None:
    """Replaces every projection's weight by an int8 / int4 base GEMM (at load, on the weights'
    device), quantized from the weights as loaded; then every other parameter (lm_head, embeddings,
    norms, biases) to dtype (default: the weights')."""
    if method not in METHODS:
        raise QuantizationError(f"quantization {method!r} is not supported ({', '.join(METHODS)})")
    if method == "none":
        return
    for layer, name, proj in model.projections():
        w = proj.weight
        try:
            if method == "int8":
                q, s = quantize_int8(w)
                proj.base = Int8Linear(q, s, proj.bias, dtype or w.dtype)
            else:
                proj.base = Int4Linear(quantize_int4(w, group_size), proj.bias, dtype or w.dtype, w.device)
        except QuantizationError as exc:
            raise QuantizationError(f"layer {layer} {name}: {exc}") from None
        proj.weight = None
    if dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(dtype)     # the same Parameter objects: the bases' bias references follow


def base_weight_bytes(model) -> int:
    """Bytes of the base model as served: quantized projections at their packed size."""
    seen, total = set(), 0
    for _, _, proj in model.projections():
        if proj.base is not None and not isinstance(proj.base, Prepacked):
            total += proj.base.nbytes
            seen.add(id(proj.bias))
    for p in model.parameters():
        if id(p) not in seen:
            total += p.numel() * p.element_size()
    return total


def dequantized(w: Tensor, method: str, group_size: int) -> Tensor:
    """w as the quantized path multiplies by it (float32): what transformers runs to check it."""
    if method == "int8":
        return dequantize_int8(*quantize_int8(w))
    if method == "int4":
        return quantize_int4(w, group_size).dequantize()
    return w.float()


def write_dequantized(src, dst, method: str, group_size: int, projections: tuple[str, ...]) -> None:
    """Copies the Hugging Face model directory src to dst with every projection weight (a tensor named
    *.<one of projections>.weight) replaced by dequantized(w): the quantized model in full precision."""
    import pathlib
    import shutil

    from safetensors.torch import load_file, save_file
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    for f in src.glob("*.safetensors"):
        state = load_file(str(f))
        for name, w in state.items():
            if name.endswith(".weight") and name.split(".")[-2] in projections:
                state[name] = dequantized(w, method, group_size).to(w.dtype)
        save_file(state, str(dst / f.name), metadata={"format": "pt"})


def round_projection_inputs(model, projections: tuple[str, ...]) -> None:
    """Rounds the input of every projection Linear of a transformers model (a module named one of
    projections, or peft's base_layer under one) to bfloat16, as the quantized GEMMs do (their
    adapters still see x unrounded): transformers on write_dequantized's weights with this computes
    what the engine serves."""
    def hook(_module, args):
        return (_bf16_rounded(args[0]), *args[1:])

    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, torch.nn.Linear) and (parts[-1] in projections or (
                parts[-1] == "base_layer" and len(parts) > 1 and parts[-2] in projections)):
            module.register_forward_pre_hook(hook)
