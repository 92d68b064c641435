"""Next-token choice per request, and when a request is finished.

    tokens, logprobs = sample(logits, rows)     # logits [N, V] float32, one SamplingRow per sequence
    tokens, logprobs, tops = sample_with_top(logits, rows)   # + each row's top_logprobs alternatives
    tokens, logprobs, tops = sample_draft(logits, row, draft)  # verify a speculated draft

Grammar rows are copied and masked apart from the others, all at once (the structured-output mask:
the tokens each row's grammar allows, structured.py), so the rows without a grammar in the same batch
do exactly the work they would do alone; then each row that needs more than the argmax is processed
on its own: the min_new_tokens mask (EOS and stop token ids at -inf until enough tokens are out) ->
repetition penalty (Hugging Face's rule, over prompt and output) -> presence and frequency
penalties (OpenAI's and vLLM's rule, over the output) -> temperature -> top-k -> top-p, then a draw
from the row's own torch.Generator, so a seeded request gets the same tokens whatever its batch
mates. logprobs are log_softmax of the RAW logits at the chosen token (logit - logsumexp). Greedy rows (temperature 0)
take the argmax of the masked and penalised logits.

One softmax of the raw logits per step serves twice: logsumexp is read off it at each row's argmax
(lse = logit[best] - log(p[best]), where p[best] >= 1/V never underflows), and it is the draw's
distribution for rows at temperature 1 with nothing masked or penalised (OpenAI's default). At a
152k vocabulary that is 5-6 x fewer passes over the logits than logsumexp + logits / T + softmax
(benchmarks/sampling.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from services.executor import ops
from services.executor.structured import Grammar, StructuredOutput, masks

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
        """Needs more than the batch argmax after the grammar masks: sampled, or adjusted."""
        return self.options.temperature > 0 or self.adjusts

    @property
    def adjusts(self) -> bool:
        """Its logits change before the choice: min_new_tokens' mask or a penalty."""
        o = self.options
        return (o.repetition_penalty not in (0, 1) or bool(self.masked)
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


CANDIDATES = 1024    # top-k / top-p rows look at their best this-many tokens first (exact; see _draw)
BLOCK = 1024         # an inverse CDF over a long row finds its block of BLOCK tokens, then the token
TINY_MASS = 1e-30     # a row's weights summing to no more than this cannot be drawn from (_pick)


def _inverse_cdf(weights: Tensor, rows: list[SamplingRow]) -> Tensor:
    """One index per row of weights [R, V] (>= 0, not necessarily normalised), index j with
    probability weights[j] / sum, from one float64 uniform of each row's generator; an index of weight
    0 is never returned. -1 for a row whose weights do not sum to a finite positive number. Long rows
    go in two levels (block sums, then one block's cumulative sum), so no [R, V] float64 copy is made."""
    r, v = weights.shape
    u = torch.cat([torch.rand(1, generator=row.generator, dtype=torch.float64, device=weights.device)
                   for row in rows])
    blocks = -(-v // BLOCK)
    if blocks <= 2:                                   # short: one level
        return _pick(weights.double(), u)
    whole = v // BLOCK * BLOCK
    sums = weights[:, :whole].view(r, -1, BLOCK).sum(-1)                   # [R, blocks] (float32: each
    if whole < v:                                                          # sum is exact to 1e-7)
        sums = torch.cat([sums, weights[:, whole:].sum(-1, keepdim=True)], dim=1)
    sums = sums.double()
    b = _pick(sums, u)
    cdf = sums.cumsum(-1)
    start = torch.where(b > 0, cdf.gather(1, (b - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    at = b.clamp(min=0)[:, None] * BLOCK + torch.arange(BLOCK, device=b.device)      # [R, BLOCK]
    inner = weights.gather(1, at.clamp(max=v - 1)).double().masked_fill(at >= v, 0.0)
    j = _pick(inner, (u * cdf[:, -1] - start) / inner.sum(-1))       # the same point, inside block b
    return torch.where((b >= 0) & (j >= 0), b * BLOCK + j, -1)


def _pick(weights: Tensor, u: Tensor) -> Tensor:
    """weights float64 [R, V] >= 0, u [R] in [0, 1) -> per row the index j where u * total falls
    (cdf[j-1] <= u * total < cdf[j]: weight > 0), clamped to the last positive weight against
    rounding; -1 where the total is not a finite number above TINY_MASS (a grammar row whose every
    allowed token underflowed in the raw softmax: the sampler redraws it from its masked logits)."""
    cdf = weights.cumsum(-1)
    total = cdf[:, -1]
    j = torch.searchsorted(cdf, (u * total)[:, None], right=True)[:, 0]
    j = torch.minimum(j, weights.shape[1] - 1 - (weights.flip(-1) > 0).to(torch.int8).argmax(-1))
    return torch.where(torch.isfinite(total) & (total > TINY_MASS), j, -1)


def _draw(logits: Tensor, rows: list[SamplingRow], probs: Tensor | None = None,
          fallback: bool = True) -> Tensor:
    """One token per row from softmax(filter(logits / temperature)) (top-k, then top-p, as
    _filter_rows), each with one uniform draw from its row's own generator. A temperature so small
    that the scaled logits overflow is greedy.

    Rows with a filter look at their CANDIDATES best tokens (one topk; k + 1 when every row has a
    top-k): when the kept set is decided inside them (no tie with the k-th value past the last
    candidate; top-p reached inside them) the draw is among them; otherwise the row takes the full
    sort (_filter_rows). Either way the same distribution; no [R, V] sort in the common case.
    probs: softmax(logits), when the caller has it; used where every row's temperature is 1."""
    n, vocab = logits.shape
    ones = all(r.options.temperature == 1.0 for r in rows)
    unit = probs is not None and ones
    if ones:                                          # logits / 1 (and, with probs, softmax(logits))
        scaled = logits
    else:
        temps = torch.tensor([r.options.temperature for r in rows], dtype=logits.dtype, device=logits.device)
        scaled = logits / temps[:, None]
    ks = [r.options.top_k if 0 < r.options.top_k < vocab else 0 for r in rows]
    ps = [r.options.top_p if 0 < r.options.top_p < 1 else 1.0 for r in rows]
    plain = [i for i in range(n) if not ks[i] and ps[i] == 1.0]
    filtered = sorted(set(range(n)) - set(plain))
    if not filtered:                                  # the common case: no filter, no copies
        drawn = _inverse_cdf(probs if unit else torch.softmax(scaled, dim=-1), rows)
    else:
        drawn = torch.full((n,), -1, dtype=torch.long, device=logits.device)
        if plain:
            at = torch.tensor(plain, device=logits.device)
            drawn[at] = _inverse_cdf(probs[at] if unit else torch.softmax(scaled[at], dim=-1),
                                     [rows[i] for i in plain])
        at = torch.tensor(filtered, device=logits.device)
        drawn[at] = _draw_filtered(scaled[at], [ks[i] for i in filtered], [ps[i] for i in filtered],
                                   [rows[i] for i in filtered])
    if fallback and bool((drawn < 0).any()):          # overflowed: greedy
        drawn = torch.where(drawn >= 0, drawn, logits.argmax(-1))
    return drawn


def _draw_filtered(scaled: Tensor, ks: list[int], ps: list[float], rows: list[SamplingRow]) -> Tensor:
    n, vocab = scaled.shape
    c = min(vocab, max(ks) + 1 if all(ks) else max(CANDIDATES, max(ks) + 1))   # top-k alone: k + 1
    if 2 * c >= vocab:                     # topk of most of a row is slower than sorting it
        c = vocab
        values, ids = torch.sort(scaled, dim=-1, descending=True)
    else:
        values, ids = torch.topk(scaled, c, dim=-1)                   # best first
    kt = torch.tensor([k or vocab for k in ks], device=scaled.device)
    pt = torch.tensor(ps, dtype=torch.float32, device=scaled.device)
    col = torch.arange(c, device=scaled.device)
    kth = values.gather(1, (kt.clamp(max=c) - 1)[:, None])          # the k-th value (if k <= c)
    in_k = (values >= kth) | (kt >= vocab)[:, None]
    # the normaliser after top-k: over the candidates at or above the k-th value, or the whole row
    norm = torch.where(kt < vocab, torch.logsumexp(values.masked_fill(~in_k, float("-inf")), -1),
                       torch.logsumexp(scaled, -1))
    probs = torch.exp(values - norm[:, None]).masked_fill(~in_k, 0.0)
    before = probs.cumsum(-1) - probs                                  # the mass of the better ones
    keep = in_k & ((before < pt[:, None]) | (col == 0)[None] | (pt >= 1)[:, None])
    if c == vocab:                                   # every token is a candidate
        decided = torch.ones(n, dtype=torch.bool, device=scaled.device)
    else:                # top-k: no tie with the k-th past the last candidate; top-p alone: reached inside
        decided = torch.where(kt < vocab, values[:, -1] < kth[:, 0], ~keep[:, -1])
    drawn = torch.full((n,), -1, dtype=torch.long, device=scaled.device)
    ok = decided.nonzero()[:, 0].tolist()
    if ok:
        at = torch.tensor(ok, device=scaled.device)
        j = _inverse_cdf(probs[at] * keep[at], [rows[i] for i in ok])
        drawn[at] = torch.where(j >= 0, ids[at].gather(1, j.clamp(min=0)[:, None])[:, 0], -1)
    rest = sorted(set(range(n)) - set(ok))
    if rest:                                                           # the kept set reaches past them
        at = torch.tensor(rest, device=scaled.device)
        kept = _filter_rows(scaled[at], [ks[i] for i in rest], [ps[i] for i in rest])
        drawn[at] = _inverse_cdf(torch.softmax(kept, dim=-1), [rows[i] for i in rest])
    return drawn


def sample(logits: Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[float]]:
    """logits [N, V] float32 -> (chosen token per row, its raw logprob)."""
    tokens, logprobs, _ = sample_with_top(logits, rows)
    return tokens, logprobs


def _choose(logits: Tensor, probs: Tensor | None, rows: list[SamplingRow], idx: list[int]) -> Tensor:
    """The tokens of rows idx (each own_pass: sampled or adjusted) of logits [N, V]; probs is
    softmax(logits) when the caller has it (the draw of an unadjusted temperature-1 row reads it:
    no second softmax). Adjusted rows (min_new_tokens' mask, penalties) are copied first; the
    others are only read."""
    adjusted = [j for j, i in enumerate(idx) if rows[i].adjusts]
    whole = len(idx) == logits.shape[0]
    at = None if whole else torch.tensor(idx, device=logits.device)
    mine = logits if whole and not adjusted else (logits.clone() if whole else logits[at])
    for j in adjusted:                                 # masks and penalties: row by row, rarely
        i = idx[j]
        o, row = rows[i].options, mine[j]
        masked = [t for t in rows[i].masked if t < row.shape[-1]]
        if masked:
            row.index_fill_(0, torch.tensor(masked, device=row.device), float("-inf"))
        if o.repetition_penalty not in (0, 1) and rows[i].history:
            row.copy_(_penalise(row, rows[i].history, o.repetition_penalty))
        output = rows[i].history[rows[i].prompt_len:]
        if (o.presence_penalty or o.frequency_penalty) and output:
            row.copy_(_presence_frequency(row, output, o.presence_penalty, o.frequency_penalty))
    chosen = torch.empty(len(idx), dtype=torch.long, device=logits.device)
    hot = [j for j, i in enumerate(idx) if rows[i].options.temperature > 0]
    cold = [j for j, i in enumerate(idx) if rows[i].options.temperature <= 0]
    if cold:
        chosen[cold] = mine[cold].argmax(-1)
    if hot:                                            # every sampled row drawn at once
        raw = None
        if probs is not None and not adjusted:         # unmasked, unpenalised: the caller's softmax
            raw = probs if whole else probs[at]
            if len(hot) < len(idx):
                raw = raw[hot]
        picks = _draw(mine if len(hot) == len(idx) else mine[hot], [rows[idx[j]] for j in hot], raw)
        if len(hot) == len(idx):
            return picks
        chosen[hot] = picks
    return chosen


Top = tuple[list[int], list[float]]   # the most likely token ids, best first, and their raw logprobs


def _lse_at(logits: Tensor, probs: Tensor, best: Tensor) -> Tensor:
    """logsumexp of each row of logits from its softmax probs and its argmax best:
    logit[best] - log(p[best]) (p[best] >= 1 / V: no underflow; equal to torch.logsumexp within
    float32 rounding)."""
    at = best[:, None]
    return logits.gather(1, at)[:, 0] - probs.gather(1, at)[:, 0].log()


def sample_with_top(logits: Tensor,
                    rows: list[SamplingRow]) -> tuple[list[int], list[float], list[Top | None]]:
    """sample(), plus for each row asking for top_logprobs = k its k most likely tokens by the raw
    logits (None for the other rows)."""
    n = logits.shape[0]
    probs = torch.softmax(logits, dim=-1)              # the raw distribution: lse, and T = 1 draws
    best = logits.argmax(dim=-1)
    lse = _lse_at(logits, probs, best)                 # a logprob is logit - lse
    tops: list[Top | None] = [None] * n
    for i, r in enumerate(rows):
        k = min(r.options.top_logprobs, logits.shape[-1])
        if k > 0:
            values, ids = torch.topk(logits[i], k)
            tops[i] = (ids.tolist(), (values - lse[i]).tolist())
    constrained = [i for i, r in enumerate(rows) if r.grammar is not None]
    if not constrained:
        own = [i for i, r in enumerate(rows) if r.own_pass]
        if len(own) == n:
            chosen = _choose(logits, probs, rows, own)
        else:
            chosen = best
            if own:
                chosen = best.clone()
                chosen[own] = _choose(logits, probs, rows, own)
    else:
        chosen = _with_grammars(logits, probs, best, rows, constrained)
    picked = logits.gather(1, chosen[:, None])[:, 0] - lse
    return chosen.tolist(), picked.tolist(), tops


def _with_grammars(logits: Tensor, probs: Tensor, best: Tensor, rows: list[SamplingRow],
                   constrained: list[int]) -> Tensor:
    """The chosen token of every row, constrained listing the rows with a grammar. Only those rows
    are copied and masked ([k, V]); the others do what they would do alone. When every sampled row
    is a plain temperature-1 draw (OpenAI's default: no top-k/top-p, nothing adjusted), the grammar
    rows' masked softmax replaces their rows of probs and every sampled row is drawn at once."""
    started = time.perf_counter()
    n, k, vocab = logits.shape[0], len(constrained), logits.shape[-1]
    stats = rows[constrained[0]].grammar.stats
    stats.rows += k
    at = torch.tensor(constrained)              # on the host, as the mask ops take their rows
    words = masks([rows[i].grammar for i in constrained],
                  [rows[i].history[rows[i].prompt_len:] for i in constrained],
                  parallel=logits.device.type != "cpu")                 # int32 [k, W]
    flags = [r.own_pass for r in rows]                                 # sampled or adjusted
    mine = [j for j, i in enumerate(constrained) if flags[i]]
    greedy = [j for j, i in enumerate(constrained) if not flags[i]]
    own = [i for i in range(n) if flags[i]]
    chosen = best
    if greedy:                                     # the masked logits' argmax
        if not mine and k == n:
            chosen = ops.token_bitmask_fill(logits, words, at).argmax(dim=-1)
        else:
            chosen = best.clone()
            ga = at[greedy] if mine else at
            chosen[ga] = _masked(logits, ga, words[greedy] if mine else words).argmax(dim=-1)
    if not own:
        stats.seconds += time.perf_counter() - started
        return chosen
    if all(_unit_draw(rows[i], vocab) for i in own):
        if mine:             # lse has been read off probs: the grammar rows' forbidden tokens zeroed in place
            ops.token_bitmask_fill_(probs, words[mine] if greedy else words, at[mine] if greedy else at, 0.0)
        stats.seconds += time.perf_counter() - started      # the draw below is every row's
        part = probs if len(own) == n else probs[own]
        drawn = _draw(part, [rows[i] for i in own], part, fallback=False)
        if bool((drawn < 0).any()):   # no mass left (every allowed token underflowed) or overflowed
            drawn = _redraw(logits, rows, own, drawn, dict(zip(constrained, words.unbind(0), strict=True)))
        if len(own) == n:
            return drawn
        if chosen is best:
            chosen = best.clone()
        chosen[own] = drawn
        return chosen
    if chosen is best:
        chosen = best.clone()
    if mine:
        ma = at[mine] if greedy else at
        chosen[ma] = _choose(_masked(logits, ma, words[mine] if greedy else words), None,
                             [rows[constrained[j]] for j in mine], list(range(len(mine))))
    stats.seconds += time.perf_counter() - started          # the rows without a grammar: theirs
    free = [i for i in own if rows[i].grammar is None]
    if free:
        chosen[free] = _choose(logits, probs, rows, free)
    return chosen


def _masked(logits: Tensor, at: Tensor, words: Tensor) -> Tensor:
    """logits' rows at (a host tensor), with -inf where words (int32 [len(at), W]) forbids the token."""
    return ops.token_bitmask_fill(logits.index_select(0, at.to(logits.device)), words, torch.arange(at.shape[0]))


def _redraw(logits: Tensor, rows: list[SamplingRow], own: list[int], drawn: Tensor,
            words: dict[int, Tensor]) -> Tensor:
    """drawn, with each -1 replaced: a grammar row drawn from the softmax of its masked logits (its
    allowed tokens' raw probabilities all underflowed), any other row greedy (overflowed logits)."""
    drawn = drawn.clone()
    for j in (drawn < 0).nonzero()[:, 0].tolist():
        i = own[j]
        if i in words:
            masked = _masked(logits, torch.tensor([i]), words[i][None])
            drawn[j] = _draw(masked, [rows[i]])[0]
        else:
            drawn[j] = logits[i].argmax()
    return drawn


def _unit_draw(row: SamplingRow, vocab: int) -> bool:
    """A temperature-1 draw from the (masked) softmax as it is: no top-k/top-p, nothing adjusted."""
    o = row.options
    return (o.temperature == 1.0 and not 0 < o.top_k < vocab and not 0 < o.top_p < 1
            and not row.adjusts)


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
