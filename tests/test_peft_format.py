"""services.common.peft_format: config parsing, tensor names, safetensors headers, validation."""

from __future__ import annotations

import json
import struct

import pytest

from services.common.errors import InvalidAdapter
from services.common.peft_format import (
    LoraConfig,
    parse_adapter_config,
    parse_lora_key,
    read_safetensors_header,
    validate_adapter,
)
from services.synthetic import AdapterSpec, adapter_config


def cfg_bytes(**extra) -> bytes:
    return json.dumps(adapter_config(AdapterSpec(extra_config=extra))).encode()


def st_bytes(tensors: dict[str, tuple[str, list[int]]], pad: int = 0) -> bytes:
    """A safetensors file of zeros: name -> (dtype, shape)."""
    sizes = {"F32": 4, "F16": 2, "I64": 8}
    header, off = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * (off + pad)


def test_parse_config():
    c = parse_adapter_config(cfg_bytes(r=4, lora_alpha=8, use_rslora=True,
                                       rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3}))
    assert (c.rank, c.alpha, c.target_modules, c.use_rslora) == (4, 8.0, ("q_proj", "v_proj"), True)
    assert c.base_model == "openlora/demo-llama"
    assert c.rank_for("model.layers.0.self_attn.v_proj") == 2
    assert c.alpha_for("model.layers.0.self_attn.q_proj") == 3.0
    assert c.scaling_for("model.layers.0.self_attn.q_proj") == pytest.approx(3 / 2)
    assert c.scaling_for("model.layers.0.self_attn.v_proj") == pytest.approx(8 / 2 ** 0.5)


@pytest.mark.parametrize("extra, needle", [
    ({"use_dora": "yes"}, "use_dora must be"),
    ({"peft_type": "IA3"}, "LoRA adapters only"),
    ({"bias": "all"}, "bias"),
    ({"modules_to_save": "lm_head"}, "modules_to_save must be a list"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"r": 0}, "r must be"),
    ({"target_modules": None}, "target_modules"),
    ({"target_modules": "(["}, "regex"),
])
def test_config_refusals(extra, needle):
    with pytest.raises(InvalidAdapter, match=needle):
        parse_adapter_config(cfg_bytes(**extra))


def test_config_not_json():
    with pytest.raises(InvalidAdapter, match="not valid JSON"):
        parse_adapter_config(b"{nope")


def test_targets_semantics():
    lst = LoraConfig(rank=8, alpha=16, target_modules=("q_proj",), layers_to_transform=(1,))
    assert lst.targets("model.layers.1.self_attn.q_proj")
    assert not lst.targets("model.layers.0.self_attn.q_proj")
    assert not lst.targets("model.layers.1.self_attn.xq_proj")
    rx = LoraConfig(rank=8, alpha=16, target_modules=r".*\.(q|v)_proj")
    assert rx.targets("model.layers.0.self_attn.v_proj")
    assert not rx.targets("model.layers.0.self_attn.k_proj")


def test_parse_lora_key():
    k = parse_lora_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight")
    assert (k.layer, k.module, k.part, k.path) == (3, "q_proj", "A", "model.layers.3.self_attn.q_proj")
    k = parse_lora_key("base_model.model.model.layers.12.mlp.down_proj.lora_B.default.weight")
    assert (k.layer, k.module, k.part) == (12, "down_proj", "B")
    for bad in ("base_model.model.lm_head.lora_A.weight", "model.layers.0.q_proj.weight",
                "base_model.model.model.layers.0.self_attn.q_proj.lora_embedding_A"):
        with pytest.raises(InvalidAdapter):
            parse_lora_key(bad)


def _pair(layer=0, module="self_attn.q_proj", r=8, d_in=64, d_out=64):
    p = f"base_model.model.model.layers.{layer}.{module}."
    return {p + "lora_A.weight": ("F32", [r, d_in]), p + "lora_B.weight": ("F32", [d_out, r])}


def test_header_and_validate_ok():
    data = st_bytes({**_pair(0), **_pair(1, "self_attn.v_proj", d_out=32)})
    tensors, size = read_safetensors_header(data)
    assert size == len(data)
    first = min(tensors.values(), key=lambda t: t.start)
    assert first.start == 8 + struct.unpack("<Q", data[:8])[0]
    validate_adapter(parse_adapter_config(cfg_bytes()), tensors)


def test_header_reports_truncation_by_size():
    data = st_bytes(_pair())
    _, size = read_safetensors_header(data[:-10])
    assert size == len(data)                       # caller sees the mismatch


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d[:5], "too short"),
    (lambda d: struct.pack("<Q", 1 << 40) + d[8:], "out of range"),
    (lambda d: d[:8] + b"x" + d[9:], "not valid JSON"),
])
def test_bad_headers(mutate, needle):
    with pytest.raises(InvalidAdapter, match=needle):
        read_safetensors_header(mutate(st_bytes(_pair())))


def test_bad_offsets():
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    raw = json.dumps(header).encode()
    with pytest.raises(InvalidAdapter, match="contiguous"):
        read_safetensors_header(struct.pack("<Q", len(raw)) + raw + b"\0" * 12)
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    raw = json.dumps(header).encode()
    with pytest.raises(InvalidAdapter, match="needs 12"):
        read_safetensors_header(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)


@pytest.mark.parametrize("tensors, needle", [
    (_pair(r=4), "r=8"),
    ({k: v for k, v in _pair().items() if "lora_B" in k}, "no lora_A"),
    ({**_pair(), "base_model.model.lm_head.weight": ("F32", [2, 2])}, "not a LoRA weight"),
    (_pair(module="self_attn.k_proj"), "not in target_modules"),
    ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": ("I64", [8, 4]),
      "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": ("F32", [4, 8])}, "float"),
])
def test_validate_refusals(tensors, needle):
    parsed, _ = read_safetensors_header(st_bytes(tensors))
    with pytest.raises(InvalidAdapter, match=needle):
        validate_adapter(parse_adapter_config(cfg_bytes()), parsed)


def test_layers_to_transform_respected():
    cfg = parse_adapter_config(cfg_bytes(layers_to_transform=[1]))
    parsed, _ = read_safetensors_header(st_bytes(_pair(0)))
    with pytest.raises(InvalidAdapter, match="layers_to_transform"):
        validate_adapter(cfg, parsed)
