"""The model runner: one step's scheduled sequences -> a ForwardBatch -> the model's logits.

    runner = ModelRunner(model, model_config, kv, device, pool, max_tokens, max_seqs)
    logits = runner.run(batch, entries)   # entries: each item's placement in `pool`, None: base only

The step's flat inputs (token ids, positions, KV slot mapping, logits rows, adapter segments and, once per
step, the segments' page tables from the kernel's page pool) are
written into buffers allocated once (InputBuffers; pinned host memory copied to device buffers on
CUDA) instead of new tensors every step. Attention's per-group tables come from
model/attention.build_group.
"""

from __future__ import annotations

from array import array

import torch
from torch import Tensor

from services.executor.kv_cache import KVCache
from services.executor.model.attention import AttnGroup, AttnMetadata, build_group
from services.executor.model.llama import ForwardBatch
from services.executor.scheduler import Batch

# name -> (dtype, array typecode, sized by tokens (True) or by sequences (False), extra rows)
_BUFFERS = {
    "input_ids": (torch.long, "q", True, 0),
    "positions": (torch.long, "q", True, 0),
    "slot_mapping": (torch.long, "q", True, 0),
    "logits_rows": (torch.long, "q", False, 0),
    "seg_indptr": (torch.int32, "i", False, 1),
}


class InputBuffers:
    """The step's flat input tensors, allocated once and refilled each step (grown if outgrown).

    On CUDA the values go to pinned host buffers and are copied to device buffers without blocking;
    the next fill first waits for the last copy, so a pinned buffer is never rewritten in flight.
    """

    def __init__(self, max_tokens: int, max_seqs: int, device: torch.device):
        self.device = device
        self.pinned = device.type == "cuda"
        self._copied = None              # the CUDA event recorded after the last copies
        self._alloc(max(1, max_tokens), max(1, max_seqs))

    def _alloc(self, tokens: int, seqs: int) -> None:
        self.max_tokens, self.max_seqs = tokens, seqs
        self.host: dict[str, Tensor] = {}
        self.dev: dict[str, Tensor] = {}
        for name, (dtype, _, by_tokens, extra) in _BUFFERS.items():
            n = (tokens if by_tokens else seqs) + extra
            self.host[name] = torch.empty(n, dtype=dtype, pin_memory=self.pinned)
            self.dev[name] = torch.empty(n, dtype=dtype, device=self.device) if self.pinned \
                else self.host[name]

    def fill(self, values: dict[str, list[int]]) -> dict[str, Tensor]:
        """values: name -> its ints this step -> name -> a view of that many rows on the device."""
        tokens = len(values["input_ids"])
        seqs = max(len(values["logits_rows"]), len(values["seg_indptr"]) - 1)
        if tokens > self.max_tokens or seqs > self.max_seqs:
            self._alloc(max(tokens, 2 * self.max_tokens), max(seqs, 2 * self.max_seqs))
        if self._copied is not None:
            self._copied.synchronize()
        out = {}
        for name, vals in values.items():
            dtype, code, _, _ = _BUFFERS[name]
            n = len(vals)
            host, dev = self.host[name][:n], self.dev[name][:n]
            if n:
                host.copy_(torch.frombuffer(array(code, vals), dtype=dtype))
                if self.pinned:
                    dev.copy_(host, non_blocking=True)
            out[name] = dev
        if self.pinned:
            self._copied = torch.cuda.Event()
            self._copied.record()
        return out


class ModelRunner:
    def __init__(self, model, model_config, kv: KVCache, device: torch.device, pool,
                 max_tokens: int, max_seqs: int):
        # pool: the page pool the kernel reads (adapters.device.DevicePool, else the host arena)
        self.model, self.kv, self.device, self.pool = model, kv, device, pool
        self.sliding_window = model_config.sliding_window
        # layers' sliding windows other than the model-wide one: each step builds their groups too
        self.other_windows = sorted({w for w in model_config.layer_windows
                                     if w != model_config.sliding_window}, key=lambda w: w or 0)
        self.buffers = InputBuffers(max_tokens, max_seqs, device)

    def run(self, batch: Batch, entries: list, prompt_spans=()) -> Tensor:
        """-> next-token logits [sampled rows, vocab] float32, in batch order: one row per sampling
        item, 1 + len(draft) for an item verifying a draft; then the rows of prompt_spans ((item
        index, k): its first k new tokens, prompt_logprobs.py), in their order."""
        return self.model(self.prepare(batch, entries, prompt_spans), self.kv)

    def prepare(self, batch: Batch, entries: list, prompt_spans=()) -> ForwardBatch:
        """The step's ForwardBatch; entries[i]: batch.items[i]'s placement in the pool, or None."""
        bs = self.kv.block_size
        ids, positions, slot_mapping, logits_rows = [], [], [], []
        decode, decode_rows, prefill, prefill_rows = [], [], [], []
        seg_indptr, seg_slots, seg_entries = [0], [], []
        row = 0
        starts = []
        for item, entry in zip(batch.items, entries, strict=True):
            starts.append(row)
            seq, n = item.seq, item.num_new
            a = seq.num_computed
            ids += (seq.token_ids + item.draft if item.draft else seq.token_ids)[a:a + n]
            positions += range(a, a + n)
            blocks = seq.blocks
            slot_mapping += [blocks[p // bs] * bs + p % bs for p in range(a, a + n)]
            if n == 1 or item.draft:   # a draft's positions: one decode query each, K/V read in place
                decode += [(blocks, a + i + 1, 1) for i in range(n)]
                decode_rows += range(row, row + n)
            else:
                prefill.append((blocks, a + n, n))
                prefill_rows.append(row)
            if item.samples:   # a draft of d tokens: logits at its last d + 1 positions
                logits_rows += range(row + n - 1 - len(item.draft), row + n)
            if n and seg_slots and seg_slots[-1] == seq.slot:   # same adapter slot: one segment
                seg_indptr[-1] += n
            elif n:
                seg_slots.append(seq.slot)
                seg_indptr.append(seg_indptr[-1] + n)
                seg_entries.append(entry)
            row += n
        for i, k in prompt_spans:
            logits_rows += range(starts[i], starts[i] + k)
        t = self.buffers.fill({"input_ids": ids, "positions": positions,
                               "slot_mapping": slot_mapping, "logits_rows": logits_rows,
                               "seg_indptr": seg_indptr})

        def groups_for(window: int | None) -> list[AttnGroup]:
            return [build_group(g, r, bs, window, self.device)
                    for g, r in ((decode, decode_rows), (prefill, prefill_rows)) if g]

        attn = AttnMetadata(t["slot_mapping"], groups_for(self.sliding_window),
                            {w or 0: groups_for(w) for w in self.other_windows})
        return ForwardBatch(input_ids=t["input_ids"], positions=t["positions"], attn=attn,
                            seg_indptr=t["seg_indptr"],
                            logits_rows=t["logits_rows"],
                            paged=self.pool.batch(seg_entries))
