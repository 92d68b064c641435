"""Adapter forms against transformers + peft: DoRA, LoRA on embed_tokens / lm_head, modules_to_save,
each served in one batch that also holds plain LoRA and base-model requests (greedy tokens equal,
logprobs within 1e-4, fp32). Adapters are made by PEFT itself (get_peft_model + save_pretrained) with
random non-zero weights, so the files are exactly what PEFT writes."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from conftest import TINY
from test_engine_oracle import check_against_oracle, engine_for, make_requests, run

from services.common import peft_format
from services.common.errors import InvalidAdapter
from services.synthetic import ALL_MODULES, AdapterSpec, write_adapter


def peft_adapter(model_dir: pathlib.Path, out: pathlib.Path, seed: int, **lora) -> pathlib.Path:
    """A PEFT adapter over the model at model_dir, every trainable tensor random (B non-zero, DoRA
    magnitudes moved off their initial norms), saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if not p.requires_grad:
                continue
            if "magnitude" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            else:                                 # modules_to_save copies
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out)
    return out


def serve_and_check(model_dir, root, names, max_lora_rank=32, **config):
    engine = engine_for(model_dir, root, max_lora_rank=max_lora_rank, **config)
    for name in names:
        engine.load_adapter(name, 0)
    requests = make_requests("llama", names, 256)
    try:
        out = run(engine, [r for r, _ in requests])
    finally:
        engine.stop()
    check_against_oracle(model_dir, root, out, requests)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])   # qwen2: q/k/v biases (PEFT's DoRA leaves them out)
def test_dora_mixed_batch_matches_transformers_peft(arch, model_dirs, tmp_path):
    model_dir = model_dirs[arch]
    peft_adapter(model_dir, tmp_path / "dora-attn-r4", 1, r=4, lora_alpha=8, use_dora=True,
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_adapter(model_dir, tmp_path / "dora-all-r16", 2, r=16, lora_alpha=8, use_dora=True,
                 target_modules=list(ALL_MODULES))
    peft_adapter(model_dir, tmp_path / "dora-mlp-r32-rslora", 3, r=32, lora_alpha=16, use_dora=True,
                 use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"])
    write_adapter(tmp_path / "plain", TINY[arch], AdapterSpec(rank=8, alpha=16, targets=ALL_MODULES,
                                                              seed=4))
    serve_and_check(model_dir, tmp_path, ["dora-attn-r4", "dora-all-r16", "dora-mlp-r32-rslora", "plain"])


@pytest.mark.parametrize("arch, config", [("llama", {}),
                                          ("mistral", {"device_cache_bytes": 8 << 20})])   # tied; device pool
def test_embedding_lm_head_and_saved_modules_match_transformers_peft(arch, config, model_dirs, tmp_path):
    model_dir = model_dirs[arch]
    peft_adapter(model_dir, tmp_path / "emb-lmh-r8", 5, r=8, lora_alpha=16,
                 target_modules=["q_proj", "down_proj", "embed_tokens", "lm_head"])
    peft_adapter(model_dir, tmp_path / "emb-r4", 6, r=4, lora_alpha=4, target_modules=["embed_tokens"])
    peft_adapter(model_dir, tmp_path / "dora-lmh-r16", 7, r=16, lora_alpha=8, use_dora=True,
                 target_modules=["v_proj", "lm_head"])
    peft_adapter(model_dir, tmp_path / "saved-lmh", 8, r=4, lora_alpha=8, target_modules=["o_proj"],
                 modules_to_save=["lm_head"])
    peft_adapter(model_dir, tmp_path / "saved-both", 9, r=4, lora_alpha=8, target_modules=["k_proj"],
                 modules_to_save=["lm_head", "embed_tokens"])
    peft_adapter(model_dir, tmp_path / "saved-norms", 10, r=4, lora_alpha=8, target_modules=["q_proj"],
                 modules_to_save=["norm"])      # every layer's two norms and model.norm
    write_adapter(tmp_path / "plain", TINY[arch], AdapterSpec(rank=8, alpha=16, targets=ALL_MODULES,
                                                              seed=4))
    serve_and_check(model_dir, tmp_path, ["emb-lmh-r8", "emb-r4", "dora-lmh-r16", "saved-lmh",
                                          "saved-both", "saved-norms", "plain"], **config)


def test_dora_config_and_magnitude_validation(model_dirs, tmp_path):
    d = peft_adapter(model_dirs["llama"], tmp_path / "d", 1, r=4, lora_alpha=8, use_dora=True,
                     target_modules=["q_proj", "v_proj"])
    cfg = peft_format.parse_adapter_config((d / "adapter_config.json").read_bytes())
    with open(d / "adapter_model.safetensors", "rb") as f:
        tensors, _ = peft_format.read_safetensors_header(f)
    peft_format.validate_adapter(cfg, tensors)
    assert peft_format.adapter_form(cfg, tensors) == "dora"
    name = next(n for n in tensors if "v_proj.lora_magnitude" in n)
    bad = dict(tensors)
    bad[name] = peft_format.TensorInfo("F32", (7,), 0, 28)
    with pytest.raises(InvalidAdapter, match="magnitude has length 7"):
        peft_format.validate_adapter(cfg, bad)
    without = {n: t for n, t in tensors.items() if n != name}
    with pytest.raises(InvalidAdapter, match="no lora_magnitude_vector"):
        peft_format.validate_adapter(cfg, without)
    plain = peft_format.parse_adapter_config(json.dumps({**json.loads(
        (d / "adapter_config.json").read_text()), "use_dora": False}).encode())
    with pytest.raises(InvalidAdapter, match="use_dora"):
        peft_format.validate_adapter(plain, tensors)


# -- registry: what is accepted, what is refused, and the form it lists -------------------------

def _tensors(d: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(d / "adapter_model.safetensors"))


def _rewrite(d: pathlib.Path, out: pathlib.Path, tensors: dict[str, torch.Tensor], **config) -> dict:
    from safetensors.torch import save_file
    out.mkdir()
    cfg = {**json.loads((d / "adapter_config.json").read_text()), **config}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return {n: (out / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}


def test_registry_accepts_dora_refuses_nonfinite_and_misfits(model_dirs, tmp_path):
    import grpc
    from test_registry_api import CODE, RunningRegistry, code_of, files_of, upload

    from services.common.gen.openlora.v1 import registry_pb2 as pb
    model_dir = model_dirs["llama"]
    d = peft_adapter(model_dir, tmp_path / "d", 1, r=4, lora_alpha=8, use_dora=True,
                     target_modules=["q_proj", "down_proj"])
    t = _tensors(d)
    mag = next(n for n in t if "q_proj.lora_magnitude" in n)
    nan = _rewrite(d, tmp_path / "nan", {**t, mag: t[mag].clone().index_fill_(0, torch.tensor([3]),
                                                                             float("nan"))})
    short = _rewrite(d, tmp_path / "short", {**t, mag: t[mag][:-1].clone()})
    no_dora = _rewrite(d, tmp_path / "nodora", t, use_dora=False)
    plain = {n: v for n, v in t.items() if "magnitude" not in n}
    lm_head = _rewrite(d, tmp_path / "lmh", {**plain,
                                             "base_model.model.lm_head.lora_A.weight": torch.ones(4, 64),
                                             "base_model.model.lm_head.lora_B.weight": torch.ones(512, 4)},
                       use_dora=False, target_modules=["q_proj", "down_proj", "lm_head"])
    emb = {"base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(4, 500),
           "base_model.model.model.embed_tokens.lora_embedding_B": torch.ones(64, 4)}
    bad_vocab = _rewrite(d, tmp_path / "vocab", {**plain, **emb}, use_dora=False,
                         target_modules=["q_proj", "down_proj", "embed_tokens"])
    saved_proj = _rewrite(d, tmp_path / "proj", {**plain, "base_model.model.model.layers.0.mlp.gate_proj.weight":
                                                 torch.ones(128, 64)}, use_dora=False, modules_to_save=["gate_proj"])
    r = RunningRegistry(tmp_path / "data", base_model=[str(model_dir)])
    try:
        a = upload(r.stub, "dora", files_of(d))
        assert a.labels["openlora/form"] == "dora" and a.rank == 4
        assert upload(r.stub, "lmh", lm_head).labels["openlora/form"] == "lora+lm_head"
        for files, want, needle in ((nan, CODE.INVALID_ARGUMENT, "NaN or infinite"),
                                    (short, CODE.INVALID_ARGUMENT, "magnitude has length"),
                                    (no_dora, CODE.INVALID_ARGUMENT, "no use_dora"),
                                    (bad_vocab, CODE.FAILED_PRECONDITION, "vocab=512"),
                                    (saved_proj, CODE.INVALID_ARGUMENT, "modules_to_save of gate_proj")):
            with pytest.raises(grpc.RpcError) as info:
                upload(r.stub, "bad", files)
            assert (info.value.code(), needle in info.value.details()) == (want, True), info.value.details()
        assert code_of(r.stub.GetAdapter, pb.GetAdapterRequest(adapter_id="bad")) == CODE.NOT_FOUND
    finally:
        r.close()


def test_saved_modules_count_at_their_true_size_and_refuse_when_they_cannot_fit(model_dirs, tmp_path):
    from services.common.errors import ResourceExhausted
    model_dir = model_dirs["llama"]
    peft_adapter(model_dir, tmp_path / "lora", 11, r=4, lora_alpha=8, target_modules=["o_proj"])
    peft_adapter(model_dir, tmp_path / "saved", 11, r=4, lora_alpha=8, target_modules=["o_proj"],
                 modules_to_save=["lm_head"])
    engine = engine_for(model_dir, tmp_path, max_lora_rank=16)
    try:
        engine.load_adapter("lora", 0)
        engine.load_adapter("saved", 0)
        used = {a.adapter_id: a for a in engine.status().adapters}
        sizes = {k: v.entry.nbytes for (k, _), v in engine.adapters._held.items()}
        assert set(used) == {"lora", "saved"}
        assert sizes["saved"] - sizes["lora"] >= 512 * 64 * 4      # the whole lm_head copy, fp32
    finally:
        engine.stop()
    small = engine_for(model_dir, tmp_path, max_lora_rank=16, host_cache_bytes=64 * 1024)
    try:
        small.load_adapter("lora", 0)
        with pytest.raises(ResourceExhausted, match="more than the whole host arena"):
            small.load_adapter("saved", 0)
    finally:
        small.stop()
