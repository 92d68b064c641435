"""Output processing: a step's logits -> sampled tokens -> request state, stop conditions, events.

An error sampling one request's row or building its event fails only that request (with
InternalError); the others of the step go on.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from torch import Tensor

from services.executor.engine_types import InternalError, RequestState, TokenEvent
from services.executor.sampler import EOS, LENGTH, STOP, Top, sample_with_top

log = structlog.get_logger(__name__)

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
        tokens, logprobs, tops = self._sample(logits, sampled)
        for r, token, lp, top in zip(sampled, tokens, logprobs, tops, strict=True):
            if r.done:
                continue
            try:
                self.emit_token(r, token, lp, top)
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
        """Append the token, check the stop conditions, stream its text (the last event ends it)."""
        r.seq.token_ids.append(token)
        r.row.history.append(token)
        r.completion += 1
        opts = r.req.sampling
        finish = None
        if token in self.eos_token_ids and not opts.ignore_eos:
            finish = EOS
        elif token in opts.stop_token_ids:
            finish = STOP
        text = r.stop_text.push(r.detok.step([token])) if r.detok else ""
        if r.stop_text.stopped:
            finish = STOP
        if finish is None and (r.completion >= r.max_new or r.seq.num_tokens >= self.max_model_len):
            finish = LENGTH
        if finish is not None and r.detok and not r.stop_text.stopped:
            text += r.stop_text.push(r.detok.flush())
            if r.stop_text.stopped:
                finish = STOP
            text += r.stop_text.flush()
        event = TokenEvent(r.req.request_id, [token], text, [logprob], finish, r.seq.prompt_len,
                           r.completion, top_logprobs=[top] if top is not None else [])
        if finish is not None:
            self.finish(r, event, None)
        else:
            deliver(r, event)
