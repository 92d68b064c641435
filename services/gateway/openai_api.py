"""OpenAI request bodies -> openlora GenerateRequests, and replies -> OpenAI JSON; the error shape.

Pure functions (no I/O): every bad field is an ApiError(400) naming the field in `param`.
"""

from __future__ import annotations

import json
import re

import grpc

from services.common.errors import HTTP_STATUS
from services.common.gen.openlora.v1 import common_pb2

ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
FINISH = {common_pb2.FINISH_REASON_LENGTH: "length", common_pb2.FINISH_REASON_STOP: "stop",
          common_pb2.FINISH_REASON_EOS: "stop", common_pb2.FINISH_REASON_UNSPECIFIED: None}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
               429: "rate_limit_error", 499: "cancelled", 501: "not_implemented",
               503: "service_unavailable", 504: "timeout_error"}
MAX_TOP_LOGPROBS = 20
U32 = 2**32 - 1          # the proto fields these land in are uint32


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message,
                          "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code or str(self.status)}}

    def json_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


def from_rpc(exc: grpc.aio.AioRpcError, model: str | None = None) -> ApiError:
    """An upstream gRPC status as the matching HTTP error (one table: common.errors.HTTP_STATUS)."""
    code = exc.code()
    status = HTTP_STATUS.get(code, 502)
    message = exc.details() or code.name
    if code == grpc.StatusCode.NOT_FOUND and model is not None:
        return ApiError(404, f"The model `{model}` does not exist: {message}", "model", "model_not_found")
    return ApiError(status, message, None, code.name.lower())


# --- typed fields -----------------------------------------------------------------------------

def _bad(param: str, what: str) -> ApiError:
    return ApiError(400, f"`{param}` {what}", param, "invalid_value")


def number(body: dict, name: str, default, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, f"must be a number, got {json.dumps(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _bad(name, f"must be in [{lo}, {hi}], got {v}")
    return v


def integer(body: dict, name: str, default, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"must be an integer, got {json.dumps(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _bad(name, f"must be in [{lo}, {'inf' if hi is None else hi}], got {v}")
    return v


def boolean(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"must be true or false, got {json.dumps(v)}")
    return v


def string(body: dict, name: str, required: bool = False) -> str | None:
    v = body.get(name)
    if v is None:
        if required:
            raise ApiError(400, f"`{name}` is required", name, "missing_field")
        return None
    if not isinstance(v, str):
        raise _bad(name, f"must be a string, got {json.dumps(v)[:80]}")
    return v


def max_tokens(body: dict, chat: bool, echo: bool = False) -> int | None:
    """`max_tokens` (chat: or `max_completion_tokens`); 0 only with `echo` (the prompt alone)."""
    if chat and body.get("max_completion_tokens") is not None:
        return integer(body, "max_completion_tokens", None, 1, U32)
    return integer(body, "max_tokens", None, 0 if echo else 1, U32)


def sampling(body: dict, default_max_tokens: int, chat: bool, echo: bool = False) -> common_pb2.SamplingParams:
    """OpenAI's and vLLM's sampling fields -> SamplingParams (ranges the executor checks again);
    max_tokens 0 (echo only) asks for one token, which the caller drops."""
    n_max = max_tokens(body, chat, echo)
    top_k = integer(body, "top_k", 0, -1, U32)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    elif stop is None:
        stop = []
    elif not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise _bad("stop", "must be a string or a list of non-empty strings")
    stop_ids = body.get("stop_token_ids") or []
    if not (isinstance(stop_ids, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                               and 0 <= t <= U32 for t in stop_ids)):
        raise _bad("stop_token_ids", f"must be a list of token ids (integers in [0, {U32}])")
    params = common_pb2.SamplingParams(
        max_new_tokens=default_max_tokens if n_max is None else max(n_max, 1),
        temperature=number(body, "temperature", 1.0, 0, 100),
        top_p=number(body, "top_p", 1.0, 0, 1),
        top_k=max(top_k, 0),
        stop=stop,
        ignore_eos=boolean(body, "ignore_eos"),
        repetition_penalty=number(body, "repetition_penalty", 1.0, 0, 100),
        stop_token_ids=stop_ids,
        min_new_tokens=integer(body, "min_tokens", 0, 0, U32),
        presence_penalty=number(body, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=number(body, "frequency_penalty", 0.0, -2, 2))
    if params.top_p <= 0:
        raise _bad("top_p", "must be in (0, 1]")
    seed = integer(body, "seed", None, 0, 2**64 - 1)
    if seed is not None:
        params.seed = seed
    return params


def prompt_logprobs_k(body: dict) -> int | None:
    """vLLM's `prompt_logprobs` extra: each prompt token's logprob and this many alternatives."""
    return integer(body, "prompt_logprobs", None, 0, MAX_TOP_LOGPROBS)


def structured_output(body: dict) -> common_pb2.StructuredOutput | None:
    """`response_format` (json_object, json_schema) or one of vLLM's extras (`structured_outputs`
    {json, regex, choice, grammar, json_object}, `guided_json`, `guided_regex`, `guided_choice`,
    `guided_grammar`) -> StructuredOutput; the executor compiles it (a bad schema is its 400)."""
    found: list[tuple[str, common_pb2.StructuredOutput]] = []

    def schema_text(param: str, v) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, (dict, bool)):
            return json.dumps(v)
        raise _bad(param, "must be a JSON Schema (an object, or its JSON text)")

    def add(param: str, kind: str, v) -> None:
        if v is None or v is False:
            return
        out = common_pb2.StructuredOutput()
        if kind == "json":
            out.json_schema = schema_text(param, v)
        elif kind == "json_object":
            out.json_object = True
        elif kind == "choice":
            if not (isinstance(v, list) and v and all(isinstance(c, str) and c for c in v)):
                raise _bad(param, "must be a non-empty list of non-empty strings")
            out.choice.choices.extend(v)
        else:
            if not isinstance(v, str) or not v:
                raise _bad(param, "must be a non-empty string")
            setattr(out, kind, v)
        found.append((param, out))

    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise _bad("response_format", "must be {\"type\": \"text\" | \"json_object\" | \"json_schema\"}")
        if rf["type"] == "json_object":
            add("response_format", "json_object", True)
        elif rf["type"] == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or spec.get("schema", {}) is None:
                raise _bad("response_format", "json_schema must be {\"name\", \"schema\", \"strict\"}")
            add("response_format", "json", spec.get("schema", {}))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise _bad("structured_outputs", "must be an object with one of json, regex, choice, grammar, "
                                             "json_object")
        for kind in ("json", "regex", "choice", "grammar", "json_object"):
            add(f"structured_outputs.{kind}", kind, so.get(kind))
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        add(name, kind, body.get(name))
    if len(found) > 1:
        raise _bad(found[1][0], f"conflicts with `{found[0][0]}`: give one structured-output format")
    return found[0][1] if found else None


def completion_logprobs_k(body: dict) -> int | None:
    """/v1/completions' `logprobs` (an int: how many alternatives per token), or None."""
    return integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)


def chat_logprobs_k(body: dict) -> int | None:
    """/v1/chat/completions' `logprobs` (bool) + `top_logprobs` (int), or None when off."""
    top = integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if not boolean(body, "logprobs"):
        if top:
            raise _bad("top_logprobs", "needs `logprobs: true`")
        return None
    return top or 0


def prompts(body: dict) -> list[str | list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids or a list of such lists."""
    p = body.get("prompt")
    if p is None:
        raise ApiError(400, "`prompt` is required", "prompt", "missing_field")

    def ids(x) -> bool:
        return isinstance(x, list) and len(x) > 0 and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= U32 for t in x)

    if isinstance(p, str):
        return [p]
    if ids(p):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) or ids(x) for x in p):
        return list(p)
    raise _bad("prompt", "must be a string, a list of strings, a list of token ids or a list of lists "
                         "of token ids (none of them empty)")


def chat_messages(body: dict) -> list[dict]:
    """`messages`, checked, with list-of-parts content joined into text."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad("messages", f"[{i}] must be an object with a string `role`")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                        part.get("text"), str):
                    raise _bad("messages", f"[{i}].content: only text parts are supported "
                                           f"({{\"type\": \"text\", \"text\": ...}})")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise _bad("messages", f"[{i}].content must be a string or a list of text parts")
        out.append({**m, "content": content})
    return out


def unsupported(body: dict, names: tuple[str, ...]) -> None:
    for name in names:
        if body.get(name) not in (None, False, [], ""):
            raise ApiError(400, f"`{name}` is not supported by openlora", name, "unsupported_parameter")


# --- replies ----------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


Entry = tuple  # (token id, logprob or None (the first prompt token), top: (ids, logprobs) or None)


def entries(token_ids, lps, tops) -> list[Entry]:
    """Generated tokens (a GenerateResponse/GenerateChunk's fields) as logprob entries."""
    return [(t, lp, (list(tops[i].token_ids), list(tops[i].logprobs)) if i < len(tops) else None)
            for i, (t, lp) in enumerate(zip(token_ids, lps, strict=False))]


def prompt_entries(plps) -> list[Entry]:
    """PromptLogprob messages as entries (the first prompt token has no logprob: None)."""
    return [(p.token_id, None if i == 0 else p.logprob,
             (list(p.top.token_ids), list(p.top.logprobs)) if p.HasField("top") else None)
            for i, p in enumerate(plps)]


def completion_logprobs(token_str, items: list[Entry], k: int, offset: int = 0) -> dict:
    """The legacy completions logprobs object (text_offset from `offset`). top_logprobs holds the k
    best (distinct ids; keys are their text, or `token_id:N` with return_tokens_as_token_ids) and
    always the chosen token, as OpenAI and vLLM do; None for the first prompt token."""
    tokens, offsets, top_dicts, token_lps = [], [], [], []
    for t, lp, top in items:
        s = token_str(t)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        token_lps.append(lp)
        if lp is None:
            top_dicts.append(None)
            continue
        d = {}
        if k and top is not None:
            for a, b in zip(top[0][:k], top[1][:k], strict=False):
                d.setdefault(token_str(a), b)
        d.setdefault(s, lp)
        top_dicts.append(d)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": top_dicts,
            "text_offset": offsets}


def chat_logprobs(token_str, token_bytes, items: list[Entry], k: int) -> dict:
    """Chat's logprobs: {"content": [{token, logprob, bytes, top_logprobs: k best by id}]}."""
    def entry(t, lp):
        return {"token": token_str(t), "logprob": lp, "bytes": token_bytes(t)}

    content = []
    for t, lp, top in items:
        e = entry(t, lp)
        e["top_logprobs"] = ([entry(a, b) for a, b in zip(top[0][:k], top[1][:k], strict=False)]
                             if k and top is not None else [])
        content.append(e)
    return {"content": content}


def vllm_prompt_logprobs(token_str, items: list[Entry]) -> list:
    """vLLM's `prompt_logprobs`: None for the first token, then {id: {logprob, rank, decoded_token}}
    for the prompt token and its alternatives (rank: 1-based among the alternatives, else None)."""
    out = []
    for t, lp, top in items:
        if lp is None:
            out.append(None)
            continue
        ids, values = top if top is not None else ([], [])
        d = {str(t): {"logprob": lp, "rank": ids.index(t) + 1 if t in ids else None,
                      "decoded_token": token_str(t)}}
        for r, (a, b) in enumerate(zip(ids, values, strict=False)):
            d.setdefault(str(a), {"logprob": b, "rank": r + 1, "decoded_token": token_str(a)})
        out.append(d)
    return out


def merged_adapters(body: dict) -> common_pb2.MergedAdapters | None:
    """`merged_adapters`: {"ids": [...], "weights": [...], "combination_type", "density",
    "majority_sign_method"} (the executor checks the values, as for gRPC clients)."""
    m = body.get("merged_adapters")
    if m is None:
        return None
    if not isinstance(m, dict):
        raise _bad("merged_adapters", f"must be an object, got {json.dumps(m)[:80]}")
    unknown = sorted(set(m) - {"ids", "weights", "combination_type", "density", "majority_sign_method"})
    if unknown:
        raise _bad("merged_adapters", f"has unknown fields {unknown}")
    ids, weights = m.get("ids"), m.get("weights") or []
    if not (isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids)):
        raise _bad("merged_adapters.ids", "must be a non-empty list of adapter ids")
    if not (isinstance(weights, list)
            and all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)):
        raise _bad("merged_adapters.weights", "must be a list of numbers")
    out = common_pb2.MergedAdapters(ids=ids, weights=weights)
    for name in ("combination_type", "majority_sign_method"):
        setattr(out, name, string(m, name) or "")
    out.density = number(m, "density", 0.0, 0.0, 1.0)
    return out
