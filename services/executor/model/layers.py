"""The layers every family shares: norms, the multi-LoRA projection, RoPE, attention, gated MLP.

    proj = LoraProj(d_in, d_out, bias)       # y = x @ W.T + b, then each segment's adapter (paged)
    attn = Attention(cfg, layer)             # q/k/v (or fused qkv), q/k norms, RoPE, paged attention
    model = CausalLM(cfg, max_len, layer_cls)    # embeddings -> layers -> norm -> logits

Families (llama.py, gemma.py, phi3.py, moe.py) choose the decoder layer and the MLP; ModelConfig
(config.py) carries what differs in the numerics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from services.executor import ops
from services.executor.adapters import forms
from services.executor.kv_cache import KVCache
from services.executor.model.attention import AttnMetadata, paged_attention
from services.executor.model.config import ModelConfig
from services.executor.model.quant import BaseLinear, Prepacked

if TYPE_CHECKING:
    from services.executor.adapters.arena import PagedBatch


@dataclass
class ForwardBatch:
    """One step's tokens. T = sum of every scheduled sequence's new tokens, grouped by adapter."""

    input_ids: Tensor    # [T] long
    positions: Tensor    # [T] long
    attn: AttnMetadata
    seg_indptr: Tensor   # [G+1] int32
    logits_rows: Tensor  # [N] long: rows whose next-token logits are wanted
    paged: PagedBatch | None = None   # the segments' page tables (None: base model only)


class RMSNorm(nn.Module):
    """Llama's RMSNorm (weight * norm(x), the norm rounded to x's dtype first) or, with offset,
    Gemma's ((1 + weight) * norm(x), all in fp32, rounded once)."""

    def __init__(self, n: int, eps: float, offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps
        self.offset = offset

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """-> (norm(h), h) with h = x + residual (or x): the residual add fused into the norm."""
        if self.offset:
            h = x if residual is None else x + residual
            if h.dtype == torch.float32:   # the same arithmetic as Gemma's: the kernel's norm, fp32
                return ops.rms_norm(h, self.weight + 1.0, self.eps), h
            hf = h.float()
            y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())
            return y.to(h.dtype), h
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps), x
        return ops.add_rms_norm(x, residual, self.weight, self.eps)

    def norm(self, x: Tensor) -> Tensor:
        return self(x)[0]


class LoraProj(nn.Module):
    """y = x @ W.T + b, then each segment's adapter read in place from page memory
    (ops.lora_paged_add_ over the kernel's page pool: the device pool, else the host arena)."""

    def __init__(self, d_in: int, d_out: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.empty(d_out)) if bias else None
        self.packed: Tensor | None = None   # ops.pack_weight(self.weight), see CausalLM.prepack
        self.base: BaseLinear | None = None  # the base GEMM when not F.linear: prepacked or quantized (quant.py)
        self.lm = 0                         # (layer, module) index in the page tables

    def forward(self, x: Tensor, batch: ForwardBatch) -> Tensor:
        y = self.base(x) if self.base is not None else torch.nn.functional.linear(x, self.weight, self.bias)
        p = batch.paged
        if p is not None and p.any_lora:
            x = x.contiguous()
            ops.lora_paged_add_(y, x, p.arena, p.page_index, p.seg_meta, p.seg_scalings, self.lm,
                                batch.seg_indptr)
            for meta, scalings in p.overlays:   # cat requests' further adapters (adapters/merge.py)
                ops.lora_paged_add_(y, x, p.arena, p.page_index, meta, scalings, self.lm, batch.seg_indptr)
            if p.forms is not None:   # DoRA: scale its segments' rows (adapters/forms.py)
                forms.dora_epilogue(y, self.bias, self.lm, p, batch.seg_indptr)
        return y


# --- RoPE ---------------------------------------------------------------------------------------

def rope_inv_freq(cfg: ModelConfig, theta: float | None = None,
                  scaling: dict | None | bool = True) -> tuple[Tensor, float]:
    """Hugging Face's inverse frequencies and the factor cos/sin are scaled by: default, linear,
    dynamic (within the trained length), llama3 and yarn. theta / scaling default to the config's
    (Gemma 3's sliding layers pass their own base and no scaling)."""
    d = cfg.rotary_dim
    base = cfg.rope_theta if theta is None else theta
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling if scaling is True else scaling
    if not rs:
        return inv, 1.0
    kind = rs.get("rope_type") or rs.get("type")
    if kind == "linear":
        return inv / rs["factor"], 1.0
    if kind == "dynamic":   # identical to default up to max_position_embeddings, our context limit
        return inv, 1.0
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wl < hi_wl) & ~(wl > lo_wl)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(cfg, rs, base)
    raise ValueError(f"rope_scaling type {kind!r} is not supported "
                     "(default, linear, dynamic, llama3, yarn; longrope for Phi-3)")


def _yarn(cfg: ModelConfig, rs: dict, base: float) -> tuple[Tensor, float]:
    """YaRN (arXiv 2309.00071) as transformers computes it: frequencies between the beta_fast and
    beta_slow rotation counts ramp from extrapolated to interpolated; cos/sin scale by
    0.1 * ln(factor) + 1 (or the mscale ratio, or attention_factor where given)."""
    d = cfg.rotary_dim
    old = rs.get("original_max_position_embeddings") or cfg.max_positions
    factor = rs.get("factor") or cfg.max_positions / old

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rs.get("attention_factor")
    if attention is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return d * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.get("beta_fast") or 32), correction_dim(rs.get("beta_slow") or 1)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, d, 2).float() / d)
    extrapolate = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv, float(attention)


def _table(inv: Tensor, scale: float, max_len: int) -> tuple[Tensor, Tensor]:
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def rope_tables(cfg: ModelConfig, max_len: int, theta: float | None = None,
                scaling: dict | None | bool = True) -> tuple[Tensor, Tensor]:
    """cos, sin [max_len, rotary_dim] float32, as Hugging Face computes them.

    LongRoPE (Phi-3): positions below original_max_position_embeddings rotate with short_factor,
    later ones with long_factor (what transformers' cached generation does: a step whose sequence
    is longer than the original context switches to the long factors), both scaled by
    attention_factor (default sqrt(1 + ln(factor) / ln(original))).
    """
    rs = cfg.rope_scaling if scaling is True else scaling
    if rs and (rs.get("rope_type") or rs.get("type")) == "longrope":
        d, base = cfg.rotary_dim, cfg.rope_theta if theta is None else theta
        old = rs["original_max_position_embeddings"]
        factor = rs.get("factor") or cfg.max_positions / old
        attention = rs.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
        shape = torch.arange(0, d, 2, dtype=torch.int64).float() / d
        short = _table(1.0 / (torch.tensor(rs["short_factor"], dtype=torch.float32) * base ** shape),
                       attention, max_len)
        long = _table(1.0 / (torch.tensor(rs["long_factor"], dtype=torch.float32) * base ** shape),
                      attention, max_len)
        return tuple(torch.cat((s[:old], l_[old:])) for s, l_ in zip(short, long, strict=True))
    inv, scale = rope_inv_freq(cfg, theta, scaling)
    return _table(inv, scale, max_len)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on the first cos.shape[-1] dims of each head (all of them unless partial)."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return ops.rotary(x, cos, sin)
    return torch.cat((ops.rotary(x[..., :rd].contiguous(), cos, sin), x[..., rd:]), dim=-1)


# --- attention and MLP --------------------------------------------------------------------------

class Attention(nn.Module):
    """q/k/v projections (or Phi-3's fused qkv_proj), optional per-head q/k RMSNorm (Qwen3,
    Gemma 3), RoPE, paged attention with the layer's window and soft-cap, o_proj."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.window = cfg.window_of(layer) or 0
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
        self.softcap = cfg.attn_softcap
        if cfg.fused_qkv:
            self.qkv_proj = LoraProj(*reversed(cfg.module_shape("qkv_proj")), cfg.qkv_bias)
        else:
            self.q_proj = LoraProj(*reversed(cfg.module_shape("q_proj")), cfg.qkv_bias)
            self.k_proj = LoraProj(*reversed(cfg.module_shape("k_proj")), cfg.qkv_bias)
            self.v_proj = LoraProj(*reversed(cfg.module_shape("v_proj")), cfg.qkv_bias)
        self.o_proj = LoraProj(*reversed(cfg.module_shape("o_proj")), cfg.o_bias)
        self.full_qk_norm, self.clip_qkv = cfg.qk_norm == "full", cfg.clip_qkv
        if self.full_qk_norm:   # OLMoE: over the whole q / k projection
            self.q_norm = RMSNorm(cfg.heads * cfg.head_dim, cfg.rms_eps)
            self.k_norm = RMSNorm(cfg.kv_heads * cfg.head_dim, cfg.rms_eps)
        elif cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_eps, cfg.norm_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, batch, cos, sin, k_cache, v_cache):
        T = x.shape[0]
        if hasattr(self, "qkv_proj"):   # split as the base's output is: [q | k | v]
            q, k, v = self.qkv_proj(x, batch).split(
                [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], -1)
        else:
            q, k, v = self.q_proj(x, batch), self.k_proj(x, batch), self.v_proj(x, batch)
        if self.full_qk_norm:
            q, k = self.q_norm.norm(q), self.k_norm.norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.reshape(T, self.heads, self.head_dim)
        k = k.reshape(T, self.kv_heads, self.head_dim)
        v = v.reshape(T, self.kv_heads, self.head_dim)
        if self.q_norm is not None and not self.full_qk_norm:
            q, k = self.q_norm.norm(q), self.k_norm.norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = paged_attention(q, k, v.contiguous(), k_cache, v_cache, batch.attn, self.scale, self.window,
                            self.softcap)
        return self.o_proj(o.reshape(T, -1), batch)


def gated_act(activation: str, gate: Tensor, up: Tensor) -> Tensor:
    """act(gate) * up: SwiGLU (the fused kernel) or GeGLU (gelu with the tanh approximation)."""
    if activation == "silu":
        return ops.silu_mul(gate, up)
    if activation in ("gelu_pytorch_tanh", "gelu_tanh"):
        return F.gelu(gate, approximate="tanh") * up
    if activation == "gelu":
        return F.gelu(gate) * up
    raise ValueError(f"activation {activation!r} is not supported (silu, gelu_pytorch_tanh, gelu)")


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)); Phi-3 fuses gate and up into gate_up_proj [2 i, hidden]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.activation = cfg.activation
        if cfg.fused_qkv:
            self.gate_up_proj = LoraProj(cfg.hidden, 2 * cfg.intermediate, cfg.mlp_bias)
        else:
            self.gate_proj = LoraProj(cfg.hidden, cfg.intermediate, cfg.mlp_bias)
            self.up_proj = LoraProj(cfg.hidden, cfg.intermediate, cfg.mlp_bias)
        self.down_proj = LoraProj(cfg.intermediate, cfg.hidden, cfg.mlp_bias)

    def forward(self, x, batch):
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x, batch).chunk(2, dim=-1)
            gate, up = gate.contiguous(), up.contiguous()
        else:
            gate, up = self.gate_proj(x, batch), self.up_proj(x, batch)
        return self.down_proj(gated_act(self.activation, gate, up), batch)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer (Llama): h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, cfg: ModelConfig, layer: int, mlp: nn.Module | None = None):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = mlp if mlp is not None else MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps, cfg.norm_offset)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps, cfg.norm_offset)
        self.layer = layer

    def forward(self, x, residual, batch, cos, sin, k_cache, v_cache):
        """x: the previous layer's output, residual: the stream before it (None for the first layer)
        -> (this layer's MLP output, the stream before it); the stream is x + residual."""
        p = batch.paged
        saved = p is not None and p.forms is not None and p.forms.norms   # modules_to_save norms
        h, residual = self.input_layernorm(x, residual)
        if saved:
            h = forms.norm_epilogue(h, residual, 2 * self.layer, p, batch.seg_indptr, self.input_layernorm.eps)
        h, residual = self.post_attention_layernorm(
            self.self_attn(h, batch, cos, sin, k_cache, v_cache), residual)
        if saved:
            h = forms.norm_epilogue(h, residual, 2 * self.layer + 1, p, batch.seg_indptr,
                                    self.post_attention_layernorm.eps)
        return self.mlp(h, batch), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_cls=DecoderLayer):
        super().__init__()
        # _weight: no random init (the loader assigns the checkpoint's; initialising, even on meta,
        # costs seconds of start-up importing torch._dynamo)
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden,
                                         _weight=torch.empty(cfg.vocab, cfg.hidden))
        self.layers = nn.ModuleList(layer_cls(cfg, i) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps, cfg.norm_offset)


class LMHead(nn.Module):
    """Holds lm_head.weight [vocab, hidden] (as nn.Linear would, without its random init)."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden))


class CausalLM(nn.Module):
    """embed (* embed_scale) -> layers -> norm -> lm_head (-> final soft-cap). Parameter names match
    Hugging Face's (model.layers.0.self_attn.q_proj.weight, ...), so a checkpoint loads with
    load_state_dict. Families subclass it with their layer class."""

    layer_cls = DecoderLayer

    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, type(self).layer_cls)
        self.lm_head = None if cfg.tie_embeddings else LMHead(cfg.hidden, cfg.vocab)
        with torch.device("cpu"):  # real tables even when built on meta (the loader moves them)
            cos, sin = rope_tables(cfg, max_len)
            if cfg.local_rope_theta is not None:   # Gemma 3: the sliding layers' own base, unscaled
                lcos, lsin = rope_tables(cfg, max_len, cfg.local_rope_theta, None)
            else:
                lcos, lsin = cos[:0], sin[:0]
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("rope_local_cos", lcos, persistent=False)
        self.register_buffer("rope_local_sin", lsin, persistent=False)
        # per layer: which table it rotates with (local: Gemma 3's sliding layers)
        self.local_rope = [cfg.local_rope_theta is not None and cfg.window_of(i) is not None
                           for i in range(cfg.layers)]
        self.lm_packed: Tensor | None = None

    @classmethod
    def convert_state(cls, cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A checkpoint's tensors under this class's names (MoE: per-expert -> fused)."""
        return state

    def prepack(self) -> int:
        """Packs every projection's weight and the lm_head once for the base matmul (ops.pack_weight:
        float32 CPU with MKL; elsewhere a no-op). Call after the weights are loaded. -> bytes packed."""
        total = 0
        for _, _, proj in self.projections():
            if proj.weight is None:   # quantized (quant.py)
                continue
            proj.packed = ops.pack_weight(proj.weight)
            proj.base = None if proj.packed is None else Prepacked(proj.weight, proj.packed, proj.bias)
            total += 0 if proj.packed is None else proj.packed.numel()
        self.lm_packed = ops.pack_weight(self._lm_weight())
        return total + (0 if self.lm_packed is None else self.lm_packed.numel())

    def _lm_weight(self) -> Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def lora_targets(self):
        """(layer, module name, holder) for every LoRA-targetable module: a LoraProj, or an expert's
        parameter (moe.ExpertLora); the engine sets each one's `lm` from the arena's layout."""
        cfg = self.config
        for i, layer in enumerate(self.model.layers):
            for name in cfg.lora_modules:
                if cfg.has_module(i, name):
                    yield i, name, self._module(layer, name)

    def projections(self):
        """(layer, module name, LoraProj) for every projection (a base weight and its LoRA)."""
        return ((i, name, m) for i, name, m in self.lora_targets() if isinstance(m, LoraProj))

    @staticmethod
    def _module(layer: nn.Module, name: str):
        if name.startswith("experts."):
            _, e, param = name.split(".")
            return layer.mlp.experts.lora[int(e)][param]
        owner = layer.self_attn if hasattr(layer.self_attn, name) else layer.mlp
        return getattr(owner, name)

    def forward(self, batch: ForwardBatch, kv: KVCache) -> Tensor:
        """-> next-token logits [N, vocab] float32 for batch.logits_rows."""
        cfg = self.config
        x = self.model.embed_tokens(batch.input_ids)                      # [T, hidden]
        forms_ = None if batch.paged is None else batch.paged.forms       # embed/lm_head adapter forms
        if forms_ is not None:   # (PEFT adapts the embedding module: before Gemma's scale)
            x = forms.embed_epilogue(x, batch.input_ids, batch.paged, batch.seg_indptr)
        if cfg.embed_scale is not None:   # Gemma: sqrt(hidden), rounded to the model's dtype first
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        cos = self.rope_cos[batch.positions].to(x.dtype)                  # [T, rotary_dim]
        sin = self.rope_sin[batch.positions].to(x.dtype)
        if self.rope_local_cos.numel():
            lcos = self.rope_local_cos[batch.positions].to(x.dtype)
            lsin = self.rope_local_sin[batch.positions].to(x.dtype)
        residual = None
        for i, layer in enumerate(self.model.layers):
            c, s = (lcos, lsin) if self.local_rope[i] else (cos, sin)
            x, residual = layer(x, residual, batch, c, s, kv.k[i], kv.v[i])
        rows = batch.logits_rows
        x, h = self.model.norm(x[rows], None if residual is None else residual[rows])
        if forms_ is not None and forms_.norms:   # a saved model.norm
            x = forms.norm_epilogue(x, h, 2 * cfg.layers, batch.paged, batch.seg_indptr, self.model.norm.eps, rows)
        w = self._lm_weight()
        logits = ops.linear_packed(x, w, self.lm_packed) if self.lm_packed is not None else (x @ w.T).float()
        if forms_ is not None:
            logits = forms.lm_head_epilogue(logits, x, rows, batch.paged, batch.seg_indptr)
        if cfg.final_softcap:
            logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits
