"""Phi-3 and Phi-4-mini: fused qkv_proj [q + 2 kv, hidden] and gate_up_proj [2 i, hidden] (LoRA on
the fused modules, its output split as the base's is), partial rotary (Phi-4-mini: 0.75 of each
head) and LongRoPE (short factors within the original context, long ones past it; layers.py).
"""

from __future__ import annotations

from services.executor.model.layers import CausalLM, DecoderLayer


class Phi3ForCausalLM(CausalLM):
    layer_cls = DecoderLayer


MODELS = {"phi3": Phi3ForCausalLM}
