"""Parsing a PEFT adapter directory into validated host tensors (no placement, no residency).

    host = read_adapter(path, model_cfg, max_rank)   # HostAdapter: (layer, module) -> (A, B, scaling)

Malformed files -> InvalidAdapter; a module, layer or shape this model does not have, or a rank above
max_rank -> AdapterMismatch.
"""

from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass, field

import torch
from safetensors.torch import load, load_file
from torch import Tensor

from services.common import peft_format
from services.common.errors import AdapterMismatch, InvalidAdapter
from services.executor.adapters.forms import Extras, read_extras
from services.executor.model.config import ModelConfig, expert_module

_PATH = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")


@dataclass
class HostAdapter:
    """An adapter read from disk: (layer, module) -> (A [r, d_in], B [d_out, r], scaling)."""

    weights: dict[tuple[int, str], tuple[Tensor, Tensor, float]]
    rank: int
    extras: Extras = field(default_factory=Extras)   # DoRA, lm_head/embed_tokens LoRA, saved modules

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b, _ in self.weights.values())


def read_adapter(path: pathlib.Path, cfg: ModelConfig, max_rank: int,
                 check_finite: bool = True) -> HostAdapter:
    """Read and check a PEFT adapter directory against this model.

    Malformed files -> InvalidAdapter; a module, layer or shape this model does not have, or a rank
    above max_rank -> AdapterMismatch.
    """
    path = pathlib.Path(path)
    config_file, weights_file = path / peft_format.CONFIG_FILE, path / peft_format.WEIGHTS_FILE
    for f in (config_file, weights_file):
        if not f.is_file():
            raise InvalidAdapter(f"adapter directory {path} has no {f.name}")
    lcfg = peft_format.parse_adapter_config(config_file.read_bytes())
    with open(weights_file, "rb") as fh:
        infos, size = peft_format.read_safetensors_header(fh)
    if size != weights_file.stat().st_size:
        raise InvalidAdapter(f"{weights_file.name} is {weights_file.stat().st_size} bytes, its header "
                             f"says {size}")
    projections = [m for m in cfg.lora_modules if not m.startswith("experts.")]
    if not isinstance(lcfg.target_modules, str):
        # PEFT matches a name or a dotted suffix ("all-linear" is saved as full module paths)
        unknown = sorted(t for t in lcfg.target_modules
                         if t.rsplit(".", 1)[-1] not in (*projections, "embed_tokens", "lm_head"))
        if unknown:
            raise AdapterMismatch(f"adapter targets {unknown}, which this {cfg.arch} model does not "
                                  f"have (its projections: {', '.join(projections)})")
    peft_format.validate_adapter(lcfg, infos)
    try:
        tensors = _load_tensors(weights_file)
    except Exception as exc:
        raise InvalidAdapter(f"{weights_file.name} cannot be read: {exc}") from None
    parts: dict[tuple[int, str], dict[str, Tensor]] = {}
    max_r = 0
    others = []
    pparts: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    for name, t in tensors.items():
        tkey = peft_format.parse_tensor_key(name)
        if tkey.kind != "lora" or tkey.layer is None:     # DoRA, lm_head, embed_tokens, saved modules
            others.append((tkey, name, t))
            continue
        param = peft_format.parameter_target(lcfg, tkey.path)
        if param is not None:   # PEFT target_parameters: the router's weight, the fused experts
            pparts.setdefault(param, {})[tkey.part] = (name, t)
            continue
        key = peft_format.parse_lora_key(name)
        m = _PATH.match(key.path)
        if m is not None and int(m[1]) >= cfg.layers:
            raise AdapterMismatch(f"tensor {name!r}: layer {m[1]} does not exist; the base model has "
                                  f"{cfg.layers} layers")
        if m is None or not cfg.has_module(int(m[1]), m[3]) or cfg.module_path(int(m[1]), m[3]) != key.path:
            raise AdapterMismatch(f"tensor {name!r}: module {key.path!r} does not exist in this "
                                  f"{cfg.arch} model")
        layer = int(m[1])
        d_out, d_in = cfg.module_shape(key.module)
        r = lcfg.rank_for(key.path)
        want = (r, d_in) if key.part == "A" else (d_out, r)
        if tuple(t.shape) != want:
            raise AdapterMismatch(f"tensor {name!r} has shape {list(t.shape)}, this model needs "
                                  f"{list(want)} (lora_{key.part} of {key.module} with d_in={d_in}, "
                                  f"d_out={d_out}, r={r}); was it trained on another base model?")
        if r > max_rank:
            raise AdapterMismatch(f"adapter rank {r} ({key.path}) is above this executor's "
                                  f"max_lora_rank {max_rank}")
        if check_finite and not torch.isfinite(t).all():   # (the arena checks its packed rows at once)
            raise InvalidAdapter(f"tensor {name!r} holds NaN or infinite values")
        max_r = max(max_r, r)
        parts.setdefault((layer, key.module), {})[key.part] = t
    weights = {}
    for (module_path, param), ab in sorted(pparts.items()):
        r = lcfg.rank_for(f"{module_path}.{param}")
        if r > max_rank:
            raise AdapterMismatch(f"adapter rank {r} ({module_path}.{param}) is above this executor's "
                                  f"max_lora_rank {max_rank}")
        for layer, module, a, b in _parameter_lora(cfg, module_path, param, ab, r, check_finite):
            weights[(layer, module)] = (a, b, lcfg.scaling_for(f"{module_path}.{param}"))
            max_r = max(max_r, r)
    for (layer, module), ab in parts.items():
        scaling = lcfg.scaling_for(cfg.module_path(layer, module))
        weights[(layer, module)] = (ab["A"], ab["B"], scaling)
    extras = read_extras(others, lcfg, cfg, max_rank, check_finite)
    return HostAdapter(weights=weights, rank=max_r, extras=extras)


_PARAM = re.compile(r"^model\.layers\.(\d+)\.mlp\.(experts|gate)$")


def _parameter_lora(cfg: ModelConfig, module_path: str, param: str, ab: dict, r: int, check_finite: bool):
    """A ParamWrapper's stacked LoRA -> (layer, arena module, A [r, d_in], B [d_out, r]) per expert.

    PEFT stacks the experts' pairs (ParamWrapper.get_delta_weight): expert e's A is rows
    e*r .. e*r+r-1 of lora_A [r * E, d_in], its B is lora_B [d_out, r * E]'s columns e, e+E, ...
    (lora_B viewed [d_out, r, E]); the router's weight is one ordinary pair."""
    m = _PARAM.match(module_path)
    what = f"{module_path}.{param}"
    if (m is None or (m[2], param) not in (("gate", "weight"), ("experts", "gate_up_proj"),
                                           ("experts", "down_proj"))):
        raise AdapterMismatch(f"target parameter {what!r} does not exist in this {cfg.arch} model")
    layer = int(m[1])
    if layer >= cfg.layers:
        raise AdapterMismatch(f"target parameter {what!r}: layer {layer} does not exist; the base "
                              f"model has {cfg.layers} layers")
    module = "gate" if m[2] == "gate" else expert_module(0, param)
    if not cfg.has_module(layer, module):
        raise AdapterMismatch(f"target parameter {what!r}: layer {layer} of this {cfg.arch} model has "
                              "no experts")
    for part in "AB":
        if part not in ab:
            raise InvalidAdapter(f"target parameter {what!r} has no lora_{part} tensor")
    (name_a, a), (name_b, b) = ab["A"], ab["B"]
    n = 1 if module == "gate" else cfg.num_experts
    d_out, d_in = cfg.module_shape(module)
    for name, t, want, part in ((name_a, a, (r * n, d_in), "A"), (name_b, b, (d_out, r * n), "B")):
        if tuple(t.shape) != want:
            raise AdapterMismatch(f"tensor {name!r} has shape {list(t.shape)}, this model needs "
                                  f"{list(want)} (lora_{part} of {what}: {n} expert(s) of rank {r}, "
                                  f"d_in={d_in}, d_out={d_out}); was it trained on another base model?")
        if check_finite and not torch.isfinite(t).all():
            raise InvalidAdapter(f"tensor {name!r} holds NaN or infinite values")
    if module == "gate":
        return [(layer, "gate", a, b)]
    bv = b.view(d_out, r, n)
    return [(layer, expert_module(e, param), a[e * r:(e + 1) * r], bv[:, :, e].contiguous())
            for e in range(n)]


def _load_tensors(weights_file: pathlib.Path) -> dict[str, Tensor]:
    """The file's tensors, read into memory of their own (pread(2), or the bytes where this
    safetensors has no `backend`), not through an mmap: loading through safetensors' default mmap
    backend left ~7 KiB of RSS behind per load (safetensors 0.8.0; its issue #369), which an
    executor loading thousands of adapter versions kept (benchmarks/churn.py)."""
    try:
        return load_file(str(weights_file), backend="pread")
    except TypeError:                       # safetensors before 0.8: no backend argument
        return load(weights_file.read_bytes())
