"""Output processing: a step's logits -> sampled tokens -> request state, stop conditions, events.

An error sampling one request's row or building its event fails only that request (with
InternalError); the others of the step go on.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from torch import Tensor

from services.executor.engine_types import InternalError, RequestState, TokenEvent
from services.executor.sampler import EOS, LENGTH, STOP, Top, sample_draft, sample_with_top

log = structlog.get_logger(__name__)

Sampled = tuple[list[int], list[float], list[Top | None]]   # tokens to emit, logprobs, top alternatives
Finish = Callable[[RequestState, TokenEvent | None, Exception | None], None]


def deliver(r: RequestState, event: TokenEvent) -> None:
    """Hand an event to the request's callback; a failing callback is logged, never raised."""
    try:
        r.on_event(event)
    except Exception:
        log.exception("on_event_failed", request_id=r.req.request_id)


class OutputProcessor:
    """finish(r, event, error): the engine's end of a request (frees its KV blocks and adapter)."""

    def __init__(self, eos_token_ids: frozenset[int], max_model_len: int, finish: Finish):
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.finish = finish

    def process(self, logits: Tensor, sampled: list[RequestState]) -> None:
        """logits [len(sampled), vocab]: one row per request that samples this step."""
        self.emit(sampled, self.sample(logits, sampled, [[] for _ in sampled]))

    def sample(self, logits: Tensor, sampled: list[RequestState],
               drafts: list[list[int]]) -> list[Sampled | None]:
        """logits: 1 + len(drafts[i]) rows per request, in order -> per request the tokens it emits
        (a draft's accepted tokens, then one more), None for a request that failed here."""
        plain = [i for i, d in enumerate(drafts) if not d]
        starts, row = [], 0
        for d in drafts:
            starts.append(row)
            row += 1 + len(d)
        out: list[Sampled | None] = [None] * len(sampled)
        if plain:
            rows = logits if len(plain) == len(sampled) else logits[[starts[i] for i in plain]]
            for i, t, lp, top in zip(plain, *self._sample(rows, [sampled[i] for i in plain]),
                                     strict=True):
                out[i] = None if t is None else ([t], [lp], [top])
        for i, d in enumerate(drafts):
            if d and not sampled[i].done:
                try:
                    out[i] = sample_draft(logits[starts[i]:starts[i] + 1 + len(d)], sampled[i].row, d)
                except Exception as exc:
                    log.exception("sampling_failed", request_id=sampled[i].req.request_id)
                    self.finish(sampled[i], None, InternalError(f"internal error in sampling: {exc}"))
        return out

    def emit(self, sampled: list[RequestState], outs: list[Sampled | None]) -> None:
        for r, o in zip(sampled, outs, strict=True):
            if r.done or o is None:
                continue
            try:
                self.emit_tokens(r, *o)
            except Exception as exc:
                log.exception("output_failed", request_id=r.req.request_id)
                self.finish(r, None, InternalError(f"internal error: {exc}"))

    def _sample(self, logits: Tensor, sampled: list[RequestState]):
        try:
            return sample_with_top(logits, [r.row for r in sampled])
        except Exception:   # isolate the faulty request: sample row by row
            tokens, logprobs, tops = [], [], []
            for i, r in enumerate(sampled):
                try:
                    t, lp, top = sample_with_top(logits[i:i + 1], [r.row])
                except Exception as exc:
                    log.exception("sampling_failed", request_id=r.req.request_id)
                    self.finish(r, None, InternalError(f"internal error in sampling: {exc}"))
                    t, lp, top = [None], [None], [None]
                tokens += t
                logprobs += lp
                tops += top
            return tokens, logprobs, tops

    def emit_token(self, r: RequestState, token: int, logprob: float, top: Top | None = None) -> None:
        self.emit_tokens(r, [token], [logprob], [top])

    def emit_tokens(self, r: RequestState, tokens: list[int], logprobs: list[float],
                    tops: list[Top | None]) -> None:
        """Append the tokens one by one, checking the stop conditions after each (the tokens after
        the one that finishes the request are dropped); stream their text as one event (the last
        event ends the request)."""
        opts = r.req.sampling
        finish, text, n = None, "", 0
        for token in tokens:
            r.seq.token_ids.append(token)
            r.row.history.append(token)
            r.completion += 1
            n += 1
            if token in self.eos_token_ids and not opts.ignore_eos:
                finish = EOS
            elif token in opts.stop_token_ids:
                finish = STOP
            text += r.stop_text.push(r.detok.step([token])) if r.detok else ""
            if r.stop_text.stopped:
                finish = STOP
            if finish is None and (r.completion >= r.max_new or r.seq.num_tokens >= self.max_model_len):
                finish = LENGTH
            if finish is not None:
                break
        if finish is not None and r.detok and not r.stop_text.stopped:
            text += r.stop_text.push(r.detok.flush())
            if r.stop_text.stopped:
                finish = STOP
            text += r.stop_text.flush()
        kept = [t for t in tops[:n] if t is not None]
        event = TokenEvent(r.req.request_id, tokens[:n], text, logprobs[:n], finish, r.seq.prompt_len,
                           r.completion, top_logprobs=kept if len(kept) == n else [])
        if finish is not None:
            self.finish(r, event, None)
        else:
            deliver(r, event)
