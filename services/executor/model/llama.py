"""The Llama family: Llama, Mistral (sliding window), Qwen2 (q/k/v bias) and Qwen3 (per-head q/k
RMSNorm, head_dim independent of hidden): same layer, same names, numerics from ModelConfig.

    logits = model(batch, kv_cache)      # batch: a step's tokens, flat [T], sorted by adapter

Every projection is a LoraProj (layers.py): the base GEMM, then each segment's adapter read from
the arena by ops.lora_paged_add_.
"""

from __future__ import annotations

from services.executor.model.config import (  # noqa: F401  (re-exported: the names callers import)
    ARCHS,
    ATTN_MODULES,
    LORA_MODULES,
    MLP_MODULES,
    ModelConfig,
)
from services.executor.model.layers import (  # noqa: F401
    CausalLM,
    DecoderLayer,
    ForwardBatch,
    LoraProj,
    RMSNorm,
    rope_inv_freq,
    rope_tables,
)


class LlamaForCausalLM(CausalLM):
    layer_cls = DecoderLayer


MistralForCausalLM = Qwen2ForCausalLM = Qwen3ForCausalLM = LlamaForCausalLM
MODELS = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM,
          "qwen3": Qwen3ForCausalLM}
