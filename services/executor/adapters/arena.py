"""Page pools: adapters at their true rank in fixed-size pages, in the layout the kernel reads.

    layout = ArenaLayout.for_model(model_cfg)              # (layer, module) order, page size P
    arena = HostArena(layout, capacity_bytes, dtype, pin=cuda)
    ids = arena.allocate(arena.pages_needed(host))         # None: not enough free pages (evict first)
    entry = arena.write(ids, host)                         # the kernel may read it in place from now on
    meta = arena.batch([entry, None, entry2])              # one step's page index and segment meta
    arena.free(entry)                                      # only once no step reads it

PagePool is the page memory and its free stack; HostArena (the host tier) adds packing, and
device.DevicePool (the device tier) is filled from the arena by page copies. Both have the same
page size and layout, so a placement in either is the same pages in a different place.

A page is P elements of the model's dtype. One (layer, module) of an adapter of rank r over a
projection [d_out, d_in] takes r * ceil(d_in / P) pages for lora_A (row k: pages k*ca .. k*ca+ca-1)
and r * ceil(d_out / P) pages for lora_B's columns (B^T row k), the last page of each row partly
used. An adapter's pages are any free pages, listed in its own page index; mixed ranks share the pool
with no padding to a maximum rank and no external fragmentation, and placing or freeing an adapter
costs O(its pages). ops.lora_paged_add_ reads each segment's weights through that index.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from services.common.errors import InvalidAdapter
from services.executor.adapters import forms, merge
from services.executor.adapters.reader import HostAdapter
from services.executor.model.config import LORA_MODULES, ModelConfig
from services.executor.ops.memory import host_pages

# What a packed image's pages mean, beyond the layout: 2 = DoRA scales stored less one, in two rows
# (forms.py). An image of another format is fetched and packed again, never read.
PACKED_FORMAT = 2


@dataclass(frozen=True)
class ArenaLayout:
    """Where each (layer, module) sits in the kernel's tables: lm = layer * len(modules) + module
    index (the family's ModelConfig.lora_modules; Llama's 7 by default)."""

    shapes: tuple[tuple[int, int], ...]   # per lm: (d_out, d_in)
    page_elems: int
    modules: tuple[str, ...] = LORA_MODULES

    @classmethod
    def for_model(cls, cfg: ModelConfig, page_elems: int = 0) -> ArenaLayout:
        modules = cfg.lora_modules
        shapes = tuple(cfg.module_shape(m) for _ in range(cfg.layers) for m in modules)
        if page_elems <= 0:
            page_elems = default_page_elems([d for shape in shapes for d in shape])
        # then the adapter forms' virtual modules (DoRA scales, lm_head/embed_tokens): see forms.py
        return cls(shapes + forms.extra_shapes(cfg, shapes), page_elems, modules)

    def lm(self, layer: int, module: str) -> int:
        return layer * len(self.modules) + self.modules.index(module)

    def chunks(self, lm: int) -> tuple[int, int]:
        """(ca, cb): pages per lora_A row and per lora_B column of (layer, module) lm."""
        d_out, d_in = self.shapes[lm]
        p = self.page_elems
        return -(-d_in // p), -(-d_out // p)

    def pages_needed(self, host: HostAdapter) -> int:
        total = 0
        for (layer, module), (a, _, _) in host.weights.items():
            ca, cb = self.chunks(self.lm(layer, module))
            total += a.shape[0] * (ca + cb)
        for lm, (a, _, _) in forms.extra_rows(host, self, None, shapes_only=True).items():
            ca, cb = self.chunks(lm)
            total += a.shape[0] * (ca + cb)
        return total


# Pages shorter than this (2 KiB of fp32) cost the kernel bandwidth: it reads each page as its own
# stream, and the memory system loses speed on short scattered runs (docs/benchmarks.md, session of
# 2026-12-07/08: 64-element pages ran the MoE experts' LoRA op at 0.58x the speed of 512-element ones).
MIN_FAST_PAGE = 512


def default_page_elems(dims: list[int]) -> int:
    """--arena-page-elems 0: S-LoRA's page, a vector: the smallest projection dimension of at least
    MIN_FAST_PAGE elements (k/v's d_out in most models; a row shorter than that, such as an MoE
    router's [experts] output, takes one partly used page), else (a small model) the smallest
    dimension, at least 64 elements."""
    long = [d for d in dims if d >= MIN_FAST_PAGE]
    return min(long) if long else max(min(dims), min(64, max(dims)))


@dataclass(eq=False)
class ArenaEntry:
    """One adapter placed in the arena. uid is unique for the arena's life (batches sort on it)."""

    uid: int
    pages: Tensor       # [n] int32: the adapter's pages in logical order (its page index)
    meta: Tensor        # [LM, 2] int32: (offset into pages, rank); rank 0 = not targeted
    scalings: Tensor    # [LM] float32
    nbytes: int         # bytes of arena it holds (whole pages)
    rank: int           # its largest rank


@dataclass(frozen=True)
class PackedAdapter:
    """An adapter laid out as the arena's pages hold it, ready to copy in (one index_copy_)."""

    rows: Tensor        # [n, P]: its pages in logical order
    meta: Tensor        # [LM, 2] int32
    scalings: Tensor    # [LM] float32
    rank: int


@dataclass(frozen=True)
class PagedBatch:
    """One step's view of the arena for ops.lora_paged_add_ (G segments)."""

    arena: Tensor         # [num_pages, P]
    page_index: Tensor    # [E] int32: the batch's adapters' page indexes, concatenated
    seg_meta: Tensor      # [G, LM, 2] int32
    seg_scalings: Tensor  # [G, LM] float32
    any_lora: bool        # False: every segment is base-only (the op can be skipped)
    forms: forms.BatchForms | None = None   # segments with DoRA, lm_head/embed_tokens forms
    overlays: tuple = ()  # ((seg_meta, seg_scalings), ...): cat segments' further adapters (merge.py)


class PageLender:
    """Whole KV blocks lent to a page pool (kv_cache.UnifiedKV): the unified KV/adapter budget."""

    pages_per_block: int

    def lend(self, n: int) -> list[int] | None: ...          # n free blocks, or None
    def give_back(self, block: int) -> None: ...
    def block_pages(self, block: int) -> list[int]: ...      # its page ids in the pool's pages
    def block_of(self, page: int) -> int: ...
    def max_blocks(self) -> int: ...


class PagePool:
    """Pages [num_pages, P] of one dtype on one device, a free stack, and the kernel's tables.

    The first `num_fixed` pages are the pool's own; with a lender (the unified KV/adapter budget)
    the pool also borrows whole KV blocks when its own pages run out, and gives a block back the
    moment none of its pages is in use. Thread-safe.
    """

    def __init__(self, layout: ArenaLayout, dtype: torch.dtype, pages: Tensor, num_fixed: int,
                 lender: PageLender | None = None):
        self.layout, self.dtype, self.pages = layout, dtype, pages
        self.device = pages.device
        self.page_bytes = layout.page_elems * pages.element_size()
        self.num_fixed = num_fixed
        self._free = list(range(num_fixed - 1, -1, -1))   # a stack: O(1) per page
        self._lender = lender
        self._lent: dict[int, list[int]] = {}              # borrowed block -> its free pages
        self._used = 0
        self._lock = threading.Lock()
        self._uids = itertools.count(1)
        self._lm = len(layout.shapes)
        self._batch_cache: tuple[tuple, PagedBatch] | None = None

    @property
    def num_pages(self) -> int:
        """Pages it holds now (its own and borrowed ones)."""
        return self.num_fixed + len(self._lent) * (self._lender.pages_per_block if self._lender else 0)

    @property
    def max_pages(self) -> int:
        """Most pages it could ever hold (with every KV block borrowed)."""
        lender = self._lender
        return self.num_fixed + (lender.max_blocks() * lender.pages_per_block if lender else 0)

    @property
    def capacity_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def free_pages(self) -> int:
        return self.num_pages - self._used

    @property
    def used_bytes(self) -> int:
        return self._used * self.page_bytes

    @property
    def borrowed_blocks(self) -> int:
        return len(self._lent)

    def holds_borrowed(self, pages: Tensor) -> bool:
        """Does a placement with these page ids sit (partly) in borrowed KV blocks?"""
        return self._lender is not None and bool(pages.numel()) and int(pages.max()) >= self.num_fixed

    def allocate(self, n: int) -> list[int] | None:
        """n free pages, or None when fewer are free (nothing is taken then). Own pages first, then
        the borrowed blocks' (fullest first), then newly borrowed blocks."""
        with self._lock:
            spare = len(self._free) + sum(len(f) for f in self._lent.values())
            if n > spare:
                if self._lender is None:
                    return None
                per = self._lender.pages_per_block
                blocks = self._lender.lend(-(-(n - spare) // per))
                if blocks is None:
                    return None
                for b in blocks:
                    self._lent[b] = list(reversed(self._lender.block_pages(b)))
            take = min(n, len(self._free))
            taken = self._free[len(self._free) - take:][::-1]   # ascending: a fresh pool's pages
            del self._free[len(self._free) - take:]             # for one adapter are contiguous
            for b in sorted(self._lent, key=lambda b: len(self._lent[b])):
                if len(taken) == n:
                    break
                free = self._lent[b]
                k = min(n - len(taken), len(free))
                taken += free[len(free) - k:]
                del free[len(free) - k:]
            self._used += n
            return taken

    def release_pages(self, ids: list[int]) -> None:
        with self._lock:
            self._used -= len(ids)
            for i in ids:
                if i < self.num_fixed:
                    self._free.append(i)
                    continue
                b = self._lender.block_of(i)
                free = self._lent[b]
                free.append(i)
                if len(free) == self._lender.pages_per_block:   # all free: KV may have it back
                    del self._lent[b]
                    self._lender.give_back(b)

    def free(self, entry: ArenaEntry) -> None:
        self.release_pages(entry.pages.tolist())
        entry.pages = entry.pages[:0]

    def place(self, ids: list[int], meta: Tensor, scalings: Tensor, rank: int) -> ArenaEntry:
        """An entry for an adapter whose pages (logical order) are `ids`."""
        return ArenaEntry(uid=next(self._uids), pages=torch.tensor(ids, dtype=torch.int32),
                          meta=meta.clone(), scalings=scalings.clone(),
                          nbytes=len(ids) * self.page_bytes, rank=rank)

    def read_back(self, entry: ArenaEntry, lm: int) -> tuple[Tensor, Tensor]:
        """(lora_A [r, d_in], lora_B [d_out, r]) of one (layer, module), gathered (tests)."""
        off, r = (int(v) for v in entry.meta[lm])
        d_out, d_in = self.layout.shapes[lm]
        ca, cb = self.layout.chunks(lm)
        p = self.layout.page_elems
        idx = entry.pages.to(self.device).long()
        a = self.pages[idx[off:off + r * ca]].reshape(r, ca * p)[:, :d_in]
        bt = self.pages[idx[off + r * ca:off + r * (ca + cb)]].reshape(r, cb * p)[:, :d_out]
        return a, bt.t()

    def batch(self, entries: list[ArenaEntry | None]) -> PagedBatch:
        """The kernel's tables for segments using `entries` in order (None: base only), built once
        per step (the same entries as the last step: the same tables) and moved to the pool's device."""
        key = tuple(e.uid if e is not None else 0 for e in entries)
        cached = self._batch_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        index, offset = [], 0
        seen: dict[int, int] = {}
        zero_meta = torch.zeros((self._lm, 2), dtype=torch.int32)
        zero_scal = torch.zeros(self._lm, dtype=torch.float32)
        G = len(entries)
        passes = []   # pass 0: each segment's adapter; pass k: a cat segment's (k+1)-th (merge.py)
        for entries_k in merge.batch_passes(entries):
            metas, scals = [], []
            for e, weight in entries_k:
                if e is None:
                    metas.append(zero_meta)
                    scals.append(zero_scal)
                    continue
                base = seen.get(e.uid)
                if base is None:
                    base = seen[e.uid] = offset
                    index.append(e.pages)
                    offset += e.pages.numel()
                m = e.meta.clone()
                m[:, 0] += base
                metas.append(m)
                scals.append(e.scalings if weight == 1.0 else e.scalings * weight)
            passes.append((torch.stack(metas) if G else torch.zeros((0, self._lm, 2), dtype=torch.int32),
                           torch.stack(scals) if G else torch.zeros((0, self._lm), dtype=torch.float32)))
        page_index = torch.cat(index) if index else torch.zeros(0, dtype=torch.int32)
        batch_forms = forms.batch_forms(self.layout, passes[0][0], self.device)
        if self.device.type != "cpu":
            page_index = page_index.to(self.device, non_blocking=True)
            passes = [tuple(t.to(self.device, non_blocking=True) for t in p) for p in passes]
        out = PagedBatch(arena=self.pages, page_index=page_index, seg_meta=passes[0][0],
                         seg_scalings=passes[0][1], any_lora=bool(index), forms=batch_forms,
                         overlays=tuple(passes[1:]))
        self._batch_cache = (key, out)
        return out


class HostArena(PagePool):
    """The host tier: pages in host memory (pinned on CUDA), what the CPU kernel reads in place when
    there is no device tier. `pages` (unified pool on CPU): the page view of KVCache's buffer, whose
    first capacity_bytes are the arena's own pages."""

    def __init__(self, layout: ArenaLayout, capacity_bytes: int, dtype: torch.dtype, pin: bool = False,
                 pages: Tensor | None = None, lender: PageLender | None = None):
        elem = torch.empty((), dtype=dtype).element_size()
        num = capacity_bytes // (layout.page_elems * elem)
        if pages is None:
            # uninitialised: a page is written before any kernel reads it, and untouched pages cost
            # no resident memory (a 2 GiB arena of which 100 MiB is used holds 100 MiB); on CPU in
            # huge pages, as the kernel reads scattered pages in place (ops/memory.py)
            if pin and torch.cuda.is_available():
                pages = torch.empty((num, layout.page_elems), dtype=dtype, pin_memory=True)
            else:
                pages = host_pages((num, layout.page_elems), dtype)
        super().__init__(layout, dtype, pages, num, lender)
        self.base: forms.BaseWeights | None = None   # set by the engine: what DoRA norms are taken against

    def pages_needed(self, host: HostAdapter) -> int:
        return self.layout.pages_needed(host)

    def pack(self, host: HostAdapter) -> PackedAdapter:
        """`host` laid out as its pages will hold it (rows [n, P] in logical page order); raises
        InvalidAdapter for NaN or infinite weights."""
        p = self.layout.page_elems
        meta = torch.zeros((self._lm, 2), dtype=torch.int32)
        scalings = torch.zeros(self._lm, dtype=torch.float32)
        items = [(self.layout.lm(layer, module), w) for (layer, module), w in host.weights.items()]
        items += forms.extra_rows(host, self.layout, self.base, page_dtype=self.dtype).items()
        n = sum(a.shape[0] * sum(self.layout.chunks(lm)) for lm, (a, _, _) in items)
        rows = torch.zeros((n, p), dtype=self.dtype)
        offset = 0
        for lm, (a, b, scaling) in sorted(items, key=lambda kv: kv[0]):
            ca, cb = self.layout.chunks(lm)
            r = a.shape[0]
            if r == 0:
                continue
            meta[lm, 0], meta[lm, 1], scalings[lm] = offset, r, scaling
            parts = ((a, ca),) if b is None else ((a, ca), (b.t(), cb))
            for mat, c in parts:                              # lora_A rows, then lora_B^T rows
                n = mat.shape[1]                              # the last page of each row partly used
                rows[offset:offset + r * c].view(r, c * p)[:, :n] = mat
                offset += r * c
        if not torch.isfinite(rows).all():
            raise InvalidAdapter("the adapter's weights hold NaN or infinite values")
        return PackedAdapter(rows=rows, meta=meta, scalings=scalings, rank=host.rank)

    def write(self, ids: list[int], host: HostAdapter | PackedAdapter) -> ArenaEntry:
        """Copy an adapter (packed or not) into pages `ids` (from allocate, exactly its page count)."""
        packed = host if isinstance(host, PackedAdapter) else self.pack(host)
        if packed.rows.shape != (len(ids), self.layout.page_elems) or packed.rows.dtype != self.dtype:
            raise ValueError(f"adapter needs {packed.rows.shape[0]} pages of {self.layout.page_elems} "
                             f"{self.dtype}, {len(ids)} pages were given")
        entry = self.place(ids, packed.meta, packed.scalings, packed.rank)
        if ids:
            self.pages.index_copy_(0, entry.pages.long(), packed.rows)
        return entry

    def pages_of(self, item: HostAdapter | PackedAdapter) -> int:
        return item.rows.shape[0] if isinstance(item, PackedAdapter) else self.pages_needed(item)

    def signature(self) -> str:
        """What a packed image depends on: the packing's format, page size, dtype and the model's
        projection shapes."""
        import hashlib
        return hashlib.sha256(repr((PACKED_FORMAT, self.layout.page_elems, str(self.dtype), self.layout.shapes,
                                    getattr(self.base, "fingerprint", "")))
                              .encode()).hexdigest()[:16]
