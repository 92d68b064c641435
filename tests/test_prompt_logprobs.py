"""Prompt logprobs from the same prefill, against transformers (+ peft) log-softmax over the prompt.

One concurrent batch: requests asking for prompt logprobs (base and adapter, k = 0 and 3), with a
small prefill budget (chunked prompts) and small KV blocks, beside requests that share a cached
prefix; the ones that ask compute every prompt position, the others still take the cached prefix.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY
from engine_runs import run_requests as run

from services.common.errors import InvalidArgument
from services.executor.adapters.source import LocalDirSource
from services.executor.config import ExecutorConfig
from services.executor.engine import Engine, GenerationRequest, SamplingOptions
from services.synthetic import AdapterSpec, write_adapter


@pytest.fixture(scope="module")
def setup(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("plp-adapters")
    write_adapter(root / "qv", TINY["llama"], AdapterSpec(rank=4, alpha=8, targets=("q_proj", "v_proj"),
                                                          seed=71))
    e = Engine(ExecutorConfig(base_model=str(llama_dir), device="cpu", dtype="float32",
                              max_lora_rank=16, kv_block_size=4, max_prefill_tokens=16,
                              enable_prefix_caching=True, max_model_len=128),
               LocalDirSource(root))
    e.start()
    yield e, llama_dir, root
    e.stop()


def prompt_oracle(model_dir, adapter_dir, prompt: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits over the prompt: [len(prompt), vocab] float32."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)


def test_prompt_logprobs_equal_transformers_beside_cached_prefixes(setup):
    engine, model_dir, root = setup
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 250, (21,), generator=g).tolist()
    warm = GenerationRequest("warm", prompt_token_ids=shared + [9],
                             sampling=SamplingOptions(max_new_tokens=2, ignore_eos=True))
    run(engine, [warm])                                  # its blocks are now in the prefix cache
    hits_before = engine.status().prefix_cache_hit_tokens
    asks = {
        "base-k3": ("", shared + [11, 12, 13], 3),
        "qv-k0": ("qv", torch.randint(3, 250, (37,), generator=g).tolist(), 0),
        "base-k1-short": ("", [7], 1),
    }
    reqs = [GenerationRequest(rid, prompt_token_ids=p, adapter_id=a,
                              sampling=SamplingOptions(max_new_tokens=3, ignore_eos=True, prompt_logprobs=k))
            for rid, (a, p, k) in asks.items()]
    reqs += [GenerationRequest(f"plain-{i}", prompt_token_ids=shared + [20 + i],
                               sampling=SamplingOptions(max_new_tokens=3, ignore_eos=True))
             for i in range(2)]
    out = run(engine, reqs)
    assert all(o["error"] is None for o in out.values())
    # the plain ones took the cached prefix (5 blocks of 4 each); the asking one with the same prefix not
    assert engine.status().prefix_cache_hit_tokens - hits_before == 2 * 20
    for rid, (adapter, prompt, k) in asks.items():
        first, *rest = out[rid]["events"]
        assert first.token_ids == [] and first.prompt_logprobs is not None
        assert all(ev.prompt_logprobs is None for ev in rest) and len(out[rid]["tokens"]) == 3
        got = first.prompt_logprobs
        assert [t for t, _, _ in got] == prompt
        assert got[0] == (prompt[0], 0.0, None)
        want = prompt_oracle(model_dir, root / adapter if adapter else None, prompt)
        for p in range(1, len(prompt)):
            token, lp, top = got[p]
            assert lp == pytest.approx(float(want[p - 1, prompt[p]]), abs=1e-4), (rid, p)
            if k == 0:
                assert top is None or top == ([], [])
            else:
                values, ids = torch.topk(want[p - 1], k)
                assert top[1] == pytest.approx(values.tolist(), abs=1e-4)
                assert top[0] == ids.tolist()
    for i in range(2):
        assert out[f"plain-{i}"]["events"][0].prompt_logprobs is None


def test_prompt_logprobs_range_is_checked(setup):
    engine = setup[0]
    with pytest.raises(InvalidArgument, match="prompt_logprobs"):
        engine.submit(GenerationRequest("bad", prompt_token_ids=[3, 4],
                                        sampling=SamplingOptions(prompt_logprobs=21)), lambda ev: None)
