"""Pure-PyTorch references for the openlora ops: the tests' oracles and the fallback kernels.

They compute in fp32 (float64 for float64 inputs) and cast to the input's dtype: lora_paged_add_ with
one Python iteration per segment, paged_attention_decode on a gathered, masked copy of every
sequence's blocks (slow, obvious).
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_paged_attention_decode_args(q, k_cache, v_cache, block_tables, context_lens, scale,
                                      sliding_window):
    """The C++ checks (cpp/paged_attention.cpp) in Python; raises ValueError naming the argument."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(msg)

    need(q.dim() == 3, f"q must be 3-D [N, H, D], got shape {tuple(q.shape)}")
    N, H, D = q.shape
    for name, t in [("k_cache", k_cache), ("v_cache", v_cache)]:
        need(t.dim() == 4 and t.shape[3] == D,
             f"{name} must be [num_blocks, block_size, KVH, D] with D = {D}, got shape {tuple(t.shape)}")
        need(t.dtype == q.dtype, f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        need(t.device == q.device, f"{name} must be on q's device {q.device}, got {t.device}")
    need(v_cache.shape == k_cache.shape,
         f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    num_blocks, bs, kvh = k_cache.shape[:3]
    need(kvh > 0 and H % kvh == 0, f"q's heads H = {H} must be a multiple of k_cache's kv heads KVH = {kvh}")
    need(block_tables.dim() == 2 and block_tables.shape[0] == N,
         f"block_tables must be [N, max_blocks] with N = {N}, got shape {tuple(block_tables.shape)}")
    need(block_tables.dtype == torch.int32, f"block_tables must be int32, got {block_tables.dtype}")
    need(context_lens.dim() == 1 and context_lens.shape[0] == N,
         f"context_lens must be [N] with N = {N}, got shape {tuple(context_lens.shape)}")
    need(context_lens.dtype == torch.int32, f"context_lens must be int32, got {context_lens.dtype}")
    for name, t in [("block_tables", block_tables), ("context_lens", context_lens)]:
        need(t.device == q.device, f"{name} must be on q's device {q.device}, got {t.device}")
    need(sliding_window >= 0, f"sliding_window must be >= 0 (0 = none), got {sliding_window}")
    if N == 0:
        return
    max_blocks = block_tables.shape[1]
    ctx = context_lens.long()
    bad = ((ctx < 1) | (ctx > max_blocks * bs)).nonzero()
    if len(bad):
        n = bad[0, 0].item()
        need(False, f"context_lens[{n}] = {ctx[n].item()} must be in [1, max_blocks * block_size = "
                    f"{max_blocks * bs}]")
    read = _blocks_read(ctx, max_blocks, bs, sliding_window)
    bad = (read & ((block_tables < 0) | (block_tables >= num_blocks))).nonzero()
    if len(bad):
        n, j = bad[0].tolist()
        need(False, f"block_tables[{n}, {j}] = {block_tables[n, j].item()} is out of range "
                    f"[0, num_blocks = {num_blocks})")


def _key_range(ctx: Tensor, sliding_window: int) -> tuple[Tensor, Tensor]:
    """[lo, ctx) of the keys each sequence's query attends."""
    lo = (ctx - sliding_window).clamp(min=0) if sliding_window > 0 else torch.zeros_like(ctx)
    return lo, ctx


def _blocks_read(ctx: Tensor, max_blocks: int, bs: int, sliding_window: int) -> Tensor:
    """[N, max_blocks] bool: block j of sequence n holds a key its query attends."""
    lo, hi = _key_range(ctx, sliding_window)
    j = torch.arange(max_blocks, device=ctx.device)
    return (j[None] >= (lo // bs)[:, None]) & (j[None] <= ((hi - 1) // bs)[:, None])


def paged_attention_decode_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                               context_lens: Tensor, scale: float, sliding_window: int) -> Tensor:
    """One query per sequence over its paged K/V, computed in fp32 (float64 for float64 inputs) on a
    gathered copy.

    q [N, H, D], k_cache/v_cache [num_blocks, bs, KVH, D], block_tables [N, max_blocks] i32,
    context_lens [N] i32 -> out [N, H, D] in q's dtype:

        c = context_lens[n]; lo = max(0, c - sliding_window) if sliding_window > 0 else 0
        K = k_cache[block_tables[n]].flatten(0, 1)[lo:c, h // (H // KVH)]     # [c - lo, D]
        out[n, h] = softmax(scale * q[n, h] @ K.T) @ V
    """
    check_paged_attention_decode_args(q, k_cache, v_cache, block_tables, context_lens, scale,
                                      sliding_window)
    H = q.shape[1]
    bs, kvh = k_cache.shape[1:3]
    max_blocks = block_tables.shape[1]
    ctx = context_lens.long()
    tables = torch.where(_blocks_read(ctx, max_blocks, bs, sliding_window), block_tables, 0).long()
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32, or float64 for a float64 oracle
    k = k_cache[tables].flatten(1, 2).to(acc).repeat_interleave(H // kvh, 2)  # [N, L, H, D]
    v = v_cache[tables].flatten(1, 2).to(acc).repeat_interleave(H // kvh, 2)
    s = torch.einsum("nhd,nlhd->nhl", q.to(acc), k) * scale                    # [N, H, L]
    lo, hi = _key_range(ctx, sliding_window)
    keys = torch.arange(max_blocks * bs, device=q.device)
    visible = (keys[None] >= lo[:, None]) & (keys[None] < hi[:, None])        # [N, L]
    p = s.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    return torch.einsum("nhl,nlhd->nhd", p, v).to(q.dtype)


# -- the decoder layer's elementwise ops (cpp/layer_ops.cpp), rounding where Hugging Face's code does --

def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)), the norm in fp32, rounded to x's dtype before weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(h, weight, eps), h) with h = x + residual in x's dtype."""
    h = x + residual
    return rms_norm_ref(h, weight, eps), h


def silu_mul_ref(gate: Tensor, up: Tensor) -> Tensor:
    return torch.nn.functional.silu(gate) * up


def rotary_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Hugging Face's rotate_half RoPE: x [T, H, D], cos/sin [T, D] in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


# -- the adapter arena's op (cpp/lora_paged.cpp) ------------------------------------------------------

def lora_paged_add_ref(y: Tensor, x: Tensor, arena: Tensor, page_index: Tensor, seg_meta: Tensor,
                       seg_scalings: Tensor, lm: int, seg_indptr: Tensor) -> None:
    """In place: y[seg] += seg_scalings[g, lm] * (x[seg] @ A.T) @ Bt, A and Bt gathered from arena pages.

    y [T, d_out], x [T, d_in], arena [NP, P], page_index [E] i32, seg_meta [G, LM, 2] i32 (offset,
    rank), seg_scalings [G, LM] f32, seg_indptr [G+1] i32. With ca = ceil(d_in / P), cb = ceil(d_out / P):
        A[k]  = concat(arena[page_index[off + k*ca + c]] for c < ca)[:d_in]
        Bt[k] = concat(arena[page_index[off + r*ca + k*cb + c]] for c < cb)[:d_out]
    Computed in fp32 (float64 for float64 inputs), rounded to y's dtype once.
    """
    P = arena.shape[1]
    d_in, d_out = x.shape[1], y.shape[1]
    ca, cb = -(-d_in // P), -(-d_out // P)
    acc = torch.promote_types(x.dtype, torch.float32)
    ip = seg_indptr.tolist()
    for g in range(len(ip) - 1):
        off, r = (int(v) for v in seg_meta[g, lm].tolist())
        if r == 0 or ip[g + 1] == ip[g]:
            continue
        a = arena[page_index[off:off + r * ca].long()].reshape(r, ca * P)[:, :d_in].to(acc)
        bt = arena[page_index[off + r * ca:off + r * (ca + cb)].long()].reshape(r, cb * P)[:, :d_out].to(acc)
        rows = slice(ip[g], ip[g + 1])
        delta = float(seg_scalings[g, lm]) * (x[rows].to(acc) @ a.T) @ bt
        y[rows] = (y[rows].to(acc) + delta).to(y.dtype)


# -- structured outputs' token masks (cpp/token_bitmask.cpp) ------------------------------------------

def _banned(t: Tensor, words: Tensor, rows: Tensor, what: str) -> Tensor:
    """bool [k, V]: True where bit tok of words[j] is clear; ValueError for a row outside [0, n), a
    row named twice, or words of the wrong shape or too short for V."""
    n, vocab = t.shape
    k = rows.shape[0]
    if words.dtype != torch.int32 or words.dim() != 2 or words.shape[0] != k:
        raise ValueError(f"words must be int32 [{k}, ceil(vocab / 32)], got {words.dtype} {tuple(words.shape)}")
    if words.shape[1] * 32 < vocab:
        raise ValueError(f"words cover {words.shape[1] * 32} tokens, fewer than the vocab of {vocab}")
    listed = rows.tolist()                   # rows on the host (the engine's): no device sync
    if any(not 0 <= r < n for r in listed) or len(set(listed)) != k:
        raise ValueError(f"rows must be distinct rows of {what} [0, {n}), got {listed}")
    bits = torch.ones(32, dtype=torch.int64, device=t.device) << torch.arange(32, device=t.device)
    clear = torch.bitwise_and(words.to(t.device).unsqueeze(-1), bits.to(torch.int32)) == 0   # [k, W, 32]
    return clear.reshape(k, words.shape[1] * 32)[:, :vocab]


def token_bitmask_fill_ref(logits: Tensor, words: Tensor, rows: Tensor) -> Tensor:
    """A copy of logits [n, V] with -inf in row rows[j] wherever bit t of words[j] (int32 [k, W],
    word t // 32, bit t % 32) is clear; rows not named are copied as they are. Raises ValueError
    for a row outside [0, n), a row named twice, or words too short for V."""
    banned = _banned(logits, words, rows, "logits")
    if rows.shape[0] == 0:
        return logits.clone()
    ban = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    ban[rows.to(logits.device)] = banned
    return logits.masked_fill(ban, float("-inf"))


def token_bitmask_fill_ref_(t: Tensor, words: Tensor, rows: Tensor, value: float) -> None:
    """In place: t[rows[j], tok] = value wherever bit tok of words[j] is clear; nothing else
    touched. The same checks (ValueError) as token_bitmask_fill_ref."""
    banned = _banned(t, words, rows, "t")
    if rows.shape[0]:
        at = rows.to(t.device)
        t.index_copy_(0, at, t.index_select(0, at).masked_fill(banned, value))
