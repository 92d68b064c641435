"""Paged KV cache: fixed-size blocks, a free-list allocator, and attention over block tables.

    cache.k[layer], cache.v[layer]: [num_blocks, block_size, kv_heads, head_dim]
    token t of a sequence lives in block block_table[t // block_size], row t % block_size,
    i.e. flat row block_table[t // bs] * bs + t % bs of cache.k[layer].view(-1, kv_heads, head_dim).

The sequences of a step are split into a decode group (one query each) and a prefill group (several
queries each). The decode group runs ops.paged_attention_decode_async (no sync on CUDA), which
reads K/V from the blocks in place; the prefill group gathers its sequences' blocks into a padded
[N, L, kv_heads, head_dim] tensor and runs one masked scaled_dot_product_attention.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from services.executor import ops


class KVBlockAllocator:
    """Block ids 0..num_blocks-1 (pure bookkeeping, no tensors), reference-counted, with an index of
    full blocks by the hash of their contents, for prefix caching.

    A block is free, in use (held by one or more sequences), or cached: no longer held but still
    holding a registered prefix's K/V, so a later sequence with that prefix can take it (`lookup`)
    instead of computing it again. Cached blocks count as free: `allocate` takes never-cached ones
    first, then evicts cached ones, least recently released first.
    """

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs: dict[int, int] = {}                        # in use -> holders
        self._cached: OrderedDict[int, None] = OrderedDict()   # released, hashed; LRU first
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Blocks holding a registered prefix, in use or not."""
        return len(self._hash_of)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """n block ids; raises MemoryError (and allocates nothing) when fewer than n are free."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > self.num_free:
            raise MemoryError(f"{n} KV blocks wanted, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:                                   # evict the least recently released prefix
                b, _ = self._cached.popitem(last=False)
                del self._by_hash[self._hash_of.pop(b)]
            self._refs[b] = 1
            blocks.append(b)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Release one hold on each block. Pass a sequence's blocks in order: its last blocks are
        then the first of them to be evicted, and its prefix the last."""
        for b, n in Counter(blocks).items():
            if self._refs.get(b, 0) < n:
                raise ValueError(f"block {b} is not allocated" if b not in self._refs else
                                 f"block {b} is released {n} times but held {self._refs[b]}")
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                del self._refs[b]
                if b in self._hash_of:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The blocks holding the longest prefix of `hashes` (a sequence's full blocks, in order),
        each now held once more by the caller."""
        found = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            if b in self._cached:
                del self._cached[b]
                self._refs[b] = 1
            else:
                self._refs[b] += 1
            found.append(b)
        return found

    def register(self, block: int, h: bytes) -> None:
        """Block `block` (in use, full) now holds the prefix whose hash is h. A prefix already held
        by another block keeps that one; this block is then freed as usual when released."""
        if block not in self._refs:
            raise ValueError(f"block {block} is not allocated")
        if h not in self._by_hash and block not in self._hash_of:
            self._by_hash[h] = block
            self._hash_of[block] = h


def block_hash(parent: bytes, key: str, tokens: list[int]) -> bytes:
    """The hash of a full block: of its tokens, the hash of the blocks before it (parent, b"" for
    the first) and key, what else the K/V depend on (the adapter and its version)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(key.encode())
    h.update(b"\0")
    h.update(array("q", tokens).tobytes())
    return h.digest()


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def bytes_per_block(layers: int, block_size: int, kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    """K and V of one block across every layer."""
    return 2 * layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def auto_num_blocks(kv_cache_bytes: int, *, layers: int, block_size: int, kv_heads: int,
                    head_dim: int, dtype: torch.dtype, device: torch.device, max_batch_size: int,
                    max_model_len: int) -> int:
    """Blocks for kv_cache_bytes; 0 -> enough for max_batch_size full-length sequences, capped at a
    quarter of host memory on CPU or half the free device memory on CUDA."""
    per_block = bytes_per_block(layers, block_size, kv_heads, head_dim, dtype)
    if kv_cache_bytes > 0:
        return max(1, kv_cache_bytes // per_block)
    want = max_batch_size * blocks_needed(max_model_len, block_size)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cap = free // 2
    else:
        try:
            import os
            cap = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
        except (ValueError, OSError, AttributeError):
            cap = 4 * 1024**3
    return max(blocks_needed(max_model_len, block_size), min(want, cap // per_block))


class KVCache:
    """Per-layer K/V block tensors, zero-initialised (masked padding must never read NaN)."""

    def __init__(self, *, layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (layers, num_blocks, block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)


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
                    meta: AttnMetadata, scale: float, window: int = 0) -> Tensor:
    """Write k/v into the cache, then attend each group over its block tables.

    window: the layer's sliding window (0: none); it selects meta.windowed[window] where present.

    q [T, H, D], k/v [T, KVH, D], k_cache/v_cache [num_blocks, bs, KVH, D] -> out [T, H, D].
    """
    T, H, D = q.shape
    kvh = k.shape[1]
    k_cache.view(-1, kvh, D).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, kvh, D).index_copy_(0, meta.slot_mapping, v)
    groups = meta.windowed.get(window, meta.groups)
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


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
