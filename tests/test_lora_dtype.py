"""--lora-dtype bfloat16 under a float32 model (vLLM's --lora-dtype): adapter pages in bfloat16 in every
tier, read by the kernels and widened to fp32 as they are read.

The oracle is transformers + peft in fp32 over the same adapters with lora_A and lora_B rounded once to
bfloat16 (what the engine stores): the rest of the math is fp32 on both sides, so greedy tokens are
equal and logprobs within the project's fp32 tolerance (1e-4). Run through the host arena, a CPU device
tier (--device-cache-bytes) and the unified KV/adapter pool.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY
from engine_runs import run_requests as run
from safetensors.torch import load_file, save_file
from test_engine_oracle import MAX_NEW, check_against_oracle, engine_for, make_requests

from services.common.config import ConfigError
from services.executor.adapters.arena import ArenaLayout, HostArena
from services.executor.adapters.reader import read_adapter
from services.executor.config import ExecutorConfig
from services.executor.kv_cache import KVBlockAllocator, KVCache, bytes_per_block, unified_pool
from services.executor.model.loader import read_config, resolve_lora_dtype
from services.synthetic import ALL_MODULES, AdapterSpec, write_adapter

ADAPTERS = {
    "bf-q-v-r8": AdapterSpec(rank=8, alpha=16, targets=("q_proj", "v_proj")),
    "bf-all-r4-rslora": AdapterSpec(rank=4, alpha=8, targets=ALL_MODULES, use_rslora=True),
    "bf-mlp-r16": AdapterSpec(rank=16, alpha=32, targets=("gate_proj", "up_proj", "down_proj")),
}


def rounded_copy(src, dst):
    """The adapter at src with its own tensors (LoRA A and B, modules_to_save copies) rounded once to
    bfloat16 (stored back as fp32) at dst. A DoRA magnitude is not paged (the engine pages the scale
    it makes of it, less one): left. The base layers PEFT saves beside an embed_tokens /
    lm_head LoRA (save_embedding_layers) are the served base's, which the engine does not page: left.
    (PEFT names a modules_to_save copy as the layer itself, so an adapter with modules_to_save has every
    non-LoRA tensor rounded; none here has both.)"""
    shutil.copytree(src, dst)
    f = dst / "adapter_model.safetensors"
    saves = bool(json.loads((dst / "adapter_config.json").read_text()).get("modules_to_save"))
    save_file({k: t.bfloat16().float() if ("lora_" in k and "magnitude" not in k) or saves else t
               for k, t in load_file(str(f)).items()}, str(f))
    return dst


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """(served, rounded): the adapters as written (fp32), and the same adapters rounded once to
    bfloat16 and stored back as fp32 (the oracle's copy: rounded_copy)."""
    served, rounded = tmp_path_factory.mktemp("lora-dtype"), tmp_path_factory.mktemp("lora-dtype-rounded")
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        write_adapter(served / name, TINY["llama"], AdapterSpec(**{**spec.__dict__, "seed": 90 + i}))
        rounded_copy(served / name, rounded / name)
        before, after = (load_file(str(d / name / "adapter_model.safetensors")) for d in (served, rounded))
        assert any(not torch.equal(before[k], after[k]) for k in before)   # the rounding shows
    return served, rounded


@pytest.mark.parametrize("tier", ["arena", "device", "unified", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_bfloat16_pages_match_peft_over_the_rounded_adapters(llama_dir, roots, tier):
    """cuda: a float32 engine on the GPU, its device pool of bfloat16 pages read by cpp/cuda/lora_paged.cu."""
    served, rounded = roots
    names = sorted(ADAPTERS)
    extra = {"arena": {}, "device": {"device_cache_bytes": 4 << 20}, "cuda": {"device": "cuda"},
             "unified": {"unified_kv_adapter_pool": True, "host_cache_bytes": 1 << 20,
                         "kv_cache_bytes": 64 * bytes_per_block(2, 4, 2, 16, torch.float32),
                         "max_model_len": 64}}[tier]
    engine = engine_for(llama_dir, served, lora_dtype="bfloat16", **extra)
    try:
        pool = engine.runner.pool
        assert pool.pages.dtype == torch.bfloat16 and engine.arena.pages.dtype == torch.bfloat16
        assert (pool is engine.device_pool) == (tier in ("device", "cuda"))
        st = engine.status()
        assert (st.dtype, st.lora_dtype) == ("float32", "bfloat16")
        for name in names:
            engine.load_adapter(name, 0)
        requests = make_requests("llama", names, TINY["llama"].vocab)
        out = run(engine, [r for r, _ in requests])
    finally:
        engine.stop()
    assert all(len(out[r.request_id]["tokens"]) == MAX_NEW for r, _ in requests)
    check_against_oracle(llama_dir, rounded, out, requests)


def test_the_fp32_oracle_over_unrounded_adapters_is_not_what_bf16_pages_give(llama_dir, roots):
    """The rounding is real: over the served fp32 adapters the logprobs move past 1e-4 somewhere (so
    the test above checks the rounded copy for a reason, and fp32 pages remain the exact default)."""
    served, _ = roots
    names = sorted(ADAPTERS)
    outs = {}
    for dtype in ("auto", "bfloat16"):
        engine = engine_for(llama_dir, served, lora_dtype=dtype)
        try:
            for name in names:
                engine.load_adapter(name, 0)
            requests = make_requests("llama", names, TINY["llama"].vocab)
            outs[dtype] = run(engine, [r for r, _ in requests])
        finally:
            engine.stop()
    diffs = [abs(a - b) for r, name in requests if name
             for a, b in zip(outs["auto"][r.request_id]["logprobs"], outs["bfloat16"][r.request_id]["logprobs"],
                             strict=True)]
    assert max(diffs) > 1e-5
    base_only = [r.request_id for r, name in requests if not name]
    for rid in base_only:    # requests with no adapter do not see the adapters' dtype (but the batch's rounding)
        assert outs["auto"][rid]["tokens"] == outs["bfloat16"][rid]["tokens"]
        torch.testing.assert_close(torch.tensor(outs["auto"][rid]["logprobs"]),
                                   torch.tensor(outs["bfloat16"][rid]["logprobs"]), atol=1e-5, rtol=0)


def test_an_arena_of_bfloat16_pages_holds_twice_the_adapters(llama_dir, roots):
    served, _ = roots
    _, cfg = read_config(llama_dir)
    layout = ArenaLayout.for_model(cfg)
    host = read_adapter(served / "bf-mlp-r16", cfg, 16)
    need = layout.pages_needed(host)
    fp32 = HostArena(layout, 4 * need * layout.page_elems * 4, torch.float32)
    bf16 = HostArena(layout, 4 * need * layout.page_elems * 4, torch.bfloat16)
    assert bf16.num_pages == 2 * fp32.num_pages
    entry = bf16.write(bf16.allocate(need), host)
    a, b, _ = host.weights[(0, "up_proj")]
    lm = layout.lm(0, "up_proj")
    off, r = (int(v) for v in entry.meta[lm])
    ca = -(-a.shape[1] // layout.page_elems)
    got_a = bf16.pages[entry.pages[off:off + r * ca].long()].reshape(r, -1)[:, :a.shape[1]]
    cb = -(-b.shape[0] // layout.page_elems)
    got_bt = bf16.pages[entry.pages[off + r * ca:off + r * (ca + cb)].long()].reshape(r, -1)[:, :b.shape[0]]
    assert torch.equal(got_a, a.bfloat16()) and torch.equal(got_bt, b.T.bfloat16())  # rounded once


def test_unified_pool_of_bfloat16_pages_over_a_float32_kv_cache_is_the_kv_bytes():
    alloc = KVBlockAllocator(6)
    lender, pages, buf = unified_pool(alloc, layers=2, block_size=4, kv_heads=2, head_dim=16,
                                      dtype=torch.float32, device=torch.device("cpu"), page_elems=32,
                                      own_pages=5, reserve=2, page_dtype=torch.bfloat16)
    assert pages.dtype == torch.bfloat16 and lender.pages_per_block == 32
    kv = KVCache(layers=2, num_blocks=6, block_size=4, kv_heads=2, head_dim=16, dtype=torch.float32,
                 device=torch.device("cpu"), buffer=buf)
    assert lender.first_page == 5    # 5 pages of 32 bf16 elements: 80 fp32 ones, the KV starts after them
    for b in range(6):
        ids = lender.block_pages(b)
        assert {lender.block_of(p) for p in ids} == {b} and min(ids) >= lender.first_page
        pages[ids] = 1.0                                            # bf16 1.0 = 0x3F80 in both halves
    want = torch.tensor([0x3F803F80], dtype=torch.int32).view(torch.float32)
    assert (kv.k == want).all() and (kv.v == want).all()            # every K and V byte is a page's
    assert (pages[:lender.first_page] == 0).all()


def test_lora_dtype_is_checked_against_the_model_dtype():
    assert resolve_lora_dtype("auto", torch.float32) == torch.float32
    assert resolve_lora_dtype("bfloat16", torch.float32) == torch.bfloat16
    assert resolve_lora_dtype("bfloat16", torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="--lora-dtype float32 does not go with a bfloat16 model"):
        resolve_lora_dtype("float32", torch.bfloat16)
    with pytest.raises(ValueError, match="--lora-dtype float16 does not go with a float32 model"):
        resolve_lora_dtype("float16", torch.float32)
    with pytest.raises(ConfigError, match="--lora-dtype: must be auto, --dtype"):
        ExecutorConfig(base_model="m", dtype="bfloat16", lora_dtype="float32")
    ExecutorConfig(base_model="m", dtype="float32", lora_dtype="bfloat16")
    ExecutorConfig(base_model="m", dtype="auto", lora_dtype="float32")   # auto is float32 on CPU: checked at load


@pytest.mark.parametrize("tied", [False, True])
def test_every_adapter_form_over_bfloat16_pages(model_dirs, tmp_path, tied):
    """LoRA on embed_tokens and lm_head, modules_to_save (lm_head, embed_tokens, the norms) and DoRA, in
    one batch over bfloat16 pages, equal the oracle over the rounded adapters (1e-4). DoRA's pages hold
    its scale less one as two bfloat16 rows (hi + lo, forms.py), taken over the rounded A and B: in one
    bfloat16 row the scale alone was off by up to 1.5e-2 in logprob here."""
    from test_forms import peft_adapter
    model_dir = model_dirs["mistral" if tied else "llama"]
    served, rounded = tmp_path / "served", tmp_path / "rounded"
    specs = {"emb-lmh-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj", "embed_tokens", "lm_head"]),
             "saved-both": dict(r=4, lora_alpha=8, target_modules=["k_proj"], modules_to_save=["lm_head", "embed_tokens"]),
             "saved-norms": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"]),
             "dora-r8": dict(r=8, lora_alpha=8, use_dora=True, target_modules=["v_proj", "up_proj", "lm_head"])}
    for i, (name, lora) in enumerate(specs.items()):
        rounded_copy(peft_adapter(model_dir, served / name, 20 + i, **lora), rounded / name)
    names = sorted(specs)
    engine = engine_for(model_dir, served, lora_dtype="bfloat16", max_lora_rank=16)
    try:
        for name in names:
            engine.load_adapter(name, 0)
        requests = make_requests("llama", names, 256)
        out = run(engine, [r for r, _ in requests])
    finally:
        engine.stop()
    check_against_oracle(model_dir, rounded, out, requests)
