"""Gemma 2 and Gemma 3 (text): embeddings * sqrt(hidden), (1 + w) RMSNorm in fp32, GeGLU
(gelu_pytorch_tanh), a norm after attention and around the feed-forward ("sandwich"),
query_pre_attn_scalar ** -0.5 as the softmax scale, sliding layers alternating with global ones
(layer_types), and where the config has them attention and final logit soft-capping (Gemma 2).
Gemma 3 adds per-head q/k norms and its sliding layers' own RoPE base (rope_local_base_freq).
All of it is ModelConfig (config.py) read by the shared layers; this file holds the layer order.
"""

from __future__ import annotations

from torch import nn

from services.executor.model.config import ModelConfig
from services.executor.model.layers import MLP, Attention, CausalLM, RMSNorm


class GemmaDecoderLayer(nn.Module):
    """h = x + post_attn_norm(attn(input_norm(x))); out = h + post_ff_norm(mlp(pre_ff_norm(h)))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        norm = lambda: RMSNorm(cfg.hidden, cfg.rms_eps, offset=True)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, x, residual, batch, cos, sin, k_cache, v_cache):
        """Same contract as DecoderLayer's: (this layer's normed MLP output, the stream before it)."""
        h, residual = self.input_layernorm(x, residual)
        a = self.post_attention_layernorm.norm(self.self_attn(h, batch, cos, sin, k_cache, v_cache))
        h, residual = self.pre_feedforward_layernorm(a, residual)
        return self.post_feedforward_layernorm.norm(self.mlp(h, batch)), residual


class Gemma2ForCausalLM(CausalLM):
    layer_cls = GemmaDecoderLayer


Gemma3ForCausalLM = Gemma2ForCausalLM
MODELS = {"gemma2": Gemma2ForCausalLM, "gemma3": Gemma3ForCausalLM}
