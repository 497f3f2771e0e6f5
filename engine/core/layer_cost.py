"""What each decoder layer costs, counted from the config: the weight bytes it holds and the weight
bytes one decoded token reads through it.

For a dense layer the two are the same. A MoE layer holds every expert but one token reads the
router and its top-k experts only, so a Mixtral layer holds about 4x what a token reads from it:
memory is planned by the bytes held, time by the bytes read. The planner (`app/planner.py`) scales
the one layer each daemon timed by these ratios, and `hetpipe bench backends` sets its memory floor
by the bytes read.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .experts import moe_prefix
from .tensors import itemsize


def per_weight(cfg: ModelConfig, module: str, dtype: str) -> float:
    """Bytes per weight of `module` as a stage holds it: the dtype, or packed codes plus a scale
    and a bias (in the activation dtype) per group (no bias where the mode is symmetric)."""
    spec = cfg.quantization.for_module(module) if cfg.quantization else None
    if spec is None:
        return itemsize(dtype)
    bits, group, mode = spec
    if mode == "q6_k":  # an int8 sub-scale per group, a float16 scale per 256
        return bits / 8 + 1 / group + 2 / 256
    return bits / 8 + (1 if mode == "symmetric" else 2) * itemsize(dtype) / group


@dataclass(frozen=True, slots=True)
class LayerCost:
    held: float  # weight bytes the layer holds
    read: float  # weight bytes one decoded token reads from it


def layer_cost(cfg: ModelConfig, layer: int, dtype: str) -> LayerCost:
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    p = f"model.layers.{layer}."
    attn = sum(h * (q if x == "q" else kv) * per_weight(cfg, f"{p}self_attn.{x}_proj", dtype) for x in "qkv")
    attn += q * h * per_weight(cfg, p + "self_attn.o_proj", dtype)
    norms = (4 if cfg.sandwich_norms else 2) * h + (2 * hd if cfg.qk_norm else 0)
    small = (norms + (q + 2 * kv if cfg.attention_bias else 0)) * itemsize(dtype)
    if cfg.moe is None or not cfg.moe.routed(layer):
        mlp = 3 * h * cfg.intermediate_size * per_weight(cfg, p + "mlp.gate_proj", dtype)
        bias = (2 * cfg.intermediate_size + h) * itemsize(dtype) if cfg.mlp_bias else 0
        return LayerCost(attn + small + mlp + bias, attn + small + mlp + bias)
    m = moe_prefix(cfg, layer)
    router = cfg.moe.n_experts * h * per_weight(cfg, m + "gate", dtype)
    expert = 3 * h * cfg.moe.intermediate_size * per_weight(cfg, m + "experts.gate_up_proj", dtype)
    return LayerCost(attn + small + router + cfg.moe.n_experts * expert,
                     attn + small + router + cfg.moe.top_k * expert)


def head_read_bytes(cfg: ModelConfig, dtype: str) -> float:
    """The final norm and the head (the embedding, when tied)."""
    head = "model.embed_tokens" if cfg.tie_word_embeddings else "lm_head"
    return cfg.vocab_size * cfg.hidden_size * per_weight(cfg, head, dtype) + cfg.hidden_size * itemsize(dtype)


def calibration_layer(cfg: ModelConfig) -> int:
    """The layer a daemon times and weighs for the planner: the first of the most common kind
    (routed, for a MoE model with a few dense layers), so most layers cost what it measured; never
    the last of several (timed alone, it would carry the head)."""
    if cfg.moe is None:
        return 0
    routed = [i for i in range(cfg.num_hidden_layers) if cfg.moe.routed(i)]
    dense = [i for i in range(cfg.num_hidden_layers) if not cfg.moe.routed(i)]
    pick = (routed if len(routed) >= len(dense) else dense)[0]
    return 0 if pick == cfg.num_hidden_layers - 1 else pick


def relative_costs(cfg: ModelConfig, dtype: str = "bfloat16") -> list[LayerCost]:
    """Each layer's held and read bytes as multiples of the calibration layer's: 1.0 for every layer of
    a dense model; a MoE model's dense layers read more than its routed ones."""
    costs = [layer_cost(cfg, i, dtype) for i in range(cfg.num_hidden_layers)]
    ref = costs[calibration_layer(cfg)]
    return [LayerCost(c.held / ref.held, c.read / ref.read) for c in costs]
