"""GPTQ and AWQ checkpoints: their 4-bit projections unpacked to quant.Int4Weight and repacked for the
int4 kernels at load.

GPTQ (AutoGPTQ / GPTQModel, checkpoint_format gptq or gptq_v2), K inputs, N outputs, G groups:
    qweight [K/8, N] int32   q[k, n]  = qweight[k // 8, n] >> 4 * (k % 8) & 15
    qzeros  [G, N/8] int32   zq[g, n] = qzeros[g, n // 8] >> 4 * (n % 8) & 15;  z = zq + 1 (gptq), zq (v2)
    scales  [G, N]           g_idx [K] int32: the group of input k (act-order: not monotonic)
    w[n, k] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]
AWQ, GEMM layout (AutoAWQ WQLinear_GEMM): nibble j of a word holds column 8 i + ORDER[j]
    qweight [K, N/8] int32   q[k, 8 i + ORDER[j]] = qweight[k, i] >> 4 j & 15
    qzeros  [G, N/8] int32   z likewise;  scales [G, N];  w[n, k] = (q[k, n] - z[k // gs, n]) * scales[k // gs, n]
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import torch
from torch import Tensor

from services.executor.model.quant import Int4Linear, Int4Weight, QuantizationError

TENSORS = ("qweight", "qzeros", "scales", "g_idx")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)        # column c of a block is nibble AWQ_REVERSE[c]
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


@dataclass(frozen=True)
class CheckpointQuant:
    method: str              # gptq | awq
    bits: int
    group_size: int          # -1: one group per row
    zeros_minus_one: bool    # GPTQ v1 stores z - 1


def checkpoint_format(path: pathlib.Path, config: dict) -> CheckpointQuant | None:
    """The checkpoint's quantization (config.json's quantization_config, quantize_config.json or
    AutoAWQ's quant_config.json), None when it has none; a format or bit width not handled raises."""
    qc, method = config.get("quantization_config"), None
    if qc is None:
        for name, default in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
            if (path / name).exists():
                qc, method = json.loads((path / name).read_text()), default
                break
    if qc is None:
        return None
    method = str(qc.get("quant_method") or method or "").lower()
    bits = int(qc.get("bits") or qc.get("w_bit") or 0)
    group = int(qc.get("group_size") or qc.get("q_group_size") or -1)
    if method == "gptq":
        fmt = str(qc.get("checkpoint_format") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise QuantizationError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        if bits != 4:
            raise QuantizationError(f"GPTQ {bits}-bit checkpoints are not supported (4-bit only)")
        return CheckpointQuant("gptq", bits, group, zeros_minus_one=fmt == "gptq")
    if method == "awq":
        version = str(qc.get("version") or "gemm").lower()
        if version != "gemm":
            raise QuantizationError(f"AWQ version {version!r} is not supported (gemm only)")
        if bits != 4:
            raise QuantizationError(f"AWQ {bits}-bit checkpoints are not supported (4-bit only)")
        if qc.get("zero_point", True) is False:
            raise QuantizationError("AWQ checkpoints without zero points are not supported")
        return CheckpointQuant("awq", bits, group, zeros_minus_one=False)
    raise QuantizationError(f"checkpoint quantization {method or qc!r} is not supported "
                            "(gptq 4-bit, awq 4-bit gemm)")


def _nibbles(packed: Tensor) -> Tensor:
    """[..., W] int32 -> [..., W, 8]: nibble j of each word (lowest first)."""
    return (packed.to(torch.int32)[..., None] >> _SHIFTS) & 15


def unpack_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor | None,
                zeros_minus_one: bool) -> Int4Weight:
    k8, n = qweight.shape
    k, groups = k8 * 8, scales.shape[0]
    if scales.shape[1] != n or qzeros.shape != (groups, n // 8) or k % groups:
        raise QuantizationError(f"GPTQ shapes do not agree: qweight {tuple(qweight.shape)}, qzeros "
                                f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)}")
    gs = k // groups
    q = _nibbles(qweight).permute(0, 2, 1).reshape(k, n)             # [K, N]
    z = _nibbles(qzeros).reshape(groups, n) + int(zeros_minus_one)    # [G, N]
    perm = None
    if g_idx is not None:
        g_idx = g_idx.long()
        if g_idx.shape != (k,) or g_idx.min() < 0 or g_idx.max() >= groups:
            raise QuantizationError(f"GPTQ g_idx must hold {k} group ids below {groups}")
        order = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[order], torch.arange(k) // gs):
            raise QuantizationError(f"GPTQ g_idx does not give each of the {groups} groups {gs} inputs")
        perm = None if torch.equal(order, torch.arange(k)) else order
    q = q.T if perm is None else q.T[:, perm]
    return Int4Weight(q.to(torch.uint8).contiguous(), scales.T.float().contiguous(),
                      z.T.float().contiguous(), gs, perm)


def unpack_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor) -> Int4Weight:
    k, n8 = qweight.shape
    n, groups = n8 * 8, scales.shape[0]
    if scales.shape[1] != n or qzeros.shape != (groups, n8) or k % groups:
        raise QuantizationError(f"AWQ shapes do not agree: qweight {tuple(qweight.shape)}, qzeros "
                                f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)}")
    rev = torch.tensor(AWQ_REVERSE)
    q = _nibbles(qweight)[..., rev].reshape(k, n)
    z = _nibbles(qzeros)[..., rev].reshape(groups, n)
    return Int4Weight(q.T.to(torch.uint8).contiguous(), scales.T.float().contiguous(),
                      z.T.float().contiguous(), k // groups)


def load_projections(model, fmt: CheckpointQuant, packed: dict[str, Tensor], loaded,
                     dtype: torch.dtype, device: torch.device) -> None:
    """Gives each projection whose weight the checkpoint holds quantized an Int4Linear base.
    loaded: load_state_dict(strict=False)'s result for the other tensors."""
    missing = set(loaded.missing_keys)
    if loaded.unexpected_keys:
        raise QuantizationError(f"unexpected tensors in the checkpoint: {sorted(loaded.unexpected_keys)[:4]}")
    names = {id(m): n for n, m in model.named_modules()}
    used = set()
    for _, _, proj in model.projections():
        prefix = names[id(proj)]
        if prefix + ".weight" not in missing:
            continue                      # kept in full precision by the quantizer
        if prefix + ".qweight" not in packed:
            raise QuantizationError(f"{prefix} has neither weight nor qweight in the checkpoint")
        t = {name: packed.get(f"{prefix}.{name}") for name in TENSORS}
        if t["qzeros"] is None or t["scales"] is None:
            raise QuantizationError(f"{prefix} lacks qzeros or scales")
        try:
            if fmt.method == "gptq":
                wt = unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], fmt.zeros_minus_one)
            else:
                wt = unpack_awq(t["qweight"], t["qzeros"], t["scales"])
            if tuple(wt.q.shape) != tuple(proj.weight.shape):    # the meta weight load_state_dict left
                raise QuantizationError(f"shape {tuple(wt.q.shape)}, the model's is {tuple(proj.weight.shape)}")
            proj.base = Int4Linear(wt, proj.bias, dtype, device)
        except QuantizationError as exc:
            raise QuantizationError(f"{fmt.method.upper()} {prefix}: {exc}") from None
        proj.weight = None
        missing.discard(prefix + ".weight")
        used.update(f"{prefix}.{name}" for name in TENSORS)
    if missing:
        raise QuantizationError(f"tensors missing from the checkpoint: {sorted(missing)[:4]}")
    extra = sorted(set(packed) - used)
    if extra:
        raise QuantizationError(f"quantized tensors of modules that are not projections are not supported: "
                                f"{extra[:4]}")
