"""The base models a registry's adapters must fit (`openlora registry --base-model DIR`, repeatable).

Each is read from its config.json: an adapter whose lora_A / lora_B shapes or layers cannot belong
to any of them is refused with FAILED_PRECONDITION at `adapters add`, instead of at the first
generate. No --base-model: no check (a registry shared by executors of unknown models).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.errors import AdapterMismatch
from services.common.peft_format import (
    EMBED_PATHS,
    LM_HEAD_PATHS,
    LoraConfig,
    TensorInfo,
    parameter_target,
    parse_tensor_key,
)
from services.executor.model.config import ModelConfig


@dataclass(frozen=True, slots=True)
class BaseModelShape:
    """What an adapter's tensors must match: layer count and each module's (d_out, d_in)."""

    name: str
    layers: int
    dims: dict[str, tuple[int, int]]
    vocab: int = 0
    hidden: int = 0
    experts: int = 0      # MoE: experts per layer (dims holds "experts.gate_up_proj" per expert)

    @classmethod
    def from_dir(cls, path: str | pathlib.Path) -> BaseModelShape:
        """Read DIR/config.json (a served architecture, model/config.py ARCHS); ValueError if it can't."""
        config_path = pathlib.Path(path) / "config.json"
        try:
            cfg = ModelConfig.from_hf(json.loads(config_path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{config_path}: cannot read a model config from it ({exc})") from None
        dims = {m: cfg.module_shape(m) for m in cfg.lora_modules if not m.startswith("experts.")}
        if cfg.num_experts:
            dims |= {f"experts.{p}": cfg.module_shape(f"experts.0.{p}") for p in ("gate_up_proj", "down_proj")}
        return cls(str(path), cfg.layers, dims, cfg.vocab, cfg.hidden, cfg.num_experts)

    def misfit(self, tensors: dict[str, TensorInfo], config: LoraConfig | None = None) -> str | None:
        """Why these adapter tensors cannot belong to this model, or None when they fit."""
        whole = (self.vocab, self.hidden)
        for name, info in tensors.items():
            key = parse_tensor_key(name)
            layer, module = key.layer, key.module
            param = None if config is None or key.kind != "lora" else parameter_target(config, key.path)
            if param is not None:   # target_parameters: the router's weight, experts stacked
                problem = self._parameter_misfit(name, info, key.part, *param)
                if problem:
                    return problem
                continue
            if layer is not None and layer >= self.layers:
                return f"tensor {name!r} is for layer {layer}; it has {self.layers} layers"
            if key.kind == "embedding":
                want = (None, self.vocab) if key.part == "A" else (self.hidden, None)
                if any(w is not None and w != d for w, d in zip(want, info.shape, strict=False)):
                    return (f"tensor {name!r} has shape {list(info.shape)}; embed_tokens is "
                            f"[vocab={self.vocab}, hidden={self.hidden}]")
                continue
            if key.kind == "full":
                want = whole if key.path in EMBED_PATHS + LM_HEAD_PATHS else (
                    (self.hidden,) if module.endswith("norm") else None)
                if want is not None and tuple(info.shape) != want:
                    return f"tensor {name!r} has shape {list(info.shape)}; {key.path} is {list(want)}"
                continue
            d_out, d_in = whole if key.path in LM_HEAD_PATHS else self.dims.get(module, (0, 0))
            if not d_out:
                return f"tensor {name!r} adapts {module!r}, which it does not have"
            if key.kind == "magnitude":
                if info.shape[0] != d_out:
                    return f"tensor {name!r} has length {info.shape[0]}; {module} gives {d_out}"
                continue
            if key.part == "A" and info.shape[1] != d_in:
                return f"tensor {name!r} has d_in {info.shape[1]}; {module} takes {d_in}"
            if key.part == "B" and info.shape[0] != d_out:
                return f"tensor {name!r} has d_out {info.shape[0]}; {module} gives {d_out}"
        return None

    def _parameter_misfit(self, name: str, info: TensorInfo, part: str, module_path: str,
                          param: str) -> str | None:
        owner = module_path.rsplit(".", 1)[-1]
        key = "gate" if owner == "gate" else f"experts.{param}"
        if key not in self.dims:
            return f"tensor {name!r} adapts {module_path}.{param}, which it does not have"
        d_out, d_in = self.dims[key]
        n = 1 if owner == "gate" else self.experts
        if part == "A" and (info.shape[1] != d_in or info.shape[0] % n):
            return (f"tensor {name!r} has shape {list(info.shape)}; {module_path}.{param} takes d_in "
                    f"{d_in} with r * {n} stacked rows")
        if part == "B" and (info.shape[0] != d_out or info.shape[1] % n):
            return (f"tensor {name!r} has shape {list(info.shape)}; {module_path}.{param} gives d_out "
                    f"{d_out} with r * {n} stacked columns")
        return None


def check_fits(models: Sequence[BaseModelShape], adapter_id: str,
               tensors: dict[str, TensorInfo], config: LoraConfig | None = None) -> None:
    """AdapterMismatch (FAILED_PRECONDITION) unless the adapter fits one of `models` (none: no check)."""
    if not models:
        return
    problems = []
    for model in models:
        problem = model.misfit(tensors, config)
        if problem is None:
            return
        problems.append(f"{model.name}: {problem}")
    raise AdapterMismatch(f"adapter {adapter_id!r} does not fit the base model(s) this registry "
                          f"serves (--base-model): {'; '.join(problems)}")
