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
from services.common.peft_format import TensorInfo, parse_lora_key
from services.executor.model.config import ModelConfig


@dataclass(frozen=True, slots=True)
class BaseModelShape:
    """What an adapter's tensors must match: layer count and each module's (d_out, d_in)."""

    name: str
    layers: int
    dims: dict[str, tuple[int, int]]

    @classmethod
    def from_dir(cls, path: str | pathlib.Path) -> BaseModelShape:
        """Read DIR/config.json (a served architecture, model/config.py ARCHS); ValueError if it can't."""
        config_path = pathlib.Path(path) / "config.json"
        try:
            cfg = ModelConfig.from_hf(json.loads(config_path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{config_path}: cannot read a model config from it ({exc})") from None
        layers = cfg.layers
        dims = {m: cfg.module_shape(m) for m in cfg.lora_modules if not m.startswith("experts.")}
        return cls(str(path), layers, dims)

    def misfit(self, tensors: dict[str, TensorInfo]) -> str | None:
        """Why these LoRA tensors cannot belong to this model, or None when they fit."""
        for name, info in tensors.items():
            key = parse_lora_key(name)
            if key.layer >= self.layers:
                return f"tensor {name!r} is for layer {key.layer}; it has {self.layers} layers"
            if key.module not in self.dims:
                return f"tensor {name!r} adapts {key.module!r}, which it does not have"
            d_out, d_in = self.dims[key.module]
            if key.part == "A" and info.shape[1] != d_in:
                return f"tensor {name!r} has d_in {info.shape[1]}; {key.module} takes {d_in}"
            if key.part == "B" and info.shape[0] != d_out:
                return f"tensor {name!r} has d_out {info.shape[0]}; {key.module} gives {d_out}"
        return None


def check_fits(models: Sequence[BaseModelShape], adapter_id: str,
               tensors: dict[str, TensorInfo]) -> None:
    """AdapterMismatch (FAILED_PRECONDITION) unless the adapter fits one of `models` (none: no check)."""
    if not models:
        return
    problems = []
    for model in models:
        problem = model.misfit(tensors)
        if problem is None:
            return
        problems.append(f"{model.name}: {problem}")
    raise AdapterMismatch(f"adapter {adapter_id!r} does not fit the base model(s) this registry "
                          f"serves (--base-model): {'; '.join(problems)}")
