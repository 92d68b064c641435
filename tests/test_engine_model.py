"""Model loading and RoPE variants against transformers; sharded checkpoints; bfloat16 on CPU."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.executor.adapters.source import LocalDirSource
from services.executor.config import ExecutorConfig
from services.executor.engine import Engine, GenerationRequest, SamplingOptions
from services.executor.model.llama import ModelConfig
from services.executor.model.loader import load_model
from services.synthetic import ModelSpec, model_config, write_model

ROPES = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn-tuned": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
                   "beta_fast": 16, "beta_slow": 2, "mscale": 0.9, "mscale_all_dim": 0.5},
}


def greedy(engine, prompt, n):
    out, done = [], threading.Event()

    def on_event(ev):
        out.extend(ev.token_ids)
        if ev.finish_reason or ev.error:
            assert ev.error is None, ev.error
            done.set()

    engine.submit(GenerationRequest("g", prompt_token_ids=prompt,
                                    sampling=SamplingOptions(max_new_tokens=n, ignore_eos=True)), on_event)
    engine.start()
    assert done.wait(60)
    engine.stop()
    return out


def hf_greedy(model_dir, prompt, n):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("rope", list(ROPES))
def test_rope_scaling_matches_transformers(tmp_path, rope):
    d = write_model(tmp_path / rope, ModelSpec(seed=21, rope_scaling=ROPES[rope], tokenizer=False,
                                               max_positions=128))
    prompt = list(range(3, 60))                       # positions past original_max_position_embeddings
    engine = Engine(ExecutorConfig(base_model=str(d), device="cpu", dtype="float32"),
                    LocalDirSource(tmp_path))
    assert greedy(engine, prompt, 10) == hf_greedy(d, prompt, 10)


def test_sharded_checkpoint_loads_the_same(tmp_path, llama_dir):
    tensors = load_file(str(llama_dir / "model.safetensors"))
    shard = tmp_path / "sharded"
    shard.mkdir()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(shard / file))
        weight_map.update({n: file for n in part})
    (shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (shard / "config.json").write_text((llama_dir / "config.json").read_text())
    a, _, _ = load_model(str(llama_dir), torch.device("cpu"), torch.float32, 64)
    b, _, _ = load_model(str(shard), torch.device("cpu"), torch.float32, 64)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=False):
        assert na == nb and torch.equal(pa, pb)


def test_bfloat16_on_cpu_runs(llama_dir, tmp_path):
    engine = Engine(ExecutorConfig(base_model=str(llama_dir), device="cpu", dtype="bfloat16"),
                    LocalDirSource(tmp_path))
    assert engine.status().dtype == "bfloat16"
    tokens = greedy(engine, [5, 6, 7, 8, 9], 6)
    assert len(tokens) == 6 and all(0 <= t < 512 for t in tokens)


def test_unsupported_architecture(tmp_path):
    d = write_model(tmp_path / "m", ModelSpec(tokenizer=False))
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture"):
        Engine(ExecutorConfig(base_model=str(d), device="cpu"), LocalDirSource(tmp_path))


def windows(arch: str, **overrides) -> list[int | None]:
    cfg = model_config(ModelSpec(arch=arch, layers=4))
    cfg.update(overrides)
    mc = ModelConfig.from_hf({k: v for k, v in cfg.items() if v is not ...})
    return [mc.window_of(i) for i in range(mc.layers)]


def test_sliding_windows_are_read_as_transformers_reads_them():
    assert windows("llama") == [None] * 4
    assert windows("mistral", sliding_window=7) == [7] * 4
    assert windows("mistral", sliding_window=...) == [4096] * 4   # MistralConfig's default
    assert windows("mistral", sliding_window=None) == [None] * 4
    # Qwen2: only with use_sliding_window, from max_window_layers on, or where layer_types say
    assert windows("qwen2", use_sliding_window=False, sliding_window=7, max_window_layers=0) == [None] * 4
    assert windows("qwen2", use_sliding_window=True, sliding_window=7, max_window_layers=2) == \
        [None, None, 7, 7]
    assert windows("qwen2", use_sliding_window=True, sliding_window=7, max_window_layers=0) == [7] * 4
    assert windows("qwen2", use_sliding_window=True, sliding_window=7, layer_types=[
        "sliding_attention", "full_attention", "sliding_attention", "full_attention"]) == [7, None, 7, None]
    with pytest.raises(ValueError, match="layer_types must name"):
        windows("qwen2", use_sliding_window=True, sliding_window=7, layer_types=["full_attention"])


@pytest.mark.parametrize("tie", [False, True])
def test_prepacked_weights_generate_what_plain_weights_do(tmp_path, tie):
    """fp32 on CPU packs every projection and the lm_head once (ops.pack_weight); the tokens are
    those of the plain weights, and of transformers."""
    from services.executor import ops
    d = write_model(tmp_path / "m", ModelSpec(seed=5, tie_embeddings=tie, tokenizer=False))
    prompt = list(range(3, 40))
    packed = Engine(ExecutorConfig(base_model=str(d), device="cpu", dtype="float32"), LocalDirSource(tmp_path))
    plain = Engine(ExecutorConfig(base_model=str(d), device="cpu", dtype="float32", prepack_weights=False),
                   LocalDirSource(tmp_path))
    if ops.pack_weight(torch.ones(2, 2)) is not None:
        assert all(p.packed is not None for _, _, p in packed.model.projections())
        assert packed.model.lm_packed is not None
    assert all(p.packed is None for _, _, p in plain.model.projections()) and plain.model.lm_packed is None
    want = hf_greedy(d, prompt, 12)
    assert greedy(packed, prompt, 12) == want
    assert greedy(plain, prompt, 12) == want


def test_bfloat16_weights_are_not_packed(llama_dir, tmp_path):
    engine = Engine(ExecutorConfig(base_model=str(llama_dir), device="cpu", dtype="bfloat16"),
                    LocalDirSource(tmp_path))
    assert all(p.packed is None for _, _, p in engine.model.projections())
