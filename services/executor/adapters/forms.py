"""Adapter forms beyond projection LoRA, held in the arena's pages beside the adapter's LoRA pages.

The arena's (layer, module) tables (ArenaLayout.shapes, seg_meta [G, LM, 2]) go on past the model's
n = layers * 7 projections with virtual modules, so every form is pages like any LoRA: counted at its
true size, evicted with its adapter, kept in the disk tier's packed image and copied to a device
pool by page. A virtual module of shape (0, d) holds `rank` rows of d elements (rows kind: its A
pages only, no B).

    lm              kind   shape             what
    n + p           rows   (0, d_out(p))     DoRA scale of projection p: one row, magnitude / ||W + s B A||_row
    2n + LM_HEAD    lora   (vocab, hidden)   LoRA on lm_head (lora_A [r, hidden], lora_B [vocab, r])
    2n + EMBED      lora   (hidden, vocab)   LoRA on embed_tokens (lora_embedding_A [r, vocab], _B [hidden, r])
    2n + LM_HEAD_FULL  rows (0, hidden)      modules_to_save lm_head: vocab rows
    2n + EMBED_FULL    rows (0, hidden)      modules_to_save embed_tokens: vocab rows
    2n + LM_HEAD_DORA  rows (0, vocab)       DoRA scale of lm_head's LoRA

The DoRA scale is computed once when the adapter is packed, against the served base weights
(`BaseWeights`), exactly as PEFT's DoraLinearLayer computes it (the norm of each output row of
W + scaling * B @ A); serving then scales the segment's rows, base and LoRA parts together:

    y[seg] = bias + scale * (x[seg] @ W.T + scaling * (x[seg] @ A.T) @ B.T)        (PEFT's DoRA output)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from services.common import peft_format
from services.common.errors import AdapterMismatch, InvalidAdapter

MODULES_PER_LAYER = 7
LM_HEAD, EMBED, LM_HEAD_FULL, EMBED_FULL, LM_HEAD_DORA = range(5)
NUM_GLOBAL = 5
_PROJ = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")


def num_projections(layout_or_cfg) -> int:
    layers = getattr(layout_or_cfg, "layers", None)
    if layers is not None:
        return layers * MODULES_PER_LAYER
    return (len(layout_or_cfg.shapes) - NUM_GLOBAL) // 2


def extra_shapes(cfg, proj_shapes: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The virtual modules' (d_out, d_in), appended after the projections' shapes."""
    h, v = cfg.hidden, cfg.vocab
    dora = tuple((0, d_out) for d_out, _ in proj_shapes)
    return dora + ((v, h), (h, v), (0, h), (0, h), (0, v))


def dora_lm(n: int, lm: int) -> int:
    return n + lm


def global_lm(n: int, which: int) -> int:
    return 2 * n + which


# -- reading ----------------------------------------------------------------------------------------

@dataclass
class Extras:
    """An adapter's forms beyond projection LoRA, as read (before packing)."""

    magnitudes: dict[int, Tensor] = field(default_factory=dict)     # projection lm -> [d_out]
    lm_head: tuple[Tensor, Tensor, float] | None = None            # (A [r, hidden], B [vocab, r], s)
    lm_head_magnitude: Tensor | None = None                         # [vocab]
    embed: tuple[Tensor, Tensor, float] | None = None               # (A [r, vocab], B [hidden, r], s)
    full: dict[str, Tensor] = field(default_factory=dict)           # "lm_head" | "embed_tokens" -> copy
    base_copies: dict[str, Tensor] = field(default_factory=dict)    # saved base_layer weights

    @property
    def any(self) -> bool:
        return bool(self.magnitudes or self.lm_head or self.embed or self.full or self.base_copies)


def read_extras(items: list[tuple[peft_format.TensorKey, str, Tensor]], lcfg, cfg, max_rank: int,
                check_finite: bool) -> Extras:
    """The tensors read_adapter does not place as projection LoRA -> Extras (AdapterMismatch for a
    shape this model does not have, InvalidAdapter for a form openlora does not serve)."""
    ex = Extras()
    lora: dict[str, dict[str, Tensor]] = {}
    for key, name, t in items:
        if check_finite and t.is_floating_point() and not torch.isfinite(t).all():
            raise InvalidAdapter(f"tensor {name!r} holds NaN or infinite values")
        whole = (cfg.vocab, cfg.hidden)
        if key.kind == "magnitude":
            if key.path in peft_format.LM_HEAD_PATHS:
                if tuple(t.shape) != (cfg.vocab,):
                    raise AdapterMismatch(f"tensor {name!r}: DoRA magnitude has {list(t.shape)}; "
                                          f"lm_head has {cfg.vocab} outputs")
                ex.lm_head_magnitude = t
                continue
            m = _PROJ.match(key.path)
            if m is None or int(m[1]) >= cfg.layers:
                raise AdapterMismatch(f"tensor {name!r}: module {key.path!r} does not exist in this "
                                      f"{cfg.arch} model")
            lm = int(m[1]) * MODULES_PER_LAYER + _module_index(m[3], name)
            d_out = cfg.module_shape(m[3])[0]
            if tuple(t.shape) != (d_out,):
                raise AdapterMismatch(f"tensor {name!r}: DoRA magnitude has {list(t.shape)}; "
                                      f"{m[3]} has {d_out} outputs")
            ex.magnitudes[lm] = t
        elif key.kind in ("lora", "embedding"):   # lm_head LoRA, embed_tokens LoRA
            lora.setdefault(key.path, {})[key.part] = t
            r = lcfg.rank_for(key.path)
            if r > max_rank:
                raise AdapterMismatch(f"adapter rank {r} ({key.path}) is above this executor's "
                                      f"max_lora_rank {max_rank}")
        elif key.kind == "full":
            target = ("lm_head" if key.path in peft_format.LM_HEAD_PATHS else
                      "embed_tokens" if key.path in peft_format.EMBED_PATHS else None)
            if target is None:
                raise InvalidAdapter(f"tensor {name!r}: modules_to_save of {key.path!r} is not "
                                     "served; openlora serves saved lm_head and embed_tokens")
            if tuple(t.shape) != whole:
                raise AdapterMismatch(f"tensor {name!r} has shape {list(t.shape)}; this model's "
                                      f"{target} is {list(whole)}")
            (ex.base_copies if key.base_copy else ex.full)[target] = t
    for path, ab in lora.items():
        s = lcfg.scaling_for(path)
        if path in peft_format.LM_HEAD_PATHS:
            want = {"A": (ab["A"].shape[0], cfg.hidden), "B": (cfg.vocab, ab["A"].shape[0])}
            ex.lm_head = (ab["A"], ab["B"], s)
        else:
            want = {"A": (ab["A"].shape[0], cfg.vocab), "B": (cfg.hidden, ab["A"].shape[0])}
            ex.embed = (ab["A"], ab["B"], s)
        for part in "AB":
            if tuple(ab[part].shape) != want[part]:
                raise AdapterMismatch(f"{path}: lora_{part} has shape {list(ab[part].shape)}, this "
                                      f"model needs {list(want[part])} (vocab {cfg.vocab}, hidden "
                                      f"{cfg.hidden}); was it trained on another base model?")
    if ex.lm_head_magnitude is not None and ex.lm_head is None:
        raise InvalidAdapter("lm_head has a DoRA magnitude but no lora_A/B")
    return ex


def _module_index(module: str, name: str) -> int:
    from services.executor.model.llama import LORA_MODULES
    if module not in LORA_MODULES:
        raise AdapterMismatch(f"tensor {name!r}: {module!r} is not a projection of this model")
    return LORA_MODULES.index(module)


# -- packing ----------------------------------------------------------------------------------------

class BaseWeights:
    """The served base weights the forms are computed against (the DoRA norms), by arena lm."""

    def __init__(self, model, tag: str = ""):
        self.proj: dict[int, tuple[Tensor, Tensor | None]] = {}
        for layer, module, proj in model.projections():
            from services.executor.model.llama import LORA_MODULES
            lm = layer * MODULES_PER_LAYER + LORA_MODULES.index(module)
            # a quantized base (model/quant.py): the weight it serves, dequantized when a DoRA norm needs it
            self.proj[lm] = (proj.weight if proj.weight is not None else proj.base, proj.bias)
        self.embed = model.model.embed_tokens.weight
        self.lm_head = model._lm_weight()
        self.fingerprint = hashlib.sha256(tag.encode()).hexdigest()[:12]


def dora_scale(weight: Tensor, a: Tensor, b: Tensor, scaling: float, magnitude: Tensor) -> Tensor:
    """magnitude / ||W + scaling * B @ A||_row  [d_out] float32 (PEFT's DoraLinearLayer.get_weight_norm,
    computed in float64 on the host)."""
    if not isinstance(weight, Tensor):   # a quantized base GEMM (model/quant.py)
        weight = weight.dequantize()
    w = weight.detach().to("cpu", torch.float64) + scaling * (b.double() @ a.double())
    return (magnitude.double() / torch.linalg.norm(w, dim=1)).float()


def extra_rows(host, layout, base: BaseWeights | None,
               shapes_only: bool = False) -> dict[int, tuple[Tensor, Tensor | None, float]]:
    """host's Extras as the arena packs them: virtual lm -> (A or rows, B or None, scaling).
    shapes_only: the same shapes without the base weights (saved base copies not counted)."""
    ex: Extras | None = getattr(host, "extras", None)
    if ex is None or not ex.any:
        return {}
    n = num_projections(layout)
    out: dict[int, tuple[Tensor, Tensor | None, float]] = {}
    if shapes_only:
        out.update({dora_lm(n, lm): (m[None], None, 0.0) for lm, m in ex.magnitudes.items()})
        if ex.lm_head_magnitude is not None:
            out[global_lm(n, LM_HEAD_DORA)] = (ex.lm_head_magnitude[None], None, 0.0)
        for which, w in ((LM_HEAD, ex.lm_head), (EMBED, ex.embed),
                         (LM_HEAD_FULL, ex.full.get("lm_head")), (EMBED_FULL, ex.full.get("embed_tokens"))):
            if w is not None:
                out[global_lm(n, which)] = w if isinstance(w, tuple) else (w, None, 0.0)
        return out
    if ex.magnitudes or ex.lm_head_magnitude is not None:
        if base is None:
            raise InvalidAdapter("a DoRA adapter needs the served base weights to be packed")
        from services.executor.model.llama import LORA_MODULES
        for lm, mag in ex.magnitudes.items():
            layer, module = divmod(lm, MODULES_PER_LAYER)
            a, b, s = host.weights[(layer, LORA_MODULES[module])]
            out[dora_lm(n, lm)] = (dora_scale(base.proj[lm][0], a, b, s, mag)[None], None, 0.0)
    if ex.lm_head is not None:
        out[global_lm(n, LM_HEAD)] = ex.lm_head
        if ex.lm_head_magnitude is not None:
            a, b, s = ex.lm_head
            out[global_lm(n, LM_HEAD_DORA)] = (
                dora_scale(base.lm_head, a, b, s, ex.lm_head_magnitude)[None], None, 0.0)
    if ex.embed is not None:
        out[global_lm(n, EMBED)] = ex.embed
    full = dict(ex.full)
    for target, copy in ex.base_copies.items():   # PEFT loads these over the base: serve them if they differ
        if target not in full and base is not None:
            served = base.lm_head if target == "lm_head" else base.embed
            if not torch.equal(copy.to(served.dtype), served):
                full[target] = copy
    if "lm_head" in full:
        out[global_lm(n, LM_HEAD_FULL)] = (full["lm_head"], None, 0.0)
    if "embed_tokens" in full:
        out[global_lm(n, EMBED_FULL)] = (full["embed_tokens"], None, 0.0)
    return out


# -- serving ----------------------------------------------------------------------------------------

@dataclass
class BatchForms:
    """One batch's (arena.batch's) forms: which segments need an epilogue, per module."""

    n: int                                         # projections
    dora: dict[int, Tensor]                        # projection lm -> its DoRA segments [S] long


def batch_forms(layout, seg_meta: Tensor, device: torch.device) -> BatchForms | None:
    """seg_meta [G, LM, 2] (on the host) -> the batch's forms, or None when no segment has any."""
    n = num_projections(layout)
    if seg_meta.shape[0] == 0 or seg_meta.shape[1] <= n:
        return None
    dora_ranks = seg_meta[:, n:2 * n, 1]                                           # [G, n]
    if not bool((dora_ranks > 0).any()):
        return None
    dora = {lm: torch.nonzero(dora_ranks[:, lm] > 0).flatten().to(device)
            for lm in torch.nonzero((dora_ranks > 0).any(0)).flatten().tolist()}
    return BatchForms(n=n, dora=dora)


def gather_rows(paged, segs: Tensor, lm: int, d: int) -> Tensor:
    """Each segment's first row of virtual module lm (a rows kind of width d) -> [S, d]."""
    arena, P = paged.arena, paged.arena.shape[1]
    c = -(-d // P)
    off = paged.seg_meta[segs, lm, 0].long()                                       # [S]
    idx = paged.page_index[(off[:, None] + torch.arange(c, device=off.device)).flatten()].long()
    return arena[idx].view(segs.numel(), c * P)[:, :d]


def row_segments(seg_indptr: Tensor, T: int) -> Tensor:
    """[T] long: the segment of each row (no host sync on a device)."""
    rows = torch.arange(T, dtype=seg_indptr.dtype, device=seg_indptr.device)
    return torch.searchsorted(seg_indptr[1:], rows, right=True).clamp_(max=seg_indptr.numel() - 2)


def dora_epilogue(y: Tensor, bias: Tensor | None, lm: int, paged, seg_indptr: Tensor) -> None:
    """In place, for the rows of each DoRA segment g of projection lm (PEFT's DoRA output; y holds
    the base output and the segment's LoRA delta already):

        y[seg] += (scale_g - 1) * (y[seg] - bias)        scale_g = magnitude / ||W + s B A||_row

    Other rows get + 0 (unchanged)."""
    segs = paged.forms.dora.get(lm)
    if segs is None:
        return
    T, d = y.shape
    factor = torch.zeros((paged.seg_meta.shape[0], d), dtype=torch.float32, device=y.device)
    factor[segs] = gather_rows(paged, segs, paged.forms.n + lm, d).float() - 1     # [G, d_out]
    yf = y.float()
    base = yf if bias is None else yf - bias.float()
    y.copy_(yf.addcmul_(base, factor[row_segments(seg_indptr, T)]))
