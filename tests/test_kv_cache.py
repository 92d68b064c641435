"""KVBlockAllocator (pure, table-tested) and paged attention against dense causal attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.executor.kv_cache import KVBlockAllocator, auto_num_blocks, block_hash, blocks_needed
from services.executor.model.attention import AttnMetadata, build_group, paged_attention


@pytest.mark.parametrize("ops, free_after", [
    ([("alloc", 3)], 5),
    ([("alloc", 8)], 0),
    ([("alloc", 3), ("free", 0), ("alloc", 8)], 0),
    ([("alloc", 2), ("alloc", 2), ("free", 1), ("free", 0)], 8),
])
def test_allocator_table(ops, free_after):
    a = KVBlockAllocator(8)
    got = []
    for op, arg in ops:
        if op == "alloc":
            got.append(a.allocate(arg))
        else:
            a.free(got[arg])
    assert a.num_free == free_after
    live = [b for i, g in enumerate(got) if ("free", i) not in ops for b in g]
    assert len(set(live)) == len(live) == 8 - free_after


def test_allocator_refuses_without_side_effects():
    a = KVBlockAllocator(4)
    a.allocate(3)
    assert not a.can_allocate(2)
    with pytest.raises(MemoryError):
        a.allocate(2)
    assert a.num_free == 1
    with pytest.raises(ValueError):
        a.free([99])                              # never allocated
    assert a.num_free == 1


@pytest.mark.parametrize("n, bs, want", [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (16, 16, 1)])
def test_blocks_needed(n, bs, want):
    assert blocks_needed(n, bs) == want


def test_auto_num_blocks_fits_at_least_one_full_sequence():
    kw = dict(layers=2, block_size=4, kv_heads=2, head_dim=8, dtype=torch.float32,
              device=torch.device("cpu"), max_batch_size=3, max_model_len=10)
    assert auto_num_blocks(0, **kw) == 3 * 3
    per_block = 2 * 2 * 4 * 2 * 8 * 4
    assert auto_num_blocks(5 * per_block, **kw) == 5


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("window", [None, 3])
def test_paged_attention_matches_dense(kv_heads, window):
    """Two prefills (one continuing a cached context) and two decodes, blocks scattered."""
    torch.manual_seed(0)
    H, D, bs, nb = 4, 8, 4, 32
    kc, vc = torch.zeros(nb, bs, kv_heads, D), torch.zeros(nb, bs, kv_heads, D)
    # (context already cached, new tokens)
    seqs = [(0, 7), (5, 6), (9, 1), (3, 1)]
    alloc = KVBlockAllocator(nb)
    alloc.allocate(5)                                   # so tables are not 0..n
    full_k, full_v, tables = [], [], []
    for cached, new in seqs:
        n = cached + new
        tables.append(alloc.allocate(blocks_needed(n, bs)))
        full_k.append(torch.randn(n, kv_heads, D))
        full_v.append(torch.randn(n, kv_heads, D))
        for p in range(cached):                         # pretend earlier steps wrote these
            kc[tables[-1][p // bs], p % bs] = full_k[-1][p]
            vc[tables[-1][p // bs], p % bs] = full_v[-1][p]
    qs = [torch.randn(new, H, D) for _, new in seqs]
    q = torch.cat(qs)
    k = torch.cat([fk[c:] for fk, (c, _) in zip(full_k, seqs, strict=False)])
    v = torch.cat([fv[c:] for fv, (c, _) in zip(full_v, seqs, strict=False)])
    slot_mapping, starts, row = [], [], 0
    for t, (c, new) in zip(tables, seqs, strict=False):
        slot_mapping += [t[p // bs] * bs + p % bs for p in range(c, c + new)]
        starts.append(row)
        row += new
    pre = [i for i, (_, n) in enumerate(seqs) if n > 1]
    dec = [i for i, (_, n) in enumerate(seqs) if n == 1]
    groups = [build_group([(tables[i], sum(seqs[i]), seqs[i][1]) for i in g], [starts[i] for i in g],
                          bs, window, torch.device("cpu")) for g in (dec, pre)]
    meta = AttnMetadata(torch.tensor(slot_mapping), groups)
    out = paged_attention(q, k, v, kc, vc, meta, D ** -0.5)
    for i, (c, new) in enumerate(seqs):
        n = c + new
        qi = qs[i].transpose(0, 1)[None]                                    # [1, H, new, D]
        ki = full_k[i].repeat_interleave(H // kv_heads, 1).transpose(0, 1)[None]
        vi = full_v[i].repeat_interleave(H // kv_heads, 1).transpose(0, 1)[None]
        qpos, kpos = torch.arange(c, n)[:, None], torch.arange(n)[None]
        mask = kpos <= qpos
        if window:
            mask &= kpos > qpos - window
        want = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask)[0].transpose(0, 1)
        torch.testing.assert_close(out[starts[i]:starts[i] + new], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("window, dense", [(None, True), (8, True), (3, False)])
def test_fresh_prompts_of_one_length_attend_densely(kv_heads, window, dense):
    """Prompts with nothing cached, all of one length, back to back: causal attention on the step's
    own K/V (no gathers, no mask), unless a sliding window shorter than the prompts needs the mask."""
    torch.manual_seed(1)
    H, D, bs, nb, N, Q = 4, 8, 4, 32, 3, 6
    kc, vc = torch.zeros(nb, bs, kv_heads, D), torch.zeros(nb, bs, kv_heads, D)
    alloc = KVBlockAllocator(nb)
    tables = [alloc.allocate(blocks_needed(Q, bs)) for _ in range(N)]
    q, k, v = torch.randn(N * Q, H, D), torch.randn(N * Q, kv_heads, D), torch.randn(N * Q, kv_heads, D)
    slot_mapping = [t[p // bs] * bs + p % bs for t in tables for p in range(Q)]
    group = build_group([(t, Q, Q) for t in tables], [i * Q for i in range(N)], bs, window,
                        torch.device("cpu"))
    assert (group.dense is not None) == dense
    out = paged_attention(q, k, v, kc, vc, AttnMetadata(torch.tensor(slot_mapping), [group]), D ** -0.5)
    pos = torch.arange(Q)
    mask = pos[None] <= pos[:, None]
    if window:
        mask &= pos[None] > pos[:, None] - window
    for i in range(N):
        rows = slice(i * Q, (i + 1) * Q)
        want = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1)[None], k[rows].repeat_interleave(H // kv_heads, 1).transpose(0, 1)[None],
            v[rows].repeat_interleave(H // kv_heads, 1).transpose(0, 1)[None], attn_mask=mask)
        torch.testing.assert_close(out[rows], want[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    # and the K/V went into the cache all the same
    torch.testing.assert_close(kc.view(-1, kv_heads, D)[torch.tensor(slot_mapping)], k)


def test_prefix_index_lookup_refcounts_and_lru_eviction():
    a = KVBlockAllocator(4)
    h = [block_hash(b"", "", [i]) for i in range(3)]
    x, y = a.allocate(2)
    a.register(x, h[0]), a.register(y, h[1])
    assert a.lookup(h) == [x, y]                          # longest registered prefix; h[2] unknown
    a.free([x, y])                                        # the lookup's hold
    assert a.num_free == 2                                # still held by the allocating sequence
    a.free([x, y])
    assert a.num_free == 4 and a.num_cached == 2          # released, but still cached (and free)
    assert a.lookup([h[1]]) == [y]                        # any registered block, not just prefixes
    a.free([y])
    assert a.lookup([h[0], h[1]]) == [x, y]
    a.free([x, y])                                        # y released first: x is the more recent
    fresh = a.allocate(3)                                 # 2 never-cached blocks, then evicts y
    assert set(fresh) == {0, 1, 2, 3} - {x} and a.num_cached == 1
    assert a.lookup([h[0], h[1]]) == [x]
    with pytest.raises(ValueError, match="released 2 times but held 1"):
        a.free([x, x])
    a.free([x])
    a.free(fresh)
    assert a.num_free == 4


def test_a_prefix_registered_twice_keeps_the_first_block():
    a = KVBlockAllocator(2)
    h = block_hash(b"", "k", [1, 2])
    first, second = a.allocate(2)
    a.register(first, h), a.register(second, h)
    a.free([first, second])
    assert a.num_cached == 1 and a.lookup([h]) == [first]


def test_block_hash_depends_on_tokens_parent_and_key():
    base = block_hash(b"", "", [1, 2, 3])
    assert base == block_hash(b"", "", [1, 2, 3])
    assert len({base, block_hash(b"", "", [1, 2, 4]), block_hash(b"x", "", [1, 2, 3]),
                block_hash(b"", "sql@1", [1, 2, 3]), block_hash(b"", "sql@2", [1, 2, 3])}) == 5
