"""Load a served model (config.ARCHS) from a Hugging Face directory (or hub id) — safetensors only.

    model, cfg, path = load_model("path/or/org-name", device, dtype, max_len, quantization="int8")

A GPTQ or AWQ checkpoint (quantization_config in config.json, or quantize_config.json) loads its
4-bit projections repacked for the int4 kernels (model/quant_checkpoints.py), whatever quantization says.
"""

from __future__ import annotations

import importlib
import json
import pathlib

import torch
from safetensors import safe_open

from services.executor.model import quant, quant_checkpoints
from services.executor.model.config import FAMILY_MODULE, ModelConfig
from services.executor.model.layers import CausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_dir(name_or_path: str) -> pathlib.Path:
    """A local directory as is; otherwise a hub id, downloaded (config, tokenizer, safetensors)."""
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path.startswith(("/", ".", "~")) or path.exists():
        raise FileNotFoundError(f"base model {name_or_path!r}: no such directory (a model directory "
                                "holds config.json and *.safetensors)")
    from services.common.hub import endpoint_of, import_hub, unreachable
    hub = import_hub()
    endpoint = endpoint_of()
    # without network: the hub's cache at once (or a clear error), not five retries (~25 s) first
    why = unreachable(endpoint)
    try:
        return pathlib.Path(hub.snapshot_download(
            name_or_path, allow_patterns=["*.json", "*.safetensors", "tokenizer*"], endpoint=endpoint,
            local_files_only=why is not None))
    except Exception as exc:
        if why is not None:
            raise FileNotFoundError(f"base model {name_or_path!r} is not a local directory, not in "
                                    f"the Hugging Face cache, and the hub ({endpoint}) cannot be "
                                    f"reached: {why}") from None
        raise FileNotFoundError(f"base model {name_or_path!r} is not a local directory and could "
                                f"not be fetched from the hub: {type(exc).__name__}: {exc}") from None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto -> float32 on CPU, bfloat16 (float16 without bf16 support) on CUDA."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype == "float16" and device.type != "cuda":
        raise ValueError("float16 is supported on CUDA only; use float32 or bfloat16 on CPU")
    return DTYPES[dtype]


def resolve_lora_dtype(lora_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """--lora-dtype against the model's resolved dtype: auto -> the model's; otherwise the model's own,
    or bfloat16 pages under a float32 model (the kernels widen them to fp32 as they read them)."""
    if lora_dtype == "auto" or DTYPES[lora_dtype] == dtype:
        return dtype
    if lora_dtype == "bfloat16" and dtype == torch.float32:
        return torch.bfloat16
    raise ValueError(f"--lora-dtype {lora_dtype} does not go with a {str(dtype).removeprefix('torch.')} model: "
                     f"use auto, the model's dtype, or bfloat16 under float32")


def read_config(path: pathlib.Path) -> tuple[dict, ModelConfig]:
    raw = json.loads((path / "config.json").read_text())
    gen = path / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            raw = {**raw, "eos_token_id": eos}
    return raw, ModelConfig.from_hf(raw)


def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{path} has no model.safetensors (or sharded index); "
                            "only safetensors checkpoints are loaded")


def model_class(cfg: ModelConfig) -> type[CausalLM]:
    """The family's model class (services/executor/model/<family>.py MODELS[arch])."""
    module = importlib.import_module(f"services.executor.model.{FAMILY_MODULE[cfg.arch]}")
    return module.MODELS[cfg.arch]


def load_model(name_or_path: str, device: torch.device, dtype: torch.dtype, max_len: int,
               quantization: str = "none", group_size: int = 128,
               ) -> tuple[CausalLM, ModelConfig, pathlib.Path]:
    path = resolve_model_dir(name_or_path)
    raw, cfg = read_config(path)
    fmt = quant_checkpoints.checkpoint_format(path, raw)   # None, or the GPTQ / AWQ settings
    cls = model_class(cfg)
    with torch.device("meta"):
        model = cls(cfg, max_len)
    state, packed = {}, {}
    load_dtype = torch.float32 if fmt is None and quantization != "none" else dtype
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                if fmt is not None and name.rsplit(".", 1)[-1] in quant_checkpoints.TENSORS:
                    packed[name] = f.get_tensor(name)
                    continue
                # quantized at load: from the checkpoint's float32 (or better), then the rest to dtype
                state[name] = f.get_tensor(name).to(device=device, dtype=load_dtype)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    state = cls.convert_state(cfg, state)
    if fmt is None:
        model.load_state_dict(state, strict=True, assign=True)
        quant.quantize_projections(model, quantization, group_size, dtype)
    else:
        loaded = model.load_state_dict(state, strict=False, assign=True)
        quant_checkpoints.load_projections(model, fmt, packed, loaded, dtype, device)
    model.quantization = fmt.method if fmt is not None else quantization   # reported by GetStatus
    for name in ("rope_cos", "rope_sin", "rope_local_cos", "rope_local_sin"):
        setattr(model, name, getattr(model, name).to(device))
    return model.eval().requires_grad_(False), cfg, path
