"""Pure-PyTorch reference for openlora::lora_linear: the tests' oracle and the fallback kernel.

Computed in fp32 and cast to x's dtype, with one Python iteration per segment (slow, obvious).
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_lora_linear_args(x, weight, bias, lora_a, lora_b, scalings, ranks, seg_indptr, seg_slots):
    """The C++ checks (cpp/lora_linear_checks.h) in Python; raises ValueError naming the argument."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(msg)

    need(x.dim() == 2, f"x must be 2-D [T, d_in], got shape {tuple(x.shape)}")
    T, d_in = x.shape
    for name, t in [("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)]:
        if t is not None:
            need(t.dtype == x.dtype, f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
            need(t.device == x.device, f"{name} must be on x's device {x.device}, got {t.device}")
    need(weight.dim() == 2 and weight.shape[1] == d_in,
         f"weight must be [d_out, d_in] with d_in = {d_in}, got shape {tuple(weight.shape)}")
    d_out = weight.shape[0]
    need(bias is None or (bias.dim() == 1 and bias.shape[0] == d_out),
         f"bias must be [d_out] with d_out = {d_out}, got shape {None if bias is None else tuple(bias.shape)}")
    need(lora_a.dim() == 3 and lora_a.shape[2] == d_in,
         f"lora_a must be [S, r_max, d_in] with d_in = {d_in}, got shape {tuple(lora_a.shape)}")
    S, r_max = lora_a.shape[:2]
    need(tuple(lora_b.shape) == (S, d_out, r_max),
         f"lora_b must be [S, d_out, r_max] = {[S, d_out, r_max]}, got shape {tuple(lora_b.shape)}")
    G = seg_indptr.shape[0] - 1 if seg_indptr.dim() == 1 else -1
    for name, t, dtype, n in [("scalings", scalings, torch.float32, S), ("ranks", ranks, torch.int32, S),
                              ("seg_indptr", seg_indptr, torch.int32, max(G + 1, 1)),
                              ("seg_slots", seg_slots, torch.int32, G)]:
        need(t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}")
        need(t.device == x.device, f"{name} must be on x's device {x.device}, got {t.device}")
        need(t.dim() == 1 and t.shape[0] == n, f"{name} must be 1-D of length {n}, got shape {tuple(t.shape)}")
    rk, ip, sl = ranks.tolist(), seg_indptr.tolist(), seg_slots.tolist()
    for s, r in enumerate(rk):
        need(0 <= r <= r_max, f"ranks[{s}] = {r} is out of range [0, r_max = {r_max}]")
    need(ip[0] == 0, f"seg_indptr must start at 0, got {ip[0]}")
    need(ip[-1] == T, f"seg_indptr must end at T = {T}, got {ip[-1]}")
    for g in range(G):
        need(ip[g + 1] >= ip[g], f"seg_indptr must be non-decreasing, got seg_indptr[{g}] = {ip[g]} "
             f"> seg_indptr[{g + 1}] = {ip[g + 1]}")
        need(-1 <= sl[g] < S, f"seg_slots[{g}] = {sl[g]} is out of range [-1, S = {S})")


def lora_linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                    scalings: Tensor, ranks: Tensor, seg_indptr: Tensor, seg_slots: Tensor) -> Tensor:
    """y = x @ weight.T + bias; y[seg] += scalings[s] * (x[seg] @ lora_a[s,:r].T) @ lora_b[s,:,:r].T.

    x [T, d_in], weight [d_out, d_in], bias [d_out] | None, lora_a [S, r_max, d_in],
    lora_b [S, d_out, r_max], scalings [S] f32, ranks [S] i32, seg_indptr [G+1] i32, seg_slots [G] i32.
    Returns y [T, d_out] in x's dtype.
    """
    check_lora_linear_args(x, weight, bias, lora_a, lora_b, scalings, ranks, seg_indptr, seg_slots)
    y = x.float() @ weight.float().T
    if bias is not None:
        y += bias.float()
    ip, sl, rk = seg_indptr.tolist(), seg_slots.tolist(), ranks.tolist()
    for g, s in enumerate(sl):
        if s < 0 or rk[s] == 0:
            continue
        r, rows = rk[s], slice(ip[g], ip[g + 1])
        a, b = lora_a[s, :r].float(), lora_b[s, :, :r].float()  # [r, d_in], [d_out, r]
        y[rows] += scalings[s].item() * (x[rows].float() @ a.T) @ b.T
    return y.to(x.dtype)
