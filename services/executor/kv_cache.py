"""Paged KV cache storage: fixed-size blocks and a free-list allocator with prefix caching.

    cache.k[layer], cache.v[layer]: [num_blocks, block_size, kv_heads, head_dim]
    token t of a sequence lives in block block_table[t // block_size], row t % block_size,
    i.e. flat row block_table[t // bs] * bs + t % bs of cache.k[layer].view(-1, kv_heads, head_dim).

Attention over these blocks is computed in model/attention.py.

The unified KV/adapter pool (--unified-kv-adapter-pool, S-LoRA's unified paging): `unified_pool`
allocates one buffer, the adapter page pool's own pages then K then V, and `UnifiedKV` lends whole
free KV blocks to that page pool (each block's K and V slices of every layer are whole pages), so
adapters use the memory sequences are not using. The allocator is thread-safe for that: adapter
loads borrow blocks from their own threads while the scheduler allocates on the engine thread.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import Counter, OrderedDict, deque

import torch


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
        self.lock = threading.RLock()        # the unified pool lends blocks from other threads

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Blocks holding a registered prefix, in use or not."""
        return len(self._hash_of)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def _allocate(self, n: int) -> list[int]:
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

    def _free_blocks(self, blocks: list[int]) -> None:
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

    def _lookup(self, hashes: list[bytes]) -> list[int]:
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

    def _register(self, block: int, h: bytes) -> None:
        """Block `block` (in use, full) now holds the prefix whose hash is h. A prefix already held
        by another block keeps that one; this block is then freed as usual when released."""
        if block not in self._refs:
            raise ValueError(f"block {block} is not allocated")
        if h not in self._by_hash and block not in self._hash_of:
            self._by_hash[h] = block
            self._hash_of[block] = h


    def allocate(self, n: int) -> list[int]:
        """n block ids; raises MemoryError (and allocates nothing) when fewer than n are free."""
        with self.lock:
            return self._allocate(n)

    def free(self, blocks: list[int]) -> None:
        """Release one hold on each block, in a sequence's order (see _free_blocks)."""
        with self.lock:
            self._free_blocks(blocks)

    def lookup(self, hashes: list[bytes]) -> list[int]:
        with self.lock:
            return self._lookup(hashes)

    def register(self, block: int, h: bytes) -> None:
        with self.lock:
            self._register(block, h)


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
    """Per-layer K/V block tensors, zero-initialised (masked padding must never read NaN); with
    `buffer` (unified_pool's), views of it: K then V."""

    def __init__(self, *, layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device,
                 buffer: torch.Tensor | None = None):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (layers, num_blocks, block_size, kv_heads, head_dim)
        if buffer is None:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        else:
            n = layers * num_blocks * block_size * kv_heads * head_dim
            self.k, self.v = buffer[:n].view(shape), buffer[n:2 * n].view(shape)


class UnifiedKV:
    """Lends whole free KV blocks to an adapter page pool (adapters.arena.PageLender).

    The pool's pages are unified_pool's buffer viewed as [num_pages, P]: its own pages first, then
    K [layers, num_blocks, E] and V likewise (E = block_size * kv_heads * head_dim, a multiple of
    P), so block b is 2 * layers * E / P pages. A lent block is allocated in the KV allocator (no
    sequence gets it) until the pool gives it back. Lending keeps `reserve` blocks free for
    sequences (one full-length sequence), so requests waiting with their adapters pinned can never
    hold every block.
    """

    def __init__(self, allocator: KVBlockAllocator, *, layers: int, block_elems: int, page_elems: int,
                 first_page: int, reserve: int):
        self.allocator, self.layers, self.first_page = allocator, layers, first_page
        self.chunk = block_elems // page_elems           # pages per (K or V, layer) slice of a block
        self.pages_per_block = 2 * layers * self.chunk
        self.reserve = reserve
        self.lent: set[int] = set()

    def lend(self, n: int) -> list[int] | None:
        with self.allocator.lock:
            if self.allocator.num_free - n < self.reserve:
                return None
            blocks = self.allocator.allocate(n)
            self.lent.update(blocks)
            return blocks

    def give_back(self, block: int) -> None:
        with self.allocator.lock:
            self.lent.discard(block)
            self.allocator.free([block])

    def block_pages(self, block: int) -> list[int]:
        nb, c = self.allocator.num_blocks, self.chunk
        return [self.first_page + (s * nb + block) * c + j for s in range(2 * self.layers) for j in range(c)]

    def block_of(self, page: int) -> int:
        return (page - self.first_page) // self.chunk % self.allocator.num_blocks

    def max_blocks(self) -> int:
        return max(0, self.allocator.num_blocks - self.reserve)


def unified_pool(allocator: KVBlockAllocator, *, layers: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, page_elems: int,
                 own_pages: int, reserve: int, page_dtype: torch.dtype | None = None,
                 ) -> tuple[UnifiedKV, torch.Tensor, torch.Tensor]:
    """One zeroed buffer for an adapter page pool's `own_pages` and the KV cache -> (the lender,
    the pool's pages [num_pages, P] of page_dtype (default: the KV's dtype; bfloat16 pages over a
    float32 KV cache see each KV element as two page elements), the KV part for KVCache(buffer=...))."""
    page_dtype = page_dtype or dtype
    if dtype.itemsize % page_dtype.itemsize:
        raise ValueError(f"--unified-kv-adapter-pool: {page_dtype} pages cannot share a {dtype} KV cache")
    per = dtype.itemsize // page_dtype.itemsize       # page elements per KV element
    block_elems = block_size * kv_heads * head_dim * per
    if block_elems % page_elems:
        raise ValueError(f"--unified-kv-adapter-pool needs KV blocks of whole adapter pages: "
                         f"block_size * kv_heads * head_dim = {block_elems // per} is not a multiple of the "
                         f"page size {page_elems} (set --arena-page-elems to a divisor)")
    while own_pages * page_elems % per:               # the KV part starts on a whole KV element
        own_pages -= 1
    own = own_pages * page_elems // per
    kv_elems = 2 * layers * allocator.num_blocks * (block_elems // per)
    buf = torch.zeros(own + kv_elems, dtype=dtype, device=device)
    lender = UnifiedKV(allocator, layers=layers, block_elems=block_elems, page_elems=page_elems,
                       first_page=own_pages, reserve=reserve)
    return lender, buf.view(page_dtype).view(-1, page_elems), buf[own:]
