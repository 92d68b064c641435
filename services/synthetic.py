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
