"""Tool calls in chat: `tools` rendered through the model's chat template, `tool_choice` enforced
by structured outputs, and the output parsed back into OpenAI's `tool_calls`.

    plan = tool_plan(body, chat_template)      # None without tools (or with tool_choice "none")
    plan.template_tools                         # the `tools` variable the template renders
    plan.structured                             # required / named: the JSON Schema the output follows
    content, calls = plan.parse(text)           # [(name, arguments JSON text)]

tool_choice:
  none      the model sees no tools; plain text back
  auto      free text; tool calls parsed from it in the family's format: Hermes / Qwen
            (<tool_call>{"name", "arguments"}</tool_call>), Llama 3 JSON ({"name", "parameters"},
            after <|python_tag|> or alone), Mistral ([TOOL_CALLS] or a bare [{"name", "arguments"}])
  required  the output is [{"name": one of the tools, "parameters": its schema}, ...] (vLLM's
            schema; one item with parallel_tool_calls false)
  {"type": "function", "function": {"name": F}}   the output is F's arguments, following its schema
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from services.common.gen.openlora.v1 import common_pb2
from services.gateway.openai_api import ApiError

HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def _bad(param: str, what: str) -> ApiError:
    return ApiError(400, f"`{param}` {what}", param, "invalid_value")


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _check_tools(tools) -> list[dict]:
    if not isinstance(tools, list) or not tools:
        raise _bad("tools", "must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not (isinstance(t, dict) and t.get("type") == "function" and isinstance(fn, dict)
                and isinstance(fn.get("name"), str) and fn["name"]):
            raise _bad("tools", f"[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", "
                                f"\"description\", \"parameters\"}}}}")
        if not isinstance(fn.get("parameters", {}), dict):
            raise _bad("tools", f"[{i}].function.parameters must be a JSON Schema object")
    return tools


def _params(fn: dict) -> dict:
    return fn.get("parameters") or {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    mode: str                                   # auto | required | named
    tools: list[dict]
    parser: str                                 # hermes | llama3_json | mistral | generic
    name: str = ""                              # named: the function
    structured: common_pb2.StructuredOutput | None = None
    template_tools: list[dict] = field(default_factory=list)

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        """The output -> (content, [(function name, arguments as JSON text)])."""
        if self.mode == "named":
            return None, [(self.name, text)]
        if self.mode == "required":
            try:
                items = json.loads(text)
            except ValueError:
                return text, []
            return None, [(c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False))
                          for c in items if isinstance(c, dict) and isinstance(c.get("name"), str)]
        return parse_auto(text, self.parser, {t["function"]["name"] for t in self.tools})


def _calls_from(obj, names: set[str]) -> list[tuple[str, str]] | None:
    """{"name", "arguments"|"parameters"} or a list of them -> calls (None when it is not one)."""
    items = obj if isinstance(obj, list) else [obj]
    out = []
    for c in items:
        if not (isinstance(c, dict) and isinstance(c.get("name"), str)):
            return None
        args = c.get("arguments", c.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        out.append((c["name"], json.dumps(args, ensure_ascii=False)))
    return out if out and all(n in names for n, _ in out) else None


def _json_prefix(text: str):
    """The JSON value at the start of text, else None."""
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    return value


def parse_auto(text: str, parser: str, names: set[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """tool_choice auto: the tool calls in free text, in the family's format (none -> all text)."""
    if parser in ("hermes", "generic") and "<tool_call>" in text:
        head = text[:text.index("<tool_call>")]
        calls = []
        for body in HERMES.findall(text):
            got = _calls_from(_json_prefix(body), names)
            if got is None:
                return text, []
            calls += got
        return (head.strip() or None), calls
    stripped = text.strip()
    for tag in ("[TOOL_CALLS]", "<|python_tag|>"):
        if stripped.startswith(tag):
            stripped = stripped[len(tag):].strip()
    if stripped[:1] in ("[", "{"):
        if parser == "llama3_json" and ";" in stripped:        # several calls: a; b
            parts = [_json_prefix(p.strip()) for p in stripped.split(";")]
            got = _calls_from(parts, names) if all(p is not None for p in parts) else None
        else:
            got = _calls_from(_json_prefix(stripped), names)
        if got:
            return None, got
    return text, []


def parser_for(template: str | None) -> str:
    t = template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t or "[AVAILABLE_TOOLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3_json"
    return "generic"


def tool_plan(body: dict, chat_template: str | None) -> ToolPlan | None:
    """`tools`, `tool_choice`, `parallel_tool_calls` -> the plan (None: no tools in play)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if body.get("functions") is not None:
        raise ApiError(400, "`functions` is deprecated: send `tools`", "functions", "unsupported_parameter")
    if not tools:
        if choice not in (None, "none"):
            raise _bad("tool_choice", "needs `tools`")
        return None
    tools = _check_tools(tools)
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise _bad("parallel_tool_calls", "must be true or false")
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    choice = "auto" if choice is None else choice
    if choice == "none":
        return None
    plan = ToolPlan(mode="auto", tools=tools, parser=parser_for(chat_template), template_tools=tools)
    if choice == "auto":
        return plan
    if choice == "required":
        items = {"type": "object", "anyOf": [
            {"properties": {"name": {"type": "string", "enum": [n]}, "parameters": _params(fn)},
             "required": ["name", "parameters"], "additionalProperties": False}
            for n, fn in by_name.items()]}
        schema = {"type": "array", "minItems": 1, "items": items, **({} if parallel else {"maxItems": 1})}
        plan.mode = "required"
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(
            choice.get("function"), dict) and isinstance(choice["function"].get("name"), str):
        name = choice["function"]["name"]
        if name not in by_name:
            raise _bad("tool_choice", f"names `{name}`, which is not in `tools`")
        schema = _params(by_name[name])
        plan.mode, plan.name = "named", name
    else:
        raise _bad("tool_choice", "must be \"none\", \"auto\", \"required\" or "
                                  "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    plan.structured = common_pb2.StructuredOutput(json_schema=json.dumps(schema))
    return plan


def template_messages(messages: list[dict]) -> list[dict]:
    """Assistant tool_calls with their arguments as objects, as chat templates expect them."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            fixed = []
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        fn = {**fn, "arguments": json.loads(fn["arguments"])}
                    except ValueError:
                        pass
                    c = {**c, "function": fn}
                fixed.append(c)
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


def message_tool_calls(calls: list[tuple[str, str]]) -> list[dict]:
    return [{"id": call_id(), "type": "function", "function": {"name": n, "arguments": a}}
            for n, a in calls]


class ToolStream:
    """Streamed chat with tools: per choice, the deltas OpenAI sends. Named: the arguments stream
    as they come (the output is them). Required: the calls at the end. Auto: text streams as content
    until it may be a tool call (a leading JSON / [TOOL_CALLS] / <|python_tag|>, or <tool_call>),
    which is held and parsed at the end (content after all, if it is no call)."""

    MARKERS = ("{", "[", "<|python_tag|>", "[TOOL_CALLS]")
    TAG = "<tool_call>"

    def __init__(self, plan: ToolPlan, choices: int):
        self.plan = plan
        self.buf = [""] * choices
        self.sent = [0] * choices
        self.started = [False] * choices
        self.ids = [call_id() for _ in range(choices)]

    def push(self, i: int, text: str) -> list[dict]:
        p = self.plan
        if p.mode == "named":
            out = []
            if not self.started[i]:
                self.started[i] = True
                out.append({"tool_calls": [{"index": 0, "id": self.ids[i], "type": "function",
                                            "function": {"name": p.name, "arguments": ""}}]})
            if text:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return out
        self.buf[i] += text
        if p.mode == "required":
            return []
        upto = self._streamable(i)
        if upto <= self.sent[i]:
            return []
        delta = {"content": self.buf[i][self.sent[i]:upto]}
        self.sent[i] = upto
        return [delta]

    def _streamable(self, i: int) -> int:
        b = self.buf[i]
        if self.sent[i] == 0:
            s = b.lstrip()
            if not s or any(s.startswith(m) or m.startswith(s) for m in self.MARKERS):
                return 0
        if self.plan.parser not in ("hermes", "generic"):
            return len(b)
        k = b.find(self.TAG)
        if k >= 0:
            return k
        hold = next((n for n in range(min(len(self.TAG) - 1, len(b)), 0, -1) if b.endswith(self.TAG[:n])), 0)
        return len(b) - hold

    def finish(self, i: int, reason: str | None) -> tuple[list[dict], str | None]:
        """The choice's last deltas and its finish_reason."""
        p = self.plan
        if p.mode == "named":
            return self.push(i, "") if not self.started[i] else [], reason
        content, calls = p.parse(self.buf[i])
        if not calls:
            rest = self.buf[i][self.sent[i]:]
            return ([{"content": rest}] if rest else []), reason
        deltas = [{"tool_calls": [{"index": j, "id": call_id(), "type": "function",
                                   "function": {"name": n, "arguments": a}}]} for j, (n, a) in enumerate(calls)]
        return deltas, reason if reason == "length" else "tool_calls"
