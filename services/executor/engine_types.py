"""The engine's request and status types (what the servicer and tests see), its per-request state,
and the validation that turns a GenerationRequest into that state."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from services.common.errors import InvalidArgument, OpenLoraError
from services.common.peft_format import check_adapter_id
from services.executor.sampler import SamplingOptions, SamplingRow, StopText, Top, make_generator
from services.executor.scheduler import Sequence
from services.executor.tokenizer import Detokenizer, Tokenizer


@dataclass
class GenerationRequest:
    request_id: str
    prompt: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)   # used when prompt is empty
    adapter_id: str = ""                                         # "" -> base model
    adapter_version: int = 0                                     # 0 -> latest
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    merged: object | None = None   # adapters/merge.MergeSpec: adapter_id is then its derived id


@dataclass
class TokenEvent:
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str | None          # "length" | "stop" | "eos" on the last event, else None
    prompt_tokens: int
    completion_tokens: int
    error: Exception | None = None     # set on a failed request's last event
    top_logprobs: list[Top] = field(default_factory=list)   # per token, when sampling.top_logprobs > 0
    # (token id, logprob, top-k | None) per prompt token, on one event before the first token, when
    # sampling.prompt_logprobs is set (prompt_logprobs.py)
    prompt_logprobs: list[tuple[int, float, Top | None]] | None = None


@dataclass(frozen=True)
class AdapterResidency:
    adapter_id: str
    version: int
    tier: str                          # "device" | "host" | "disk"
    active_requests: int


@dataclass(frozen=True)
class TierStat:
    tier: str                          # "device" | "host" | "disk"
    adapters: int = 0
    bytes_used: int = 0
    bytes_capacity: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0


@dataclass(frozen=True)
class EngineStatus:
    running: int
    waiting: int
    max_batch_size: int
    kv_blocks_total: int
    kv_blocks_free: int
    device: str
    dtype: str
    device_adapter_slots: int
    adapters: list[AdapterResidency]
    kv_blocks_cached: int = 0          # blocks holding a cached prefix (in use or free)
    prefix_cache_hit_tokens: int = 0   # prompt tokens taken from the prefix cache since start
    prefill_tokens_computed: int = 0   # prompt tokens run through the model since start
    tier_stats: list[TierStat] = field(default_factory=list)   # device, host, disk
    host_cache_bytes: int = 0          # the host arena's capacity
    host_cache_used_bytes: int = 0     # its pages in use
    quantization: str = "none"         # the base weights': none, int8, int4, gptq, awq
    base_weight_bytes: int = 0         # the base model's weights as served (quantized ones packed)
    speculative_method: str = ""       # "" (off) or "ngram"
    spec_draft_tokens: int = 0         # draft tokens proposed and verified, since start
    spec_accepted_tokens: int = 0      # of those, accepted
    spec_emitted_tokens: int = 0       # tokens emitted by steps that verified drafts
    spec_acceptance_rate: float = 0.0  # accepted / drafted (0 with no drafts)
    device_cache_bytes: int = 0        # the device page pool's capacity (0: none)
    device_cache_used_bytes: int = 0
    unified_kv_adapter_pool: bool = False
    lora_dtype: str = ""               # the adapter pages' dtype (--lora-dtype)
    steps: int = 0                     # engine steps run (non-empty batches), since start
    step_seconds: float = 0.0          # their wall time
    grammar_seconds: float = 0.0       # of which the grammar rows' own work (structured.GrammarStats)
    grammar_rows: int = 0              # grammar rows masked


class InternalError(OpenLoraError):
    """A bug in the engine (gRPC INTERNAL)."""


@dataclass(eq=False)
class RequestState:
    """A request in flight, as the engine thread sees it."""

    req: GenerationRequest
    on_event: Callable[[TokenEvent], None]
    seq: Sequence
    max_new: int
    row: SamplingRow
    detok: Detokenizer | None
    stop_text: StopText
    lease_future: Future | None = None
    lease: object | None = None        # the pinned adapter (a residency lease)
    slot: int | None = None            # its batch sort key
    completion: int = 0
    done: bool = False
    prompt_lps: list | None = None     # prompt logprobs collected so far (prompt_logprobs.py)


def new_request_state(req: GenerationRequest, on_event: Callable[[TokenEvent], None], *,
                      tokenizer: Tokenizer | None, vocab: int, max_model_len: int,
                      default_max_new_tokens: int, eos_token_ids: frozenset[int],
                      device: torch.device) -> RequestState:
    """Validate a request (raising InvalidArgument with what to fix) -> its state in the engine."""
    if not req.request_id:
        raise InvalidArgument("request_id must not be empty")
    problems = req.sampling.problems()
    if problems:
        raise InvalidArgument("; ".join(problems))
    if req.adapter_version < 0:
        raise InvalidArgument(f"adapter_version must be >= 0, got {req.adapter_version}")
    if req.adapter_id and req.merged is None:
        check_adapter_id(req.adapter_id)
    prompt_ids = prompt_token_ids(req, tokenizer, vocab)
    if len(prompt_ids) >= max_model_len:
        raise InvalidArgument(f"the prompt has {len(prompt_ids)} tokens; this model's context "
                              f"is {max_model_len} tokens, prompt plus at least one new token")
    if req.sampling.stop and tokenizer is None:
        raise InvalidArgument("stop strings need a tokenizer, and this model has none")
    opts = req.sampling
    bad = [t for t in opts.stop_token_ids if t >= vocab]
    if bad:
        raise InvalidArgument(f"stop_token_ids: {bad[0]} is outside the vocabulary [0, {vocab})")
    max_new = opts.max_new_tokens or default_max_new_tokens
    if opts.min_new_tokens > max_new:
        raise InvalidArgument(f"min_new_tokens ({opts.min_new_tokens}) must be <= max_new_tokens "
                              f"({max_new}, the executor's default)")
    greedy = opts.temperature <= 0
    held_back = tuple(sorted(set(opts.stop_token_ids)
                             | (set() if opts.ignore_eos else set(eos_token_ids))))
    return RequestState(
        req=req, on_event=on_event,
        seq=Sequence(req.request_id, list(prompt_ids), len(prompt_ids),
                     prompt_logits=opts.prompt_logprobs is not None), max_new=max_new,
        row=SamplingRow(opts, None if greedy else make_generator(opts.seed, device),
                        list(prompt_ids), len(prompt_ids), held_back),
        detok=Detokenizer(tokenizer, prompt_ids) if tokenizer else None,
        stop_text=StopText(tuple(opts.stop)))


def prompt_token_ids(req: GenerationRequest, tokenizer: Tokenizer | None, vocab: int) -> list[int]:
    if req.prompt:
        if tokenizer is None:
            raise InvalidArgument("this model has no tokenizer.json: send prompt_token_ids")
        ids = tokenizer.encode(req.prompt)
    else:
        ids = list(req.prompt_token_ids)
    if not ids:
        raise InvalidArgument("the prompt is empty: send prompt or prompt_token_ids")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InvalidArgument(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
    return ids
