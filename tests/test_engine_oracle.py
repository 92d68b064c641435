"""The engine against transformers + peft (test-only oracle) on tiny random models of each architecture.

One concurrent batch mixes adapters of different ranks, alphas, target modules, rslora, layer
subsets and rank/alpha patterns with base-only requests; every request's greedy tokens and logprobs
must equal transformers+peft run on that request alone (fp32, 1e-4). Small KV blocks put prompts
across block boundaries; a tiny KV budget forces preemption; a small prefill budget forces chunks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import pytest
import torch
from conftest import TINY
from engine_runs import run_requests as run
from safetensors.torch import save_file

from services.executor.adapters.source import LocalDirSource
from services.executor.config import ExecutorConfig
from services.executor.engine import Engine, GenerationRequest, SamplingOptions
from services.executor.model.llama import ModelConfig
from services.synthetic import ALL_MODULES, AdapterSpec, ModelSpec, adapter_config, write_adapter, write_model

ADAPTERS = {
    "q-v-r8": AdapterSpec(rank=8, alpha=16, targets=("q_proj", "v_proj")),
    "all-r4-rslora": AdapterSpec(rank=4, alpha=8, targets=ALL_MODULES, use_rslora=True),
    "mlp-r16-layer1": AdapterSpec(rank=16, alpha=32, targets=("gate_proj", "up_proj", "down_proj"),
                                  layers_to_transform=(1,)),
    "k-o-r2": AdapterSpec(rank=2, alpha=7, targets=("k_proj", "o_proj")),
    "alpha-pattern": AdapterSpec(rank=4, alpha=4, targets=("q_proj", "v_proj", "down_proj"),
                                 extra_config={"alpha_pattern": {"v_proj": 40}}),
}
MAX_NEW = 8


def write_rank_pattern_adapter(path: pathlib.Path, arch: str) -> pathlib.Path:
    """rank 4 everywhere but q_proj (rank 6) and layer 0's up_proj (rank 3)."""
    spec, g = TINY[arch], torch.Generator().manual_seed(7)
    pattern = {"q_proj": 6, "model.layers.0.mlp.up_proj": 3}
    tensors = {}
    for i in range(spec.layers):
        for module in ("q_proj", "v_proj", "up_proj"):
            kind = "self_attn" if module in ALL_MODULES[:4] else "mlp"
            r = 6 if module == "q_proj" else 3 if (i, module) == (0, "up_proj") else 4
            d_out, d_in = spec.module_shape(module)
            p = f"base_model.model.model.layers.{i}.{kind}.{module}."
            tensors[p + "lora_A.weight"] = torch.randn(r, d_in, generator=g) / math.sqrt(d_in)
            tensors[p + "lora_B.weight"] = torch.randn(d_out, r, generator=g) / math.sqrt(r)
    path.mkdir(parents=True)
    cfg = adapter_config(AdapterSpec(rank=4, alpha=8, targets=("q_proj", "v_proj", "up_proj")))
    cfg.update(rank_pattern=pattern, alpha_pattern={"up_proj": 12})
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


@pytest.fixture(scope="module")
def adapter_roots(tmp_path_factory):
    """arch -> a directory of adapters (LocalDirSource root)."""
    roots = {}
    for arch in TINY:
        root = tmp_path_factory.mktemp(f"adapters-{arch}")
        for i, (name, spec) in enumerate(ADAPTERS.items()):
            write_adapter(root / name, TINY[arch], AdapterSpec(**{**spec.__dict__, "seed": 50 + i}))
        write_rank_pattern_adapter(root / "rank-pattern", arch)
        roots[arch] = root
    return roots


def oracle(model_dir: pathlib.Path, adapter_dir: pathlib.Path | None, prompt: list[int], n: int,
           prepare=None):
    """Greedy tokens and raw logprobs from transformers (+ peft), one request alone, no KV cache.
    prepare(model), when given, runs on the transformers model before peft wraps it."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if prepare is not None:
        prepare(model)
    if adapter_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    ids, tokens, logprobs = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            t = int(logits.argmax())
            tokens.append(t)
            logprobs.append(float(torch.log_softmax(logits, -1)[t]))
            ids.append(t)
    return tokens, logprobs


def make_requests(arch: str, names: list[str], vocab: int) -> list[tuple[GenerationRequest, str | None]]:
    g = torch.Generator().manual_seed({"llama": 1, "mistral": 2, "qwen2": 3}[arch])
    reqs = []
    for i, name in enumerate(names + [None, None]):
        length = 3 + (i * 5) % 19                        # 3..21 tokens: across 4-token blocks
        prompt = torch.randint(2, vocab, (length,), generator=g).tolist()
        sampling = SamplingOptions(max_new_tokens=MAX_NEW, ignore_eos=True)
        reqs.append((GenerationRequest(f"{arch}-{i}", prompt_token_ids=prompt, adapter_id=name or "",
                                       sampling=sampling), name))
    return reqs


def engine_for(model_dir, root, **overrides) -> Engine:
    cfg = dict(base_model=str(model_dir), device="cpu", dtype="float32", max_device_adapters=8,
               max_lora_rank=16, kv_block_size=4, max_prefill_tokens=40)
    return Engine(ExecutorConfig(**{**cfg, **overrides}), LocalDirSource(root))


def check_against_oracle(model_dir, root, out, requests, oracle_fn=oracle, atol=1e-4):
    for req, name in requests:
        o = out[req.request_id]
        assert o["error"] is None, o["error"]
        assert o["finish"] == "length"
        want_tokens, want_lp = oracle_fn(model_dir, root / name if name else None,
                                      req.prompt_token_ids, MAX_NEW)
        assert o["tokens"] == want_tokens, (req.request_id, name)
        torch.testing.assert_close(torch.tensor(o["logprobs"]), torch.tensor(want_lp),
                                   atol=atol, rtol=0)


@pytest.mark.parametrize("arch", list(TINY))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_mixed_adapter_batch_matches_transformers_peft(device, arch, model_dirs, adapter_roots):
    """On CUDA every op runs on the GPU (lora_paged_add_ on device pages, paged_attention_decode_async, the layer
    ops' kernels), fp32, against transformers+peft on the CPU."""
    root = adapter_roots[arch]
    names = sorted(p.name for p in root.iterdir())
    engine = engine_for(model_dirs[arch], root, device=device)
    for name in names:                                  # resident before the batch forms
        engine.load_adapter(name, 0)
    requests = make_requests(arch, names, TINY[arch].vocab)
    try:
        out = run(engine, [r for r, _ in requests])
    finally:
        engine.stop()
    check_against_oracle(model_dirs[arch], root, out, requests)


def test_preemption_under_tiny_kv_budget_gives_identical_tokens(model_dirs, adapter_roots):
    arch = "llama"
    root = adapter_roots[arch]
    names = sorted(p.name for p in root.iterdir())[:3]
    spec = TINY[arch]
    # 12 blocks of 4 tokens: 48 tokens of KV for 5 sequences of up to 29 tokens each
    per_block = 2 * spec.layers * 4 * spec.kv_heads * spec.head_dim * 4
    engine = engine_for(model_dirs[arch], root, kv_cache_bytes=12 * per_block)
    for name in names:
        engine.load_adapter(name, 0)
    requests = make_requests(arch, names, spec.vocab)
    preempted = []
    orig = engine.scheduler._preempt
    engine.scheduler._preempt = lambda seq: (preempted.append(seq.seq_id), orig(seq))
    try:
        out = run(engine, [r for r, _ in requests])
        assert engine.allocator.num_free == engine.allocator.num_blocks
    finally:
        engine.stop()
    assert preempted, "the tiny KV budget should have forced a preemption"
    check_against_oracle(model_dirs[arch], root, out, requests)


WINDOWED = {  # window 5 < the 3..21-token prompts + 8 new tokens, over 4-token KV blocks
    "mistral": ModelSpec(arch="mistral", seed=12, tie_embeddings=True, sliding_window=5),
    "qwen2": ModelSpec(arch="qwen2", seed=13, sliding_window=5, max_window_layers=1),  # layer 1 slides
}


@pytest.mark.parametrize("arch", list(WINDOWED))
def test_sliding_window_batch_matches_transformers_peft(arch, adapter_roots, tmp_path):
    """Mistral slides every layer, Qwen2 (use_sliding_window, max_window_layers=1) only layer 1; a
    mixed-adapter batch through chunked prefill and decode still gives transformers+peft's tokens."""
    spec = WINDOWED[arch]
    model_dir = write_model(tmp_path / arch, spec)
    cfg = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    assert [cfg.window_of(i) for i in range(spec.layers)] == \
        ([5, 5] if arch == "mistral" else [None, 5])
    root = adapter_roots[arch]
    names = sorted(p.name for p in root.iterdir())[:4]
    engine = engine_for(model_dir, root)
    for name in names:
        engine.load_adapter(name, 0)
    requests = make_requests(arch, names, spec.vocab)
    try:
        out = run(engine, [r for r, _ in requests])
    finally:
        engine.stop()
    check_against_oracle(model_dir, root, out, requests)
    # the window matters here: without it transformers answers otherwise for some request
    full_dir = write_model(tmp_path / f"{arch}-full", dataclasses.replace(spec, sliding_window=None))
    req, name = requests[-1]
    assert oracle(full_dir, None, req.prompt_token_ids, MAX_NEW)[1] != \
        pytest.approx(out[req.request_id]["logprobs"], abs=1e-4)


def test_prefix_cache_reuses_blocks_only_within_an_adapter_and_matches_transformers_peft(
        model_dirs, adapter_roots):
    """A second wave of requests sharing a 13-token prefix with the first takes its cached blocks
    (3 of 4 tokens each) when on the same adapter, or the base model, and computes them otherwise;
    every request still gets transformers+peft's tokens and logprobs."""
    arch = "llama"
    root, spec = adapter_roots[arch], TINY[arch]
    g = torch.Generator().manual_seed(9)
    prefix = torch.randint(2, spec.vocab, (13,), generator=g).tolist()

    def wave(tag, names):
        reqs = []
        for i, name in enumerate(names):
            suffix = torch.randint(2, spec.vocab, (2 + i,), generator=g).tolist()
            reqs.append((GenerationRequest(f"{tag}-{i}", prompt_token_ids=prefix + suffix,
                                           adapter_id=name or "",
                                           sampling=SamplingOptions(max_new_tokens=MAX_NEW, ignore_eos=True)),
                         name))
        return reqs

    engine = engine_for(model_dirs[arch], root)
    for name in ("q-v-r8", "all-r4-rslora", "k-o-r2"):
        engine.load_adapter(name, 0)
    first = wave("w1", ["q-v-r8", None, "all-r4-rslora"])
    second = wave("w2", ["q-v-r8", None, "k-o-r2", "all-r4-rslora"])
    try:
        out = run(engine, [r for r, _ in first])
        hits_before = engine.scheduler.prefix_hit_tokens
        out |= run(engine, [r for r, _ in second])
        hits = engine.scheduler.prefix_hit_tokens - hits_before
        assert engine.allocator.num_free == engine.allocator.num_blocks
    finally:
        engine.stop()
    assert hits == 3 * 12                  # q-v-r8, base, all-r4-rslora: 3 blocks each; k-o-r2: none
    check_against_oracle(model_dirs[arch], root, out, first + second)
