"""Small random Llama-family models and PEFT LoRA adapters, written as real files.

Used by `openlora up` (the built-in demo model), tests and benchmarks: no network, no transformers.

    write_model(dir, ModelSpec(arch="llama", hidden=64, layers=2, ...))   # config.json, model.safetensors, tokenizer.json
    write_adapter(dir, spec, AdapterSpec(rank=8, targets=("q_proj", "v_proj")))  # adapter_config.json, adapter_model.safetensors
"""

from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file

ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BOS, EOS = "<|bos|>", "<|eos|>"
# A simple chat template (Jinja, as transformers renders tokenizer_config.json's chat_template)
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                 "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")

_CORPUS = """openlora serves many fine tuned adapters over one shared base model.
The quick brown fox jumps over the lazy dog. Hello world, hello adapters!
Specialised models beat general ones inside their domain; paged attention keeps memory small.
A request names an adapter, the router finds an executor, the executor batches tokens together.
0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' " # $ % & @ ^ _ ` | ~
"""


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "llama"
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 512
    max_positions: int = 512
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_embeddings: bool = False
    # Mistral: every layer attends within the window; Qwen2: the layers from max_window_layers on
    sliding_window: int | None = None
    max_window_layers: int | None = None
    seed: int = 0
    tokenizer: bool = True
    dtype: torch.dtype = torch.float32

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def module_shape(self, module: str) -> tuple[int, int]:
        """(d_out, d_in) of one projection."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                "gate_proj": (self.intermediate, h), "up_proj": (self.intermediate, h),
                "down_proj": (h, self.intermediate)}[module]


@dataclass(frozen=True)
class AdapterSpec:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    use_rslora: bool = False
    layers_to_transform: tuple[int, ...] | None = None
    seed: int = 1
    base_model: str = "openlora/demo-llama"
    extra_config: dict = field(default_factory=dict)


def model_config(spec: ModelSpec) -> dict:
    """A Hugging Face config.json for `spec`."""
    cfg = {
        "architectures": [ARCHS[spec.arch]], "model_type": spec.arch,
        "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "head_dim": spec.head_dim,
        "vocab_size": spec.vocab, "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": 1e-6, "rope_theta": spec.rope_theta, "rope_scaling": spec.rope_scaling,
        "hidden_act": "silu", "tie_word_embeddings": spec.tie_embeddings,
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": str(spec.dtype).removeprefix("torch."),
        "attention_bias": False,
    }
    if spec.arch == "mistral":
        cfg["sliding_window"] = spec.sliding_window
    if spec.arch == "qwen2":
        cfg.update(use_sliding_window=spec.sliding_window is not None, sliding_window=spec.sliding_window,
                   max_window_layers=spec.layers if spec.max_window_layers is None else spec.max_window_layers)
    return cfg


def model_tensors(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Random weights under Hugging Face's names, scaled so logits are well separated."""
    g = torch.Generator().manual_seed(spec.seed)

    def linear(d_out: int, d_in: int) -> torch.Tensor:
        return torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    t = {"model.embed_tokens.weight": torch.randn(spec.vocab, spec.hidden, generator=g)}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(spec.hidden)
        t[p + "post_attention_layernorm.weight"] = norm(spec.hidden)
        for module in ALL_MODULES:
            kind = "self_attn" if module in ALL_MODULES[:4] else "mlp"
            t[f"{p}{kind}.{module}.weight"] = linear(*spec.module_shape(module))
            if spec.arch == "qwen2" and module in ("q_proj", "k_proj", "v_proj"):
                t[f"{p}{kind}.{module}.bias"] = 0.1 * torch.randn(spec.module_shape(module)[0], generator=g)
    t["model.norm.weight"] = norm(spec.hidden)
    if not spec.tie_embeddings:
        t["lm_head.weight"] = linear(spec.vocab, spec.hidden)
    return {k: v.to(spec.dtype).contiguous() for k, v in t.items()}


def write_tokenizer(path: pathlib.Path, vocab: int) -> None:
    """A byte-level BPE tokenizer.json (any text encodes), trained on a small built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast",
         "chat_template": CHAT_TEMPLATE}))


def write_model(path: str | pathlib.Path, spec: ModelSpec = ModelSpec()) -> pathlib.Path:
    """Write a Hugging Face model directory for `spec`; returns the path."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model_config(spec), indent=2))
    save_file(model_tensors(spec), str(path / "model.safetensors"), metadata={"format": "pt"})
    if spec.tokenizer:
        if spec.vocab < 258 + 2:
            raise ValueError("a byte-level tokenizer needs vocab >= 260")
        write_tokenizer(path, spec.vocab)
    return path


def adapter_config(spec: AdapterSpec) -> dict:
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": spec.base_model,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(spec.targets), "use_rslora": spec.use_rslora, "use_dora": False,
        "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": list(spec.layers_to_transform) if spec.layers_to_transform else None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }
    cfg.update(spec.extra_config)
    return cfg


def adapter_tensors(model: ModelSpec, spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """PEFT-named lora_A/lora_B weights with non-zero B (PEFT's default B=0 would be a no-op)."""
    g = torch.Generator().manual_seed(spec.seed)
    layers = spec.layers_to_transform or range(model.layers)
    t = {}
    for i in layers:
        for module in spec.targets:
            kind = "self_attn" if module in ALL_MODULES[:4] else "mlp"
            d_out, d_in = model.module_shape(module)
            p = f"base_model.model.model.layers.{i}.{kind}.{module}."
            t[p + "lora_A.weight"] = torch.randn(spec.rank, d_in, generator=g) / math.sqrt(d_in)
            t[p + "lora_B.weight"] = torch.randn(d_out, spec.rank, generator=g) / math.sqrt(spec.rank)
    return {k: v.to(model.dtype).contiguous() for k, v in t.items()}


def write_adapter(path: str | pathlib.Path, model: ModelSpec, spec: AdapterSpec) -> pathlib.Path:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(adapter_config(spec), indent=2))
    save_file(adapter_tensors(model, spec), str(path / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return path


def copy_model_tensors(spec: ModelSpec, noise: float = 0.0) -> dict[str, torch.Tensor]:
    """Weights set by hand so that greedy decoding copies from the context, as an extraction or
    editing fine-tune quoting its input does: after a token seen before, the model predicts the token
    that followed it there (an induction circuit, two layers):

        layer 0, head 0: attends to the previous position (RoPE's fastest frequencies, query and key
                         from a constant coordinate, the key rotated one position ahead) and writes
                         that token's embedding e(t-1) into a second subspace P;
        layer 1, head 0: query e(t), key P = e(n-1) (RoPE's slowest frequencies: position-blind),
                         so position n after an earlier occurrence of t wins; writes e(token n) into C;
        lm_head:         logits = e(v) . C.

    Embeddings are random unit vectors in A (a dims). Every other head, the MLPs and any layer past
    the second are random, scaled by `noise` (0: zero). Needs kv_heads == heads, head_dim >= 32 and
    a large rope_theta (1e6) so that some frequencies are fast and some slow over max_positions.
    """
    if spec.kv_heads != spec.heads or spec.layers < 2 or spec.tie_embeddings:
        raise ValueError("the copying model needs kv_heads == heads, >= 2 layers, an untied lm_head")
    g = torch.Generator().manual_seed(spec.seed)
    d, dh = spec.hidden, spec.head_dim
    half = dh // 2
    theta = spec.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / dh)   # per pair
    fast = [j for j in range(half) if theta[j] >= 0.04]
    slow = [j for j in range(half) if theta[j] * spec.max_positions <= 0.2]
    slow_dims = slow + [j + half for j in slow]
    a = min(len(slow_dims), (d - 1) // 3)
    if len(fast) < 4 or a < 16:
        raise ValueError(f"rope_theta {spec.rope_theta} and head_dim {dh} leave {len(fast)} fast "
                         f"and {len(slow)} slow frequencies; need >= 4 and >= 8")
    A, P, C, const = torch.arange(a), torch.arange(a, 2 * a), torch.arange(2 * a, 3 * a), 3 * a
    s = math.sqrt(d / 2)                  # |A| = const = s: the embedding's RMS is 1
    t = {k: noise * v for k, v in model_tensors(ModelSpec(**{**spec.__dict__, "dtype": torch.float32})).items()}
    for k in t:
        if k.endswith("layernorm.weight") or k == "model.norm.weight":
            t[k] = torch.ones(d)
    e = torch.randn(spec.vocab, a, generator=g, dtype=torch.float64)
    e /= e.norm(dim=1, keepdim=True)
    emb = torch.zeros(spec.vocab, d, dtype=torch.float64)
    emb[:, A], emb[:, const] = s * e, s
    t["model.embed_tokens.weight"] = emb
    for i in (0, 1):
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"model.layers.{i}.self_attn.{m}.weight"][:dh].zero_() if m != "o_proj" else \
                t[f"model.layers.{i}.self_attn.{m}.weight"][:, :dh].zero_()
        for m in ("gate_proj", "up_proj", "down_proj"):
            t[f"model.layers.{i}.mlp.{m}.weight"].zero_()
    # layer 0: input normalised to itself (RMS 1); score(m, n) = wq^2 / sqrt(dh) * sum cos((n-m+1) theta)
    wq = math.sqrt(40 * math.sqrt(dh) / sum(1 - math.cos(theta[j]) for j in fast))
    p0 = "model.layers.0.self_attn."
    for j in fast:
        t[p0 + "q_proj.weight"][j, const] = wq / s
        t[p0 + "k_proj.weight"][j, const] = wq * math.cos(theta[j]) / s
        t[p0 + "k_proj.weight"][j + half, const] = wq * math.sin(theta[j]) / s
    t[p0 + "v_proj.weight"][torch.arange(a), A] = 1.0
    t[p0 + "o_proj.weight"][P, torch.arange(a)] = 1.0
    # layer 1: the stream is (s e(t), s e(t-1), 0, s): RMS sqrt(3/2)
    r1 = 1 / math.sqrt(1.5)
    beta = math.sqrt(120 * math.sqrt(dh))
    p1 = "model.layers.1.self_attn."
    sd = torch.tensor(slow_dims[:a])
    t[p1 + "q_proj.weight"][sd, A] = beta / (s * r1)
    t[p1 + "k_proj.weight"][sd, P] = beta / (s * r1)
    t[p1 + "v_proj.weight"][torch.arange(a), A] = 1 / r1
    t[p1 + "o_proj.weight"][C, torch.arange(a)] = 1.0
    # final stream (s e(t), s e(t-1), s e(copied), s): RMS sqrt(2); logits 20 e(v) . e(copied)
    lm = torch.zeros(spec.vocab, d, dtype=torch.float64)
    lm[:, C] = 20 * e / (s / math.sqrt(2))
    t["lm_head.weight"] = lm + noise * t["lm_head.weight"]
    return {k: v.to(spec.dtype).contiguous() for k, v in t.items()}


def write_copy_model(path: str | pathlib.Path, spec: ModelSpec, noise: float = 0.0) -> pathlib.Path:
    """write_model with copy_model_tensors' weights (a model whose greedy output quotes its context)."""
    path = write_model(path, spec)
    save_file(copy_model_tensors(spec, noise), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
