"""Mixture of Experts: Qwen3-MoE, Mixtral and OLMoE, with LoRA on the router and on every expert.

transformers 5 keeps each layer's experts fused: mlp.experts.gate_up_proj [E, 2I, H] and
mlp.experts.down_proj [E, H, I], and the router as mlp.gate.weight [E, H]. A token goes to its
top-k experts by softmax(router logits) (Mixtral and Qwen3-MoE with norm_topk_prob: the k weights
renormalised to sum to 1), and its output is the weighted sum of theirs.

The experts run grouped: the (token, expert) pairs are sorted by expert (stably, so each expert's
rows keep the batch's adapter order), then one GEMM per expert over its rows, not a loop over
tokens, and one activation over all of them. LoRA on the experts is PEFT's target_parameters
(ParamWrapper: a rank-r pair per expert, reader.py splits them); each (layer, expert, parameter) is
one module in the arena's tables. The sorted rows are E * G segments (expert, then the batch's
adapter segment), each given its own (expert, parameter) module's page entry, so ONE
ops.lora_paged_add_ call per parameter serves every expert's rows: the same op as a projection,
with no per-expert call (16 calls a layer for 8 experts otherwise). The router is a LoraProj ("gate").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from services.executor import ops
from services.executor.model.config import EXPERT_MODULES, ModelConfig
from services.executor.model.layers import MLP, CausalLM, DecoderLayer, LoraProj, gated_act


class ExpertLora:
    """Where one expert's parameter sits in the arena's tables (the engine sets lm)."""

    __slots__ = ("lm",)

    def __init__(self):
        self.lm = 0


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden, cfg.moe_intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.activation = cfg.activation
        self.lora = [{p: ExpertLora() for p in EXPERT_MODULES} for _ in range(e)]
        self._lm_index: tuple = (None, None)   # (the lms and device it was built for, the index)

    def forward(self, x: Tensor, top_i: Tensor, top_w: Tensor, batch) -> Tensor:
        """x [T, H], top_i / top_w [T, k] -> sum_k top_w * expert_{top_i}(x) [T, H]."""
        T, k = top_i.shape
        E = self.gate_up_proj.shape[0]
        flat = top_i.reshape(-1)
        order = torch.argsort(flat, stable=True)            # pairs by expert, then by token
        rows = order // k                                   # each sorted pair's token
        xs = x[rows]
        sizes = torch.bincount(flat, minlength=E).tolist()
        p = batch.paged
        groups = self._lora_groups(p, batch.seg_indptr, flat[order], rows, E) \
            if p is not None and p.any_lora else None
        h = xs.new_empty((xs.shape[0], self.gate_up_proj.shape[1]))
        self._grouped_mm(xs, self.gate_up_proj, sizes, h)
        if groups is not None:
            self._lora(h, xs, p, groups, 0)
        gate, up = h.chunk(2, dim=-1)
        a = gated_act(self.activation, gate.contiguous(), up.contiguous())
        out = xs.new_empty((xs.shape[0], self.down_proj.shape[1]))
        self._grouped_mm(a, self.down_proj, sizes, out)
        if groups is not None:
            self._lora(out, a, p, groups, 1)
        weights = top_w.reshape(-1)[order].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, rows, out * weights[:, None])

    @staticmethod
    def _grouped_mm(xs: Tensor, w: Tensor, sizes: list[int], out: Tensor) -> None:
        """out[rows of e] = xs[rows of e] @ w[e].T, one GEMM per expert with rows."""
        start = 0
        for e, n in enumerate(sizes):
            if n:
                torch.mm(xs[start:start + n], w[e].T, out=out[start:start + n])
                start += n

    def _lora_groups(self, p, seg_indptr: Tensor, experts: Tensor, rows: Tensor, E: int):
        """The sorted pairs as E * G segments (expert-major; within an expert, the batch's adapter
        segments in order) -> (indptr [E*G+1], per pass: (seg_meta [2, E*G, 1, 2], seg_scalings
        [2, E*G, 1]) for gate_up_proj and down_proj). One lora_paged_add_ call per parameter then
        covers every expert's rows, each segment with its own (expert, parameter) module."""
        G = seg_indptr.numel() - 1
        seg = torch.searchsorted(seg_indptr[1:].long(), rows, right=True)
        counts = torch.bincount(experts * G + seg, minlength=E * G)
        indptr = torch.zeros(E * G + 1, dtype=torch.int32, device=rows.device)
        indptr[1:] = counts.cumsum(0)
        lms = self._lms(rows.device)
        passes = []
        for meta, scalings in ((p.seg_meta, p.seg_scalings), *p.overlays):   # overlays: cat
            m = meta[:, lms].transpose(0, 1).reshape(2, E * G, 1, 2)     # [G, 2E, 2] -> (param, e, g)
            s = scalings[:, lms].t().reshape(2, E * G, 1)
            passes.append((m, s))
        return indptr, passes

    def _lms(self, device) -> Tensor:
        """[2E] int64: gate_up_proj's module index for every expert, then down_proj's."""
        key = (tuple(self.lora[e][name].lm for name in EXPERT_MODULES for e in range(len(self.lora))), device)
        if self._lm_index[0] != key:
            self._lm_index = (key, torch.tensor(key[0], dtype=torch.long, device=device))
        return self._lm_index[1]

    @staticmethod
    def _lora(y: Tensor, x: Tensor, p, groups, param: int) -> None:
        indptr, passes = groups
        for meta, scalings in passes:
            ops.lora_paged_add_(y, x, p.arena, p.page_index, meta[param], scalings[param], 0, indptr)


class SparseMoeBlock(nn.Module):
    """router (a LoraProj) -> top-k -> grouped experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = LoraProj(cfg.hidden, cfg.num_experts, False)
        self.experts = Experts(cfg)
        self.top_k, self.norm_topk = cfg.experts_per_token, cfg.norm_topk_prob

    def forward(self, x: Tensor, batch) -> Tensor:
        logits = self.gate(x, batch)
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return self.experts(x, top_i, top_w.to(x.dtype), batch)


class MoeDecoderLayer(DecoderLayer):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer, SparseMoeBlock(cfg) if cfg.is_moe(layer) else MLP(cfg))


# hub checkpoints keep one tensor per expert; transformers 5 (and this model) fuse them
_PER_EXPERT = {  # family -> (block name, gate, up, down)
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "olmoe": ("mlp", "gate_proj", "up_proj", "down_proj"),
}


class MoeForCausalLM(CausalLM):
    layer_cls = MoeDecoderLayer

    @classmethod
    def convert_state(cls, cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-expert checkpoint tensors (model.layers.L.mlp.experts.E.gate_proj.weight, Mixtral's
        block_sparse_moe.experts.E.w1/w3/w2 and block_sparse_moe.gate) -> the fused parameters."""
        block, g, u, d = _PER_EXPERT[cfg.arch]
        for layer in range(cfg.layers):
            src = f"model.layers.{layer}.{block}"
            dst = f"model.layers.{layer}.mlp"
            if f"{src}.experts.0.{g}.weight" not in state:
                continue
            w = {(e, n): state.pop(f"{src}.experts.{e}.{n}.weight")
                 for e in range(cfg.num_experts) for n in (g, u, d)}
            es = range(cfg.num_experts)
            state[f"{dst}.experts.gate_up_proj"] = torch.stack([torch.cat((w[e, g], w[e, u])) for e in es])
            state[f"{dst}.experts.down_proj"] = torch.stack([w[e, d] for e in es])
            if f"{src}.gate.weight" in state:
                state[f"{dst}.gate.weight"] = state.pop(f"{src}.gate.weight")
        return state


Qwen3MoeForCausalLM = MixtralForCausalLM = OlmoeForCausalLM = MoeForCausalLM
MODELS = {"qwen3_moe": Qwen3MoeForCausalLM, "mixtral": MixtralForCausalLM, "olmoe": OlmoeForCausalLM}
