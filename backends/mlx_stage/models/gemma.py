"""Gemma 2 and Gemma 3 (text) layers in MLX: the Llama layers with a norm after attention and after
the MLP too ("sandwich" norms) and GELU-gated MLPs.

What else sets them apart is config, applied by the shared layers (`llama.py`): norms that multiply
by (1 + weight), folded into the weights at load (`engine.core.weights`); the embedding scaled by
sqrt(hidden_size); the softmax scale from `query_pre_attn_scalar`; sliding-window layers between
global ones; gemma2's soft-capped attention scores and logits; gemma3's q/k norms and its windowed
layers' own RoPE base.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from engine.core.config import ModelConfig

from .llama import Attention, Block, LlamaStage


class GemmaBlock(Block):
    def __init__(self, cfg: ModelConfig, w: dict, i: int, rope_freqs: mx.array, graphs: dict):
        nn.Module.__init__(self)  # not Block.__init__: the layers are made here
        p = f"model.layers.{i}."
        self.eps = cfg.rms_norm_eps
        self.attn_norm = w[p + "input_layernorm.weight"]
        self.attn_post_norm = w[p + "post_attention_layernorm.weight"]  # on attention's output, here
        self.mlp_norm = w[p + "pre_feedforward_layernorm.weight"]
        self.mlp_post_norm = w[p + "post_feedforward_layernorm.weight"]
        dtype = self.attn_norm.dtype
        self.attn = Attention(cfg, w, p + "self_attn.", i, rope_freqs, dtype, graphs)
        self.init_mlp(cfg, w, p + "mlp.", dtype, graphs, post_norm=True)

    def __call__(self, x, positions, plans, keys, values):
        h = self.attn(mx.fast.rms_norm(x, self.attn_norm, self.eps), positions, plans, keys, values)
        x = x + mx.fast.rms_norm(h, self.attn_post_norm, self.eps)
        return self.mlp(x, self.mlp_norm, *self.mlp_weights, self.mlp_post_norm)


class GemmaStage(LlamaStage):
    block = GemmaBlock


StageModel = GemmaStage
