"""Several adapters combined per request (GenerateRequest.merged_adapters), as PEFT's
LoraModel.add_weighted_adapter defines each combination_type:

    spec = MergeSpec.parse(["acme/sql@2", "acme/style"], [0.7, 0.3], "ties", density=0.5)
    req.adapter_id, req.adapter_version = spec.derived_id, 1     # "merged:<sha>", served like any adapter
    source = MergedSource(inner_source, model_cfg, max_rank)      # what Residency reads from
    source.register(spec)                                         # before the request is admitted

cat is served inside the batch with no merged copy (CombiningResidency pins each adapter; the pool's
batch gives pass k of the page tables a cat segment's (k+1)-th adapter, scaled by its weight; LoraProj
adds one ops.lora_paged_add_ per pass). The other types are materialised once into a derived adapter
keyed by its recipe (ids@versions, weights, type, density, sign method, seed), read, packed and cached
through the tiers like any adapter, and evicted like one. Per (layer, module) present in any of them,
with s_i each adapter's scaling:

    cat          A = cat_i(w_i s_i A_i)   B = cat_i(B_i)                      rank: sum of ranks (exact sum)
    linear       A = sum_i sign_i sqrt|w_i s_i| A_i   B = sum_i sqrt|w_i s_i| B_i    equal ranks
    ties, dare_* the same weights through PEFT's ties / dare_linear / dare_ties (density, sign method)
    svd          B A = the best rank-r approximation of sum_i w_i s_i B_i A_i, r = the largest rank

and the derived adapter's scaling is PEFT's: lora_alpha = r (1, or sqrt(r) with the first adapter's
use_rslora). dare's random pruning draws from torch.Generator().manual_seed(seed) in PEFT's order
(modules in model order; per module every adapter's A, then every B), so a seeded PEFT merge gives
the same adapter. Only LoRA on the projections combines: DoRA, embedding / lm_head LoRA and
modules_to_save adapters are refused (INVALID_ARGUMENT naming them).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import Tensor

from services.common import peft_format
from services.common.errors import InvalidArgument
from services.executor.adapters.reader import HostAdapter, read_adapter
from services.executor.adapters.source import UnusableCopy

COMBINATIONS = ("cat", "linear", "ties", "dare_linear", "dare_ties", "svd")
MAX_RECIPES = 4096          # recipes an executor remembers (each request registers its own again)
PREFIX = "merged:"          # not a valid adapter id: a derived id never names a registered adapter


@dataclass(frozen=True)
class MergeSpec:
    ids: tuple[tuple[str, int], ...]        # (adapter id, version; 0: latest)
    weights: tuple[float, ...]
    combination_type: str = "cat"
    density: float = 1.0
    majority_sign_method: str = "total"
    seed: int = 0                           # dare's random pruning

    @classmethod
    def parse(cls, ids, weights=(), combination_type: str = "", density: float = 0.0,
              majority_sign_method: str = "", seed: int = 0) -> MergeSpec:
        """The request's fields, checked (InvalidArgument); each id is ID or ID@VERSION."""
        if not ids:
            raise InvalidArgument("merged_adapters.ids is empty; name at least one adapter")
        parsed = []
        for raw in ids:
            name, _, ver = str(raw).partition("@")
            if not name or (ver and not ver.isdigit()):
                raise InvalidArgument(f"merged_adapters.ids: {raw!r} is not ID or ID@VERSION")
            parsed.append((peft_format.check_adapter_id(name), int(ver or 0)))
        weights = tuple(float(w) for w in weights) or (1.0,) * len(parsed)
        if len(weights) != len(parsed):
            raise InvalidArgument(f"merged_adapters: {len(weights)} weights for {len(parsed)} ids")
        bad = [f"{n}={w}" for (n, _), w in zip(parsed, weights, strict=True) if not math.isfinite(w)]
        if bad:
            raise InvalidArgument(f"merged_adapters.weights must be finite, got {', '.join(bad)}")
        kind = combination_type or "cat"
        if kind not in COMBINATIONS:
            raise InvalidArgument(f"merged_adapters.combination_type {kind!r} is not one of "
                                  f"{', '.join(COMBINATIONS)}")
        density = float(density) or 1.0
        if not 0.0 < density <= 1.0:
            raise InvalidArgument(f"merged_adapters.density must be in (0, 1], got {density}")
        sign = majority_sign_method or "total"
        if sign not in ("total", "frequency"):
            raise InvalidArgument(f"merged_adapters.majority_sign_method {sign!r} is not total or "
                                  "frequency")
        if len(parsed) == 1:       # PEFT: one adapter can only be combined linearly
            kind = "linear"
        return cls(tuple(parsed), weights, kind, density, sign, int(seed))

    @functools.cached_property
    def derived_id(self) -> str:
        recipe = json.dumps([self.ids, self.weights, self.combination_type, self.density,
                             self.majority_sign_method, self.seed])
        return PREFIX + hashlib.sha256(recipe.encode()).hexdigest()[:32]


# -- PEFT's merge_utils, with an explicit generator ---------------------------------------------------

def _prune(t: Tensor, density: float, method: str, g: torch.Generator) -> Tensor:
    if density >= 1:
        return t
    if method == "magnitude":
        mask = torch.zeros_like(t).reshape(-1)
        mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)[1]] = 1
        return t * mask.reshape(t.shape)
    return t * torch.bernoulli(torch.full_like(t, density), generator=g) / density


def _combine(kind: str, tensors: list[Tensor], weights: Tensor, density: float, sign_method: str,
             g: torch.Generator) -> Tensor:
    if kind in ("ties", "dare_linear", "dare_ties"):
        tensors = [_prune(t, density, "magnitude" if kind == "ties" else "random", g) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if kind in ("linear", "dare_linear"):
        return weighted.sum(0)
    sign = stacked.sign()
    magnitude = stacked.sum(0) if sign_method == "total" else sign.sum(0)
    keep = sign == torch.where(magnitude >= 0, 1, -1)
    return (weighted * keep).sum(0) / torch.clamp(keep.sum(0), min=1.0)


def combine(spec: MergeSpec, adapters: list[tuple[HostAdapter, peft_format.LoraConfig]],
            modules: tuple[str, ...]) -> HostAdapter:
    """The derived adapter of `spec` from its adapters (in spec order), as PEFT builds it; modules:
    the model's per-layer module order (PEFT visits modules in model order)."""
    names = [f"{n}@{v}" if v else n for n, v in spec.ids]
    for name, (host, lcfg) in zip(names, adapters, strict=True):
        if host.extras.any or lcfg.use_dora:
            raise InvalidArgument(f"adapter {name!r} is {'DoRA' if lcfg.use_dora else 'not plain LoRA'}"
                                  "; only LoRA on the projections can be combined")
    kind = spec.combination_type
    ranks = [host.rank for host, _ in adapters]
    if kind in ("linear", "ties", "dare_linear", "dare_ties") and len(set(ranks)) > 1:
        raise InvalidArgument(f"combination_type {kind} needs adapters of one rank; "
                              + ", ".join(f"{n} has r={r}" for n, r in zip(names, ranks, strict=True))
                              + " (cat and svd combine different ranks)")
    new_rank = sum(ranks) if kind == "cat" else max(ranks)
    scaling = math.sqrt(new_rank) if adapters[0][1].use_rslora else 1.0
    g = torch.Generator().manual_seed(spec.seed)
    weights: dict[tuple[int, str], tuple[Tensor, Tensor, float]] = {}
    keys = sorted({k for host, _ in adapters for k in host.weights},
                  key=lambda k: (k[0], modules.index(k[1]) if k[1] in modules else len(modules)))
    for key in keys:
        present = [(w, host.weights[key]) for w, (host, _) in zip(spec.weights, adapters, strict=True)
                   if key in host.weights]
        if kind == "cat":
            a = torch.cat([a * (w * s) for w, (a, _, s) in present])
            b = torch.cat([b for _, (_, b, _) in present], dim=1)
        elif kind == "svd":
            delta = sum(w * s * (b.double() @ a.double()) for w, (a, b, s) in present)
            u, sv, vh = torch.linalg.svd(delta, full_matrices=True)
            dtype = present[0][1][0].dtype
            b, a = (u[:, :new_rank] * sv[:new_rank]).to(dtype), vh[:new_rank].to(dtype)
        else:
            ws = [w * s for w, (_, _, s) in present]
            wa = torch.tensor([math.copysign(math.sqrt(abs(x)), x) if x else 0.0 for x in ws])
            wb = torch.tensor([math.sqrt(abs(x)) for x in ws])
            dtype = present[0][1][0].dtype
            a = _combine(kind, [a for _, (a, _, _) in present], wa, spec.density,
                         spec.majority_sign_method, g).to(dtype)
            b = _combine(kind, [b for _, (_, b, _) in present], wb, spec.density,
                         spec.majority_sign_method, g).to(dtype)
        weights[key] = (a.contiguous(), b.contiguous(), scaling)
    return HostAdapter(weights=weights, rank=max(a.shape[0] for a, _, _ in weights.values()))


class MergedSource:
    """An adapter source that also serves derived adapters ("merged:<sha>", version 1), built from
    the inner source's adapters; everything else is the inner source's."""

    def __init__(self, inner, cfg, max_rank: int):
        self.inner, self.cfg, self.max_rank = inner, cfg, max_rank
        self._specs: OrderedDict[str, MergeSpec] = OrderedDict()   # the newest MAX_RECIPES
        self._lock = threading.Lock()
        # a disk tier's hooks, where the inner source has one: derived adapters never go to disk
        # (rebuilt from their adapters' copies, which do)
        if hasattr(inner, "holds"):
            self.holds = lambda a, v: not a.startswith(PREFIX) and inner.holds(a, v)
        if hasattr(inner, "write_back"):
            self.write_back = lambda a, v, *rest: not a.startswith(PREFIX) and inner.write_back(a, v, *rest)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def register(self, spec: MergeSpec) -> str:
        with self._lock:      # (a request registers its recipe again: a forgotten one comes back)
            self._specs[spec.derived_id] = spec
            self._specs.move_to_end(spec.derived_id)
            while len(self._specs) > MAX_RECIPES:
                self._specs.popitem(last=False)
        return spec.derived_id

    def cat_spec(self, adapter_id: str) -> MergeSpec | None:
        """The cat combination a derived id names (served in the batch, not materialised), or None."""
        spec = self._specs.get(adapter_id) if adapter_id.startswith(PREFIX) else None
        return spec if spec is not None and spec.combination_type == "cat" else None

    def derived_of(self, adapter_id: str) -> list[str]:
        """The derived ids built from (any version of) adapter_id."""
        with self._lock:
            return [d for d, s in self._specs.items() if any(n == adapter_id for n, _ in s.ids)]

    def read(self, adapter_id: str, version: int, reader):
        spec = self._specs.get(adapter_id) if adapter_id.startswith(PREFIX) else None
        if spec is None:
            if adapter_id.startswith(PREFIX):
                raise InvalidArgument(f"{adapter_id!r} names no combination this executor was asked for")
            return self.inner.read(adapter_id, version, reader)

        def parts(path):
            if not (path / peft_format.WEIGHTS_FILE).exists():   # a packed image alone: fetch the files
                raise UnusableCopy(f"{path}: the adapter's files are needed to combine it")
            lcfg = peft_format.parse_adapter_config((path / peft_format.CONFIG_FILE).read_bytes())
            return read_adapter(path, self.cfg, self.max_rank), lcfg

        adapters = [self.inner.read(n, v, parts)[1] for n, v in spec.ids]
        return 1, combine(spec, adapters, self.cfg.lora_modules), "merged"     # the arena packs it


# -- cat inside the batch: each adapter's pages read as one more pass over the request's rows ---------

_cat_uids = itertools.count(-2, -1)    # below -1 (the base model's slot), apart from placements' uids


@dataclass(eq=False)
class CatEntry:
    """A cat request's placement: its adapters' own placements, each applied with its weight (the
    pool's batch gives part k of every cat segment to pass k; nothing is copied)."""

    uid: int
    parts: tuple            # the adapters' ArenaEntry placements, in spec order
    weights: tuple[float, ...]


@dataclass(eq=False)
class CatLease:
    """Quacks like residency.Lease for intake and the engine; holds one lease per adapter."""

    key: tuple[str, int]
    leases: tuple
    entry: CatEntry
    load_ms: float = 0.0
    source_tier: str = "host"
    held: object = None

    @property
    def version(self) -> int:
        return 1

    @property
    def slot(self) -> int:
        return self.entry.uid


class CombiningResidency:
    """The engine's Residency, plus cat requests served from their adapters' own placements
    (acquire/release of a cat's derived id pins and unpins each adapter); everything else is the
    residency's."""

    def __init__(self, residency, merged: MergedSource, projections: int):
        self._inner, self.merged, self.projections = residency, merged, projections

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def acquire(self, adapter_id: str, version: int, device: bool = True) -> Future:
        spec = self.merged.cat_spec(adapter_id)
        if spec is None:
            return self._inner.acquire(adapter_id, version, device)
        out: Future = Future()
        futs = [self._inner.acquire(n, v, device) for n, v in spec.ids]
        left, lock = [len(futs)], threading.Lock()

        def one_done(_):
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            leases = [f.result() for f in futs if f.exception() is None]
            error = next((f.exception() for f in futs if f.exception() is not None), None)
            if error is None:
                for (name, _), lease in zip(spec.ids, leases, strict=True):
                    if bool((lease.entry.meta[self.projections:, 1] > 0).any()):
                        error = InvalidArgument(f"adapter {name!r} is not plain LoRA (DoRA, embedding, "
                                                "lm_head or saved modules); only LoRA on the projections "
                                                "can be combined")
                        break
            if error is not None:
                for lease in leases:
                    self._inner.release(lease)
                out.set_exception(error)
                return
            entry = CatEntry(next(_cat_uids), tuple(le.entry for le in leases), spec.weights)
            out.set_result(CatLease((adapter_id, 1), tuple(leases), entry,
                                    max(le.load_ms for le in leases)))

        for f in futs:
            f.add_done_callback(one_done)
        return out

    def release(self, lease) -> None:
        if isinstance(lease, CatLease):
            for part in lease.leases:
                self._inner.release(part)
        else:
            self._inner.release(lease)


def batch_passes(entries: list) -> list[list[tuple[object, float]]]:
    """A step's segment placements -> passes of (placement or None, weight) per segment: pass 0 is
    every segment's own adapter (a cat segment's first), pass k a cat segment's (k+1)-th adapter."""
    depth = max((len(e.parts) for e in entries if isinstance(e, CatEntry)), default=1)
    passes = [[] for _ in range(depth)]
    for e in entries:
        parts = list(zip(e.parts, e.weights, strict=True)) if isinstance(e, CatEntry) else [(e, 1.0)]
        for k in range(depth):
            passes[k].append(parts[k] if k < len(parts) else (None, 1.0))
    return passes
