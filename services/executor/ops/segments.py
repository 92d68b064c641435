"""Segments of a mixed-adapter batch: which rows of x each adapter slot covers."""

from __future__ import annotations

import torch
from torch import Tensor


def build_segments(slots_per_seq: list[int], tokens_per_seq: list[int],
                   device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Merge consecutive sequences with the same slot into segments.

    slots_per_seq [N] (slot of each sequence, -1 = base only), tokens_per_seq [N] (its rows in x,
    in order). Returns seg_indptr [G+1] int32 and seg_slots [G] int32 such that
    segment g is rows seg_indptr[g] : seg_indptr[g+1] of x, with slot seg_slots[g]:

        slots [3, 3, -1, 5], tokens [2, 1, 4, 1]  ->  indptr [0, 3, 7, 8], slots [3, -1, 5]

    Sequences with 0 tokens are dropped; an empty batch gives indptr [0] and no segments.
    """
    if len(slots_per_seq) != len(tokens_per_seq):
        raise ValueError(f"slots_per_seq and tokens_per_seq differ in length: "
                         f"{len(slots_per_seq)} != {len(tokens_per_seq)}")
    indptr, slots = [0], []
    for slot, n in zip(slots_per_seq, tokens_per_seq, strict=False):
        if n < 0:
            raise ValueError(f"tokens_per_seq must be >= 0, got {n}")
        if slot < -1:
            raise ValueError(f"slots_per_seq must be >= -1, got {slot}")
        if n == 0:
            continue
        if slots and slots[-1] == slot:
            indptr[-1] += n
        else:
            slots.append(slot)
            indptr.append(indptr[-1] + n)
    return (torch.tensor(indptr, dtype=torch.int32, device=device),
            torch.tensor(slots, dtype=torch.int32, device=device))
