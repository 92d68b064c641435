"""Several adapters per request (merged_adapters) against PEFT's add_weighted_adapter: every
combination type, each request in one batch with a plain LoRA request and a base request (greedy
tokens equal, logprobs within 1e-4, fp32), and the refusals with their codes."""

from __future__ import annotations

import pathlib

import pytest
import torch
from test_engine_oracle import MAX_NEW, engine_for, run
from test_forms import peft_adapter

from services.common.errors import AdapterNotFound, InvalidArgument
from services.executor.adapters.merge import MergeSpec
from services.executor.engine import GenerationRequest, SamplingOptions

COMBOS = [("cat", ["a4", "b8", "c4"], [0.7, 1.2, -0.5]),
          ("linear", ["a4", "c4"], [0.6, -0.8]),
          ("ties", ["a4", "c4", "d4"], [1.0, 0.7, 0.4]),
          ("dare_linear", ["a4", "c4"], [0.9, 0.5]),
          ("dare_ties", ["a4", "c4", "d4"], [0.8, 0.6, 0.5]),
          ("svd", ["a4", "b8"], [1.0, 0.6])]


@pytest.fixture(scope="module")
def adapters(model_dirs, tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("merge-adapters")
    model_dir = model_dirs["llama"]
    peft_adapter(model_dir, root / "a4", 21, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_adapter(model_dir, root / "b8", 22, r=8, lora_alpha=4, target_modules=["q_proj", "o_proj", "up_proj"])
    peft_adapter(model_dir, root / "c4", 23, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"])
    peft_adapter(model_dir, root / "d4", 24, r=4, lora_alpha=4, target_modules=["k_proj", "v_proj", "down_proj"])
    peft_adapter(model_dir, root / "dora", 25, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    return root


def merged_oracle(model_dir, root, kind, names, weights, density, prompt, n, seed=0):
    """PEFT: load the adapters, add_weighted_adapter, greedy decode. Its RNG is seeded at the start of
    the merge loop (after inject_adapter's initialisation draws), where openlora's generator starts."""
    from peft import PeftModel
    from peft.tuners.lora.model import LoraModel
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      root / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(root / name, adapter_name=name)
    inject = LoraModel.inject_adapter

    def seeded(self, *a, **kw):
        out = inject(self, *a, **kw)
        torch.manual_seed(seed)
        return out

    LoraModel.inject_adapter = seeded
    try:
        model.add_weighted_adapter(names, weights, "merged", combination_type=kind, density=density)
    finally:
        LoraModel.inject_adapter = inject
    model.set_adapter("merged")
    model.eval()
    ids, tokens, lps = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            t = int(logits.argmax())
            tokens.append(t)
            lps.append(float(torch.log_softmax(logits, -1)[t]))
            ids.append(t)
    return tokens, lps


def _request(rid, prompt, adapter_id="", merged=None):
    return GenerationRequest(rid, prompt_token_ids=prompt, sampling=SamplingOptions(max_new_tokens=MAX_NEW,
                                                                                   ignore_eos=True),
                             adapter_id=merged.derived_id if merged else adapter_id,
                             adapter_version=1 if merged else 0, merged=merged)


@pytest.mark.parametrize("config", [{}, {"device_cache_bytes": 8 << 20}])   # host arena; device pool
def test_every_combination_type_matches_peft_add_weighted_adapter(config, model_dirs, adapters):
    model_dir = model_dirs["llama"]
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, 512, (4 + 3 * i,), generator=g).tolist() for i in range(len(COMBOS) + 2)]
    specs = [MergeSpec.parse(names, weights, kind, density=0.6 if kind in ("ties", "dare_linear", "dare_ties")
                             else 0.0) for kind, names, weights in COMBOS]
    reqs = [_request(f"m{i}", prompts[i], merged=s) for i, s in enumerate(specs)]
    reqs += [_request("plain", prompts[-2], "b8"), _request("base", prompts[-1])]
    engine = engine_for(model_dir, adapters, max_lora_rank=16, **config)
    try:
        out = run(engine, reqs)
        placed = {a for a, *_ in engine.adapters.placements()}
    finally:
        engine.stop()
    # cat reads its adapters' own pages in the batch; the other types are derived adapters
    assert {s.derived_id for s in specs if s.combination_type != "cat"} <= placed
    assert specs[0].derived_id not in placed and {"a4", "b8", "c4"} <= placed
    for i, (kind, names, weights) in enumerate(COMBOS):
        o = out[f"m{i}"]
        assert o["error"] is None, (kind, o["error"])
        want_t, want_lp = merged_oracle(model_dir, adapters, kind, names, weights, specs[i].density,
                                        prompts[i], MAX_NEW)
        assert o["tokens"] == want_t, kind
        torch.testing.assert_close(torch.tensor(o["logprobs"]), torch.tensor(want_lp), atol=1e-4, rtol=0,
                                   msg=kind)
    for rid in ("plain", "base"):
        assert out[rid]["error"] is None and len(out[rid]["tokens"]) == MAX_NEW


def test_merge_refusals(model_dirs, adapters):
    for args, needle in ((([],), "empty"), ((["a4", "b8"], [1.0]), "1 weights for 2"),
                         ((["a4", "b8"], [1.0, float("nan")]), "finite"),
                         ((["a4", "b8"], [1.0, 2.0], "mean"), "not one of"),
                         ((["a4", "b8"], [], "ties", 1.5), "density"),
                         ((["a4", "b8"], [], "ties", 0.5, "most"), "majority_sign_method"),
                         ((["a4@x"],), "ID@VERSION"), ((["../a"],), "")):
        with pytest.raises(InvalidArgument, match=needle):
            MergeSpec.parse(*args)
    engine = engine_for(model_dirs["llama"], adapters, max_lora_rank=16)
    bad = {"ranks": (MergeSpec.parse(["a4", "b8"], [1, 1], "linear"), InvalidArgument, "one rank"),
           "dora": (MergeSpec.parse(["a4", "dora"], [1, 1], "cat"), InvalidArgument, "'dora' is"),
           "unknown": (MergeSpec.parse(["a4", "nope"], [1, 1], "cat"), AdapterNotFound, "nope")}
    try:
        out = run(engine, [_request(k, [3, 4, 5], merged=s) for k, (s, _, _) in bad.items()])
    finally:
        engine.stop()
    for k, (_, exc, needle) in bad.items():
        assert isinstance(out[k]["error"], exc) and needle in str(out[k]["error"]), (k, out[k]["error"])


def test_merged_adapters_through_router_and_gateway(model_dirs, adapters, tmp_path):
    """GenerateRequest.merged_adapters over real servers on loopback (registry, executor, router),
    and the gateway's `merged_adapters` body field: PEFT's cat, and the refusals with their codes."""
    import json

    import grpc
    from test_gateway import Gateway, http

    from services.common.gen.openlora.v1 import common_pb2, router_pb2_grpc
    from tests.servers import deployment
    model_dir = model_dirs["llama"]
    dirs = {f"t/{n}": adapters / n for n in ("a4", "b8", "dora")}
    prompt = [5, 17, 99, 230, 41]
    want_t, want_lp = merged_oracle(model_dir, adapters, "cat", ["a4", "b8"], [0.7, -1.1], 1.0, prompt, MAX_NEW)
    with deployment(tmp_path, model_dir, dirs) as (registry, _, router):
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(router.address))
        sampling = common_pb2.SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)

        def generate(ids, weights, kind="cat", adapter_id=""):
            return stub.Generate(common_pb2.GenerateRequest(
                prompt_token_ids=prompt, sampling=sampling, adapter_id=adapter_id,
                merged_adapters=common_pb2.MergedAdapters(ids=ids, weights=weights, combination_type=kind)),
                timeout=120)

        got = generate(["t/a4", "t/b8@1"], [0.7, -1.1])
        assert list(got.token_ids) == want_t
        torch.testing.assert_close(torch.tensor(list(got.logprobs)), torch.tensor(want_lp), atol=1e-4, rtol=0)
        for args, code in (((["t/a4", "t/nope"], [1, 1]), grpc.StatusCode.NOT_FOUND),
                           ((["t/a4", "t/b8"], [1, float("inf")]), grpc.StatusCode.INVALID_ARGUMENT),
                           ((["t/a4", "t/b8"], [1, 1], "linear"), grpc.StatusCode.INVALID_ARGUMENT),
                           ((["t/a4", "t/dora"], [1, 1]), grpc.StatusCode.INVALID_ARGUMENT),
                           ((["t/a4"], [1], "cat", "t/a4"), grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.RpcError) as info:
                generate(*args)
            assert info.value.code() == code, (args, info.value.details())
        gateway = Gateway("--router", router.address, "--registry", registry.address,
                          log_path=tmp_path / "gateway.log").start()
        try:
            body = {"model": "t/a4", "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0,
                    "return_token_ids": True, "ignore_eos": True,
                    "merged_adapters": {"ids": ["t/a4", "t/b8"], "weights": [0.7, -1.1],
                                        "combination_type": "cat"}}
            url = gateway.url + "/v1/completions"
            status, reply = http(url, "POST", json.dumps(body).encode(), token=None)
            assert status == 200, reply
            assert reply["choices"][0]["token_ids"] == want_t
            status, reply = http(url, "POST", json.dumps(
                {**body, "merged_adapters": {"ids": ["t/a4", "t/nope"]}}).encode(), token=None)
            assert status == 404, reply
            status, reply = http(url, "POST", json.dumps(
                {**body, "merged_adapters": {"ids": "t/a4"}}).encode(), token=None)
            assert status == 400 and reply["error"]["param"] == "merged_adapters.ids", reply
        finally:
            gateway.stop()
