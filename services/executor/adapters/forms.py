"""Adapter forms beyond projection LoRA, held in the arena's pages beside the adapter's LoRA pages.

The arena's (layer, module) tables (ArenaLayout.shapes, seg_meta [G, LM, 2]) go on past the model's
n projections with virtual modules, so every form is pages like any LoRA: counted at its true size,
evicted with its adapter, kept in the disk tier's packed image and copied to a device pool by page.
A virtual module of shape (0, d) is a "rows" module: `rank` rows of d elements (A pages only, no B).

    lm                 kind  shape            what
    n + p              rows  (0, d_out(p))    DoRA scale of projection p less one, in two rows (hi, lo): see below
    2n + LM_HEAD       lora  (vocab, hidden)  LoRA on lm_head (lora_A [r, hidden], lora_B [vocab, r])
    2n + EMBED         lora  (hidden, vocab)  LoRA on embed_tokens (lora_embedding_A [r, vocab], _B [hidden, r])
    2n + LM_HEAD_FULL  rows  (0, hidden)      modules_to_save lm_head: its vocab rows
    2n + EMBED_FULL    rows  (0, hidden)      modules_to_save embed_tokens: its vocab rows
    2n + LM_HEAD_DORA  rows  (0, vocab)       DoRA scale of lm_head's LoRA less one, in two rows (hi, lo)
    2n + NORMS + j     rows  (0, hidden)      modules_to_save of a norm: j = 2 layer (input_layernorm),
                                              2 layer + 1 (post_attention_layernorm), 2 layers (model.norm)

The DoRA scale is computed once when the adapter is packed, against the served base weights
(`BaseWeights`), as PEFT's DoraLinearLayer computes it (the norm of each output row of
W + scaling * B @ A as the pages hold A and B, here in float64), and stored as v = scale - 1 in two
rows, hi = v rounded to the pages' dtype and lo = v - hi rounded again; serving reads hi + lo. In
float32 pages lo is 0; in bfloat16 pages (--lora-dtype bfloat16, or a bf16 model) the pair keeps
~16 of v's bits where one row would keep 8. Serving then scales the segment's rows, base and LoRA
parts together (PEFT's DoRA output):

    y[seg] = bias + scale * (x[seg] @ W.T + scaling * (x[seg] @ A.T) @ B.T)

Embeddings and lm_head (PEFT's Embedding and Linear LoRA layers, ModulesToSaveWrapper):

    x[t]      = E[id_t] + s * B @ A[:, id_t]           (embed LoRA)  or  E_saved[id_t]
    logits[t] = h_t @ W.T + s * (h_t @ A.T) @ B.T       (lm_head LoRA, ops.lora_paged_add_)  or  h_t @ W_saved.T

Tied embeddings as PEFT serves them: each of embed_tokens and lm_head is its own module. A saved
norm weight w_g replaces the norm's on its segment's rows: rms_norm(h) * w_g (Llama-style norms).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from services.common import peft_format
from services.common.errors import AdapterMismatch, InvalidAdapter
from services.executor import ops

LM_HEAD, EMBED, LM_HEAD_FULL, EMBED_FULL, LM_HEAD_DORA = range(5)
NORMS = 5                 # the first norm's offset past 2n
_NORM = re.compile(r"^model\.(?:layers\.(\d+)\.(input_layernorm|post_attention_layernorm)|norm)$")
CACHE_ELEMS = 1 << 20     # DoRA factor rows [T, d] kept per module across steps up to this size
_PROJ = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")


@functools.lru_cache(maxsize=8)
def _n(shapes: tuple[tuple[int, int], ...]) -> int:
    return next((i for i, (d_out, _) in enumerate(shapes) if d_out == 0), len(shapes))


def num_projections(layout) -> int:
    """n: the layout's projections (the first DoRA row module ends them)."""
    return _n(layout.shapes)


def extra_shapes(cfg, proj_shapes: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The virtual modules' (d_out, d_in), appended after the projections' shapes."""
    h, v = cfg.hidden, cfg.vocab
    dora = tuple((0, d_out) for d_out, _ in proj_shapes)
    return dora + ((v, h), (h, v), (0, h), (0, h), (0, v)) + ((0, h),) * (2 * cfg.layers + 1)


def norm_index(path: str, layers: int) -> int | None:
    """j of a saved norm's virtual module (see above), or None for a norm openlora does not serve."""
    m = _NORM.match(path)
    if m is None or (m[1] is not None and int(m[1]) >= layers):
        return None
    return 2 * layers if m[1] is None else 2 * int(m[1]) + (m[2] == "post_attention_layernorm")


# -- reading ----------------------------------------------------------------------------------------

@dataclass
class Extras:
    """An adapter's forms beyond projection LoRA, as read (before packing)."""

    magnitudes: dict[tuple[int, str], Tensor] = field(default_factory=dict)   # (layer, module) -> [d_out]
    lm_head: tuple[Tensor, Tensor, float] | None = None            # (A [r, hidden], B [vocab, r], s)
    lm_head_magnitude: Tensor | None = None                         # [vocab]
    embed: tuple[Tensor, Tensor, float] | None = None               # (A [r, vocab], B [hidden, r], s)
    full: dict[str, Tensor] = field(default_factory=dict)           # "lm_head" | "embed_tokens" -> copy
    base_copies: dict[str, Tensor] = field(default_factory=dict)    # saved base_layer weights
    norms: dict[int, Tensor] = field(default_factory=dict)          # saved norm j -> weight [hidden]

    @property
    def any(self) -> bool:
        return bool(self.magnitudes or self.lm_head or self.embed or self.full or self.base_copies
                    or self.norms)


def read_extras(items: list[tuple[peft_format.TensorKey, str, Tensor]], lcfg, cfg, max_rank: int,
                check_finite: bool) -> Extras:
    """The tensors read_adapter does not place as projection LoRA -> Extras (AdapterMismatch for a
    shape this model does not have, InvalidAdapter for a form openlora does not serve)."""
    ex = Extras()
    lora: dict[str, dict[str, Tensor]] = {}
    whole = (cfg.vocab, cfg.hidden)
    for key, name, t in items:
        if check_finite and t.is_floating_point() and not torch.isfinite(t).all():
            raise InvalidAdapter(f"tensor {name!r} holds NaN or infinite values")
        if key.kind == "magnitude" and key.path in peft_format.LM_HEAD_PATHS:
            if tuple(t.shape) != (cfg.vocab,):
                raise AdapterMismatch(f"tensor {name!r}: DoRA magnitude has {list(t.shape)}; "
                                      f"lm_head has {cfg.vocab} outputs")
            ex.lm_head_magnitude = t
        elif key.kind == "magnitude":
            m = _PROJ.match(key.path)
            try:
                d_out = cfg.module_shape(m[3])[0] if m is not None and int(m[1]) < cfg.layers else 0
            except KeyError:
                d_out = 0
            if not d_out:
                raise AdapterMismatch(f"tensor {name!r}: module {key.path!r} does not exist in this "
                                      f"{cfg.arch} model")
            if tuple(t.shape) != (d_out,):
                raise AdapterMismatch(f"tensor {name!r}: DoRA magnitude has {list(t.shape)}; "
                                      f"{m[3]} has {d_out} outputs")
            ex.magnitudes[(int(m[1]), m[3])] = t
        elif key.kind in ("lora", "embedding"):   # lm_head LoRA, embed_tokens LoRA
            lora.setdefault(key.path, {})[key.part] = t
            r = lcfg.rank_for(key.path)
            if r > max_rank:
                raise AdapterMismatch(f"adapter rank {r} ({key.path}) is above this executor's "
                                      f"max_lora_rank {max_rank}")
        elif key.kind == "full" and key.module.endswith("norm"):
            j = None if getattr(cfg, "norm_offset", False) else norm_index(key.path, cfg.layers)
            if j is None:
                raise InvalidAdapter(f"tensor {name!r}: modules_to_save of {key.path!r} is not served "
                                     "on this model (saved norms: Llama-style input_layernorm, "
                                     "post_attention_layernorm and model.norm)")
            if tuple(t.shape) != (cfg.hidden,):
                raise AdapterMismatch(f"tensor {name!r} has shape {list(t.shape)}; this model's "
                                      f"{key.path} is [{cfg.hidden}]")
            ex.norms[j] = t
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
        r = ab["A"].shape[0]
        if path in peft_format.LM_HEAD_PATHS:
            want = {"A": (r, cfg.hidden), "B": (cfg.vocab, r)}
            ex.lm_head = (ab["A"], ab["B"], lcfg.scaling_for(path))
        else:
            want = {"A": (r, cfg.vocab), "B": (cfg.hidden, r)}
            ex.embed = (ab["A"], ab["B"], lcfg.scaling_for(path))
        for part in "AB":
            if tuple(ab[part].shape) != want[part]:
                raise AdapterMismatch(f"{path}: lora_{part} has shape {list(ab[part].shape)}, this "
                                      f"model needs {list(want[part])} (vocab {cfg.vocab}, hidden "
                                      f"{cfg.hidden}); was it trained on another base model?")
    if ex.lm_head_magnitude is not None and ex.lm_head is None:
        raise InvalidAdapter("lm_head has a DoRA magnitude but no lora_A/B")
    return ex


# -- packing ----------------------------------------------------------------------------------------

class BaseWeights:
    """The served base weights the forms are computed against (DoRA norms, saved base copies)."""

    def __init__(self, model, tag: str = ""):
        # a quantized base (model/quant.py): the weight it serves, dequantized when a DoRA norm needs it
        self.proj: dict[tuple[int, str], Tensor] = {
            (layer, module): proj.weight if proj.weight is not None else proj.base
            for layer, module, proj in model.projections()}
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


def extra_rows(host, layout, base: BaseWeights | None, shapes_only: bool = False,
               page_dtype: torch.dtype | None = None) -> dict[int, tuple[Tensor, Tensor | None, float]]:
    """host's Extras as the arena packs them: virtual lm -> (A or rows, B or None, scaling).
    shapes_only: the same shapes without the base weights (saved base copies not counted).
    page_dtype: the pages' dtype; a DoRA scale is taken over A and B as the pages hold them."""
    def served(t: Tensor) -> Tensor:
        return t if page_dtype is None else t.to(page_dtype)

    def split(v: Tensor) -> Tensor:          # [2, d]: hi, lo (v = hi + lo to ~16 bits in bfloat16)
        hi = v.to(page_dtype or v.dtype).float()
        return torch.stack([hi, (v.float() - hi).to(page_dtype or v.dtype).float()])
    ex: Extras | None = getattr(host, "extras", None)
    if ex is None or not ex.any:
        return {}
    n = num_projections(layout)
    out: dict[int, tuple[Tensor, Tensor | None, float]] = {}
    if (ex.magnitudes or ex.lm_head_magnitude is not None) and base is None and not shapes_only:
        raise InvalidAdapter("a DoRA adapter needs the served base weights to be packed")
    for (layer, module), mag in ex.magnitudes.items():
        lm = layout.lm(layer, module)
        if shapes_only:
            out[n + lm] = (mag.expand(2, -1), None, 0.0)
            continue
        a, b, s = host.weights[(layer, module)]
        out[n + lm] = (split(dora_scale(base.proj[(layer, module)], served(a), served(b), s, mag) - 1), None, 0.0)
    if ex.lm_head is not None:
        out[2 * n + LM_HEAD] = ex.lm_head
        if ex.lm_head_magnitude is not None:
            a, b, s = ex.lm_head
            rows = ex.lm_head_magnitude.expand(2, -1) if shapes_only else split(
                dora_scale(base.lm_head, served(a), served(b), s, ex.lm_head_magnitude) - 1)
            out[2 * n + LM_HEAD_DORA] = (rows, None, 0.0)
    if ex.embed is not None:
        out[2 * n + EMBED] = ex.embed
    full = dict(ex.full)
    for target, copy in ex.base_copies.items():   # PEFT loads these over the base: serve them if they differ
        if target not in full and base is not None:
            served = base.lm_head if target == "lm_head" else base.embed
            if not torch.equal(copy.to(served.dtype), served.detach().cpu()):
                full[target] = copy
    for target, which in (("lm_head", LM_HEAD_FULL), ("embed_tokens", EMBED_FULL)):
        if target in full:
            out[2 * n + which] = (full[target], None, 0.0)
    for j, w in ex.norms.items():
        out[2 * n + NORMS + j] = (w[None], None, 0.0)
    return out


# -- serving ----------------------------------------------------------------------------------------

@dataclass
class BatchForms:
    """One batch's (arena.batch's) forms: which segments need an epilogue, per module. Segment lists
    are long tensors on the pool's device; their lengths are known on the host."""

    n: int                                         # projections
    vocab: int
    dora: dict[int, Tensor]                        # projection lm -> its DoRA segments [S]
    lm_head: bool = False                          # a segment has LoRA on lm_head
    lm_head_dora: Tensor | None = None
    lm_head_full: tuple[int, ...] = ()             # segments with a saved lm_head (host ints)
    embed_rank: int = 0                            # largest embed_tokens LoRA rank (0: none)
    embed_full: bool = False
    norms: dict[int, Tensor] = field(default_factory=dict)   # saved norm j -> its segments [S]
    cache: dict = field(default_factory=dict)      # lm -> DoRA factor rows of the current row ranges
    cache_key: object = None
    cache_ip: object = None


def batch_forms(layout, seg_meta: Tensor, device: torch.device) -> BatchForms | None:
    """seg_meta [G, LM, 2] (on the host) -> the batch's forms, or None when no segment has any."""
    n = num_projections(layout)
    if seg_meta.shape[0] == 0 or seg_meta.shape[1] <= n:
        return None
    ranks = seg_meta[:, n:, 1]                                                     # [G, LM - n]
    if not bool((ranks > 0).any()):
        return None

    def segs(lm: int) -> Tensor:
        return torch.nonzero(seg_meta[:, lm, 1] > 0).flatten()

    dora = {lm: segs(n + lm).to(device)
            for lm in torch.nonzero((ranks[:, :n] > 0).any(0)).flatten().tolist()}
    g = 2 * n
    lm_head_dora = segs(g + LM_HEAD_DORA)
    return BatchForms(
        n=n, vocab=layout.shapes[g + EMBED][1], dora=dora, lm_head=bool((seg_meta[:, g + LM_HEAD, 1] > 0).any()),
        lm_head_dora=lm_head_dora.to(device) if lm_head_dora.numel() else None,
        lm_head_full=tuple(segs(g + LM_HEAD_FULL).tolist()),
        embed_rank=int(seg_meta[:, g + EMBED, 1].max()),
        embed_full=bool((seg_meta[:, g + EMBED_FULL, 1] > 0).any()),
        norms={j: segs(g + NORMS + j).to(device)
               for j in torch.nonzero((ranks[:, n + NORMS:] > 0).any(0)).flatten().tolist()})


def gather_rows(paged, segs: Tensor, lm: int, d: int, rows: int = 1) -> Tensor:
    """Each segment's first `rows` rows of virtual module lm (a rows kind of width d) -> [S, rows, d]."""
    arena, P = paged.arena, paged.arena.shape[1]
    c = -(-d // P)
    off = paged.seg_meta[segs, lm, 0].long()                                       # [S]
    idx = paged.page_index[(off[:, None] + torch.arange(rows * c, device=off.device)).flatten()].long()
    return arena[idx].view(segs.numel(), rows, c * P)[:, :, :d]


def row_segments(seg_indptr: Tensor, T: int) -> Tensor:
    """[T] long: the segment of each row (no host sync on a device)."""
    rows = torch.arange(T, dtype=seg_indptr.dtype, device=seg_indptr.device)
    return torch.searchsorted(seg_indptr[1:], rows, right=True).clamp_(max=seg_indptr.numel() - 2)


def _factor_rows(f: BatchForms, paged, segs: Tensor, lm: int, shape: tuple[int, int],
                 seg_indptr: Tensor) -> Tensor:
    """[T, d] float32: scale_g - 1 for each row of a segment g in segs, 0 for the other rows. Cached
    on the batch's forms while its segments' row ranges stay the same (decode steps of one batch)."""
    key = seg_indptr.numpy().tobytes() if seg_indptr.device.type == "cpu" else id(seg_indptr)
    if f.cache_key != key:      # (a device tensor's id: cache_ip keeps it alive, so never reused)
        f.cache.clear()
        f.cache_key, f.cache_ip = key, seg_indptr
    rows = f.cache.get(lm)
    if rows is None:
        T, d = shape
        factor = torch.zeros((paged.seg_meta.shape[0], d), dtype=torch.float32, device=paged.arena.device)
        factor[segs] = gather_rows(paged, segs, lm, d, rows=2).float().sum(1)        # [G, d]: scale - 1
        rows = factor[row_segments(seg_indptr, T)]
        if T * d <= CACHE_ELEMS:     # decode-sized: kept for the next steps; a prefill chunk is not
            f.cache[lm] = rows
    return rows


def _scale_rows(y: Tensor, bias: Tensor | None, factor: Tensor) -> None:
    """y += factor * (y - bias): (scale_g - 1) on a scaled segment's rows, + 0 on the others."""
    if y.dtype == torch.float32:
        y.addcmul_(y if bias is None else y - bias, factor)
        return
    yf = y.float()
    y.copy_(yf.addcmul_(yf if bias is None else yf - bias.float(), factor))


def dora_epilogue(y: Tensor, bias: Tensor | None, lm: int, paged, seg_indptr: Tensor) -> None:
    """In place, for the rows of each DoRA segment g of projection lm (y holds the base output and
    the segment's LoRA delta already): y[seg] += (scale_g - 1) * (y[seg] - bias)."""
    f: BatchForms = paged.forms
    segs = f.dora.get(lm)
    if segs is not None:
        _scale_rows(y, bias, _factor_rows(f, paged, segs, f.n + lm, tuple(y.shape), seg_indptr))


def embed_epilogue(x: Tensor, input_ids: Tensor, paged, seg_indptr: Tensor) -> Tensor:
    """The embeddings [T, hidden] with each segment's embed_tokens form: its saved copy's rows, or
    + s * B @ A[:, id] (PEFT's LoRA Embedding)."""
    f: BatchForms = paged.forms
    if not (f.embed_full or f.embed_rank):
        return x
    arena, index, meta, P = paged.arena, paged.page_index, paged.seg_meta, paged.arena.shape[1]
    T, h = x.shape
    row_seg = row_segments(seg_indptr, T)
    ids = input_ids.long()
    if f.embed_full:
        lm, c = 2 * f.n + EMBED_FULL, -(-h // P)
        off, has = meta[row_seg, lm, 0].long(), meta[row_seg, lm, 1] > 0          # [T]
        first = torch.where(has, off + ids * c, 0)
        saved = arena[index[first[:, None] + torch.arange(c, device=x.device)].long()]
        x = torch.where(has[:, None], saved.view(T, c * P)[:, :h].to(x.dtype), x)
    if f.embed_rank:
        lm, R = 2 * f.n + EMBED, f.embed_rank
        ca, cb = -(-f.vocab // P), -(-h // P)
        off, r = meta[row_seg, lm, 0].long(), meta[row_seg, lm, 1].long()          # [T]
        k = torch.arange(R, device=x.device)
        valid = k[None] < r[:, None]                                               # [T, R]
        a_page = torch.where(valid, off[:, None] + k * ca + (ids // P)[:, None], 0)
        u = arena[index[a_page].long(), (ids % P)[:, None]].float() * valid        # [T, R]: A[k, id]
        b_page = torch.where(valid[:, :, None], (off + r * ca)[:, None, None]
                             + (k * cb)[None, :, None] + torch.arange(cb, device=x.device), 0)
        bt = arena[index[b_page].long()].view(T, R, cb * P)[:, :, :h].float()      # [T, R, h]: B^T
        delta = torch.bmm(u[:, None], bt)[:, 0] * paged.seg_scalings[row_seg, lm][:, None]
        x = (x.float() + delta).to(x.dtype)
    return x


def lm_head_epilogue(logits: Tensor, h: Tensor, logits_rows: Tensor, paged, seg_indptr: Tensor) -> Tensor:
    """logits [N, vocab] (float32) of hidden states h [N, hidden] at logits_rows, with each segment's
    lm_head form: its saved copy (h @ W_saved.T), or LoRA (+ DoRA scale) on lm_head."""
    f: BatchForms = paged.forms
    if not (f.lm_head or f.lm_head_full):
        return logits
    N, vocab = logits.shape
    # segment g's logits rows: lseg[g] .. lseg[g+1]-1 (logits_rows ascending, segments contiguous)
    lseg = torch.searchsorted(logits_rows.to(seg_indptr.dtype), seg_indptr).to(torch.int32)
    row_seg = row_segments(lseg, N)
    for g in f.lm_head_full:
        w = gather_rows(paged, torch.tensor([g], device=h.device), 2 * f.n + LM_HEAD_FULL,
                        h.shape[1], vocab)[0]                                      # [vocab, hidden]
        logits = torch.where((row_seg == g)[:, None], (h @ w.to(h.dtype).T).float(), logits)   # pages may be bf16
    if f.lm_head:
        y = logits if logits.dtype == h.dtype else torch.zeros((N, vocab), dtype=h.dtype, device=h.device)
        ops.lora_paged_add_(y, h.contiguous(), paged.arena, paged.page_index, paged.seg_meta,
                            paged.seg_scalings, 2 * f.n + LM_HEAD, lseg)
        if y is not logits:
            logits = logits + y.float()
        if f.lm_head_dora is not None:
            factor = torch.zeros((paged.seg_meta.shape[0], vocab), dtype=torch.float32, device=h.device)
            factor[f.lm_head_dora] = gather_rows(paged, f.lm_head_dora, 2 * f.n + LM_HEAD_DORA, vocab,
                                                 rows=2).float().sum(1)
            _scale_rows(logits, None, factor[row_seg])
    return logits


def norm_epilogue(normed: Tensor, h: Tensor, j: int, paged, seg_indptr: Tensor, eps: float,
                  rows: Tensor | None = None) -> Tensor:
    """normed [T, hidden] (= norm(h)) with each segment that saved norm j: rms_norm(h) * w_g on its
    rows (PEFT's ModulesToSaveWrapper over the norm). rows: the token rows T holds (logits rows) when
    not every row of the step."""
    segs = paged.forms.norms.get(j)
    if segs is None:
        return normed
    T, d = normed.shape
    ip = seg_indptr if rows is None else torch.searchsorted(rows.to(seg_indptr.dtype), seg_indptr).to(
        seg_indptr.dtype)
    row_seg = row_segments(ip, T)
    G = paged.seg_meta.shape[0]
    table = torch.zeros((G, d), dtype=h.dtype, device=h.device)
    table[segs] = gather_rows(paged, segs, 2 * paged.forms.n + NORMS + j, d)[:, 0].to(h.dtype)
    has = torch.zeros(G, dtype=torch.bool, device=h.device)
    has[segs] = True
    saved = ops.rms_norm(h.contiguous(), torch.ones(d, dtype=h.dtype, device=h.device), eps) * table[row_seg]
    return torch.where(has[row_seg][:, None], saved.to(normed.dtype), normed)
