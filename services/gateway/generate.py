"""Completions and chat: an OpenAI request -> one GenerateRequest per choice, fanned out to the
router (one grpc.aio call each), and the replies -> OpenAI's JSON or server-sent events.

A client that goes away cancels its gRPC calls, and so the executors' requests (their KV blocks are
freed). Streams wait for each choice's first chunk before the 200, so upstream errors keep their
HTTP status; an error after that is an error event, then [DONE].
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

import grpc
from starlette.requests import Request
from starlette.responses import Response

from services.common.gen.openlora.v1 import common_pb2
from services.gateway import openai_api as api
from services.gateway import tools
from services.gateway.chat import TemplateError
from services.gateway.openai_api import ApiError
from services.gateway.transport import DONE, EventStream, dumps, unless_disconnected
from services.gateway.upstream import Gateway, caller


def _token_id_str(token_id: int) -> str:
    """return_tokens_as_token_ids: a token as `token_id:N` (vLLM's spelling), never ambiguous."""
    return f"token_id:{token_id}"


@dataclasses.dataclass
class Shape:
    """One request's reply options (fixed before the first upstream call)."""

    route: str
    model: str
    chat: bool
    n: int
    token_ids: bool                 # return_token_ids: each choice's token ids
    include_usage: bool             # stream_options.include_usage
    k: int | None                   # logprobs alternatives per token (None: no logprobs)
    prompt_k: int | None            # vLLM's prompt_logprobs (None: not asked)
    echo: bool                      # completions: the prompt before the output
    drop_output: bool               # echo with max_tokens 0: the one token generated is dropped
    token_str: object               # token id -> its text in logprobs
    token_bytes: object             # token id -> its bytes (chat logprobs)
    tools: tools.ToolPlan | None = None   # chat with tools in play
    echo_texts: list[str] = dataclasses.field(default_factory=list)   # per prompt
    offsets: list[int] = dataclasses.field(default_factory=list)      # per choice: text_offset so far



class Completions:
    """/v1/completions and /v1/chat/completions over one Gateway's router channel."""

    def __init__(self, gw: Gateway):
        self.gw = gw

    def _requests(self, rid: str, adapter: str, version: int, prompts, n: int,
                  sampling: common_pb2.SamplingParams) -> list[common_pb2.GenerateRequest]:
        """One GenerateRequest per choice; request ids are `<response id>-<choice index>`."""
        if len(prompts) * n > self.gw.config.max_n:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={n} is over --max-n "
                                f"({self.gw.config.max_n})", "n", "invalid_value")
        reqs = []
        for p in prompts:
            for i in range(n):
                s = sampling
                if n > 1 and sampling.HasField("seed"):   # different samples, each reproducible
                    s = common_pb2.SamplingParams()
                    s.CopyFrom(sampling)
                    s.seed = (sampling.seed + i) % 2**64
                req = common_pb2.GenerateRequest(request_id=f"{rid}-{len(reqs)}", adapter_id=adapter,
                                                 adapter_version=version, sampling=s)
                if isinstance(p, str):
                    req.prompt = p
                else:
                    req.prompt_token_ids.extend(p)
                reqs.append(req)
        return reqs

    async def _unary(self, reqs, md) -> list:
        calls = [self.gw.router.Generate(r, timeout=self.gw.config.request_timeout_s, metadata=md) for r in reqs]
        try:
            return list(await asyncio.gather(*calls))
        finally:
            for call in calls:
                call.cancel()

    async def _open_streams(self, reqs, md):
        """Start every stream and wait for each one's first chunk (errors surface before 200)."""
        calls = [self.gw.router.GenerateStream(r, timeout=self.gw.config.request_timeout_s, metadata=md)
                 for r in reqs]
        try:
            firsts = await asyncio.gather(*(c.read() for c in calls))
        except BaseException:
            for c in calls:
                c.cancel()
            raise
        return calls, list(firsts)

    @staticmethod
    async def _chunks(calls, firsts):
        """(choice index, chunk) in arrival order, over one or many streams."""
        if len(calls) == 1:
            call, chunk = calls[0], firsts[0]
            while chunk is not grpc.aio.EOF:
                yield 0, chunk
                chunk = await call.read()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def drain(i, call, first):
            try:
                chunk = first
                while chunk is not grpc.aio.EOF:
                    queue.put_nowait((i, chunk))
                    chunk = await call.read()
                queue.put_nowait((i, None))
            except BaseException as exc:
                queue.put_nowait((i, exc))

        tasks = [asyncio.ensure_future(drain(i, c, f)) for i, (c, f) in enumerate(zip(calls, firsts, strict=False))]
        try:
            left = len(calls)
            while left:
                i, item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    async def generate(self, request: Request, route: str, body: dict, chat: bool) -> Response:
        model = body.get("model")
        adapter, version = await self.gw.resolve(model)
        api.unsupported(body, ("suffix", "tools", "functions", "tool_choice", "logit_bias", "best_of")
                        if not chat else ("logit_bias",))
        plan = tools.tool_plan(body, self.gw.files.chat_template) if chat else None
        n = api.integer(body, "n", 1, 1, self.gw.config.max_n)
        stream = api.boolean(body, "stream")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise ApiError(400, "`stream_options` must be an object", "stream_options", "invalid_value")
        echo = not chat and api.boolean(body, "echo")
        o = Shape(route=route, model=model, chat=chat, n=n,
                  token_ids=api.boolean(body, "return_token_ids"),
                  include_usage=stream and api.boolean(stream_options, "include_usage"),
                  k=api.chat_logprobs_k(body) if chat else api.completion_logprobs_k(body),
                  prompt_k=api.prompt_logprobs_k(body), echo=echo,
                  drop_output=echo and api.max_tokens(body, chat, echo) == 0,
                  token_str=(_token_id_str if api.boolean(body, "return_tokens_as_token_ids")
                             else self.gw.files.token_str),
                  token_bytes=self.gw.files.token_bytes, tools=plan)
        api.string(body, "user")
        await self.gw.learn_base()
        prompts = [self._chat_prompt(body, plan)] if chat else api.prompts(body)
        sampling = api.sampling(body, self.gw.config.default_max_tokens, chat, echo)
        self._limit(body, chat, echo, prompts, sampling)
        if o.k is not None:
            sampling.top_logprobs = o.k
        structured = api.structured_output(body)
        if plan is not None and plan.structured is not None:
            if structured is not None:
                raise ApiError(400, f"tool_choice {plan.mode} is enforced with a structured output: give "
                                    "no `response_format` or guided_* with it", "tool_choice", "invalid_value")
            structured = plan.structured
        if structured is not None:
            sampling.structured_output.CopyFrom(structured)
        wanted = [x for x in (o.prompt_k, o.k if echo else None) if x is not None]
        if wanted:
            sampling.prompt_logprobs = max(wanted)
        if echo:
            o.echo_texts = [p if isinstance(p, str) else self.gw.files.decode(p) for p in prompts]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        reqs = self._requests(rid, adapter, version, prompts, n, sampling)
        merged = api.merged_adapters(body)
        if merged is not None:   # several adapters combined; `model` is the base or one of them
            if adapter and adapter not in [i.partition("@")[0] for i in merged.ids]:
                raise ApiError(400, f"`model` {model!r} is neither the base model nor one of "
                                    "merged_adapters.ids", "model", "invalid_value")
            for r in reqs:
                r.adapter_id, r.adapter_version = "", 0
                r.merged_adapters.CopyFrom(merged)
        try:
            if not stream:
                replies = await unless_disconnected(request.receive, self._unary(reqs, caller(request)))
                return self._reply(rid, o, replies)
            calls, firsts = await unless_disconnected(request.receive,
                                                       self._open_streams(reqs, caller(request)))
        except grpc.aio.AioRpcError as exc:
            raise api.from_rpc(exc, model) from None
        return EventStream(self._events(rid, o, calls, firsts), calls)

    def _limit(self, body: dict, chat: bool, echo: bool, prompts, sampling) -> None:
        """max_tokens past the context: 400 naming the limit; none given (and no --default-max-tokens):
        up to the end of the context, which the executor stops at."""
        limit = self.gw.max_model_len
        asked = api.max_tokens(body, chat, echo)
        if asked is None and not self.gw.config.default_max_tokens and limit:
            sampling.max_new_tokens = limit
        if asked is None or not limit:
            return
        param = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
            else "max_tokens"
        tok = self.gw.files.tokenizer
        for p in prompts:
            n = len(p) if not isinstance(p, str) else (
                len(tok.encode(p, add_special_tokens=True).ids) if tok is not None else 1)
            if n + asked > limit:
                where = "messages" if chat else "prompt"
                raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                    f"requested {n + asked} tokens ({n} in the {where}, {asked} in the "
                                    f"completion). Please reduce the length of the {where} or `{param}`.",
                               param, "context_length_exceeded")

    def _chat_prompt(self, body: dict, plan: tools.ToolPlan | None = None):
        messages = tools.template_messages(api.chat_messages(body))
        if self.gw.files.chat_template is None:
            raise ApiError(400, f"the model `{self.gw.base_name}` has no chat template (no chat_template in "
                                "its tokenizer_config.json): use /v1/completions, or give the gateway "
                                "--base-model DIR of a model that has one", "messages",
                           "chat_template_missing")
        extra = body.get("chat_template_kwargs") or {}
        if not isinstance(extra, dict):
            raise ApiError(400, "`chat_template_kwargs` must be an object", "chat_template_kwargs")
        if plan is not None:
            extra = {**extra, "tools": plan.template_tools}
        try:
            text = self.gw.files.render(messages, api.boolean(body, "add_generation_prompt", True), extra)
        except TemplateError as exc:
            raise ApiError(400, f"the chat template refused these messages: {exc}", "messages",
                           "invalid_messages") from None
        return self.gw.files.encode(text) if self.gw.files.tokenizer is not None else text

    def _reply(self, rid: str, o: Shape, replies) -> Response:
        choices = []
        n = o.n
        prompt_tokens = sum(r.usage.prompt_tokens for r in replies[::n])
        completion_tokens = 0 if o.drop_output else sum(r.usage.completion_tokens for r in replies)
        for i, r in enumerate(replies):
            items = [] if o.drop_output else api.entries(r.token_ids, r.logprobs, r.top_logprobs)
            text = "" if o.drop_output else r.text
            if o.chat:
                message, finish = {"role": "assistant", "content": text}, api.FINISH[r.finish_reason]
                if o.tools is not None:
                    content, calls = o.tools.parse(text)
                    if calls:
                        message = {"role": "assistant", "content": content,
                                   "tool_calls": tools.message_tool_calls(calls)}
                        if finish != "length" and o.tools.mode != "named":
                            finish = "tool_calls"
                choice = {"index": i, "message": message,
                          "logprobs": None if o.k is None else api.chat_logprobs(
                              o.token_str, o.token_bytes, items, o.k),
                          "finish_reason": finish}
            else:
                lp = None
                if o.echo:
                    text = o.echo_texts[i // n] + text
                    if o.k is not None:
                        items = api.prompt_entries(r.prompt_logprobs) + items
                if o.k is not None:
                    lp = api.completion_logprobs(o.token_str, items, o.k)
                choice = {"index": i, "text": text, "logprobs": lp,
                          "finish_reason": api.FINISH[r.finish_reason]}
            if o.prompt_k is not None:
                choice["prompt_logprobs"] = api.vllm_prompt_logprobs(
                    o.token_str, api.prompt_entries(r.prompt_logprobs))
            if o.token_ids:
                choice["token_ids"] = [] if o.drop_output else list(r.token_ids)
            choices.append(choice)
        self.gw.count(o.route, prompt_tokens, completion_tokens)
        return Response(dumps({
            "id": rid, "object": "chat.completion" if o.chat else "text_completion",
            "created": int(time.time()), "model": o.model, "choices": choices,
            "usage": api.usage(prompt_tokens, completion_tokens)}).encode(),
            media_type="application/json")

    def _first_chunks(self, o: Shape, firsts) -> list[dict]:
        """What each choice says before its tokens: chat's role; completions' echoed prompt (with
        its logprobs); vLLM's prompt_logprobs."""
        out = []
        for i, first in enumerate(firsts):
            if o.chat:
                choice = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}
            elif o.echo or o.prompt_k is not None:
                choice = {"index": i, "text": o.echo_texts[i // o.n] if o.echo else "",
                          "logprobs": None, "finish_reason": None}
                if o.echo and o.k is not None:
                    choice["logprobs"] = api.completion_logprobs(
                        o.token_str, api.prompt_entries(first.prompt_logprobs), o.k)
                    o.offsets[i] = len(choice["text"])
            else:
                continue
            if o.prompt_k is not None:
                choice["prompt_logprobs"] = api.vllm_prompt_logprobs(
                    o.token_str, api.prompt_entries(first.prompt_logprobs))
            out.append(choice)
        return out

    async def _events(self, rid: str, o: Shape, calls, firsts):
        start = time.perf_counter()
        chat, n, k, route = o.chat, o.n, o.k, o.route
        head = dumps({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                       "created": int(time.time()), "model": o.model})[:-1] + ',"choices":['
        tail = ',"usage":null}\n\n' if o.include_usage else '}\n\n'
        prompt_tokens = completion_tokens = 0
        o.offsets = [0] * len(calls)
        first_token = True
        ts = tools.ToolStream(o.tools, len(calls)) if o.tools is not None else None
        try:
            for choice in self._first_chunks(o, firsts):
                yield ("data: " + head + dumps(choice) + "]" + tail).encode()
            async for i, c in self._chunks(calls, firsts):
                finish = api.FINISH[c.finish_reason]
                if finish:
                    if i % n == 0:
                        prompt_tokens += c.usage.prompt_tokens
                    completion_tokens += 0 if o.drop_output else c.usage.completion_tokens
                if o.drop_output:
                    if finish:
                        choice = {"index": i, "text": "", "logprobs": None, "finish_reason": finish}
                        yield ("data: " + head + dumps(choice) + "]" + tail).encode()
                    continue
                if ts is not None:        # chat with tools: content and tool_calls deltas (tools.py)
                    deltas = ts.push(i, c.text) if c.text else []
                    reason = None
                    if finish:
                        last, reason = ts.finish(i, finish)
                        deltas += last
                    for d in deltas:
                        choice = {"index": i, "delta": d, "logprobs": None, "finish_reason": None}
                        yield ("data: " + head + dumps(choice) + "]" + tail).encode()
                    if finish:
                        choice = {"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}
                        yield ("data: " + head + dumps(choice) + "]" + tail).encode()
                    continue
                if not (c.text or finish or ((k is not None or o.token_ids) and c.token_ids)):
                    continue
                if first_token and c.token_ids:
                    first_token = False
                    self.gw.metrics.ttft.labels(route).observe(time.perf_counter() - start)
                lp = None
                if k is not None:
                    items = api.entries(c.token_ids, c.logprobs, c.top_logprobs)
                    if chat:
                        lp = api.chat_logprobs(o.token_str, o.token_bytes, items, k)
                    else:
                        lp = api.completion_logprobs(o.token_str, items, k, o.offsets[i])
                        o.offsets[i] += sum(len(t) for t in lp["tokens"])
                if not finish and lp is None and not o.token_ids:   # the common case, no dict built
                    text = dumps(c.text)
                    yield ("data: " + head + (f'{{"index":{i},"delta":{{"content":{text}}},' if chat else
                                              f'{{"index":{i},"text":{text},')
                           + '"logprobs":null,"finish_reason":null}]' + tail).encode()
                    continue
                if chat:
                    choice = {"index": i, "delta": {"content": c.text} if c.text else {},
                              "logprobs": lp, "finish_reason": finish}
                else:
                    choice = {"index": i, "text": c.text, "logprobs": lp, "finish_reason": finish}
                if o.token_ids:
                    choice["token_ids"] = list(c.token_ids)
                yield ("data: " + head + dumps(choice) + "]" + tail).encode()
        except grpc.aio.AioRpcError as exc:   # after the 200: an error event, then [DONE]
            yield ("data: " + api.from_rpc(exc, o.model).json_bytes().decode() + "\n\n").encode()
            yield DONE
            return
        self.gw.count(route, prompt_tokens, completion_tokens)
        if o.include_usage:
            yield ("data: " + head + "]," + '"usage":' + dumps(api.usage(prompt_tokens, completion_tokens))
                   + "}\n\n").encode()
        yield DONE

