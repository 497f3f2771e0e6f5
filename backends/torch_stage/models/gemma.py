"""Gemma 2 and Gemma 3 (text) layers in PyTorch: the Llama layers with a norm after attention and
after the MLP too ("sandwich" norms). The rest is config the shared layers apply; the MLX file
(`backends/mlx_stage/models/gemma.py`) lists it.
"""

from __future__ import annotations

from .llama import Block, LlamaStage, RMSNorm


class GemmaBlock(Block):
    def __init__(self, cfg, w, i):
        super().__init__(cfg, w, i)  # post_attention_layernorm: on attention's output, here
        p = f"model.layers.{i}."
        self.pre_feedforward_layernorm = RMSNorm(w[p + "pre_feedforward_layernorm.weight"], cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(w[p + "post_feedforward_layernorm.weight"], cfg.rms_norm_eps)

    def forward(self, x, rope, plans, keys, values):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, plans, keys, values))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaStage(LlamaStage):
    block = GemmaBlock


StageModel = GemmaStage
