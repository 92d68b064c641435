"""Next-token choice per request, and when a request is finished.

    tokens, logprobs = sample(logits, rows)     # logits [N, V] float32, one SamplingRow per sequence

Each row is processed on its own: repetition penalty -> temperature -> top-k -> top-p, then a draw
from the row's own torch.Generator, so a seeded request gets the same tokens whatever its batch
mates. logprobs are log_softmax of the RAW logits at the chosen token. Greedy rows (temperature 0)
take the argmax of the penalised logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

LENGTH, STOP, EOS = "length", "stop", "eos"


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
        return out


@dataclass
class SamplingRow:
    """One sequence's sampling state."""

    options: SamplingOptions
    generator: torch.Generator | None   # None for greedy
    history: list[int]                  # prompt + generated ids (for the repetition penalty)


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


def _filter(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p     # keep the smallest set reaching top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[float]]:
    """logits [N, V] float32 -> (chosen token per row, its raw logprob)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logits.argmax(dim=-1)                      # greedy, unpenalised: the common case
    special = [i for i, r in enumerate(rows)
               if r.options.temperature > 0 or r.options.repetition_penalty not in (0, 1)]
    if special:
        chosen = chosen.clone()
        for i in special:
            o = rows[i].options
            row = logits[i]
            if o.repetition_penalty not in (0, 1) and rows[i].history:
                row = _penalise(row, rows[i].history, o.repetition_penalty)
            if o.temperature <= 0:
                chosen[i] = row.argmax()
                continue
            scaled = row / o.temperature
            if not torch.isfinite(scaled).all():   # a temperature so small it overflows: greedy
                chosen[i] = row.argmax()
                continue
            probs = torch.softmax(_filter(scaled, o.top_k, o.top_p), dim=-1)
            chosen[i] = torch.multinomial(probs, 1, generator=rows[i].generator)[0]
    picked = logprobs.gather(1, chosen[:, None])[:, 0]
    return chosen.tolist(), picked.tolist()


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
