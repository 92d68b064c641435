"""Fuzzing in the suite: replay of the atheris corpus, plus short hypothesis runs over the same targets.

The long runs are `tests/fuzz/run.py TARGET --seconds N` (coverage-guided, atheris); what they find
is fixed and its input kept in tests/fuzz/corpus/<target>/, replayed here. Every target raises only
the contract's errors (never INTERNAL, never another exception) and returns within a bound.
"""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.gen.openlora.v1 import common_pb2, registry_pb2
from tests.fuzz.targets import CORPUS, TARGETS

FAST = settings(max_examples=150, deadline=2000, suppress_health_check=list(HealthCheck),
                database=None)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_corpus_replays(target):
    files = sorted((CORPUS / target).iterdir())
    assert files, f"no corpus for {target}"
    for path in files:
        TARGETS[target](path.read_bytes())


# -- structured inputs: JSON a config or header could hold --------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
module_names = st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj", "lm_head", "", ".*", "(q|v)_proj", "(a+)+", "["])

configs = st.fixed_dictionaries(
    {"peft_type": st.sampled_from(["LORA", "lora", "IA3", None])},
    optional={"r": json_scalars, "lora_alpha": json_scalars,
              "target_modules": st.lists(module_names, max_size=4) | module_names | json_values,
              "layers_to_transform": st.lists(st.integers(-2, 40), max_size=4) | json_scalars,
              "rank_pattern": st.dictionaries(module_names, json_scalars, max_size=3),
              "alpha_pattern": st.dictionaries(module_names, json_scalars, max_size=3),
              "use_rslora": json_scalars, "use_dora": json_scalars, "bias": json_scalars,
              "base_model_name_or_path": json_scalars, "modules_to_save": json_values})


@FAST
@given(configs)
def test_peft_config_json(cfg):
    TARGETS["peft_config"](json.dumps(cfg, allow_nan=True).encode())


@FAST
@given(st.binary(max_size=512))
def test_peft_config_bytes(data):
    TARGETS["peft_config"](data)


tensor_names = st.sampled_from([
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight",
    "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
    "base_model.model.lm_head.lora_A.weight", "__metadata__", "x", ""])
entries = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "F64", "Q4", 3]),
    "shape": st.lists(st.integers(-1, 70000), max_size=3) | json_scalars,
    "data_offsets": st.lists(st.integers(-1, 2**40), max_size=3) | json_scalars})


@FAST
@given(st.dictionaries(tensor_names, entries | json_values, max_size=5), st.integers(0, 4096),
       st.integers(-8, 8))
def test_safetensors_headers(header, data_len, skew):
    body = json.dumps(header).encode()
    n = max(0, len(body) + skew)
    TARGETS["safetensors_header"](struct.pack("<Q", n) + body + bytes(data_len))
    TARGETS["adapter_pair"](json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                        "target_modules": ["q_proj", "v_proj"]}).encode()
                            + b"\0" + struct.pack("<Q", n) + body + bytes(data_len))


@FAST
@given(st.binary(max_size=256))
def test_safetensors_bytes(data):
    TARGETS["safetensors_header"](data)


texts = st.text(max_size=60) | st.sampled_from(["a/b", "../x", "a//b", "a/../b", "-x", "a" * 129, "."])


@FAST
@given(texts, texts, st.lists(st.integers(0, 2**32 - 1), max_size=8),
       st.floats(allow_nan=True), st.floats(allow_nan=True), st.integers(0, 2**32 - 1),
       st.lists(texts, max_size=3), st.integers(0, 2**32 - 1))
def test_generate_requests(adapter, prompt, ids, temperature, top_p, top_k, stop, top_logprobs):
    msg = common_pb2.GenerateRequest(
        adapter_id=adapter, prompt=prompt, prompt_token_ids=ids,
        sampling=common_pb2.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                                           stop=stop, top_logprobs=top_logprobs,
                                           repetition_penalty=temperature, presence_penalty=top_p))
    TARGETS["generate_request"](msg.SerializeToString())


sources = st.one_of(texts, st.builds(lambda s, p: f"{s}://{p}", st.sampled_from(
    ["file", "hf", "s3", "ftp", "FILE", ""]), st.text(max_size=60)),
    st.sampled_from(["file:///etc/passwd", "file://localhost/etc", "file:///%2e%2e/x",
                     "hf://../../x", "hf://a/b@/../", "file://\x00"]))


@FAST
@given(texts, sources, st.dictionaries(texts, texts, max_size=3), texts, texts)
def test_registry_requests(adapter_id, source, labels, selector, page_token):
    data = registry_pb2.RegisterAdapterRequest(adapter_id=adapter_id, source=source,
                                               labels=labels).SerializeToString()
    TARGETS["registry_requests"](data)
    TARGETS["registry_requests"](registry_pb2.ListAdaptersRequest(
        label_selector=selector, page_token=page_token).SerializeToString())


@FAST
@given(st.dictionaries(st.sampled_from(["tokens", "x"]), st.lists(
    st.dictionaries(st.sampled_from(["token", "token_sha256", "tenant", "role", "expires_at"]),
                    json_scalars | st.sampled_from(["admin", "tenant", "service", "a" * 64]),
                    max_size=5) | json_values, max_size=3) | json_values, max_size=2) | json_values)
def test_auth_file_json(doc):
    TARGETS["auth_inputs"](json.dumps(doc).encode())


@FAST
@given(st.binary(max_size=200))
def test_auth_header_bytes(data):
    TARGETS["auth_inputs"](data)


openai_fields = st.fixed_dictionaries({}, optional={
    "model": json_scalars, "prompt": json_values | st.lists(st.integers(-5, 2**40), max_size=5),
    "messages": st.lists(st.fixed_dictionaries({}, optional={
        "role": st.sampled_from(["system", "user", "assistant", "tool", 3]),
        "content": json_values}), max_size=3) | json_values,
    "max_tokens": json_scalars, "max_completion_tokens": json_scalars, "temperature": json_scalars,
    "top_p": json_scalars, "top_k": json_scalars, "n": json_scalars, "stop": json_values,
    "seed": json_scalars, "logprobs": json_scalars, "top_logprobs": json_scalars,
    "stream": json_scalars, "stream_options": json_values, "presence_penalty": json_scalars,
    "frequency_penalty": json_scalars, "logit_bias": json_values, "suffix": json_scalars})


@FAST
@given(openai_fields)
def test_gateway_json_fields(body):
    TARGETS["gateway_json"](json.dumps(body, allow_nan=True).encode())


@FAST
@given(st.binary(max_size=300) | st.integers(1, 20000).map(lambda n: b"[" * n + b"{" * (n % 7)))
def test_gateway_json_bytes(data):
    TARGETS["gateway_json"](data)
