"""Mixtral and Qwen3-MoE layers in MLX: Llama attention, and an MLP of routed experts.

Each token's router picks its top-k experts (softmax over all, then the k largest, renormalized
where the family does); their gated MLPs run as `mx.gather_mm`, or `mx.gather_qmm` on quantized
experts, over the experts stacked into one array each (`engine.core.experts`), as mlx-lm's
SwitchGLU does: the same calls on Metal and the CPU. Rows of a prefill are sorted by expert first,
so each expert's weights are read once per call.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from engine.core.config import ModelConfig
from engine.core.experts import moe_prefix
from engine.core.quant import QuantTensor

from .llama import GATED, Block, LlamaStage, keep, projection

SORT_ROWS = 64  # (rows x top_k) from which rows are sorted by expert (mlx-lm's threshold)


class SwitchLinear(nn.Module):
    """x @ weight[e] for each row's experts e, over stacked (experts, out, in) weights, float or
    quantized (mlx-lm's SwitchLinear and QuantizedSwitchLinear)."""

    def __init__(self, w, dtype):
        super().__init__()
        if isinstance(w, QuantTensor):
            s, b = w.float_parts()
            self.weight = mx.array(w.codes)
            self.scales, self.biases = mx.array(s).astype(dtype), mx.array(b).astype(dtype)
            self.bits, self.group_size = w.bits, w.group_size
        else:  # (experts, in, out): contiguous on the CPU, a view on Metal
            cpu = mx.default_device() == mx.cpu
            self.weight = w.swapaxes(-1, -2)
            self.weight = mx.contiguous(self.weight) if cpu else self.weight
            self.scales = None
            # MLX's CPU GatherMM (0.32) multiplies float32 only: there, experts held in another dtype are
            # kept in float32 and the rows upcast around the call (twice the memory, on the CPU only)
            self.upcast = cpu and self.weight.dtype != mx.float32
            if self.upcast:
                self.weight = self.weight.astype(mx.float32)

    def __call__(self, x: mx.array, experts: mx.array, sorted_rows: bool) -> mx.array:
        if self.scales is None:
            if self.upcast:
                return mx.gather_mm(x.astype(mx.float32), self.weight, rhs_indices=experts,
                                    sorted_indices=sorted_rows).astype(x.dtype)
            return mx.gather_mm(x, self.weight, rhs_indices=experts, sorted_indices=sorted_rows)
        return mx.gather_qmm(x, self.weight, self.scales, self.biases, rhs_indices=experts, transpose=True,
                             group_size=self.group_size, bits=self.bits, sorted_indices=sorted_rows)


class SwitchMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, w: dict, p: str, dtype):
        super().__init__()
        self.top_k, self.norm_topk, self.gated = cfg.moe.top_k, cfg.moe.norm_topk, GATED[cfg.hidden_act]
        self.router = projection([w.pop(p + "gate.weight")], dtype)
        self.gate_up = SwitchLinear(w.pop(p + "experts.gate_up_proj"), dtype)
        self.down = SwitchLinear(w.pop(p + "experts.down_proj"), dtype)

    def __call__(self, x: mx.array) -> mx.array:
        """x (N, hidden), normed: the weighted sum of each row's top-k experts' outputs."""
        probs = mx.softmax(self.router(x).astype(mx.float32), axis=-1)
        k = self.top_k
        experts = mx.argpartition(-probs, kth=k - 1, axis=-1)[:, :k]  # (N, k)
        weights = mx.take_along_axis(probs, experts, axis=-1)
        if self.norm_topk:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        n = x.shape[0]
        rows = x[:, None, None, :]  # (N, 1, 1, hidden): one matmul row per (row, expert)
        sort = experts.size >= SORT_ROWS
        if sort:  # rows grouped by expert: each expert's weights read once
            flat = experts.flatten()
            order = mx.argsort(flat)
            rows, idx = rows.flatten(0, -3)[order // k], flat[order]
        else:
            idx = experts
        y = self.down(self.gated(self.gate_up(rows, idx, sort)), idx, sort)  # (.., 1, hidden)
        if sort:
            y = y[mx.argsort(order)].reshape(n, k, 1, -1)
        return (y[:, :, 0] * weights[..., None].astype(y.dtype)).sum(axis=1)


class MoEBlock(Block):
    def init_mlp(self, cfg: ModelConfig, w: dict, p: str, dtype, graphs: dict, post_norm: bool = False) -> None:
        layer = int(p.split(".")[2])
        if not cfg.moe.routed(layer):  # qwen3_moe's dense layers
            return super().init_mlp(cfg, w, p, dtype, graphs)
        self.switch = SwitchMLP(cfg, w, moe_prefix(cfg, layer), dtype)
        eps = self.eps
        keep(self, "mlp", lambda x, norm: x + self.switch(mx.fast.rms_norm(x, norm, eps)))
        keep(self, "mlp_weights", ())


class MoEStage(LlamaStage):
    block = MoEBlock


StageModel = MoEStage
