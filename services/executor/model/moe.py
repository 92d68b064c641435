"""Mixture of Experts: Qwen3-MoE, Mixtral and OLMoE, with LoRA on the router and on every expert.

transformers 5 keeps each layer's experts fused: mlp.experts.gate_up_proj [E, 2I, H] and
mlp.experts.down_proj [E, H, I], and the router as mlp.gate.weight [E, H]. A token goes to its
top-k experts by softmax(router logits) (Mixtral and Qwen3-MoE with norm_topk_prob: the k weights
renormalised to sum to 1), and its output is the weighted sum of theirs.

The experts run grouped: the (token, expert) pairs are sorted by expert (stably, so each expert's
rows keep the batch's adapter order), then one GEMM per expert over its rows, not a loop over
tokens. LoRA on the experts is PEFT's target_parameters (ParamWrapper: a rank-r pair per expert,
reader.py splits them); each (layer, expert, parameter) is one module in the arena's tables, so an
expert's rows get their own adapters' deltas through the same ops.lora_paged_add_ as a projection,
with the segments counted within the expert's rows. The router is a LoraProj ("gate").
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

    def forward(self, x: Tensor, top_i: Tensor, top_w: Tensor, batch) -> Tensor:
        """x [T, H], top_i / top_w [T, k] -> sum_k top_w * expert_{top_i}(x) [T, H]."""
        T, k = top_i.shape
        E = self.gate_up_proj.shape[0]
        flat = top_i.reshape(-1)
        order = torch.argsort(flat, stable=True)            # pairs by expert, then by token
        rows = order // k                                   # each sorted pair's token
        xs = x[rows]
        p = batch.paged
        lora = p is not None and p.any_lora
        if lora:   # per expert, its rows counted per adapter segment: [E, G+1] offsets into xs
            G = batch.seg_indptr.numel() - 1
            seg = torch.searchsorted(batch.seg_indptr[1:].long(), rows, right=True)
            counts = torch.bincount(flat[order] * G + seg, minlength=E * G).view(E, G)
            indptr = torch.zeros((E, G + 1), dtype=torch.int32, device=x.device)
            indptr[:, 1:] = counts.cumsum(1)
        sizes = torch.bincount(flat, minlength=E).tolist()
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(sizes):
            if n == 0:
                continue
            xe = xs[start:start + n]
            h = xe @ self.gate_up_proj[e].T
            if lora:
                for meta, scalings in ((p.seg_meta, p.seg_scalings), *p.overlays):   # overlays: cat
                    ops.lora_paged_add_(h, xe, p.arena, p.page_index, meta, scalings,
                                        self.lora[e]["gate_up_proj"].lm, indptr[e])
            gate, up = h.chunk(2, dim=-1)
            a = gated_act(self.activation, gate.contiguous(), up.contiguous())
            o = a @ self.down_proj[e].T
            if lora:
                for meta, scalings in ((p.seg_meta, p.seg_scalings), *p.overlays):
                    ops.lora_paged_add_(o, a, p.arena, p.page_index, meta, scalings,
                                        self.lora[e]["down_proj"].lm, indptr[e])
            out[start:start + n] = o
            start += n
        weights = top_w.reshape(-1)[order].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, rows, out * weights[:, None])


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
