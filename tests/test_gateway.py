"""The OpenAI-compatible gateway over a real deployment on loopback, through the official `openai` SDK.

registry + one executor + router + gateway as subprocesses (module-scoped: started once); every
answer is compared token for token with the router's gRPC answer for the same request and seed.
Two more gateways (no torch, a second each) cover a model without a chat template, a short request
deadline, a small body limit and a router that is down. The deployment runs with --auth-file: the
gateway passes each caller's own bearer token on (the SDK's api_key), never its own service token.
"""

from __future__ import annotations

import http.client as httpclient
import json
import shutil
import threading
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from services.common.errors import HTTP_STATUS
from services.common.gen.openlora.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    router_pb2_grpc,
)
from services.synthetic import AdapterSpec, write_adapter
from tests.conftest import TINY
from tests.servers import Service, free_port

ADAPTERS = {"org/qv": AdapterSpec(rank=4, alpha=8, targets=("q_proj", "v_proj"), seed=301),
            "org/mlp": AdapterSpec(rank=8, alpha=16, targets=("gate_proj", "up_proj", "down_proj"), seed=302)}
SAMPLED = {"temperature": 0.8, "top_p": 0.9, "seed": 7}
EXTRA = {"top_k": 20, "ignore_eos": True, "return_token_ids": True}
TOKENS = {"admin": "admin-tok", "service": "service-tok", "a": "tenant-a-tok"}
ADMIN = (("authorization", f"Bearer {TOKENS['admin']}"),)


class Gateway:
    """`openlora gateway` in a subprocess (the harness's Service: ready when GET /health answers)."""

    def __init__(self, *args: str, log_path=None):
        self.service = Service("gateway", *args, log_path=log_path)
        self.port, self.url = self.service.port, self.service.url

    def start(self, timeout: float = 60) -> Gateway:
        self.service.start(timeout)
        return self

    def stop(self) -> None:
        self.service.stop()


def http(url: str, method: str = "GET", body: bytes | None = None, token: str | None = TOKENS["admin"]):
    """(status, parsed JSON or text) of one raw HTTP request (as admin unless `token` says otherwise)."""
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def assert_error_shape(payload, status: int) -> None:
    assert set(payload) == {"error"}, payload
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"] and isinstance(err["type"], str), err


@pytest.fixture(scope="module")
def stack(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway")
    adapter_dirs = {aid: write_adapter(root / aid.replace("/", "_"), TINY["llama"], spec)
                    for aid, spec in ADAPTERS.items()}
    started: list = []
    auth_file = root / "tokens.json"
    auth_file.write_text(json.dumps({"tokens": [
        {"token": TOKENS["admin"], "tenant": "ops", "role": "admin"},
        {"token": TOKENS["service"], "tenant": "cluster", "role": "service"},
        {"token": TOKENS["a"], "tenant": "a", "role": "tenant"}]}))
    secured = ("--auth-file", str(auth_file), "--token", TOKENS["service"])

    def start(service, timeout=600):
        started.append(service)
        return service.start(timeout=timeout)

    try:
        registry = start(Service("registry", "--data-dir", str(root / "registry"), *secured,
                                 log_path=root / "registry.log"))
        executor = start(Service("executor", "--registry", registry.address, "--base-model", str(llama_dir),
                                 "--disk-cache-dir", str(root / "disk"), "--max-batch-size", "8",
                                 "--max-queue", "4", *secured, log_path=root / "executor.log"))
        router = start(Service("router", "--registry", registry.address, "--executor", executor.address,
                               "--poll-interval-s", "0.2", *secured, log_path=root / "router.log"))
        with grpc.insecure_channel(registry.address) as ch:
            stub = registry_pb2_grpc.AdapterRegistryStub(ch)
            for aid, path in adapter_dirs.items():
                stub.RegisterAdapter(registry_pb2.RegisterAdapterRequest(
                    adapter_id=aid, source=f"file://{path}"), timeout=30, metadata=ADMIN)
        # the gateway learns the base model (name, tokenizer, chat template) from the executors
        gateway = start(Gateway("--router", router.address, "--registry", registry.address,
                                "--token", TOKENS["service"], "--models-cache-s", "0",
                                log_path=root / "gateway.log"))
        plain = root / "no-template"
        shutil.copytree(llama_dir, plain)
        cfg = json.loads((plain / "tokenizer_config.json").read_text())
        cfg.pop("chat_template")
        (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
        strict = start(Gateway("--router", router.address, "--base-model", str(plain),
                               "--served-model-name", "plain", "--request-timeout-s", "0.02",
                               "--max-body-bytes", "2000", log_path=root / "strict.log"))
        orphan = start(Gateway("--router", f"127.0.0.1:{free_port()}", "--served-model-name", "base",
                               log_path=root / "orphan.log"))
    except BaseException:
        for s in reversed(started):
            s.stop()
        raise
    channel = grpc.insecure_channel(router.address)
    try:
        yield {"registry": registry, "executor": executor, "router": router, "gateway": gateway,
               "strict": strict, "orphan": orphan, "root": root, "llama": llama_dir,
               "rpc": router_pb2_grpc.RouterStub(channel),
               "client": openai.OpenAI(base_url=gateway.url + "/v1", api_key=TOKENS["admin"],
                                       max_retries=0)}
    finally:
        channel.close()
        for s in reversed(started):
            s.stop()


BASE = "llama"   # the served name: the model directory's name


def grpc_answer(stack, adapter: str, sampling: dict, prompt: str = "", prompt_ids=None):
    s = common_pb2.SamplingParams(**sampling)
    req = common_pb2.GenerateRequest(adapter_id=adapter, prompt=prompt, prompt_token_ids=prompt_ids or [],
                                     sampling=s)
    return stack["rpc"].Generate(req, timeout=120, metadata=ADMIN)


def grpc_sampling(max_tokens: int, **extra) -> dict:
    return {"max_new_tokens": max_tokens, "temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 7,
            "ignore_eos": True, **extra}


def test_models_list_base_and_adapters_with_parent(stack):
    models = {m.id: m for m in stack["client"].models.list()}
    assert set(models) >= {BASE, *ADAPTERS}
    assert models[BASE].model_extra["parent"] is None
    for aid in ADAPTERS:
        assert models[aid].model_extra["parent"] == BASE and models[aid].owned_by == "openlora"
    assert stack["client"].models.retrieve("org/qv").id == "org/qv"


@pytest.mark.parametrize("model", [BASE, "org/qv", "org/mlp@1"])
def test_completions_equal_grpc_token_for_token(stack, model):
    client = stack["client"]
    adapter = "" if model == BASE else model.split("@")[0]
    want = grpc_answer(stack, adapter, grpc_sampling(12), prompt="Hello adapters")
    got = client.completions.create(model=model, prompt="Hello adapters", max_tokens=12, extra_body=EXTRA,
                                    **SAMPLED)
    choice = got.choices[0]
    assert choice.model_extra["token_ids"] == list(want.token_ids)
    assert choice.text == want.text and choice.finish_reason == "length"
    assert got.usage.prompt_tokens == want.usage.prompt_tokens and got.usage.completion_tokens == 12
    assert got.model == model and got.object == "text_completion"

    stream = client.completions.create(model=model, prompt="Hello adapters", max_tokens=12, stream=True,
                                       stream_options={"include_usage": True}, extra_body=EXTRA, **SAMPLED)
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    body = [c for c in chunks if c.choices]
    assert [t for c in body for t in c.choices[0].model_extra["token_ids"]] == list(want.token_ids)
    assert "".join(c.choices[0].text for c in body) == want.text
    assert body[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in body)
    plain = client.completions.create(model=model, prompt="Hello adapters", max_tokens=12, stream=True,
                                      extra_body={"top_k": 20, "ignore_eos": True}, **SAMPLED)
    assert "".join(c.choices[0].text for c in plain) == want.text


@pytest.mark.parametrize("model", [BASE, "org/qv"])
def test_chat_equal_grpc_token_for_token(stack, model):
    from transformers import AutoTokenizer
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hello world, hello adapters!"}]
    tok = AutoTokenizer.from_pretrained(stack["llama"])
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    adapter = "" if model == BASE else model
    want = grpc_answer(stack, adapter, grpc_sampling(10), prompt_ids=list(ids))
    client = stack["client"]
    got = client.chat.completions.create(model=model, messages=messages, max_tokens=10, extra_body=EXTRA,
                                         **SAMPLED)
    assert got.choices[0].model_extra["token_ids"] == list(want.token_ids)
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 10

    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=10, stream=True,
                                                  extra_body=EXTRA, **SAMPLED))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [t for c in chunks for t in (c.choices[0].model_extra.get("token_ids") or [])] == \
        list(want.token_ids)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=10, stream=True,
                                           extra_body={"top_k": 20, "ignore_eos": True}, **SAMPLED)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == want.text


def test_every_sampling_field_reaches_the_executor(stack):
    fields = {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.2}
    want = grpc_answer(stack, "org/mlp", {**grpc_sampling(12, ignore_eos=False), **fields,
                                          "min_new_tokens": 3, "stop_token_ids": [13, 17]},
                       prompt="Hello world")
    reply = stack["client"].completions.create(
        model="org/mlp", prompt="Hello world", max_tokens=12, user="someone", **SAMPLED,
        presence_penalty=0.5, frequency_penalty=0.3,
        extra_body={"top_k": 20, "repetition_penalty": 1.2, "min_tokens": 3, "stop_token_ids": [13, 17],
                    "return_token_ids": True})
    assert reply.choices[0].model_extra["token_ids"] == list(want.token_ids)
    assert reply.choices[0].finish_reason == {1: "length", 2: "stop", 3: "stop"}[want.finish_reason]


def test_logprobs_match_grpc(stack):
    client = stack["client"]
    want = grpc_answer(stack, "org/qv", grpc_sampling(6, top_logprobs=3), prompt="The quick brown")
    got = client.completions.create(model="org/qv", prompt="The quick brown", max_tokens=6, logprobs=3,
                                    extra_body=EXTRA, **SAMPLED).choices[0].logprobs
    assert got.token_logprobs == pytest.approx(list(want.logprobs), abs=1e-6)
    assert all(3 <= len(d) <= 4 for d in got.top_logprobs)
    assert max(got.top_logprobs[0].values()) == pytest.approx(want.top_logprobs[0].logprobs[0], abs=1e-6)
    assert "".join(got.tokens) == want.text

    chat = client.chat.completions.create(model="org/qv", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, logprobs=True, top_logprobs=2, extra_body=EXTRA,
                                          **SAMPLED)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    streamed = client.chat.completions.create(model="org/qv", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=5, logprobs=True, top_logprobs=2, stream=True,
                                              extra_body=EXTRA, **SAMPLED)
    lps = [e.logprob for c in streamed if c.choices and c.choices[0].logprobs
           for e in c.choices[0].logprobs.content]
    assert lps == pytest.approx([c.logprob for c in content], abs=1e-6)


def test_stop_strings_and_n(stack):
    client = stack["client"]
    greedy = {"temperature": 0, "max_tokens": 24, "extra_body": {"ignore_eos": True}}
    full = client.completions.create(model=BASE, prompt="openlora serves", **greedy).choices[0].text
    assert len(full) > 8
    stop = full[4:8]
    cut = client.completions.create(model=BASE, prompt="openlora serves", stop=[stop], **greedy).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]
    want = grpc_answer(stack, "", {"max_new_tokens": 24, "ignore_eos": True, "stop": [stop]},
                       prompt="openlora serves")
    assert cut.text == want.text

    many = client.completions.create(model="org/qv", prompt="Hello", max_tokens=6, n=3, extra_body=EXTRA,
                                     **SAMPLED)
    assert [c.index for c in many.choices] == [0, 1, 2] and many.usage.completion_tokens == 18
    first = grpc_answer(stack, "org/qv", grpc_sampling(6), prompt="Hello")
    assert many.choices[0].model_extra["token_ids"] == list(first.token_ids)   # choice i: seed + i
    streamed = client.completions.create(model="org/qv", prompt=["Hello", "World"], max_tokens=4, n=2,
                                         stream=True, extra_body=EXTRA, **SAMPLED)
    per_choice: dict[int, list[int]] = {}
    for c in streamed:
        for ch in c.choices:
            per_choice.setdefault(ch.index, []).extend(ch.model_extra["token_ids"])
    assert sorted(per_choice) == [0, 1, 2, 3] and all(len(v) == 4 for v in per_choice.values())


def test_sdk_errors_have_openai_shape_and_status(stack):
    client = stack["client"]
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="org/nope", prompt="x", max_tokens=2)
    assert info.value.status_code == 404 and info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="org/qv@99", messages=[{"role": "user", "content": "x"}],
                                       stream=True)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="../etc/passwd", prompt="x")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=BASE, prompt="x", temperature=-1)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:   # the executor's INVALID_ARGUMENT
        client.completions.create(model=BASE, prompt=[5] * 5000, max_tokens=2)
    assert "context" in info.value.body["message"]


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"prompt": "x"}).encode(), 400, "model"),
    (json.dumps({"model": BASE}).encode(), 400, "prompt"),
    (json.dumps({"model": BASE, "prompt": "x", "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": BASE, "prompt": "x", "n": 0}).encode(), 400, "n"),
    (json.dumps({"model": BASE, "prompt": "x", "logprobs": 50}).encode(), 400, "logprobs"),
    (json.dumps({"model": BASE, "prompt": "x", "stop": 3}).encode(), 400, "stop"),
    (json.dumps({"model": "nobody/knows", "prompt": "x"}).encode(), 404, "model"),
])
def test_raw_bad_requests(stack, body, status, param):
    got_status, payload = http(stack["gateway"].url + "/v1/completions", "POST", body)
    assert got_status == status, payload
    assert_error_shape(payload, status)
    assert payload["error"]["param"] == param


def test_limits_deadlines_templates_and_a_router_that_is_down(stack):
    strict, orphan = stack["strict"].url, stack["orphan"].url
    status, payload = http(strict + "/v1/completions", "POST",
                           json.dumps({"model": "plain", "prompt": "x" * 5000}).encode())
    assert status == 413 and payload["error"]["code"] == "request_too_large"
    status, payload = http(strict + "/v1/chat/completions", "POST", json.dumps(
        {"model": "plain", "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert status == 400 and "chat template" in payload["error"]["message"]
    status, payload = http(strict + "/v1/completions", "POST", json.dumps(
        {"model": "plain", "prompt": "x", "max_tokens": 500, "ignore_eos": True}).encode())
    assert status == 504 and payload["error"]["code"] == "deadline_exceeded", payload
    for path in ("/v1/completions", "/v1/chat/completions"):
        status, payload = http(orphan + path, "POST", json.dumps(
            {"model": "base", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}).encode())
        assert status in (503, 400), payload   # chat: no template known (no executor to ask) -> 400
        assert_error_shape(payload, status)
    status, payload = http(orphan + "/v1/completions", "POST",
                           json.dumps({"model": "base", "prompt": "x"}).encode())
    assert status == 503 and payload["error"]["code"] == "unavailable"
    assert http(orphan + "/health")[0] == 200
    status, payload = http(orphan + "/health/ready")
    assert status == 503 and payload["error"]["code"] == "router_unavailable"
    assert http(stack["gateway"].url + "/health/ready")[0] == 200


def test_queue_full_is_429(stack):
    results = []

    def one():
        results.append(http(stack["gateway"].url + "/v1/completions", "POST", json.dumps(
            {"model": BASE, "prompt": "x", "max_tokens": 300, "ignore_eos": True}).encode()))

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses, statuses
    for s, payload in results:
        if s == 429:
            assert_error_shape(payload, s)
            assert payload["error"]["type"] == "rate_limit_error"


def test_http_status_of_every_grpc_code():
    from services.gateway.openai_api import from_rpc
    want = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401,
            "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503,
            "DEADLINE_EXCEEDED": 504}
    for name, status in want.items():
        code = getattr(grpc.StatusCode, name)
        assert HTTP_STATUS[code] == status
        exc = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="why")
        err = from_rpc(exc).body()["error"]
        assert err["message"] == "why" and err["code"] == name.lower()
    assert all(s != 500 for s in HTTP_STATUS.values())


def executor_status(stack):
    with grpc.insecure_channel(stack["executor"].address) as ch:
        return executor_pb2_grpc.ExecutorStub(ch).GetStatus(executor_pb2.GetStatusRequest(), timeout=10,
                                                            metadata=ADMIN)


def test_client_disconnect_mid_stream_frees_kv_blocks(stack):
    channel = grpc.insecure_channel(stack["executor"].address)   # opened now: status calls are quick
    stub = executor_pb2_grpc.ExecutorStub(channel)

    def status():
        return stub.GetStatus(executor_pb2.GetStatusRequest(), timeout=10, metadata=ADMIN)

    before = status()
    assert before.running_requests == 0
    conn = httpclient.HTTPConnection("127.0.0.1", stack["gateway"].port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": "org/qv", "prompt": "Hello", "max_tokens": 500, "ignore_eos": True, "stream": True}),
        {"content-type": "application/json", "authorization": f"Bearer {TOKENS['admin']}"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.readline()
    assert first.startswith(b"data: ")
    request_id = json.loads(first[len(b"data: "):])["id"] + "-0"   # the executor's request id
    during = status()
    conn.sock.shutdown(2)
    conn.close()
    assert during.running_requests == 1 and during.kv_blocks_free < before.kv_blocks_free
    deadline = time.monotonic() + 60           # a generous deadline: the cancel is an event, not a race
    while time.monotonic() < deadline:
        now = status()
        if now.running_requests == 0 and now.kv_blocks_free == now.kv_blocks_total:
            break
        time.sleep(0.05)
    assert now.running_requests == 0 and now.kv_blocks_free == now.kv_blocks_total
    log = (stack["root"] / "executor.log").read_text()   # cancelled, not finished
    cancelled = [json.loads(line) for line in log.splitlines() if '"request_cancelled"' in line]
    assert request_id in {e.get("request_id") for e in cancelled}
    channel.close()


def test_load_and_unload_lora_adapter(stack):
    path = write_adapter(stack["root"] / "runtime", TINY["llama"], AdapterSpec(rank=4, seed=333))
    url = stack["gateway"].url
    status, text = http(url + "/v1/load_lora_adapter", "POST",
                        json.dumps({"lora_name": "org/runtime", "lora_path": str(path)}).encode())
    assert status == 200 and "org/runtime" in text
    assert any(a.adapter_id == "org/runtime" for a in executor_status(stack).adapters)
    client = stack["client"]
    assert "org/runtime" in {m.id for m in client.models.list()}
    got = client.completions.create(model="org/runtime", prompt="Hi", max_tokens=4, extra_body=EXTRA,
                                    **SAMPLED)
    want = grpc_answer(stack, "org/runtime", grpc_sampling(4), prompt="Hi")
    assert got.choices[0].model_extra["token_ids"] == list(want.token_ids)

    status, payload = http(url + "/v1/load_lora_adapter", "POST",
                           json.dumps({"lora_name": "org/bad", "lora_path": str(stack["root"])}).encode())
    assert status == 400, payload
    assert_error_shape(payload, status)
    status, payload = http(url + "/v1/load_lora_adapter", "POST", json.dumps({"lora_name": "x"}).encode())
    assert status == 400 and payload["error"]["param"] == "lora_path"

    status, text = http(url + "/v1/unload_lora_adapter", "POST",
                        json.dumps({"lora_name": "org/runtime"}).encode())
    assert status == 200, text
    # as vLLM: gone from the executors' tiers, kept by the registry (served again on demand)
    assert not any(a.adapter_id == "org/runtime" for a in executor_status(stack).adapters)
    assert "org/runtime" in {m.id for m in client.models.list()}
    got = client.completions.create(model="org/runtime", prompt="Hi", max_tokens=4, extra_body=EXTRA,
                                    **SAMPLED)
    assert got.choices[0].model_extra["token_ids"] == list(want.token_ids)
    status, payload = http(url + "/v1/unload_lora_adapter", "POST",
                           json.dumps({"lora_name": "org/never-loaded"}).encode())
    assert status == 404
    assert_error_shape(payload, status)


def test_health_and_metrics(stack):
    url = stack["gateway"].url
    assert http(url + "/health") == (200, {"status": "ok"})
    stack["client"].completions.create(model=BASE, prompt="Hi", max_tokens=3)
    status, text = http(url + "/metrics")
    assert status == 200
    assert 'openlora_gateway_requests_total{route="/v1/completions",status="200"}' in text
    assert 'openlora_gateway_request_duration_seconds_count{route="/v1/completions"}' in text
    assert "openlora_gateway_completion_tokens_total" in text
    status, payload = http(url + "/v1/nothing")
    assert status == 404
    assert_error_shape(payload, 404)


def test_gateway_never_imports_torch_and_checks_its_flags():
    """Its container image (deploy/gateway.Dockerfile) ships without torch."""
    import subprocess
    import sys
    code = ("import sys, services.cli, services.gateway.app; assert 'torch' not in sys.modules, 'torch'; "
            "assert 'transformers' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for args, flag in ([[], "--router"], [["--router", "x:1", "--max-n", "0"], "--max-n"],
                       [["--router", "x:1", "--request-timeout-s", "0"], "--request-timeout-s"]):
        proc = subprocess.run([sys.executable, "-m", "services.cli", "gateway", *args], capture_output=True,
                              text=True, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and flag in lines[0], proc.stderr


def test_the_callers_own_token_is_passed_on(stack):
    url = stack["gateway"].url
    body = json.dumps({"model": BASE, "prompt": "Hi", "max_tokens": 2}).encode()
    for token in (None, "wrong"):   # the gateway's own service token is not lent to callers
        status, payload = http(url + "/v1/completions", "POST", body, token=token)
        assert status == 401, payload
        assert_error_shape(payload, status)
        assert payload["error"]["type"] == "authentication_error"
    tenant = openai.OpenAI(base_url=url + "/v1", api_key=TOKENS["a"], max_retries=0)
    assert {m.id for m in tenant.models.list()} == {BASE}     # org/* belongs to another tenant
    assert tenant.completions.create(model=BASE, prompt="Hi", max_tokens=2,
                                     extra_body={"ignore_eos": True}).usage.completion_tokens == 2
    with pytest.raises(openai.NotFoundError):
        tenant.completions.create(model="org/qv", prompt="Hi", max_tokens=2)
    status, payload = http(url + "/v1/load_lora_adapter", "POST", json.dumps(
        {"lora_name": "org/theirs", "lora_path": str(stack["root"] / "org_qv")}).encode(), token=TOKENS["a"])
    assert status == 403, payload
    assert_error_shape(payload, status)
