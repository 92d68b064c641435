"""Each served family (Qwen3, Gemma 2/3, Phi-3, Qwen3-MoE, Mixtral) against transformers + peft.

Tiny random models are built with transformers' own classes and saved with save_pretrained; the
adapters are PEFT's (get_peft_model + save_pretrained) with random non-zero A and B, different
ranks and targets. One concurrent batch mixes every adapter with base-only requests; each
request's greedy tokens and logprobs must equal transformers+peft run on it alone (fp32, 1e-4),
with prefix caching on (a second wave of the same prompts reuses cached blocks and answers the same).
"""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch
from test_engine_oracle import MAX_NEW, engine_for, oracle, run

from services.common.errors import AdapterMismatch
from services.executor.adapters.reader import read_adapter
from services.executor.engine import GenerationRequest, SamplingOptions
from services.executor.model.config import ModelConfig

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
              pad_token_id=None)


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    # head_dim 24 != hidden / heads (16): q_proj is [96, 64], o_proj [64, 96]
    return Qwen3ForCausalLM(Qwen3Config(**COMMON, intermediate_size=96, head_dim=24,
                                        tie_word_embeddings=False))


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    # window 8 < the longer prompts; soft-capping low enough to bite on these logits
    return Gemma2ForCausalLM(Gemma2Config(**COMMON, intermediate_size=96, head_dim=16,
                                          query_pre_attn_scalar=24, sliding_window=8,
                                          attn_logit_softcapping=5.0, final_logit_softcapping=8.0))


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    return Gemma3ForCausalLM(Gemma3TextConfig(
        **COMMON, intermediate_size=96, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}}))


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM
    return Phi3ForCausalLM(Phi3Config(**COMMON, intermediate_size=96, tie_word_embeddings=False))


def _phi4_mini():
    """Phi-4-mini's shape: partial rotary (0.75), LongRoPE past a 16-token original context (the
    long factors from position 16 on), tied embeddings."""
    from transformers import Phi3Config, Phi3ForCausalLM
    half = 16 * 3 // 4 // 2
    g = torch.Generator().manual_seed(3)
    short = (1 + torch.rand(half, generator=g)).tolist()
    long = (1 + 4 * torch.rand(half, generator=g)).tolist()
    return Phi3ForCausalLM(Phi3Config(
        **COMMON, intermediate_size=96, tie_word_embeddings=True, original_max_position_embeddings=16,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": short, "long_factor": long,
                         "original_max_position_embeddings": 16}))


def _qwen3_moe():
    """4 experts, top-2 with renormalised weights; layer 1 a dense MLP (mlp_only_layers)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        **COMMON, intermediate_size=96, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, head_dim=16, mlp_only_layers=[1], tie_word_embeddings=False))


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    return MixtralForCausalLM(MixtralConfig(**COMMON, intermediate_size=80, num_local_experts=6,
                                            num_experts_per_tok=2, sliding_window=None))


def _olmoe():
    """q/k norms over the whole projections, clip_qkv, top-2 of 4 experts without renormalising."""
    from transformers import OlmoeConfig, OlmoeForCausalLM
    return OlmoeForCausalLM(OlmoeConfig(**COMMON, intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                                        clip_qkv=1.0, tie_word_embeddings=False))


EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

FAMILIES = {
    "qwen3": (_qwen3, [
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                "up_proj", "down_proj"], use_rslora=True),
        dict(r=2, lora_alpha=6, target_modules=["o_proj", "down_proj"], layers_to_transform=[1]),
    ]),
    "gemma2": (_gemma2, [
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        dict(r=4, lora_alpha=8, target_modules="all-linear"),
    ]),
    "gemma3": (_gemma3, [
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj"]),
        dict(r=4, lora_alpha=12, target_modules=["gate_proj", "up_proj", "down_proj", "v_proj"],
             use_rslora=True),
    ]),
    "phi3": (_phi3, [   # PEFT on the fused modules: one LoRA over [q | k | v] and [gate | up]
        dict(r=8, lora_alpha=16, target_modules=["qkv_proj", "o_proj"]),
        dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj", "down_proj"]),
    ]),
    "qwen3_moe": (_qwen3_moe, [   # LoRA on every expert (PEFT target_parameters) and on the router
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS),
        dict(r=8, lora_alpha=16, target_modules=["o_proj", "down_proj"],
             target_parameters=["mlp.experts.down_proj", "mlp.gate.weight"]),
        dict(r=2, lora_alpha=4, target_modules=["k_proj"]),
    ]),
    "mixtral": (_mixtral, [
        dict(r=4, lora_alpha=8, target_modules=[], target_parameters=EXPERTS + ["mlp.gate.weight"]),
        dict(r=6, lora_alpha=12, target_modules=["q_proj", "o_proj"],
             target_parameters=["mlp.experts.gate_up_proj"], use_rslora=True),
    ]),
    "olmoe": (_olmoe, [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], target_parameters=EXPERTS),
        dict(r=2, lora_alpha=2, target_modules=["v_proj", "o_proj"], target_parameters=["mlp.gate.weight"]),
    ]),
    "phi4mini": (_phi4_mini, [
        dict(r=8, lora_alpha=16, target_modules="all-linear"),
        dict(r=2, lora_alpha=4, target_modules=["gate_up_proj"]),
    ]),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights scaled so that logits are well separated (HF's 0.02-std init makes near-ties)."""
    g = torch.Generator().manual_seed(seed)
    offset_norm = type(model).__name__.startswith("Gemma")   # Gemma's norms scale by (1 + w)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif "norm" in name:
                p.copy_((0.0 if offset_norm else 1.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def build_family(root: pathlib.Path, family: str, seed: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
    """-> (model dir, adapters root) written by transformers and peft."""
    from peft import LoraConfig, get_peft_model
    make, adapters = FAMILIES[family]
    torch.manual_seed(seed)
    model = make()
    randomize(model, seed)
    model_dir = root / family
    model.save_pretrained(model_dir)
    adapters_root = root / f"{family}-adapters"
    for i, kw in enumerate(adapters):
        base = make()
        base.load_state_dict(model.state_dict())
        peft = get_peft_model(base, LoraConfig(lora_dropout=0.0, init_lora_weights=False, **kw))
        g = torch.Generator().manual_seed(seed * 100 + i)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        peft.save_pretrained(adapters_root / f"a{i}-r{kw['r']}")
    return model_dir, adapters_root


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    return request.param, *build_family(tmp_path_factory.mktemp(request.param), request.param)


def requests_for(family: str, names: list[str], tag: str, lengths=None) -> list[tuple]:
    g = torch.Generator().manual_seed(sum(map(ord, family)))
    reqs = []
    for i, name in enumerate(names + [None, None]):
        length = lengths[i] if lengths else 3 + (i * 7) % 19           # 3..21 tokens
        prompt = torch.randint(2, VOCAB, (length,), generator=g).tolist()
        reqs.append((GenerationRequest(f"{tag}-{i}", prompt_token_ids=prompt, adapter_id=name or "",
                                       sampling=SamplingOptions(max_new_tokens=MAX_NEW, ignore_eos=True)),
                     name))
    return reqs


def cached_oracle(model_dir, adapter_dir, prompt: list[int], n: int):
    """transformers' own cached generation (prefill, then one token a step with past_key_values):
    LongRoPE switches to the long factors for the steps past the original context while the cached
    keys keep the short ones, which a KV-cached server does too. (Recomputing the whole sequence each
    step, as `oracle` does, re-rotates every past key with the long factors.)"""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    tokens, logprobs, past, ids = [], [], None, torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            out = model(ids, past_key_values=past, use_cache=True)
            logits, past = out.logits[0, -1].float(), out.past_key_values
            t = int(logits.argmax())
            tokens.append(t)
            logprobs.append(float(torch.log_softmax(logits, -1)[t]))
            ids = torch.tensor([[t]])
    return tokens, logprobs


# per family: (prompt lengths, oracle) where the defaults (3..21 tokens, recomputing oracle) won't do
SPECIAL = {"phi4mini": ([5, 9, 12, 14, 16], cached_oracle)}   # prompts fit 16, generation crosses it


def serve_family(model_dir, root, family: str, tag: str, **overrides) -> tuple[dict, list[tuple]]:
    """One engine (max_lora_rank 16, + overrides) with every adapter under root loaded runs the
    family's mixed batch (requests_for) -> (its outputs by request id, the (request, adapter) pairs)."""
    names = sorted(p.name for p in root.iterdir())
    engine = engine_for(model_dir, root, **{"max_lora_rank": 16, **overrides})
    for n in names:
        engine.load_adapter(n, 0)
    requests = requests_for(family, names, tag)
    try:
        return run(engine, [r for r, _ in requests]), requests
    finally:
        engine.stop()


def check(model_dir, root, out, requests, oracle_fn=oracle, atol=1e-4):
    for req, name in requests:
        o = out[req.request_id]
        assert o["error"] is None, o["error"]
        want_tokens, want_lp = oracle_fn(model_dir, root / name if name else None,
                                         req.prompt_token_ids, MAX_NEW)
        assert o["tokens"] == want_tokens, (req.request_id, name)
        torch.testing.assert_close(torch.tensor(o["logprobs"]), torch.tensor(want_lp), atol=atol, rtol=0)


def test_family_mixed_batch_matches_transformers_peft_with_prefix_caching(family):
    name, model_dir, root = family
    names = sorted(p.name for p in root.iterdir())
    engine = engine_for(model_dir, root, max_lora_rank=16)
    for n in names:
        engine.load_adapter(n, 0)
    lengths, oracle_fn = SPECIAL.get(name, (None, oracle))
    first = requests_for(name, names, "w1", lengths)
    second = [(GenerationRequest(f"w2-{i}", prompt_token_ids=r.prompt_token_ids, adapter_id=r.adapter_id,
                                 sampling=r.sampling), n) for i, (r, n) in enumerate(first)]
    try:
        out = run(engine, [r for r, _ in first])
        hits = engine.scheduler.prefix_hit_tokens
        out |= run(engine, [r for r, _ in second])
        assert engine.scheduler.prefix_hit_tokens > hits, "the second wave should reuse cached blocks"
    finally:
        engine.stop()
    check(model_dir, root, out, first + second, oracle_fn)


def test_family_adapter_shapes_are_checked(family, tmp_path):
    """The executor's reader accepts each adapter; a tensor of the wrong shape is refused
    (AdapterMismatch: FAILED_PRECONDITION) naming the tensor."""
    from safetensors.torch import load_file, save_file
    name, model_dir, root = family
    cfg = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    src = sorted(root.iterdir())[0]
    assert read_adapter(src, cfg, 16).weights
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    victim = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[victim] = torch.zeros(tensors[victim].shape[0] + 2, tensors[victim].shape[1])
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterMismatch, match=victim.replace(".", r"\.")):
        read_adapter(bad, cfg, 16)


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(ValueError, match="supported: .*Qwen3ForCausalLM.*Gemma2ForCausalLM"):
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_registry_base_model_check_knows_the_family(family):
    """The registry's --base-model check reads the family's module shapes: every adapter fits, one
    built for another model (a renamed tensor, a wrong shape) is refused naming the tensor."""
    from services.common.peft_format import parse_adapter_config, read_safetensors_header
    from services.registry.base_models import BaseModelShape, check_fits
    name, model_dir, root = family
    shape = BaseModelShape.from_dir(model_dir)
    for adapter in sorted(root.iterdir()):
        tensors, _ = read_safetensors_header((adapter / "adapter_model.safetensors").read_bytes())
        config = parse_adapter_config((adapter / "adapter_config.json").read_bytes())
        check_fits([shape], adapter.name, tensors, config)
    victim = sorted(k for k in tensors if "lora_A" in k)[0]
    info = tensors[victim]
    wrong = dict(tensors)
    wrong[victim] = type(info)(info.dtype, (info.shape[0], info.shape[1] + 1), info.start, info.end)
    with pytest.raises(AdapterMismatch, match=victim.replace(".", r"\.")):
        check_fits([shape], "wrong", wrong, config)


@pytest.mark.parametrize("config, message", [
    ({"architectures": ["Qwen3ForCausalLM"], "hidden_act": "relu2"}, "activation 'relu2' is not supported"),
    ({"architectures": ["Gemma3ForCausalLM"], "rope_parameters": {
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
        "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}, "sliding layers use default RoPE"),
    ({"architectures": ["Gemma2ForCausalLM"], "layer_types": ["sliding_attention"]}, "for each of the 2 layers"),
])
def test_unsupported_family_configs_are_refused(config, message):
    """What a family's implementation does not cover is refused at load with a message naming it
    (the executor does not start), not served with different numerics."""
    base = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=96)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf({**base, **config})


def test_unsupported_rope_scaling_is_refused_at_load():
    from services.executor.model.layers import rope_tables
    cfg = ModelConfig.from_hf(dict(architectures=["Qwen3ForCausalLM"], vocab_size=VOCAB, hidden_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                   rope_scaling={"rope_type": "mrope", "factor": 2.0}))
    with pytest.raises(ValueError, match="rope_scaling type 'mrope' is not supported"):
        rope_tables(cfg, 16)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "olmoe"])
def test_moe_per_expert_checkpoints_load_as_the_fused_experts(arch, tmp_path):
    """Hub checkpoints keep one tensor per expert (Qwen3-MoE: mlp.experts.E.gate_proj/up_proj/
    down_proj; Mixtral: block_sparse_moe.experts.E.w1/w3/w2 and block_sparse_moe.gate): they load
    into the same fused parameters transformers 5 saves."""
    from safetensors.torch import load_file, save_file

    from services.executor.model.loader import load_model
    make, _ = FAMILIES[arch]
    torch.manual_seed(1)
    model = make()
    randomize(model, 1)
    model.save_pretrained(tmp_path / "fused")
    cfg = model.config
    block, names = ("mlp", ("gate_proj", "up_proj", "down_proj")) if arch != "mixtral" else (
        "block_sparse_moe", ("w1", "w3", "w2"))
    state = load_file(str(tmp_path / "fused" / "model.safetensors"))
    split = {}
    for k, t in state.items():
        if ".mlp.experts.gate_up_proj" in k or ".mlp.experts.down_proj" in k or (
                ".mlp.gate." in k and block != "mlp"):
            continue
        split[k] = t
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.mlp"
        if f"{p}.experts.gate_up_proj" not in state:
            continue
        gu, down = state[f"{p}.experts.gate_up_proj"], state[f"{p}.experts.down_proj"]
        for e in range(gu.shape[0]):
            gate, up = gu[e].chunk(2)
            for n, t in zip(names, (gate, up, down[e]), strict=True):
                split[f"model.layers.{layer}.{block}.experts.{e}.{n}.weight"] = t.contiguous()
        if block != "mlp":
            split[f"model.layers.{layer}.{block}.gate.weight"] = state[f"{p}.gate.weight"]
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "config.json").write_bytes((tmp_path / "fused" / "config.json").read_bytes())
    save_file(split, str(tmp_path / "split" / "model.safetensors"))
    fused, _, _ = load_model(str(tmp_path / "fused"), torch.device("cpu"), torch.float32, 64)
    loaded, _, _ = load_model(str(tmp_path / "split"), torch.device("cpu"), torch.float32, 64)
    want, got = fused.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


# each family's chat format, as its tokenizer_config.json's chat_template renders it (shortened)
CHAT_TEMPLATES = {
    "qwen3_moe": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "gemma2": ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant'"
               " else m['role']) + '\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"),
}


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_family_chat_through_registry_router_and_gateway(name, tmp_path):
    """The family served for real: its PEFT adapters registered in a registry that checks them
    against the base model (--base-model; MoE expert LoRA included), an executor, the router and the
    OpenAI gateway; a chat completion in the family's chat format answers, greedily, what
    transformers+peft answers for the templated prompt."""
    import grpc
    import openai
    from test_gateway import Gateway
    from transformers import AutoTokenizer

    from services.common.gen.openlora.v1 import registry_pb2, registry_pb2_grpc
    from services.synthetic import write_tokenizer
    from tests.servers import Service
    model_dir, root = build_family(tmp_path, name)
    write_tokenizer(model_dir, VOCAB)
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "chat_template": CHAT_TEMPLATES[name]}))
    adapter = sorted(p.name for p in root.iterdir())[0]
    messages = [{"role": "user", "content": "Hello world, hello adapters! The quick brown fox jumps."}]
    ids = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    started = []
    try:
        registry = Service("registry", "--data-dir", str(tmp_path / "reg"), "--base-model", str(model_dir),
                           log_path=tmp_path / "registry.log")
        started.append(registry.start())
        executor = Service("executor", "--registry", registry.address, "--base-model", str(model_dir),
                           "--disk-cache-dir", str(tmp_path / "disk"), log_path=tmp_path / "executor.log")
        started.append(executor.start(timeout=600))
        router = Service("router", "--registry", registry.address, "--executor", executor.address,
                         "--poll-interval-s", "0.2", log_path=tmp_path / "router.log")
        started.append(router.start())
        with grpc.insecure_channel(registry.address) as ch:
            registry_pb2_grpc.AdapterRegistryStub(ch).RegisterAdapter(registry_pb2.RegisterAdapterRequest(
                adapter_id=f"org/{adapter}", source=f"file://{root / adapter}"), timeout=30)
        gateway = Gateway("--router", router.address, "--registry", registry.address,
                          "--models-cache-s", "0", log_path=tmp_path / "gateway.log")
        started.append(gateway.start().service)
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
        for model, adapter_dir in ((f"org/{adapter}", root / adapter), (name, None)):
            got = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_NEW,
                                                 temperature=0, extra_body={"ignore_eos": True,
                                                                            "return_token_ids": True})
            want, _ = oracle(model_dir, adapter_dir, ids, MAX_NEW)
            assert got.usage.prompt_tokens == len(ids), model
            assert got.choices[0].model_extra["token_ids"] == want, model
    finally:
        for s in reversed(started):
            s.stop()


@pytest.mark.parametrize("name", ["qwen3", "gemma2", "qwen3_moe"])
def test_family_bfloat16_within_its_tolerance(name, tmp_path):
    """bfloat16: the engine's mixed batch, teacher-forced through transformers+peft in bfloat16 on
    the engine's own tokens: each token is transformers' argmax or within 0.1 nats of it, and its
    logprob within 0.1 of transformers' (bf16 keeps ~3 significant digits: greedy runs may part
    at a near-tie, which is why the tokens are not compared run against run)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model_dir, root = build_family(tmp_path, name)
    out, reqs = serve_family(model_dir, root, name, "bf16", dtype="bfloat16")
    for req, adapter in reqs:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        if adapter:
            model = PeftModel.from_pretrained(model, root / adapter)
        o, ids = out[req.request_id], list(req.prompt_token_ids)
        assert o["error"] is None and len(o["tokens"]) == MAX_NEW
        with torch.no_grad():
            for t, lp in zip(o["tokens"], o["logprobs"], strict=True):
                want = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
                assert float(want.max() - want[t]) <= 0.1, (req.request_id, len(ids))
                assert abs(float(want[t]) - lp) <= 0.1, (req.request_id, len(ids))
                ids.append(t)


def test_moe_cat_of_expert_adapters_matches_peft_with_both_active(tmp_path):
    """A cat request (merged_adapters) over two adapters on every expert: the grouped experts' one
    op call per parameter reads each (expert, adapter) segment's pages, then the overlay pass the
    second adapter's. With weights 1 and 1, cat is both deltas added: PEFT with both adapters active.
    In one batch with a plain request on one of them and a base request."""
    from peft import PeftModel
    from test_forms import peft_adapter
    from transformers import AutoModelForCausalLM

    from services.executor.adapters.merge import MergeSpec
    torch.manual_seed(5)
    model = _qwen3_moe()
    randomize(model, 5)
    model_dir = tmp_path / "moe"
    model.save_pretrained(model_dir)
    for name, seed, r in (("a", 51, 4), ("b", 52, 8)):   # ParamWrapper: the same parameters in both
        peft_adapter(model_dir, tmp_path / "adapters" / name, seed, r=r, lora_alpha=2 * r, lora_dropout=0.0,
                     init_lora_weights=False, target_modules=["q_proj"], target_parameters=EXPERTS)
    spec = MergeSpec.parse(["a", "b"], [1.0, 1.0], "cat")
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (9, 14, 5)]
    opts = SamplingOptions(max_new_tokens=MAX_NEW, ignore_eos=True)
    reqs = [GenerationRequest("cat", prompt_token_ids=prompts[0], adapter_id=spec.derived_id,
                              adapter_version=1, merged=spec, sampling=opts),
            GenerationRequest("plain", prompt_token_ids=prompts[1], adapter_id="b", sampling=opts),
            GenerationRequest("base", prompt_token_ids=prompts[2], sampling=opts)]
    engine = engine_for(model_dir, tmp_path / "adapters")
    try:
        out = run(engine, reqs)
    finally:
        engine.stop()
    both = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                     tmp_path / "adapters" / "a", adapter_name="a")
    both.load_adapter(tmp_path / "adapters" / "b", adapter_name="b")
    both.base_model.set_adapter(["a", "b"])
    both.eval()
    ids, tokens, lps = list(prompts[0]), [], []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            logits = both(torch.tensor([ids])).logits[0, -1].float()
            tokens.append(int(logits.argmax()))
            lps.append(float(torch.log_softmax(logits, -1)[tokens[-1]]))
            ids.append(tokens[-1])
    assert out["cat"]["error"] is None and out["cat"]["tokens"] == tokens
    torch.testing.assert_close(torch.tensor(out["cat"]["logprobs"]), torch.tensor(lps), atol=1e-4, rtol=0)
    for rid, name, prompt in (("plain", "b", prompts[1]), ("base", None, prompts[2])):
        want_t, want_lp = oracle(model_dir, tmp_path / "adapters" / name if name else None, prompt, MAX_NEW)
        assert out[rid]["tokens"] == want_t, rid
        torch.testing.assert_close(torch.tensor(out[rid]["logprobs"]), torch.tensor(want_lp), atol=1e-4, rtol=0)
