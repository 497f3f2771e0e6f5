"""A MoE layer's experts as stacked tensors, framework-neutral: what both backends' routed MLPs take.

Checkpoints name each expert's projections on its own (Mixtral: `block_sparse_moe.experts.E.w1`
gate, `w3` up, `w2` down; Qwen3-MoE: `mlp.experts.E.gate_proj`, `up_proj`, `down_proj`). Here they
become one (experts, 2 * intermediate, hidden) gate/up stack and one (experts, hidden, intermediate)
down stack, float `TypedArray`s or, quantized, `QuantTensor`s whose codes, scales and biases gain a
leading experts axis: the layout `mx.gather_qmm` takes.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .errors import UserError
from .quant import QuantTensor
from .tensors import TypedArray

# model_type -> (the MoE module's name in a layer, (gate, up, down) names of an expert's projections)
NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
         "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def moe_prefix(cfg: ModelConfig, layer: int) -> str:
    return f"model.layers.{layer}.{NAMES[cfg.model_type][0]}."


def expert_names(cfg: ModelConfig, layer: int) -> list[str]:
    """Every tensor name of the layer's experts, in (expert, gate/up/down) order."""
    _, parts = NAMES[cfg.model_type]
    p = moe_prefix(cfg, layer)
    return [f"{p}experts.{e}.{x}.weight" for e in range(cfg.moe.n_experts) for x in parts]


def stack_experts(w: dict, cfg: ModelConfig, layer: int) -> tuple:
    """(router weight, gate/up stack, down stack), each expert's tensors popped from `w` as it is stacked."""
    _, (g, u, d) = NAMES[cfg.model_type]
    p = moe_prefix(cfg, layer)
    names = expert_names(cfg, layer)
    missing = [n for n in names + [p + "gate.weight"] if n not in w]
    if missing:
        raise UserError(f"checkpoint lacks {missing[0]} (and {len(missing) - 1} more)")
    E = cfg.moe.n_experts
    gate_up = _stack([[w.pop(f"{p}experts.{e}.{x}.weight") for x in (g, u)] for e in range(E)])
    down = _stack([[w.pop(f"{p}experts.{e}.{d}.weight")] for e in range(E)])
    return w.pop(p + "gate.weight"), gate_up, down


def _stack(per_expert: list[list]):
    """[[rows of expert 0 ...], ...] -> one tensor (experts, rows, K): each expert's parts concatenated
    by rows, then stacked."""
    first = per_expert[0][0]
    if isinstance(first, QuantTensor):
        if any(not isinstance(t, QuantTensor) or t.scheme != first.scheme for parts in per_expert for t in parts):
            raise UserError("a MoE layer's experts must all be quantized alike (one bits, group size and mode)")
        if first.mode == "q6_k":  # experts are multiplied as one stack: in the form every backend has
            per_expert = [[t.requantized8() for t in parts] for parts in per_expert]
            first = per_expert[0][0]
        floats = {id(t): t.float_parts() for parts in per_expert for t in parts}  # exact, whatever the mode
        cat = lambda get: np.stack([np.concatenate([get(t) for t in parts]) for parts in per_expert])  # noqa: E731
        return QuantTensor(cat(lambda t: t.codes), TypedArray(cat(lambda t: floats[id(t)][0]), "float32"),
                           TypedArray(cat(lambda t: floats[id(t)][1]), "float32"), first.bits, first.group_size)
    if any(isinstance(t, QuantTensor) for parts in per_expert for t in parts):
        raise UserError("a MoE layer's experts must all be quantized alike (some are float)")
    data = np.stack([np.concatenate([t.data for t in parts]) for parts in per_expert])
    return TypedArray(data, first.dtype)
