"""Prompt-lookup (n-gram) speculative decoding: drafts from each sequence's own tokens, no draft model.

    spec = Speculator(k=4, min_n=2, max_n=5)
    seq.spec = spec.new_state(limit=prompt_len + max_new)   # per sequence, on admission
    draft = spec.propose(seq.token_ids, seq.spec, room)     # by the scheduler, each decode step
    ...one forward verifies token_ids[-1] + draft (logits at each of the 1 + len(draft) positions)...
    spec.record(seq.spec, drafted=len(draft), accepted=a, emitted=e)

Proposal (vLLM's NgramProposer rule): the longest n-gram, n from max_n down to min_n, ending the
context (prompt + output so far) that occurred earlier in it; the draft is the k tokens that followed
that occurrence (the most recent one among the longest). A continuation running into the context's
own end keeps copying (a period shorter than k is drafted k long). Lookups use an index of the
context's min_n-grams kept up to date as tokens are appended: O(candidates x max_n) per step.

Back-pressure, so that speculation never costs throughput:
- per sequence, an EMA of its acceptance rate sets its draft length (k x EMA, at least 1); below
  `min_acceptance` it stops drafting for a pause that doubles each time (up to 64 steps) and is then
  on probation at the threshold;
- per step (Scheduler), drafts are added only while the batch has at most `disable_by_batch_size`
  sequences and at most `max_batch_tokens` tokens in all: a big batch is compute-bound and verifying
  drafts there would cost more than it gains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_PAUSE = 64           # steps
EMA_WEIGHT = 0.3         # of the newest step's acceptance rate
SCAN_CANDIDATES = 16     # earlier occurrences of the last min_n tokens examined, most recent first


@dataclass(eq=False)
class NgramIndex:
    """Start positions of every min_n-gram of a growing token list (positions ascending)."""

    n: int
    starts: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    indexed: int = 0     # n-grams starting before this position are in `starts`

    def update(self, tokens: list[int]) -> None:
        n, starts = self.n, self.starts
        for i in range(self.indexed, len(tokens) - n + 1):
            starts.setdefault(tuple(tokens[i:i + n]), []).append(i)
        self.indexed = max(self.indexed, len(tokens) - n + 1)


@dataclass(eq=False)
class SpecState:
    """One sequence's speculation state."""

    limit: int                   # its length when it finishes by length: nothing is drafted past it
    index: NgramIndex
    ema: float = 1.0             # acceptance rate, exponentially averaged over its verify steps
    pause: int = 0               # steps left without drafting
    backoff: int = 1             # the next pause, in steps


def propose_ngram(tokens: list[int], index: NgramIndex, k: int, max_n: int) -> list[int]:
    """Up to k draft tokens continuing `tokens` (see the module docstring); [] when nothing matches."""
    n, size = index.n, len(tokens)
    if k <= 0 or size <= n:
        return []
    index.update(tokens)
    suffix_start = size - n
    found = index.starts.get(tuple(tokens[suffix_start:]))
    if not found:
        return []
    best, best_len, scanned = -1, 0, 0
    for i in reversed(found):
        if i >= suffix_start:        # the suffix itself
            continue
        length = n                   # extend the match backwards, up to max_n
        while length < max_n and i - (length - n) > 0 and \
                tokens[i - 1 - (length - n)] == tokens[suffix_start - 1 - (length - n)]:
            length += 1
        if length > best_len:
            best, best_len = i, length
            if length >= max_n:
                break
        scanned += 1
        if scanned >= SCAN_CANDIDATES:
            break
    if best < 0:
        return []
    draft: list[int] = []
    src = best + n
    for j in range(k):               # past the context's end it copies its own draft (a loop)
        p = src + j
        draft.append(tokens[p] if p < size else draft[p - size])
    return draft


class Speculator:
    """The n-gram proposer and its back-pressure, with counters since start (engine thread only)."""

    def __init__(self, k: int, min_n: int, max_n: int, *, min_acceptance: float = 0.25,
                 disable_by_batch_size: int = 0, max_batch_tokens: int = 0):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {min_n}, {max_n}")
        if k < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {k}")
        self.k, self.min_n, self.max_n = k, min_n, max_n
        self.min_acceptance = min_acceptance
        self.disable_by_batch_size = disable_by_batch_size    # 0 -> no limit
        self.max_batch_tokens = max_batch_tokens              # 0 -> no limit
        self.draft_tokens = 0       # proposed and verified
        self.accepted_tokens = 0    # of those, accepted
        self.emitted_tokens = 0     # tokens out of the steps that verified drafts (accepted + 1 each)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    def new_state(self, limit: int) -> SpecState:
        return SpecState(limit=limit, index=NgramIndex(self.min_n))

    def room(self, num_seqs: int, num_tokens: int) -> int:
        """Draft tokens this step may add to a batch of num_seqs sequences and num_tokens tokens."""
        if self.disable_by_batch_size and num_seqs > self.disable_by_batch_size:
            return 0
        if self.max_batch_tokens:
            return max(0, self.max_batch_tokens - num_tokens)
        return num_seqs * self.k

    def propose(self, tokens: list[int], state: SpecState, room: int) -> list[int]:
        """The draft for a sequence about to decode (at most `room` tokens, [] for none)."""
        if state.pause > 0:
            state.pause -= 1
            return []
        k = min(room, max(1, int(self.k * state.ema + 0.999)), state.limit - len(tokens) - 1)
        return propose_ngram(tokens, state.index, k, self.max_n)

    def record(self, state: SpecState, drafted: int, accepted: int, emitted: int) -> None:
        """After a verify step: update the counters and the sequence's acceptance EMA."""
        self.draft_tokens += drafted
        self.accepted_tokens += accepted
        self.emitted_tokens += emitted
        state.ema = (1 - EMA_WEIGHT) * state.ema + EMA_WEIGHT * accepted / drafted
        if state.ema < self.min_acceptance:
            state.pause, state.backoff = state.backoff, min(2 * state.backoff, MAX_PAUSE)
            state.ema = self.min_acceptance        # probation: one more bad step pauses it again
        elif accepted == drafted:
            state.backoff = 1
