"""ModelConfig: one decoder's shape and numerics, read from a Hugging Face config.json (no torch).

    cfg = ModelConfig.from_hf(json.load(open("config.json")))   # ValueError names the supported archs
    cfg.lora_modules                  # the projections LoRA may target, per layer, in arena order
    cfg.module_shape("q_proj")        # (d_out, d_in)
    cfg.module_path(3, "q_proj")      # "model.layers.3.self_attn.q_proj" (PEFT's tensor path)

ARCHS maps each served Hugging Face architecture to its family (one file under model/ each); the
registry reads module shapes from here too, so the two agree on what an adapter must look like.
"""

from __future__ import annotations

from dataclasses import dataclass

# Hugging Face architecture -> family (services/executor/model/<family module>.py)
ARCHS = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3", "Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral",
    "OlmoeForCausalLM": "olmoe",
}
FAMILY_MODULE = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
                 "gemma2": "gemma", "gemma3": "gemma", "phi3": "phi3", "qwen3_moe": "moe",
                 "mixtral": "moe", "olmoe": "moe"}
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
               "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3", "qwen3_moe": "qwen3_moe",
               "mixtral": "mixtral", "olmoe": "olmoe"}

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_MODULES = ATTN_MODULES + MLP_MODULES           # the Llama family's, in arena order
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_tanh", "gelu")   # of the gated MLP's gate
EXPERT_MODULES = ("gate_up_proj", "down_proj")      # PEFT target_parameters of mlp.experts


def expert_module(expert: int, param: str) -> str:
    """The arena's name for one expert's slice of a fused expert parameter."""
    return f"experts.{expert}.{param}"


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
    # the families' extras (defaults: Llama's)
    qk_norm: bool | str = False         # Qwen3, Gemma 3: RMSNorm over each head of q and k;
                                        # "full": over the whole q / k projection (OLMoE)
    clip_qkv: float | None = None       # OLMoE: q, k, v clamped to [-clip, clip]
    norm_offset: bool = False           # Gemma: RMSNorm scales by (1 + weight), in fp32
    embed_scale: float | None = None    # Gemma: embeddings * sqrt(hidden) (in the model's dtype)
    activation: str = "silu"            # "silu" or "gelu_pytorch_tanh" (Gemma's GeGLU)
    sandwich_norm: bool = False         # Gemma: post-attention and pre/post feed-forward norms
    attn_scale: float | None = None     # softmax scale (None: head_dim ** -0.5)
    attn_softcap: float | None = None   # Gemma 2: scores = cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: logits = cap * tanh(logits / cap)
    local_rope_theta: float | None = None   # Gemma 3: the sliding layers' RoPE base
    partial_rotary: float = 1.0         # Phi-4-mini: RoPE on the first head_dim * this dims only
    fused_qkv: bool = False             # Phi-3: qkv_proj [q + 2 kv, hidden], gate_up_proj [2 i, hidden]
    num_experts: int = 0                # MoE (Qwen3-MoE, Mixtral)
    experts_per_token: int = 0
    moe_intermediate: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] = ()   # per layer: sparse MoE block (else a dense MLP)

    def window_of(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    def is_moe(self, layer: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not supported ({', '.join(ACTIVATIONS)})")

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((ARCHS[a] for a in archs if a in ARCHS), None) or MODEL_TYPES.get(cfg.get("model_type"))
        if arch is None:
            raise ValueError(f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                             f"supported: {', '.join(ARCHS)}")
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or None
        if arch == "gemma3":
            return _gemma3(cls, cfg, rope)
        theta = cfg.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
        partial = (rope or {}).get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0
        kind = (rope or {}).get("rope_type") or (rope or {}).get("type") or "default"
        if kind == "default":
            rope = None
        elif kind == "su" or (arch == "phi3" and kind in ("yarn", "longrope")):   # as Phi3Config reads it
            rope = {**rope, "rope_type": "longrope", "original_max_position_embeddings": rope.get(
                "original_max_position_embeddings") or cfg.get("original_max_position_embeddings")}
        window, layer_windows = _sliding_windows(arch, cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        attn_bias = bool(cfg.get("attention_bias", False))
        extra: dict = {"activation": cfg.get("hidden_act") or "silu"}
        if arch in ("qwen3", "qwen3_moe"):
            extra["qk_norm"] = True
        if arch == "gemma2":
            extra.update(_gemma_common(cfg), attn_softcap=cfg.get("attn_logit_softcapping"),
                         final_softcap=cfg.get("final_logit_softcapping"))
        if arch == "phi3":
            extra["fused_qkv"] = True
        if arch in ("qwen3_moe", "mixtral", "olmoe"):
            extra.update(_moe(arch, cfg))
        if arch == "olmoe":
            extra.update(qk_norm="full", clip_qkv=cfg.get("clip_qkv"))
        return cls(
            arch=arch, hidden=hidden, intermediate=cfg.get("intermediate_size") or 0,
            layers=cfg["num_hidden_layers"], heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads, vocab=cfg["vocab_size"],
            rms_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=rope,
            max_positions=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", arch in ("gemma2",))),
            qkv_bias=arch == "qwen2" or attn_bias, o_bias=attn_bias and arch != "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)), sliding_window=window,
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids, layer_windows=layer_windows,
            partial_rotary=float(partial), **extra)

    @property
    def lora_modules(self) -> tuple[str, ...]:
        """Every (layer-local) module LoRA may target, in the arena's order. MoE layers add the
        router ("gate", PEFT's target_parameters mlp.gate.weight) and one entry per expert and fused
        expert parameter (a layer without experts leaves those ranks 0, as a dense MLP's in a MoE
        layer)."""
        if self.fused_qkv:
            return ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
        if self.num_experts:
            return ATTN_MODULES + MLP_MODULES + ("gate",) + tuple(
                expert_module(e, p) for e in range(self.num_experts) for p in EXPERT_MODULES)
        return LORA_MODULES

    def module_path(self, layer: int, module: str) -> str:
        """PEFT's path of a module ("model.layers.3.self_attn.q_proj"; experts: the fused parameter's
        module, "model.layers.3.mlp.experts")."""
        if module.startswith("experts."):
            return f"model.layers.{layer}.mlp.experts"
        if module == "gate":
            return f"model.layers.{layer}.mlp.gate"
        kind = "self_attn" if module in ATTN_MODULES or module == "qkv_proj" else "mlp"
        return f"model.layers.{layer}.{kind}.{module}"

    def has_module(self, layer: int, module: str) -> bool:
        """Whether layer `layer` has this module (MoE layers have experts, dense layers an MLP)."""
        if module not in self.lora_modules or not 0 <= layer < self.layers:
            return False
        if not self.num_experts or module in ATTN_MODULES:
            return True
        return self.is_moe(layer) == (module.startswith("experts.") or module == "gate")

    def module_shape(self, module: str) -> tuple[int, int]:
        """(d_out, d_in) of one projection (of one expert, for experts.E.gate_up_proj / down_proj)."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if module.startswith("experts."):
            m = self.moe_intermediate
            return (2 * m, h) if module.endswith("gate_up_proj") else (h, m)
        if module == "gate":
            return (self.num_experts, h)
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
                "qkv_proj": (q + 2 * kv, h), "gate_up_proj": (2 * i, h)}[module]


def _gemma_common(cfg: dict) -> dict:
    return dict(norm_offset=True, embed_scale=float(cfg["hidden_size"]) ** 0.5, sandwich_norm=True,
                activation=cfg.get("hidden_activation") or "gelu_pytorch_tanh",
                attn_scale=float(cfg.get("query_pre_attn_scalar") or 256) ** -0.5)


def _gemma3(cls, cfg: dict, rope: dict | None) -> ModelConfig:
    """Gemma 3 text: rope_parameters per layer type (full: rope_theta, 1e6 by default, with the
    checkpoint's rope_scaling; sliding: rope_local_base_freq, 1e4 by default)."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full, local = dict(cfg.get("rope_scaling") or {}), {}
    theta = full.pop("rope_theta", None) or cfg.get("rope_theta") or 1_000_000.0
    local_theta = local.get("rope_theta") or cfg.get("rope_local_base_freq") or 10_000.0
    if (local.get("rope_type") or local.get("type") or "default") != "default":
        raise ValueError("Gemma 3's sliding layers use default RoPE; rope_parameters.sliding_attention "
                         f"{local!r} is not supported")
    if (full.get("rope_type") or full.get("type") or "default") == "default":
        full = {}
    window, layer_windows = _sliding_windows("gemma3", cfg)
    eos = cfg.get("eos_token_id")
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    return cls(
        arch="gemma3", hidden=hidden, intermediate=cfg["intermediate_size"],
        layers=cfg["num_hidden_layers"], heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or 256, vocab=cfg["vocab_size"],
        rms_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=full or None,
        max_positions=cfg.get("max_position_embeddings", 131072),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        qkv_bias=bool(cfg.get("attention_bias")), o_bias=bool(cfg.get("attention_bias")), mlp_bias=False,
        sliding_window=window, bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos])),
        layer_windows=layer_windows, qk_norm=True, local_rope_theta=float(local_theta),
        attn_softcap=cfg.get("attn_logit_softcapping"), final_softcap=cfg.get("final_logit_softcapping"),
        **_gemma_common(cfg))


def _moe(arch: str, cfg: dict) -> dict:
    layers = cfg["num_hidden_layers"]
    if arch in ("mixtral", "olmoe"):   # every layer sparse, the experts of intermediate_size
        return dict(num_experts=cfg.get("num_local_experts") or cfg["num_experts"],
                    experts_per_token=cfg["num_experts_per_tok"], moe_intermediate=cfg["intermediate_size"],
                    norm_topk_prob=arch == "mixtral" or bool(cfg.get("norm_topk_prob", False)),
                    moe_layers=(True,) * layers)
    only = set(cfg.get("mlp_only_layers") or [])
    step = cfg.get("decoder_sparse_step") or 1
    n = cfg.get("num_experts") or cfg.get("num_local_experts") or 0   # transformers 5 saves the latter
    return dict(num_experts=n, experts_per_token=cfg["num_experts_per_tok"],
                moe_intermediate=cfg["moe_intermediate_size"],
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                moe_layers=tuple(i not in only and n > 0 and (i + 1) % step == 0 for i in range(layers)))


def _sliding_windows(arch: str, cfg: dict) -> tuple[int | None, tuple[int | None, ...]]:
    """-> (the window of every layer, or None; per-layer windows where they differ, else ()).

    As transformers reads them: Mistral, Mixtral and Phi-3 attend within sliding_window (Mistral:
    4096 when the key is absent; null for none) at every layer; Qwen2/Qwen3(-MoE) only with
    use_sliding_window, and then only at the layers its layer_types mark "sliding_attention" (by
    default those from max_window_layers on); Gemma 2 slides every other layer from the first, Gemma 3
    five of every six (sliding_window_pattern), or as layer_types says.
    """
    if arch in ("mistral", "mixtral", "phi3"):
        window = cfg.get("sliding_window", 4096 if arch == "mistral" else None)
        return (window or None), ()
    layers = cfg["num_hidden_layers"]
    if arch in ("gemma2", "gemma3"):
        window = cfg.get("sliding_window") or 4096
        pattern = 2 if arch == "gemma2" else cfg.get("sliding_window_pattern") or 6
        default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    elif arch in ("qwen2", "qwen3", "qwen3_moe"):
        if not cfg.get("use_sliding_window") or not cfg.get("sliding_window"):
            return None, ()
        window = cfg["sliding_window"]
        default = ["sliding_attention" if i >= cfg.get("max_window_layers", 28) else "full_attention"
                   for i in range(layers)]
    else:
        return None, ()
    types = cfg.get("layer_types") or default
    if len(types) != layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer_types must name full_attention or sliding_attention for each of the "
                         f"{layers} layers, got {types!r}")
    windows = tuple(int(window) if t == "sliding_attention" else None for t in types)
    if len(set(windows)) == 1:
        return windows[0], ()
    return None, windows
