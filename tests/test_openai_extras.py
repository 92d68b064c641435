"""What real OpenAI clients need beyond plain generation, over a real registry + executor + router +
gateway on loopback: `echo` with `logprobs` (lm-evaluation-harness's loglikelihood), vLLM's
`prompt_logprobs`, exact logprobs (by token id, bytes, return_tokens_as_token_ids).

Every logprob is checked against transformers (+ peft) log_softmax over the same tokens (fp32, 1e-4).
"""

from __future__ import annotations

import json
import shutil

import openai
import pytest
import torch

from services.common.harness import http_ok, wait_until
from services.synthetic import AdapterSpec, write_adapter
from tests.conftest import TINY
from tests.servers import Service, deployment, free_port
from tests.test_gateway import Gateway
from tests.test_structured import SCHEMA

ADAPTERS = {"org/qv": AdapterSpec(rank=4, alpha=8, targets=("q_proj", "v_proj"), seed=401)}
BASE = "llama"
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>\n"
    "{%- for t in tools %}{{ t.function.name }}{{ t.function.parameters.properties | tojson }}\n{% endfor %}"
    "</tools><|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ {'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{%- else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def stack(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai-extras")
    dirs = {aid: write_adapter(root / aid.replace("/", "_"), TINY["llama"], spec)
            for aid, spec in ADAPTERS.items()}
    hermes = root / "hermes"      # the same model, a chat template that renders tools (Hermes / Qwen)
    shutil.copytree(llama_dir, hermes)
    cfg = json.loads((hermes / "tokenizer_config.json").read_text())
    cfg["chat_template"] = HERMES_TEMPLATE
    (hermes / "tokenizer_config.json").write_text(json.dumps(cfg))
    with deployment(root, llama_dir, dirs) as (registry, executor, router):
        gateway = Gateway("--router", router.address, "--registry", registry.address,
                          log_path=root / "gateway.log").start()
        tooled = Gateway("--router", router.address, "--base-model", str(hermes), "--served-model-name", BASE,
                         log_path=root / "tooled.log").start()
        http_port = free_port()         # a router serving the OpenAI API itself (one hop)
        direct = Service("router", "--registry", registry.address, "--executor", executor.address,
                         "--http-port", str(http_port), log_path=root / "direct.log").start()
        try:
            assert wait_until(lambda: http_ok(f"http://127.0.0.1:{http_port}/health"), 60), "no HTTP API"
            yield {"direct": openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="x",
                                           max_retries=0),
                   "direct_url": f"http://127.0.0.1:{http_port}","gateway": gateway, "dirs": dirs, "llama": llama_dir, "executor": executor, "root": root,
                   "client": openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0),
                   "tools": openai.OpenAI(base_url=tooled.url + "/v1", api_key="x", max_retries=0)}
        finally:
            direct.stop()
            tooled.stop()
            gateway.stop()


_models: dict = {}


def oracle(stack, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """transformers (+ peft) log_softmax over `ids`: [len(ids), vocab] float32."""
    if adapter not in _models:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(stack["llama"], dtype=torch.float32)
        if adapter is not None:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, stack["dirs"][adapter])
        _models[adapter] = model.eval()
    with torch.no_grad():
        return torch.log_softmax(_models[adapter](torch.tensor([ids])).logits[0].float(), -1)


def tokenizer(stack):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(stack["llama"] / "tokenizer.json"))


@pytest.mark.parametrize("adapter", [None, "org/qv"])
def test_echo_logprobs_equal_transformers(stack, adapter):
    tok = tokenizer(stack)
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = tok.encode(prompt, add_special_tokens=False).ids
    want = oracle(stack, adapter, ids)
    for max_tokens in (0, 1):
        r = stack["client"].completions.create(model=adapter or BASE, prompt=prompt, echo=True,
                                               logprobs=3, max_tokens=max_tokens, temperature=0)
        c = r.choices[0]
        lp = c.logprobs
        assert len(lp.tokens) == len(ids) + max_tokens
        assert c.text.startswith(prompt) and (max_tokens or c.text == prompt)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert "".join(lp.tokens[:len(ids)]) == prompt
        for p in range(1, len(ids)):
            assert lp.token_logprobs[p] == pytest.approx(float(want[p - 1, ids[p]]), abs=1e-4)
            assert lp.top_logprobs[p][lp.tokens[p]] == pytest.approx(lp.token_logprobs[p], abs=1e-6)
        assert lp.text_offset[:len(ids)] == [len("".join(lp.tokens[:p])) for p in range(len(ids))]
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == max_tokens
    # keyed by id (texts collide: byte pieces all decode to U+FFFD): the 3 best and the chosen one
    r = stack["client"].completions.create(model=adapter or BASE, prompt=prompt, echo=True, logprobs=3,
                                           max_tokens=1, temperature=0,
                                           extra_body={"return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    assert lp.tokens[:len(ids)] == [f"token_id:{t}" for t in ids]
    for p in range(1, len(ids) + 1):
        best = torch.topk(want[p - 1], 3) if p < len(ids) else None
        top = lp.top_logprobs[p]
        if best is not None:
            assert {f"token_id:{t}" for t in best.indices.tolist()} <= set(top)
            assert sorted(top.values(), reverse=True)[:3] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert lp.tokens[p] in top and len(top) in (3, 4)


def test_echo_streamed_and_token_id_prompts(stack):
    tok = tokenizer(stack)
    ids = tok.encode("hello world, hello again", add_special_tokens=False).ids
    want = oracle(stack, None, ids)
    chunks = list(stack["client"].completions.create(model=BASE, prompt=ids, echo=True, logprobs=0,
                                                     max_tokens=2, temperature=0, stream=True))
    first = chunks[0].choices[0]
    assert first.text == tok.decode(ids, skip_special_tokens=False)
    got = first.logprobs.token_logprobs
    assert got[0] is None and len(got) == len(ids)
    assert got[1:] == pytest.approx([float(want[p - 1, ids[p]]) for p in range(1, len(ids))], abs=1e-4)
    later = [t for c in chunks[1:] for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    assert len(later) == 2
    assert chunks[-1].choices[0].finish_reason == "length"


def test_vllm_prompt_logprobs_extra(stack):
    ids = [5, 17, 99, 200, 31, 7]
    want = oracle(stack, "org/qv", ids)
    r = stack["client"].completions.create(model="org/qv", prompt=ids, max_tokens=1, temperature=0,
                                           extra_body={"prompt_logprobs": 2})
    plp = r.model_extra["choices"][0]["prompt_logprobs"] if "choices" in r.model_extra else \
        r.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for p in range(1, len(ids)):
        entry = plp[p][str(ids[p])]
        assert entry["logprob"] == pytest.approx(float(want[p - 1, ids[p]]), abs=1e-4)
        best = torch.topk(want[p - 1], 2).indices.tolist()
        assert {int(t) for t, e in plp[p].items() if e["rank"] in (1, 2)} == set(best)


def test_lm_eval_loglikelihood_equals_transformers(stack, tmp_path):
    """lm-evaluation-harness's `local-completions` on a multiple-choice task from a local file: each
    choice's loglikelihood (its echo + logprobs request) equals transformers+peft's within 1e-4."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    docs = [{"question": "Which animal barks?", "choices": ["a dog", "a cat", "a fish"], "label": 0},
            {"question": "The sky is", "choices": ["blue", "green", "loud"], "label": 0},
            {"question": "Two plus two is", "choices": ["three", "four"], "label": 1}]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "mc.yaml").write_text(
        "task: openlora_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)   # not lm_eval's thousands
    for adapter in (None, "org/qv"):
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": adapter or BASE, "base_url": stack["gateway"].url + "/v1/completions",
                        # the adapter's run tokenizes through the gateway's /tokenize (auto -> remote)
                        **({"tokenizer_backend": "huggingface", "tokenizer": str(stack["llama"])}
                           if adapter is None else {}),
                        "num_concurrent": 2, "max_retries": 1},
            tasks=["openlora_mc"], task_manager=tasks,
            log_samples=True, limit=None)
        samples = results["samples"]["openlora_mc"]
        assert len(samples) == len(docs)
        tok = tokenizer(stack)
        for s in samples:
            assert len(s["arguments"]) == len(s["doc"]["choices"]) == len(s["resps"])
            for (context, continuation), resp in zip(s["arguments"], s["resps"], strict=True):
                whole = tok.encode(context + continuation, add_special_tokens=False).ids
                n_ctx = len(tok.encode(context, add_special_tokens=False).ids)
                want = oracle(stack, adapter, whole)
                ll = sum(float(want[p - 1, whole[p]]) for p in range(n_ctx, len(whole)))
                assert resp[0][0] == pytest.approx(ll, abs=1e-4), (adapter, context, continuation)


def test_structured_outputs_in_a_mixed_batch(stack):
    """response_format json_schema (base and adapter, greedy and sampled), vLLM's guided_regex and
    guided_choice, beside unconstrained requests (equal to themselves alone) in one batch."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    import jsonschema
    client = stack["client"]
    msgs = [{"role": "user", "content": "Describe a pet as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}

    def plain(model):
        return client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)

    alone = {m: plain(m).choices[0].message.content for m in (BASE, "org/qv")}
    jobs = {
        "schema-base": lambda: client.chat.completions.create(model=BASE, messages=msgs, response_format=fmt,
                                                              max_tokens=300, temperature=0),
        "schema-qv": lambda: client.chat.completions.create(model="org/qv", messages=msgs, response_format=fmt,
                                                            max_tokens=300, temperature=1.0, seed=3),
        "object": lambda: client.chat.completions.create(model=BASE, messages=msgs, max_tokens=8,
                                                         response_format={"type": "json_object"}),
        "regex": lambda: client.completions.create(model="org/qv", prompt="code:", max_tokens=20,
                                                   extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{3}"}),
        "choice": lambda: client.completions.create(
            model=BASE, prompt="pick:", max_tokens=20, temperature=1.0,
            extra_body={"structured_outputs": {"choice": ["left", "right"]}}),
        "plain-base": lambda: plain(BASE),
        "plain-qv": lambda: plain("org/qv"),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        out = {name: f.result() for name, f in futures.items()}
    for name in ("schema-base", "schema-qv"):
        c = out[name].choices[0]
        assert c.finish_reason == "stop", (name, c.message.content)
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    assert out["object"].choices[0].message.content.startswith("{")
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", out["regex"].choices[0].text)
    assert out["choice"].choices[0].text in ("left", "right")
    assert out["plain-base"].choices[0].message.content == alone[BASE]
    assert out["plain-qv"].choices[0].message.content == alone["org/qv"]


@pytest.mark.parametrize("extra, param, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     None, "strin"),
    ({"guided_regex": "[a-z"}, None, "unclosed character class"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "conflicts"),
    ({"response_format": {"type": "yaml"}}, "response_format", "json_schema"),
])
def test_bad_structured_outputs_are_400(stack, extra, param, says):
    with pytest.raises(openai.BadRequestError) as err:
        stack["client"].completions.create(model=BASE, prompt="x", max_tokens=2, extra_body=extra)
    assert err.value.status_code == 400
    body = err.value.body
    assert body["param"] == param and says in body["message"], body


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "weather",
    "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "time",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def _valid_call(name: str, arguments: str) -> None:
    import jsonschema
    fn = {"get_weather": WEATHER, "get_time": TIME}[name]["function"]
    jsonschema.validate(json.loads(arguments), fn["parameters"])


def _streamed_calls(stream) -> tuple[dict, str | None, str]:
    """index -> {id, name, arguments} from streamed tool_calls deltas; finish_reason; content."""
    calls, finish, content = {}, None, ""
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:
                    assert call["id"] is None, "one id per call, in its first delta"
                    call["id"] = d.id
                if d.function and d.function.name:
                    call["name"] = d.function.name
                if d.function and d.function.arguments:
                    call["arguments"] += d.function.arguments
            finish = c.finish_reason or finish
    return calls, finish, content


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_named_and_required(stack, stream):
    client = stack["tools"]
    plain = client.chat.completions.create(model=BASE, messages=ASK, max_tokens=1)
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice, tools_, finish_want in ((named, [WEATHER, TIME], "stop"), ("required", [TIME, WEATHER], "tool_calls")):
        kw = dict(model=BASE, messages=ASK, tools=tools_, tool_choice=choice, max_tokens=150, temperature=0.7,
                  seed=4, parallel_tool_calls=False)
        if not stream:
            r = client.chat.completions.create(**kw)
            assert r.usage.prompt_tokens > plain.usage.prompt_tokens      # the template rendered the tools
            c = r.choices[0]
            assert c.finish_reason == finish_want and len(c.message.tool_calls) == 1, c
            call = c.message.tool_calls[0]
            assert call.type == "function" and call.id.startswith("call_")
            if choice is named:
                assert call.function.name == "get_weather"
            _valid_call(call.function.name, call.function.arguments)
        else:
            calls, finish, content = _streamed_calls(client.chat.completions.create(stream=True, **kw))
            assert finish == finish_want and list(calls) == [0] and content == ""
            assert calls[0]["id"].startswith("call_")
            _valid_call(calls[0]["name"], calls[0]["arguments"])


def test_tool_history_renders_and_bad_tools_are_400(stack):
    client = stack["tools"]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 3})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.chat.completions.create(model=BASE, messages=history, tools=[WEATHER], max_tokens=3,
                                       tool_choice="none")
    assert r.choices[0].message.tool_calls is None
    for kw, param in ((dict(tools=[{"type": "function"}]), "tools"),
                      (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
                       "tool_choice"),
                      (dict(tool_choice="required"), "tool_choice")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=BASE, messages=ASK, max_tokens=2, **kw)
        assert err.value.body["param"] == param


def test_auto_tool_calls_parsed_in_each_family_format():
    from services.gateway.tools import ToolPlan, ToolStream, parse_auto
    names = {"get_weather"}
    args = {"city": "Oslo", "days": 2}
    a = json.dumps(args)
    want = [("get_weather", a)]
    assert parse_auto('Let me check. <tool_call>\n{"name": "get_weather", "arguments": ' + a + "}\n</tool_call>",
                      "hermes", names) == ("Let me check.", want)
    assert parse_auto('<|python_tag|>{"name": "get_weather", "parameters": ' + a + "}",
                      "llama3_json", names) == (None, want)
    assert parse_auto('[TOOL_CALLS][{"name": "get_weather", "arguments": ' + a + "}]",
                      "mistral", names) == (None, want)
    assert parse_auto('{"name": "other", "arguments": {}}', "llama3_json", names)[1] == []
    assert parse_auto("just text", "hermes", names) == ("just text", [])
    # streamed: content flows until <tool_call>, the call comes whole at the end
    ts = ToolStream(ToolPlan(mode="auto", tools=[WEATHER], parser="hermes"), 1)
    text = 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>'
    deltas = [d for piece in (text[:4], text[4:9], text[9:14], text[14:]) for d in ts.push(0, piece)]
    last, finish = ts.finish(0, "stop")
    assert "".join(d.get("content", "") for d in deltas) == "Sure. " and finish == "tool_calls"
    assert last[0]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_limits_tokenizer_routes_and_hygiene(stack):
    import urllib.request

    from tests.test_gateway import http
    client, url = stack["client"], stack["gateway"].url
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=BASE, prompt="hello", max_tokens=1_000_000)
    assert err.value.body["param"] == "max_tokens" and err.value.body["code"] == "context_length_exceeded"
    assert "maximum context length" in err.value.body["message"]
    status, tok = http(url + "/tokenize", "POST", json.dumps({"model": BASE, "prompt": "hello world"}).encode())
    assert status == 200 and tok["tokens"] == tokenizer(stack).encode("hello world").ids
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] > 0
    status, detok = http(url + "/detokenize", "POST", json.dumps({"tokens": tok["tokens"]}).encode())
    assert status == 200 and detok["prompt"] == "hello world"
    assert http(url + "/version")[1]["version"] and "eos_token" in http(url + "/tokenizer_info")[1]
    # a lone surrogate is a 400 naming the field, not a 500
    for body, param in (('{"model": "llama", "prompt": "a\\ud800b"}', "prompt"),
                        ('{"model": "llama", "prompt": "a", "stop": ["\\udc00"]}', "stop[0]")):
        status, payload = http(url + "/v1/completions", "POST", body.encode())
        assert status == 400 and payload["error"]["param"] == param, payload
    # streamed JSON is ASCII: no raw U+2028/U+2029/U+0085 for line-splitting clients
    req = urllib.request.Request(url + "/v1/completions", method="POST", headers={"content-type": "application/json"},
                                 data=json.dumps({"model": BASE, "prompt": [5, 6, 7], "max_tokens": 40, "stream": True,
                                                  "temperature": 1.0, "seed": 1}).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        raw = r.read()
    assert raw.isascii() and raw.endswith(b"data: [DONE]\n\n")
    # /v1/models shows no server path
    for m in client.models.list():
        assert not str(m.model_extra.get("root", "")).startswith("/"), m


def test_a_disconnect_at_any_moment_cancels_down_to_the_executor(stack):
    """Streamed and unary requests dropped by their client at many points (before the headers, right
    after the first chunk, later), all in flight together: every one that reached the executor is
    cancelled there (its log says so, by request id), and none runs on."""
    import socket
    import time

    import grpc

    from services.common.gen.openlora.v1 import executor_pb2, executor_pb2_grpc
    log = stack["root"] / "executor.log"

    def cancelled() -> set[str]:
        return {json.loads(line).get("request_id") for line in log.read_text().splitlines()
                if '"request_cancelled"' in line}

    host, port = "127.0.0.1", stack["gateway"].port
    seen = set()                 # request ids the client saw (its stream had started)
    # streams: dropped before the headers (None), or after the first event and then `n` more (points
    # in the stream, not in time: a fast engine would finish 480 tokens within a timed wait);
    # unary requests: dropped after a wait in seconds
    points = [(True, None), (True, 0), (True, 3), (True, 20), (True, 60), (False, 0.05), (False, 0.3)]
    for stream, at in points:
        body = json.dumps({"model": "org/qv", "prompt": [5, 6, 7], "max_tokens": 480, "ignore_eos": True,
                           "stream": stream}).encode()
        sock = socket.create_connection((host, port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        if stream and at is not None:
            got = b""
            while got.count(b"data: ") < 1 + at or b"\n\n" not in got.rsplit(b"data: ", 1)[-1]:
                got += sock.recv(4096)
            first = got.split(b"data: ", 1)[1].split(b"\n\n", 1)[0]
            seen.add(json.loads(first)["id"] + "-0")
            assert b"[DONE]" not in got                  # dropped mid-stream
        elif stream:
            time.sleep(0.3)
        else:
            time.sleep(at)
        sock.close()
    with grpc.insecure_channel(stack["executor"].address) as ch:
        stub = executor_pb2_grpc.ExecutorStub(ch)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = stub.GetStatus(executor_pb2.GetStatusRequest(), timeout=10)
            if st.running_requests == 0 and st.waiting_requests == 0 and seen <= cancelled():
                break
            time.sleep(0.1)
    assert st.running_requests == 0 and st.waiting_requests == 0
    assert len(seen) == 4 and seen <= cancelled()


def test_router_serves_the_openai_api_itself(stack):
    """`openlora router --http-port`: the same answers as through the gateway, one hop from the
    executor (unary, streamed, echo + logprobs, chat with a schema, errors with their status)."""
    via_gw, direct = stack["client"], stack["direct"]
    kw = dict(model="org/qv", prompt="Once upon", max_tokens=8, temperature=0.9, seed=5,
              extra_body={"return_token_ids": True})
    a, b = via_gw.completions.create(**kw), direct.completions.create(**kw)
    assert a.choices[0].model_extra["token_ids"] == b.choices[0].model_extra["token_ids"]
    assert a.choices[0].text == b.choices[0].text
    streamed = "".join(c.choices[0].text for c in direct.completions.create(stream=True, **kw) if c.choices)
    assert streamed == b.choices[0].text
    e1 = via_gw.completions.create(model=BASE, prompt="a b c", echo=True, logprobs=2, max_tokens=0)
    e2 = direct.completions.create(model=BASE, prompt="a b c", echo=True, logprobs=2, max_tokens=0)
    assert e1.choices[0].logprobs.token_logprobs == e2.choices[0].logprobs.token_logprobs
    assert {m.id for m in direct.models.list()} >= {BASE, "org/qv"}
    with pytest.raises(openai.NotFoundError):
        direct.completions.create(model="org/nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        direct.completions.create(model=BASE, prompt="x", max_tokens=1, extra_body={"guided_regex": "[a-"})
    # admin through the router's own executor channels
    from tests.test_gateway import http
    path = write_adapter(stack["root"] / "rt", TINY["llama"], AdapterSpec(rank=4, seed=77))
    status, text = http(stack["direct_url"] + "/v1/load_lora_adapter", "POST",
                        json.dumps({"lora_name": "org/rt", "lora_path": str(path)}).encode(), token=None)
    assert status == 200 and "loaded on 1 executor" in text, text
    assert len(direct.completions.create(model="org/rt", prompt="hi", max_tokens=2).choices[0].text) >= 0
    status, text = http(stack["direct_url"] + "/v1/unload_lora_adapter", "POST",
                        json.dumps({"lora_name": "org/rt"}).encode(), token=None)
    assert status == 200, text


def test_chat_logprobs_exact(stack):
    """Three distinct alternatives per token (by id: their bytes differ even where their text is
    U+FFFD), the chosen token among them (greedy), and bytes that spell the content exactly."""
    r = stack["client"].chat.completions.create(model="org/qv", messages=ASK, max_tokens=24, temperature=0,
                                                logprobs=True, top_logprobs=3,
                                                extra_body={"ignore_eos": True, "return_token_ids": True})
    c = r.choices[0]
    content = c.logprobs.content
    ids = c.model_extra["token_ids"]
    assert len(content) == len(ids) == 24
    spelled = b"".join(bytes(e.bytes) for e in content if not (e.token.startswith("<|") and e.token.endswith("|>")))
    assert spelled.decode("utf-8", "replace") == c.message.content    # special tokens are not text
    for e in content:
        assert len(e.top_logprobs) == 3
        assert len({bytes(t.bytes) for t in e.top_logprobs} | {t.token for t in e.top_logprobs}) >= 3
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob) and e.top_logprobs[0].bytes == e.bytes
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
