"""Mixtral and Qwen3-MoE layers in PyTorch: Llama attention, and an MLP of routed experts.

Each token's router picks its top-k experts (softmax over all, then the k largest, renormalized
where the family does). A single decode row runs its k experts in turn; more rows are grouped by
expert (one sort) and each expert hit runs
its gated MLP once over all its rows: a grouped matmul, through the same dense or quantized linear
layers as every other projection (`llama.projection`), so quantized experts use the quantized
kernels. The experts come stacked (`engine.core.experts`); each is a view of its stack.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.core.config import ModelConfig
from engine.core.experts import moe_prefix
from engine.core.quant import QuantTensor

from .llama import ACT, Block, LlamaStage, projection


def expert(stack, e: int):
    """Expert `e` of a stacked (experts, out, in) tensor or QuantTensor."""
    return stack.rows(e) if isinstance(stack, QuantTensor) else stack[e]


class SwitchMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, w: dict, p: str, like: torch.Tensor):
        super().__init__()
        self.top_k, self.norm_topk, self.act = cfg.moe.top_k, cfg.moe.norm_topk, ACT[cfg.hidden_act]
        self.router = projection([w.pop(p + "gate.weight")], like)
        gate_up, down = w.pop(p + "experts.gate_up_proj"), w.pop(p + "experts.down_proj")
        self.gate_up = nn.ModuleList(projection([expert(gate_up, e)], like) for e in range(cfg.moe.n_experts))
        self.down = nn.ModuleList(projection([expert(down, e)], like) for e in range(cfg.moe.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, hidden), normed: the weighted sum of each row's top-k experts' outputs."""
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        if x.shape[0] == 1:  # one decode row: its k experts in turn, no grouping
            out = None
            for j, e in enumerate(experts[0].tolist()):
                gate, up = self.gate_up[e](x).chunk(2, dim=-1)
                y = self.down[e](self.act(gate) * up) * weights[:, j:j + 1]
                out = y if out is None else out + y
            return out
        weights = weights.flatten()
        flat = experts.flatten()
        order = flat.argsort(stable=True)  # (row, choice) pairs grouped by expert
        counts = torch.bincount(flat, minlength=len(self.gate_up)).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, c in enumerate(counts):
            if not c:
                continue
            pick = order[start : start + c]
            rows = pick // self.top_k
            gate, up = self.gate_up[e](x[rows]).chunk(2, dim=-1)
            out.index_add_(0, rows, self.down[e](self.act(gate) * up) * weights[pick, None])
            start += c
        return out


class MoEBlock(Block):
    def make_mlp(self, cfg: ModelConfig, w: dict, i: int, like: torch.Tensor) -> nn.Module:
        if not cfg.moe.routed(i):  # qwen3_moe's dense layers
            return super().make_mlp(cfg, w, i, like)
        return SwitchMLP(cfg, w, moe_prefix(cfg, i), like)


class MoEStage(LlamaStage):
    block = MoEBlock


StageModel = MoEStage
