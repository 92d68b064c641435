"""build_segments: sequences' slots and token counts -> (seg_indptr, seg_slots)."""

import pytest
import torch

from services.executor.ops.segments import build_segments


@pytest.mark.parametrize("slots, tokens, indptr, seg_slots", [
    ([], [], [0], []),
    ([3], [5], [0, 5], [3]),
    ([-1], [2], [0, 2], [-1]),
    ([3, 3, -1, 5], [2, 1, 4, 1], [0, 3, 7, 8], [3, -1, 5]),  # adjacent equal slots merge
    ([1, 2, 1], [1, 1, 1], [0, 1, 2, 3], [1, 2, 1]),          # equal but not adjacent: kept apart
    ([0, 0, 0, 0], [1, 1, 1, 1], [0, 4], [0]),                # decode, one adapter
    ([4, 7, 7, -1, -1], [1, 1, 1, 1, 1], [0, 1, 3, 5], [4, 7, -1]),
    ([2, 9, 2], [3, 0, 4], [0, 7], [2]),                      # empty sequences vanish, then merge
    ([5, 6], [0, 0], [0], []),
])
def test_build_segments(slots, tokens, indptr, seg_slots):
    got_indptr, got_slots = build_segments(slots, tokens)
    assert got_indptr.dtype == torch.int32 and got_slots.dtype == torch.int32
    assert got_indptr.tolist() == indptr and got_slots.tolist() == seg_slots


@pytest.mark.parametrize("slots, tokens, match", [
    ([1, 2], [3], "length"),
    ([1], [-1], "tokens_per_seq"),
    ([-2], [1], "slots_per_seq"),
])
def test_build_segments_rejects(slots, tokens, match):
    with pytest.raises(ValueError, match=match):
        build_segments(slots, tokens)
