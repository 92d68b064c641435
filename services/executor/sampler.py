"""Next-token choice per request, and when a request is finished.

    tokens, logprobs = sample(logits, rows)     # logits [N, V] float32, one SamplingRow per sequence
    tokens, logprobs, tops = sample_with_top(logits, rows)   # + each row's top_logprobs alternatives
    tokens, logprobs, tops = sample_draft(logits, row, draft)  # verify a speculated draft

Grammar rows are masked first, all at once (the structured-output mask: the tokens each row's
grammar allows, structured.py); then each row that needs more than the argmax is processed on its
own: the min_new_tokens mask (EOS and stop token ids at -inf until enough tokens are out) ->
repetition penalty (Hugging Face's rule, over prompt and output) -> presence and frequency
penalties (OpenAI's and vLLM's rule, over the output) -> temperature -> top-k -> top-p, then a draw
from the row's own torch.Generator, so a seeded request gets the same tokens whatever its batch
mates. logprobs are log_softmax of the RAW logits at the chosen token. Greedy rows (temperature 0)
take the argmax of the masked and penalised logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from services.executor.structured import Grammar, StructuredOutput, allowed_rows

LENGTH, STOP, EOS = "length", "stop", "eos"
MAX_TOP_LOGPROBS = 20   # as OpenAI's and vLLM's APIs allow


@dataclass
class SamplingOptions:
    max_new_tokens: int = 0            # 0 -> the executor's default
    temperature: float = 0.0           # 0 -> greedy
    top_p: float = 0.0                 # 0 or 1 -> off
    top_k: int = 0                     # 0 -> off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 0.0    # 0 or 1 -> off
    stop_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0            # EOS and stop_token_ids masked until this many new tokens
    presence_penalty: float = 0.0      # [-2, 2]; minus this for every token generated so far
    frequency_penalty: float = 0.0     # [-2, 2]; minus this times each token's count so far
    top_logprobs: int = 0              # 0..MAX_TOP_LOGPROBS most likely tokens returned per step
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's logprob + k alternatives
    structured: StructuredOutput | None = None   # a format the output must follow (structured.py)
    speculative: bool = True           # False -> never speculate for this request (same output)

    def problems(self) -> list[str]:
        """What is wrong with these values (empty when valid)."""
        out = []
        if self.max_new_tokens < 0:
            out.append(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            out.append(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 <= self.top_p <= 1:
            out.append(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            out.append(f"top_k must be >= 0, got {self.top_k}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty < 0:
            out.append(f"repetition_penalty must be a finite number >= 0, got {self.repetition_penalty}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            out.append(f"seed must fit in 64 bits, got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            out.append("stop strings must be non-empty strings")
        if self.min_new_tokens < 0:
            out.append(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        elif self.max_new_tokens and self.min_new_tokens > self.max_new_tokens:
            out.append(f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens "
                       f"({self.max_new_tokens})")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not -2 <= value <= 2:
                out.append(f"{name} must be in [-2, 2], got {value}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            out.append(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            out.append(f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs}")
        if any(t < 0 for t in self.stop_token_ids):
            out.append(f"stop_token_ids must be >= 0, got {min(self.stop_token_ids)}")
        if self.structured is not None:
            out += self.structured.problems()
        return out


@dataclass
class SamplingRow:
    """One sequence's sampling state."""

    options: SamplingOptions
    generator: torch.Generator | None   # None for greedy
    history: list[int]                  # prompt + generated ids (for the penalties)
    prompt_len: int = 0                 # history[prompt_len:] is the output so far
    held_back: tuple[int, ...] = ()     # EOS + stop token ids: masked while the output is too short
    grammar: Grammar | None = None      # structured output: the tokens it allows (structured.py)

    @property
    def masked(self) -> tuple[int, ...]:
        """The ids that cannot be drawn at this step (min_new_tokens not reached yet)."""
        short = len(self.history) - self.prompt_len < self.options.min_new_tokens
        return self.held_back if short else ()

    @property
    def special(self) -> bool:
        """Needs more than the raw argmax."""
        return self.grammar is not None or self.own_pass

    @property
    def own_pass(self) -> bool:
        """Needs a pass of its own after the batch's grammar masks: anything but (masked) greedy."""
        o = self.options
        return (o.temperature > 0 or o.repetition_penalty not in (0, 1) or bool(self.masked)
                or bool((o.presence_penalty or o.frequency_penalty) and len(self.history) > self.prompt_len))


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed % 2**64)
    return g


def _penalise(logits: Tensor, history: list[int], penalty: float) -> Tensor:
    """Hugging Face's rule: positive logits of seen tokens / penalty, negative ones * penalty."""
    idx = torch.tensor(sorted(set(history)), dtype=torch.long, device=logits.device)
    seen = logits[idx]
    logits = logits.clone()
    logits[idx] = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits


def _presence_frequency(logits: Tensor, output: list[int], presence: float, frequency: float) -> Tensor:
    """OpenAI's and vLLM's rule: logit -= presence * (count > 0) + frequency * count, counts over the
    output so far."""
    counts = torch.bincount(torch.tensor(output, dtype=torch.long, device=logits.device),
                            minlength=logits.shape[-1])[:logits.shape[-1]].to(logits.dtype)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def _filter(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """One row's top-k then top-p filter (_filter_rows for a single row)."""
    return _filter_rows(logits[None], [top_k], [top_p])[0]


def _filter_rows(logits: Tensor, top_k: list[int], top_p: list[float]) -> Tensor:
    """logits [N, V] with each row's top-k (0 or >= V: off) then top-p (0 or 1: off) applied: the
    tokens outside go to -inf. Top-k keeps ties with the k-th value; top-p keeps the smallest set of
    the best tokens whose probability (after top-k) reaches p. One sort serves both."""
    n, vocab = logits.shape
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=logits.device)
    ps = torch.tensor([p if 0 < p < 1 else 1.0 for p in top_p], dtype=logits.dtype, device=logits.device)
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    kth = ordered.gather(1, (ks - 1)[:, None])                     # [N, 1]
    drop = logits < kth
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = ordered.softmax(-1)
    beyond = probs.cumsum(-1) - probs >= ps[:, None]               # the mass before it reaches p
    beyond[:, 0] = False
    beyond &= (ps < 1)[:, None]
    drop |= torch.zeros_like(beyond).scatter(1, order, beyond)
    return logits.masked_fill(drop, float("-inf"))


def _draw(logits: Tensor, rows: list[SamplingRow]) -> Tensor:
    """One token per row from softmax(filter(logits / temperature)), each with one uniform draw from
    its row's generator (inverse CDF over the row's probabilities; a token of probability 0 is never
    drawn). A temperature so small that the scaled logits overflow is greedy."""
    temps = torch.tensor([r.options.temperature for r in rows], dtype=logits.dtype, device=logits.device)
    scaled = logits / temps[:, None]
    if any(0 < r.options.top_k < logits.shape[-1] or 0 < r.options.top_p < 1 for r in rows):
        scaled = _filter_rows(scaled, [r.options.top_k for r in rows], [r.options.top_p for r in rows])
    probs = torch.softmax(scaled, dim=-1).double()
    cdf = probs.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=r.generator, dtype=torch.float64, device=logits.device)
                   for r in rows])
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(-1)   # the last possible
    drawn = torch.minimum(drawn, last)
    return torch.where(torch.isfinite(scaled.max(-1).values), drawn, logits.argmax(-1))


def sample(logits: Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[float]]:
    """logits [N, V] float32 -> (chosen token per row, its raw logprob)."""
    tokens, logprobs, _ = sample_with_top(logits, rows)
    return tokens, logprobs


Top = tuple[list[int], list[float]]   # the most likely token ids, best first, and their raw logprobs


def sample_with_top(logits: Tensor,
                    rows: list[SamplingRow]) -> tuple[list[int], list[float], list[Top | None]]:
    """sample(), plus for each row asking for top_logprobs = k its k most likely tokens by the raw
    logits (None for the other rows)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    tops: list[Top | None] = [None] * len(rows)
    for i, r in enumerate(rows):
        k = min(r.options.top_logprobs, logprobs.shape[-1])
        if k > 0:
            values, ids = torch.topk(logprobs[i], k)
            tops[i] = (ids.tolist(), values.tolist())
    work = logits
    constrained = [i for i, r in enumerate(rows) if r.grammar is not None]
    if constrained:                                    # every grammar row masked at once
        allowed = allowed_rows([rows[i].grammar for i in constrained],
                               [rows[i].history[rows[i].prompt_len:] for i in constrained], logits.device)
        work = logits.clone()                          # logprobs stay those of the raw logits
        if len(constrained) == len(rows):
            work.masked_fill_(~allowed, float("-inf"))
        else:
            at = torch.tensor(constrained, device=logits.device)
            work[at] = work[at].masked_fill(~allowed, float("-inf"))
    chosen = work.argmax(dim=-1)                       # greedy, unpenalised: the common case
    own = [i for i, r in enumerate(rows) if r.own_pass]
    if own:
        chosen = chosen.clone()
        mine = work[torch.tensor(own, device=work.device)]    # [len(own), V], a copy
        for j, i in enumerate(own):                     # masks and penalties: row by row, rarely
            o, row = rows[i].options, mine[j]
            masked = [t for t in rows[i].masked if t < row.shape[-1]]
            if masked:
                row.index_fill_(0, torch.tensor(masked, device=row.device), float("-inf"))
            if o.repetition_penalty not in (0, 1) and rows[i].history:
                row.copy_(_penalise(row, rows[i].history, o.repetition_penalty))
            output = rows[i].history[rows[i].prompt_len:]
            if (o.presence_penalty or o.frequency_penalty) and output:
                row.copy_(_presence_frequency(row, output, o.presence_penalty, o.frequency_penalty))
        hot = [j for j, i in enumerate(own) if rows[i].options.temperature > 0]
        cold = [j for j, i in enumerate(own) if rows[i].options.temperature <= 0]
        if cold:
            chosen[[own[j] for j in cold]] = mine[cold].argmax(-1)
        if hot:                                         # every sampled row drawn at once
            chosen[[own[j] for j in hot]] = _draw(mine[hot], [rows[own[j]] for j in hot])
    picked = logprobs.gather(1, chosen[:, None])[:, 0]
    return chosen.tolist(), picked.tolist(), tops


def sample_draft(logits: Tensor, row: SamplingRow,
                 draft: list[int]) -> tuple[list[int], list[float], list[Top | None]]:
    """Verify a speculated draft: logits [len(draft) + 1, V], row i the next-token logits after the
    context and draft[:i] -> the tokens the step emits (the accepted draft tokens, then one more),
    their raw logprobs and top alternatives.

        for i in 0..len(draft): t = the token sample_with_top picks from logits[i], the row's history
                                    extended by draft[:i]  (same masks, penalties, temperature,
                                    top-k/top-p and the same draw from the row's generator)
                                emit t; stop unless i < len(draft) and t == draft[i]

    Each emitted token is drawn exactly as without speculation, one generator draw per token, so
    greedy and seeded outputs are those of plain decoding. For temperature > 0 this is the standard
    rejection rule for a draft that is a point mass at d: d is accepted with probability p(d), and
    on rejection the token is distributed as p with d removed and renormalised.
    """
    o = row.options
    if not row.special and not (o.presence_penalty or o.frequency_penalty):   # plain greedy: all rows at once
        tokens, logprobs, tops = sample_with_top(logits, [row] * logits.shape[0])
        n = 0
        while n < len(draft) and tokens[n] == draft[n]:
            n += 1
        return tokens[:n + 1], logprobs[:n + 1], tops[:n + 1]
    tokens, logprobs, tops = [], [], []
    base = len(row.history)
    try:
        for i in range(len(draft) + 1):
            t, lp, top = sample_with_top(logits[i:i + 1], [row])
            tokens += t
            logprobs += lp
            tops += top
            if i == len(draft) or t[0] != draft[i]:
                break
            row.history.append(t[0])         # what the next position's penalties and masks see
    finally:
        del row.history[base:]
    return tokens, logprobs, tops


class StopText:
    """Output text with stop strings cut off: push() returns only text no stop string can claim."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(stops)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        """Add decoded text; returns what may be streamed now (sets .stopped on a match)."""
        if self.stopped:
            return ""
        start = len(self.text)
        self.text += delta
        if not self.stops:
            return self._emit(len(self.text))
        longest = max(len(s) for s in self.stops)
        window = max(0, start - longest + 1)
        hits = [i for i in (self.text.find(s, window) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            return self._emit(len(self.text))
        hold = 0   # the longest tail of the text that starts some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        return self._emit(len(self.text) - hold)

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out
