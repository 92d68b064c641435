"""Prompt logprobs: each prompt token's logprob given the tokens before it, from the same prefill.

A request asking for them (SamplingOptions.prompt_logprobs = k) computes every prompt position (it
takes no cached prefix; the others keep theirs), and the model returns the logits of its prompt rows
too, after the step's sampling rows:

    spans = prompt_spans(batch)                  # [(item index, k)]: item's first k new rows
    logits = runner.run(batch, entries, spans)   # [sampled + sum(k), vocab]
    collect(logits[len(sampled):], spans, batch, states)
    # logprob of prompt token p+1 = log_softmax(logits at position p)[token p+1], + its top-k

The whole list goes out with the request's first event (an event with no tokens, before its first
token); prompt token 0 has no context: logprob 0 and no alternatives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from services.executor.sampler import Top

PromptLogprob = tuple[int, float, Top | None]   # (token id, logprob, its top-k alternatives)


def prompt_spans(batch) -> list[tuple[int, int]]:
    """(item index, k) for each scheduled item whose first k new tokens are prompt positions whose
    next-token logits are wanted (positions num_computed .. num_computed + k - 1 < prompt_len - 1)."""
    out = []
    for i, item in enumerate(batch.items):
        seq = item.seq
        if seq.prompt_logits:
            k = min(item.num_new, seq.prompt_len - 1 - seq.num_computed)
            if k > 0:
                out.append((i, k))
    return out


def collect(logits: Tensor, spans: list[tuple[int, int]], batch, states: list) -> None:
    """logits [sum(k), vocab]: the spans' rows in order -> each state's prompt_lps[p] for p in the
    span (the logprob of prompt token p + 1). Call before the scheduler advances the batch."""
    off = 0
    for i, k in spans:
        seq, r = batch.items[i].seq, states[i]
        a = seq.num_computed
        lp = torch.log_softmax(logits[off:off + k].float(), dim=-1)          # [k, V]
        off += k
        targets = seq.token_ids[a + 1:a + 1 + k]
        chosen = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None])[:, 0].tolist()
        top_k = min(r.req.sampling.prompt_logprobs or 0, lp.shape[-1])
        tops: list[Top | None] = [None] * k
        if top_k:
            values, ids = torch.topk(lp, top_k, dim=-1)
            tops = list(zip(ids.tolist(), values.tolist(), strict=True))
        if r.prompt_lps is None:
            r.prompt_lps = [None] * (seq.prompt_len - 1)
        for j in range(k):
            r.prompt_lps[a + j] = (targets[j], chosen[j], tops[j])


def finished(r) -> list[PromptLogprob]:
    """The request's whole list (prompt token 0 first), once every position was collected."""
    prompt = r.seq.token_ids[:r.seq.prompt_len]
    rest = r.prompt_lps or []
    assert len(rest) == len(prompt) - 1 and all(e is not None for e in rest), "prompt logprobs missing"
    return [(prompt[0], 0.0, None), *rest]
