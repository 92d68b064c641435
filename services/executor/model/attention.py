"""Attention over the paged KV cache (kv_cache.py holds the blocks).

The sequences of a step are split into a decode group (one query each) and a prefill group (several
queries each). The decode group runs ops.paged_attention_decode_async (no sync on CUDA), which
reads K/V from the blocks in place; the prefill group gathers its sequences' blocks into a padded
[N, L, kv_heads, head_dim] tensor and runs one masked scaled_dot_product_attention (or, for fresh
prompts of one length, causal attention over the step's own K/V).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from services.executor import ops


@dataclass
class AttnGroup:
    """Sequences attended together, padded to Qmax queries and L = max_blocks * block_size keys.

    A decode group (Qmax == 1) has int32 block_tables and context_lens and no mask; a prefill group
    has long block_tables and a mask, and context_lens None; a dense group (fresh prompts of one
    length, back to back) has only `dense`, its other tensors None.
    """

    q_index: Tensor | None       # [N, Qmax] long: rows of the step's tokens (padding -> any valid row)
    out_rows: Tensor | None      # [n_valid] long: rows written back (q_index[q_valid])
    q_valid: Tensor | None       # [N, Qmax] bool
    block_tables: Tensor | None  # [N, max_blocks] int32 (decode) / long (prefill); padding -> block 0
    mask: Tensor | None          # [N, 1, Qmax, L] bool: query i of sequence n may attend to key j
    context_lens: Tensor | None = None  # [N] int32 (decode only)
    rows: slice | None = None           # q_index[:, 0] as a slice when it is a run of rows (decode)
    sliding_window: int = 0
    # prefill of N fresh prompts (no cached prefix) of Q tokens each, back to back from row r0:
    # (r0, N, Q); attention then runs causally on the step's own K/V, without gathers or a mask
    dense: tuple[int, int, int] | None = None


@dataclass
class AttnMetadata:
    slot_mapping: Tensor        # [T] long: flat cache row each token's K/V is written to
    groups: list[AttnGroup]
    # the groups of layers whose sliding window (key) differs from the one `groups` was built with
    # (Qwen2 models that slide only some layers); paged_attention picks by the layer's window
    windowed: dict[int, list[AttnGroup]] = field(default_factory=dict)


def build_group(seqs: list[tuple[list[int], int, int]], row_start: list[int], block_size: int,
                sliding_window: int | None, device: torch.device) -> AttnGroup:
    """seqs: (block_table, context_len, q_len) per sequence, its queries at rows row_start[n]...

    The queries are the last q_len of the context_len tokens: query i sits at position
    context_len - q_len + i and sees keys j <= that position (and > it - sliding_window).
    """
    n = len(seqs)
    q_max = max(q for _, _, q in seqs)
    nb_max = max(len(bt) for bt, _, _ in seqs)
    decode = q_max == 1
    # one tensor from padded rows (a tensor per row cost ~0.3 ms per step at 64 sequences)
    tables = torch.tensor([bt + [0] * (nb_max - len(bt)) for bt, _, _ in seqs],
                          dtype=torch.int32 if decode else torch.long)
    if decode:
        r0 = row_start[0]
        rows = slice(r0, r0 + n) if row_start == list(range(r0, r0 + n)) else None
        q_index = torch.tensor(row_start, dtype=torch.long)[:, None]
        return AttnGroup(q_index=q_index.to(device), out_rows=q_index[:, 0].to(device),
                         q_valid=torch.ones((n, 1), dtype=torch.bool, device=device),
                         block_tables=tables.to(device), mask=None,
                         context_lens=torch.tensor([c for _, c, _ in seqs], dtype=torch.int32,
                                                   device=device),
                         rows=rows, sliding_window=sliding_window or 0)
    window_ok = not sliding_window or q_max <= sliding_window
    if window_ok and all(c == q == q_max for _, c, q in seqs) and \
            row_start == list(range(row_start[0], row_start[0] + n * q_max, q_max)):
        return AttnGroup(q_index=None, out_rows=None, q_valid=None, block_tables=None, mask=None,
                         dense=(row_start[0], n, q_max))
    ctx = torch.tensor([c for _, c, _ in seqs], dtype=torch.long)
    q_len = torch.tensor([q for _, _, q in seqs], dtype=torch.long)
    starts = torch.tensor(row_start, dtype=torch.long)
    ar = torch.arange(q_max)
    q_valid = ar[None, :] < q_len[:, None]                                 # [N, Qmax]
    q_index = torch.where(q_valid, starts[:, None] + ar[None, :], starts[:, None])
    pos = (ctx - q_len)[:, None] + ar[None, :]                            # [N, Qmax]
    pos = torch.minimum(pos, (ctx - 1)[:, None])                          # padding queries: last pos
    keys = torch.arange(nb_max * block_size)
    mask = keys[None, None, :] <= pos[:, :, None]                         # [N, Qmax, L]
    if sliding_window:
        mask &= keys[None, None, :] > pos[:, :, None] - sliding_window
    return AttnGroup(q_index=q_index.to(device), out_rows=q_index[q_valid].to(device),
                     q_valid=q_valid.to(device), block_tables=tables.to(device),
                     mask=mask[:, None].to(device))


def paged_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                    meta: AttnMetadata, scale: float, window: int = 0,
                    softcap: float | None = None) -> Tensor:
    """Write k/v into the cache, then attend each group over its block tables.

    window: the layer's sliding window (0: none); it selects meta.windowed[window] where present.
    softcap: scores = softcap * tanh(scores / softcap) before the mask and softmax (Gemma 2); such
    layers take the eager path (attention_eager) for every group.

    q [T, H, D], k/v [T, KVH, D], k_cache/v_cache [num_blocks, bs, KVH, D] -> out [T, H, D].
    """
    T, H, D = q.shape
    kvh = k.shape[1]
    k_cache.view(-1, kvh, D).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, kvh, D).index_copy_(0, meta.slot_mapping, v)
    groups = meta.windowed.get(window, meta.groups)
    if softcap:
        return _paged_attention_eager(q, k, v, k_cache, v_cache, groups, scale, softcap)
    if len(groups) == 1 and groups[0].rows == slice(0, T):  # decode-only step
        g = groups[0]
        return ops.paged_attention_decode_async(q, k_cache, v_cache, g.block_tables, g.context_lens, scale,
                                                g.sliding_window)
    out = q.new_empty((T, H, D))
    for g in groups:
        if g.context_lens is not None:  # decode: one query per sequence, K/V read in place
            rows = g.rows if g.rows is not None else g.q_index[:, 0]
            out[rows] = ops.paged_attention_decode_async(q[rows], k_cache, v_cache, g.block_tables,
                                                         g.context_lens, scale, g.sliding_window)
            continue
        if g.dense is not None:  # fresh prompts of one length: causal attention over their own K/V
            r0, n, qlen = g.dense
            rows = slice(r0, r0 + n * qlen)
            qd = q[rows].view(n, qlen, H, D).transpose(1, 2)                # [N, H, Q, D]
            kd = k[rows].view(n, qlen, kvh, D).transpose(1, 2)
            vd = v[rows].view(n, qlen, kvh, D).transpose(1, 2)
            o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale,
                                               enable_gqa=kvh != H)
            out[rows] = o.transpose(1, 2).reshape(n * qlen, H, D)
            continue
        kg = k_cache[g.block_tables].flatten(1, 2).transpose(1, 2)        # [N, KVH, L, D]
        vg = v_cache[g.block_tables].flatten(1, 2).transpose(1, 2)
        qg = q[g.q_index].transpose(1, 2)                                 # [N, H, Qmax, D]
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=scale,
                                           enable_gqa=kvh != H)
        out[g.out_rows] = o.transpose(1, 2)[g.q_valid]
    return out


def attention_eager(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float,
                    softcap: float | None) -> Tensor:
    """transformers' eager attention: softmax(cap(q @ k^T * scale) masked) @ v, softmax in fp32.

    q [N, H, Q, D], k/v [N, KVH, L, D], mask [N, 1, Q, L] bool -> [N, H, Q, D].
    """
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _paged_attention_eager(q, k, v, k_cache, v_cache, groups: list[AttnGroup], scale: float,
                           softcap: float | None) -> Tensor:
    """Every group through attention_eager (soft-capped layers): decode groups gather their blocks
    and mask by context length and window, dense groups attend causally over their own K/V."""
    T, H, D = q.shape
    kvh = k.shape[1]
    out = q.new_empty((T, H, D))
    for g in groups:
        if g.dense is not None:
            r0, n, qlen = g.dense
            rows = slice(r0, r0 + n * qlen)
            causal = torch.ones((qlen, qlen), dtype=torch.bool, device=q.device).tril()
            o = attention_eager(q[rows].view(n, qlen, H, D).transpose(1, 2),
                                k[rows].view(n, qlen, kvh, D).transpose(1, 2),
                                v[rows].view(n, qlen, kvh, D).transpose(1, 2),
                                causal[None, None], scale, softcap)
            out[rows] = o.transpose(1, 2).reshape(n * qlen, H, D)
            continue
        tables = g.block_tables.long()
        kg = k_cache[tables].flatten(1, 2).transpose(1, 2)                # [N, KVH, L, D]
        vg = v_cache[tables].flatten(1, 2).transpose(1, 2)
        if g.context_lens is not None:   # decode: the one query sits at position context_len - 1
            keys = torch.arange(kg.shape[2], device=q.device)
            ctx = g.context_lens.long()[:, None]
            mask = keys[None] < ctx
            if g.sliding_window:
                mask &= keys[None] > ctx - 1 - g.sliding_window
            rows = g.q_index[:, 0]
            o = attention_eager(q[rows][:, :, None], kg, vg, mask[:, None, None], scale, softcap)
            out[rows] = o[:, :, 0]
            continue
        o = attention_eager(q[g.q_index].transpose(1, 2), kg, vg, g.mask, scale, softcap)
        out[g.out_rows] = o.transpose(1, 2)[g.q_valid]
    return out


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
