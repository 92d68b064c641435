"""Structured outputs: a grammar per sequence, as a mask over the next token's logits.

    grammars = GrammarCache(tokenizer_json, vocab, eos_token_ids, size=256)
    g = grammars.new(StructuredOutput("json_schema", schema_text))   # InvalidArgument when bad
    row.grammar = g                             # sampler.py: special rows are masked at one point
    prefetch(rows)                              # engine: masks computed while the model runs
    words = masks([g, ...], [output, ...])      # int32 bitmasks; consumes new tokens (the sampler
                                                # applies them: ops.token_bitmask_fill / _fill_)

The engine is llguidance (Microsoft's grammar engine behind guidance; CPU wheels on PyPI, no torch
or transformers needed): JSON Schema, regular expressions, Lark and GBNF grammars, each compiled
once to a matcher over the model's own tokenizer and kept by spec (LRU); each sequence gets a cheap
copy of it, advanced by the tokens it emitted since its last step. The mask allows exactly the
tokens that keep the output a prefix of a sentence of the grammar, and EOS once it is complete; a
complete output that can grow no further allows only EOS, so it ends there ("stop"). Sequences
with no grammar never reach this code. Logprobs stay those of the raw logits, as without a grammar.

Kinds (SamplingParams.structured_output, CONTRACT.md): json_schema (JSON Schema text), json_object
(any JSON object), regex (the whole output matches), choice (exactly one of the strings), grammar
(Lark or GBNF / EBNF text). JSON is generated compact (no free whitespace), as vLLM's default does.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from services.common.errors import InvalidArgument

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass
class GrammarStats:
    """What the grammar rows cost the engine's steps, since start (one per GrammarCache: per engine).
    seconds: the sampler's grammar-only work in each step (advancing the matchers, computing and
    applying the masks, the masked rows' softmax and argmax; sampler._with_grammars), which the whole
    batch waits for; rows: the grammar rows it masked. Exported as metrics (metrics.py)."""

    seconds: float = 0.0
    rows: int = 0


@dataclass(frozen=True)
class StructuredOutput:
    """A format for the output: kind in KINDS; value the schema / regex / grammar text, or for
    choice the strings (a tuple); json_object has no value."""

    kind: str
    value: str | tuple[str, ...] = ""

    def problems(self) -> list[str]:
        if self.kind not in KINDS:
            return [f"structured_output kind must be one of {', '.join(KINDS)}, got {self.kind!r}"]
        if self.kind == "choice":
            if not self.value or not all(isinstance(c, str) and c for c in self.value):
                return ["structured_output.choice must be a non-empty list of non-empty strings"]
        elif self.kind != "json_object" and not (isinstance(self.value, str) and self.value.strip()):
            return [f"structured_output.{self.kind} must not be empty"]
        return []


def grammar_text(spec: StructuredOutput) -> str:
    """spec -> llguidance's grammar (a JSON string); InvalidArgument for text that does not parse."""
    import llguidance as llg
    try:
        if spec.kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_OPTIONS)
        if spec.kind == "json_schema":
            try:
                schema = json.loads(spec.value)
            except ValueError as exc:
                raise InvalidArgument(f"structured_output.json_schema is not valid JSON: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise InvalidArgument("structured_output.json_schema must be a JSON object")
            return llg.LLMatcher.grammar_from_json_schema(schema, JSON_OPTIONS)
        if spec.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.value)
        if spec.kind == "choice":
            return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.value))
        from llguidance.gbnf_to_lark import any_to_lark
        return llg.LLMatcher.grammar_from_lark(any_to_lark(spec.value))
    except InvalidArgument:
        raise
    except Exception as exc:     # llguidance's ValueError, gbnf_to_lark's parse errors
        raise InvalidArgument(f"structured_output.{spec.kind} is invalid: {exc}") from None


class GrammarCache:
    """The tokenizer as llguidance sees it (built on first use) and compiled grammars by spec."""

    def __init__(self, tokenizer_json: str | None, vocab: int, eos_token_ids, size: int = 256):
        self.tokenizer_json = tokenizer_json
        self.vocab = vocab
        self.eos_token_ids = sorted(eos_token_ids)
        self.size = size
        self._tokenizer = None
        self._compiled: OrderedDict[StructuredOutput, object] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0            # grammars compiled (cache misses), for tests and status
        self.stats = GrammarStats()  # the steps' grammar work, summed by the sampler

    def _llg_tokenizer(self):
        import llguidance as llg
        if self._tokenizer is None:
            if self.tokenizer_json is None:
                raise InvalidArgument("structured outputs need a tokenizer, and this model has no "
                                      "tokenizer.json")
            if not self.eos_token_ids:
                raise InvalidArgument("structured outputs need an EOS token, and this model has none")
            self._tokenizer = llg.LLTokenizer(self.tokenizer_json, n_vocab=self.vocab,
                                              eos_token=self.eos_token_ids)
        return self._tokenizer

    def cached(self, spec: StructuredOutput) -> bool:
        """Whether spec's matcher is compiled already (compile() then returns at once)."""
        with self._lock:
            return spec in self._compiled

    def compile(self, spec: StructuredOutput):
        """The spec's matcher at its start (cached); InvalidArgument naming what is wrong."""
        problems = spec.problems()
        if problems:
            raise InvalidArgument("; ".join(problems))
        with self._lock:
            hit = self._compiled.get(spec)
            if hit is not None:
                self._compiled.move_to_end(spec)
                return hit
            tok = self._llg_tokenizer()
        import llguidance as llg
        grammar = grammar_text(spec)
        error = llg.LLMatcher.validate_grammar(grammar, tok)
        if error:
            raise InvalidArgument(f"structured_output.{spec.kind} is invalid: {error.strip()}")
        matcher = llg.LLMatcher(tok, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidArgument(f"structured_output.{spec.kind} is invalid: {matcher.get_error()}")
        with self._lock:
            self.compiles += 1
            self._compiled[spec] = matcher
            while len(self._compiled) > self.size:
                self._compiled.popitem(last=False)
        return matcher

    def new(self, spec: StructuredOutput) -> Grammar:
        """A fresh grammar state for one sequence."""
        return Grammar(self.compile(spec).deep_copy(), self.vocab, self.eos_token_ids, self.stats)


_POOL: ThreadPoolExecutor | None = None
_EXECUTOR = None             # llguidance's LLExecutor (its own thread pool), made on first use


def masks(grammars: list[Grammar], outputs: list[list[int]], parallel: bool = False) -> Tensor:
    """int32 [len(grammars), ceil(vocab / 32)]: row j the tokens grammars[j] allows next (a set bit
    allows one) after outputs[j], whose tokens not yet consumed advance its matcher first; a mask
    prefetched for exactly that output is copied instead. parallel: see _masks."""
    words = torch.empty((len(grammars), (grammars[0].vocab + 31) // 32), dtype=torch.int32)
    todo = []
    for j, (g, out) in enumerate(zip(grammars, outputs, strict=True)):
        if g.pending is None or not g.take_prefetched(out, words[j]):   # (no row view made)
            g.advance(out)
            todo.append((g.matcher, j))
    if todo:
        _masks(todo, words, parallel=parallel)
    return words


def _masks(todo: list[tuple[object, int]], words: Tensor, parallel: bool) -> None:
    """Each (matcher, row) writes its next-token bitmask into words[row] (the tokenizer's n_vocab is
    the model's vocab, so a row is exactly the matcher's mask size). parallel: on llguidance's
    executor (its own threads, without the GIL) where the host has cores to spare beside a GPU; on
    a CPU engine one after another (a few microseconds each; extra threads would only take cores
    from the model)."""
    global _EXECUTOR
    assert words.is_contiguous() and words.dtype == torch.int32 and words.device.type == "cpu"
    row_bytes = words.shape[1] * 4
    if not parallel:
        base = words.data_ptr()
        for m, i in todo:
            m.unsafe_compute_mask_ptr(base + i * row_bytes, row_bytes)
        return
    if _EXECUTOR is None:
        import llguidance as llg
        _EXECUTOR = llg.LLExecutor()
    _EXECUTOR.unsafe_compute_mask_ptr(todo, words.data_ptr(), row_bytes, words.shape[0])


def prefetch(rows) -> None:
    """Start computing the masks of these rows' grammars on a worker thread (llguidance drops the
    GIL), to overlap the step's forward pass; masks() then takes the result."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
    jobs = [(r.grammar, r.history[r.prompt_len:]) for r in rows]

    def work():
        words = torch.zeros(len(jobs), (jobs[0][0].vocab + 31) // 32, dtype=torch.int32)
        for g, out in jobs:
            g.advance(out)
        _masks([(g.matcher, i) for i, (g, _) in enumerate(jobs)], words, parallel=True)
        return words

    future = _POOL.submit(work)                                        # one hand-off per step
    for i, (g, out) in enumerate(jobs):
        g.pending = (len(out), future, i)


class Grammar:
    """One sequence's position in its grammar."""

    def __init__(self, matcher, vocab: int, eos_token_ids: list[int], stats: GrammarStats | None = None):
        self.matcher = matcher
        self.vocab = vocab
        self.eos_token_ids = eos_token_ids
        self.stats = stats if stats is not None else GrammarStats()   # its cache's: the engine's
        self.consumed = 0            # output tokens the matcher has taken
        self.pending = None          # (output length, Future of an int32 words buffer, row) from prefetch()

    def take_prefetched(self, output: list[int], words: Tensor) -> bool:
        """Copies a prefetched mask for exactly `output` into words (int32 [ceil(vocab / 32)]);
        False when there is none (or it is stale: the output moved on)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return False
        n, future, i = pending
        done = future.result()          # also when stale: the worker has advanced the matcher
        if n != len(output):
            return False
        words.copy_(done[i])
        return True

    def advance(self, output: list[int]) -> None:
        """Consumes the tokens of `output` the matcher has not taken yet."""
        m = self.matcher
        for t in output[self.consumed:]:
            if not m.is_stopped():   # a complete output: EOS (or ignore_eos' repeats) not consumed
                m.consume_token(t)
            self.consumed += 1
        if m.is_error():
            raise InvalidArgument(f"the output left its grammar: {m.get_error()}")
