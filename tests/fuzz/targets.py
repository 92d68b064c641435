"""Fuzz targets: bytes in, and nothing but the contract's errors out.

Each target feeds one input to a parser or validator that takes outside input. An expected rejection
is an OpenLoraError whose code is not INTERNAL; anything else (another exception type, an INTERNAL
error, a hang) is a bug. `tests/fuzz/run.py` drives them with atheris (coverage-guided); the suite
replays `tests/fuzz/corpus/<target>/` and runs hypothesis strategies over them (tests/test_fuzz.py).
"""

from __future__ import annotations

import json
import pathlib
import tempfile

import grpc
from google.protobuf.message import DecodeError

from services.common import auth
from services.common.errors import OpenLoraError
from services.common.gen.openlora.v1 import common_pb2, registry_pb2
from services.common.peft_format import (
    check_adapter_id,
    parse_adapter_config,
    read_safetensors_header,
    validate_adapter,
)

MAX_INPUT = 1 << 16


def expected(exc: BaseException) -> bool:
    """A rejection the contract allows: a domain error with a non-INTERNAL code."""
    return isinstance(exc, OpenLoraError) and exc.code != grpc.StatusCode.INTERNAL


def _guard(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        if not expected(exc):
            raise
        return None


def peft_config(data: bytes) -> None:
    """adapter_config.json as bytes -> LoraConfig or InvalidAdapter."""
    cfg = _guard(parse_adapter_config, data)
    if cfg is not None:                # a config that parses answers every question without crashing
        for path in ("model.layers.0.self_attn.q_proj", "model.layers.31.mlp.down_proj", "lm_head"):
            if cfg.targets(path):
                assert cfg.rank_for(path) > 0
                cfg.scaling_for(path)
        _ = cfg.target_module_names


_CONFIG = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                      "target_modules": ["q_proj", "v_proj"]}).encode()


def safetensors_header(data: bytes) -> None:
    """adapter_model.safetensors bytes -> header checked, then validated against a plain config."""
    parsed = _guard(read_safetensors_header, data)
    if parsed is not None:
        tensors, size = parsed
        assert size >= 8
        _guard(validate_adapter, parse_adapter_config(_CONFIG), tensors)


def adapter_pair(data: bytes) -> None:
    """One input split at the first NUL: config JSON, then safetensors bytes; both must hold."""
    config_bytes, _, weights = data.partition(b"\0")
    cfg = _guard(parse_adapter_config, config_bytes)
    parsed = _guard(read_safetensors_header, weights)
    if cfg is not None and parsed is not None:
        _guard(validate_adapter, cfg, parsed[0])


def generate_request(data: bytes) -> None:
    """A GenerateRequest off the wire -> the executor's conversion and checks, and the ownership check."""
    from services.executor.servicer import to_request
    try:
        msg = common_pb2.GenerateRequest.FromString(data)
    except DecodeError:
        return                          # gRPC itself refuses it before any handler runs
    req = to_request(msg)
    req.sampling.problems()
    if req.adapter_id:
        _guard(check_adapter_id, req.adapter_id)
    token = auth._current.set(auth.Identity("fuzz", "tenant"))
    try:
        _guard(auth.require_adapter, msg.adapter_id)
    finally:
        auth._current.reset(token)


def registry_requests(data: bytes) -> None:
    """Register/List requests off the wire -> the registry's checks of ids, labels, selectors, tokens,
    source URIs (file:// bounded to an empty temp dir, hf:// parsed only)."""
    from services.registry.core import _decode_token, check_labels, parse_label_selector
    from services.registry.sources import fetch_source
    from services.registry.sources.file import FileSource
    from services.registry.sources.hf import parse_hf_uri
    try:
        reg = registry_pb2.RegisterAdapterRequest.FromString(data)
        ls = registry_pb2.ListAdaptersRequest.FromString(data)
    except DecodeError:
        return
    _guard(check_adapter_id, reg.adapter_id)
    _guard(check_labels, dict(reg.labels))
    _guard(parse_label_selector, ls.label_selector)
    _guard(_decode_token, ls.page_token)
    with tempfile.TemporaryDirectory() as d:
        work = pathlib.Path(d)
        allowed = work / "allowed"
        allowed.mkdir()
        sources = {"file": FileSource([allowed]), "hf": _HfParseOnly(parse_hf_uri)}
        _guard(fetch_source, reg.source, work, sources)


class _HfParseOnly:
    def __init__(self, parse):
        self.parse = parse

    def fetch(self, uri, workdir):
        self.parse(uri)
        return {}


def auth_inputs(data: bytes) -> None:
    """The auth file's JSON and an authorization header."""
    text = data.decode("utf-8", "replace")
    table = _guard(auth.parse_tokens, text, "fuzz")
    if table is not None:
        assert all(i.role in auth.ROLES for i in table.values())
    t = auth.TokenTable(inline='{"tokens": [{"token": "k", "tenant": "t", "role": "tenant"}]}')
    _guard(t.identify, text)


class _Body:
    """The part of a Starlette Request that read_json reads."""

    def __init__(self, data: bytes):
        self.headers = {"content-length": str(len(data))}
        self._data = data

    async def stream(self):
        yield self._data


def gateway_json(data: bytes) -> None:
    """An HTTP body -> the gateway's JSON reading and its OpenAI field validators (400s, never 500)."""
    import asyncio

    from services.gateway import openai_api as api
    from services.gateway.app import read_json

    def check(fn, *args):
        try:
            return fn(*args)
        except api.ApiError as exc:
            assert 400 <= exc.status < 500, (exc.status, exc.message)
            return None

    async def body():
        try:
            return await read_json(_Body(data), 1 << 20)
        except api.ApiError as exc:
            assert 400 <= exc.status < 500, (exc.status, exc.message)
            return None

    doc = asyncio.run(body())
    if doc is None:
        return
    for chat in (False, True):
        check(api.sampling, doc, 16, chat)
    check(api.prompts, doc)
    check(api.chat_messages, doc)
    check(api.completion_logprobs_k, doc)
    check(api.chat_logprobs_k, doc)
    check(api.unsupported, doc, ("suffix", "best_of"))


TARGETS = {f.__name__: f for f in (peft_config, safetensors_header, adapter_pair, generate_request,
                                   registry_requests, auth_inputs, gateway_json)}
CORPUS = pathlib.Path(__file__).parent / "corpus"
