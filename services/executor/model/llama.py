"""Llama-family decoders (Llama, Mistral, Qwen2) where every projection is a multi-LoRA linear.

    logits = model(batch, kv_cache)      # batch: a step's tokens, flat [T], grouped by adapter

Parameter names match Hugging Face's (model.layers.0.self_attn.q_proj.weight, ...), so a
checkpoint loads with load_state_dict. Each of q/k/v/o/gate/up/down is the base GEMM, then
ops.lora_paged_add_ over the step's segments and page tables for its (layer, module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from services.executor import ops
from services.executor.adapters import forms
from services.executor.kv_cache import KVCache
from services.executor.model.attention import AttnMetadata, paged_attention
from services.executor.model.quant import BaseLinear, Prepacked

if TYPE_CHECKING:
    from services.executor.adapters.arena import PagedBatch

ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_MODULES = ATTN_MODULES + MLP_MODULES


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_positions: int
    tie_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None  # the window of every layer not named in layer_windows' overrides
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    layer_windows: tuple[int | None, ...] = ()  # per layer (None: full attention); () = sliding_window

    def window_of(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((ARCHS[a] for a in archs if a in ARCHS), None) or (
            cfg.get("model_type") if cfg.get("model_type") in ARCHS.values() else None)
        if arch is None:
            raise ValueError(f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                             f"supported: {', '.join(ARCHS)}")
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or None
        theta = cfg.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
        if rope is not None and (rope.get("rope_type") or rope.get("type") or "default") == "default":
            rope = None
        window, layer_windows = _sliding_windows(arch, cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        attn_bias = bool(cfg.get("attention_bias", False))
        return cls(
            arch=arch, hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
            layers=cfg["num_hidden_layers"], heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
            rms_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=rope,
            max_positions=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or attn_bias, o_bias=attn_bias and arch != "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)), sliding_window=window,
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids, layer_windows=layer_windows)

    def module_shape(self, module: str) -> tuple[int, int]:
        """(d_out, d_in) of one projection."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}[module]


def _sliding_windows(arch: str, cfg: dict) -> tuple[int | None, tuple[int | None, ...]]:
    """-> (the window of every layer, or None; per-layer windows where they differ, else ()).

    As transformers reads them: Mistral attends within sliding_window (4096 when the key is absent,
    null for none) at every layer; Qwen2 only with use_sliding_window, and then only at the layers
    its layer_types mark "sliding_attention" (by default those from max_window_layers on).
    """
    if arch == "mistral":
        window = cfg.get("sliding_window", 4096)
        return (window or None), ()
    if arch != "qwen2" or not cfg.get("use_sliding_window") or not cfg.get("sliding_window"):
        return None, ()
    window, layers = int(cfg["sliding_window"]), cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or [
        "sliding_attention" if i >= cfg.get("max_window_layers", 28) else "full_attention"
        for i in range(layers)]
    if len(types) != layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer_types must name full_attention or sliding_attention for each of the "
                         f"{layers} layers, got {types!r}")
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    if len(set(windows)) == 1:
        return windows[0], ()
    return None, windows


def rope_inv_freq(cfg: ModelConfig) -> tuple[Tensor, float]:
    """Hugging Face's inverse frequencies and the factor cos/sin are scaled by: default, linear,
    dynamic (within the trained length), llama3 and yarn."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
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
        return _yarn(cfg, rs)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, dynamic, llama3, yarn)")


def _yarn(cfg: ModelConfig, rs: dict) -> tuple[Tensor, float]:
    """YaRN (arXiv 2309.00071) as transformers computes it: frequencies between the beta_fast and
    beta_slow rotation counts ramp from extrapolated to interpolated; cos/sin scale by
    0.1 * ln(factor) + 1 (or the mscale ratio, or attention_factor where given)."""
    d, base = cfg.head_dim, cfg.rope_theta
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


def rope_tables(cfg: ModelConfig, max_len: int) -> tuple[Tensor, Tensor]:
    """cos, sin [max_len, head_dim] float32, as Hugging Face computes them."""
    inv, scale = rope_inv_freq(cfg)
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


@dataclass
class ForwardBatch:
    """One step's tokens. T = sum of every scheduled sequence's new tokens, sorted by adapter slot."""

    input_ids: Tensor    # [T] long
    positions: Tensor    # [T] long
    attn: AttnMetadata
    seg_indptr: Tensor   # [G+1] int32
    seg_slots: Tensor    # [G] int32
    logits_rows: Tensor  # [N] long: rows whose next-token logits are wanted
    paged: PagedBatch | None = None   # the segments' page tables (None: base model only)


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """-> (norm(h), h) with h = x + residual (or x): the residual add fused into the norm."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps), x
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class LoraProj(nn.Module):
    """y = x @ W.T + b, then each segment's adapter read in place from page memory
    (ops.lora_paged_add_ over the kernel's page pool: the device pool, else the host arena)."""

    def __init__(self, d_in: int, d_out: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.empty(d_out)) if bias else None
        self.packed: Tensor | None = None   # ops.pack_weight(self.weight), see LlamaForCausalLM.prepack
        self.base: BaseLinear | None = None  # the base GEMM when not F.linear: prepacked or quantized (quant.py)
        self.lm = 0                         # (layer, module) index in the page tables

    def forward(self, x: Tensor, batch: ForwardBatch) -> Tensor:
        y = self.base(x) if self.base is not None else torch.nn.functional.linear(x, self.weight, self.bias)
        p = batch.paged
        if p is not None and p.any_lora:
            ops.lora_paged_add_(y, x.contiguous(), p.arena, p.page_index, p.seg_meta, p.seg_scalings,
                                self.lm, batch.seg_indptr)
            if p.forms is not None:   # DoRA: scale its segments' rows (adapters/forms.py)
                forms.dora_epilogue(y, self.bias, self.lm, p, batch.seg_indptr)
        return y


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.window = cfg.window_of(layer) or 0
        self.scale = cfg.head_dim ** -0.5
        self.q_proj = LoraProj(*reversed(cfg.module_shape("q_proj")), cfg.qkv_bias)
        self.k_proj = LoraProj(*reversed(cfg.module_shape("k_proj")), cfg.qkv_bias)
        self.v_proj = LoraProj(*reversed(cfg.module_shape("v_proj")), cfg.qkv_bias)
        self.o_proj = LoraProj(*reversed(cfg.module_shape("o_proj")), cfg.o_bias)

    def forward(self, x, batch, cos, sin, k_cache, v_cache):
        T = x.shape[0]
        q = self.q_proj(x, batch).view(T, self.heads, self.head_dim)
        k = self.k_proj(x, batch).view(T, self.kv_heads, self.head_dim)
        v = self.v_proj(x, batch).view(T, self.kv_heads, self.head_dim)
        q, k = ops.rotary(q, cos, sin), ops.rotary(k, cos, sin)
        o = paged_attention(q, k, v, k_cache, v_cache, batch.attn, self.scale, self.window)
        return self.o_proj(o.reshape(T, -1), batch)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = LoraProj(cfg.hidden, cfg.intermediate, cfg.mlp_bias)
        self.up_proj = LoraProj(cfg.hidden, cfg.intermediate, cfg.mlp_bias)
        self.down_proj = LoraProj(cfg.intermediate, cfg.hidden, cfg.mlp_bias)

    def forward(self, x, batch):
        return self.down_proj(ops.silu_mul(self.gate_proj(x, batch), self.up_proj(x, batch)), batch)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.rms_eps)

    def forward(self, x, residual, batch, cos, sin, k_cache, v_cache):
        """x: the previous layer's output, residual: the stream before it (None for the first layer)
        -> (this layer's MLP output, the stream before it); the stream is x + residual."""
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(
            self.self_attn(h, batch, cos, sin, k_cache, v_cache), residual)
        return self.mlp(h, batch), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # _weight: no random init (the loader assigns the checkpoint's; initialising, even on meta,
        # costs seconds of start-up importing torch._dynamo)
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden,
                                         _weight=torch.empty(cfg.vocab, cfg.hidden))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)


class LMHead(nn.Module):
    """Holds lm_head.weight [vocab, hidden] (as nn.Linear would, without its random init)."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden))


class LlamaForCausalLM(nn.Module):
    """Also serves Mistral (sliding window) and Qwen2 (q/k/v bias): same shapes, same names."""

    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = None if cfg.tie_embeddings else LMHead(cfg.hidden, cfg.vocab)
        with torch.device("cpu"):  # real tables even when built on meta (the loader moves them)
            cos, sin = rope_tables(cfg, max_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_packed: Tensor | None = None

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

    def projections(self):
        """(layer, module name, LoraProj) for every LoRA-targetable projection."""
        for i, layer in enumerate(self.model.layers):
            for name in ATTN_MODULES:
                yield i, name, getattr(layer.self_attn, name)
            for name in MLP_MODULES:
                yield i, name, getattr(layer.mlp, name)

    def forward(self, batch: ForwardBatch, kv: KVCache) -> Tensor:
        """-> next-token logits [N, vocab] float32 for batch.logits_rows."""
        x = self.model.embed_tokens(batch.input_ids)                      # [T, hidden]
        forms_ = None if batch.paged is None else batch.paged.forms       # embed/lm_head adapter forms
        if forms_ is not None:
            x = forms.embed_epilogue(x, batch.input_ids, batch.paged, batch.seg_indptr)
        cos = self.rope_cos[batch.positions].to(x.dtype)                  # [T, D]
        sin = self.rope_sin[batch.positions].to(x.dtype)
        residual = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, batch, cos, sin, kv.k[i], kv.v[i])
        rows = batch.logits_rows
        x, _ = self.model.norm(x[rows], None if residual is None else residual[rows])
        w = self._lm_weight()
        logits = ops.linear_packed(x, w, self.lm_packed) if self.lm_packed is not None else (x @ w.T).float()
        if forms_ is not None:
            logits = forms.lm_head_epilogue(logits, x, rows, batch.paged, batch.seg_indptr)
        return logits


MistralForCausalLM = Qwen2ForCausalLM = LlamaForCausalLM
