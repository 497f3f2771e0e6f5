"""Llama-family layers in PyTorch (llama, mistral, qwen2): a contiguous slice of the model.

Rows of all sequences in a batch are flattened to (N, hidden) for every projection; attention
runs per sequence against its own KV cache. q/k/v and gate/up are fused into one matmul each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig

from ..cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in float32 as transformers does, then cast back
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], p: str):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.wqkv = nn.Parameter(torch.cat([w[p + f"{x}_proj.weight"] for x in "qkv"]), requires_grad=False)
        self.bqkv = None
        if cfg.attention_bias:
            self.bqkv = nn.Parameter(torch.cat([w[p + f"{x}_proj.bias"] for x in "qkv"]), requires_grad=False)
        self.wo = nn.Parameter(w[p + "o_proj.weight"], requires_grad=False)
        self.bo = nn.Parameter(w[p + "o_proj.bias"], requires_grad=False) if p + "o_proj.bias" in w else None

    def forward(self, x, cos, sin, segments, caches: list[KVCache]) -> torch.Tensor:
        n = x.shape[0]
        qd, kd = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        q, k, v = F.linear(x, self.wqkv, self.bqkv).split([qd, kd, kd], dim=-1)
        q = q.view(n, self.n_heads, self.head_dim)  # (N, n_heads, head_dim)
        k = k.view(n, self.n_kv, self.head_dim)
        v = v.view(n, self.n_kv, self.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        outs = []
        for (start, length, offset), cache in zip(segments, caches):
            sl = slice(start, start + length)
            keys, values = cache.update_and_fetch(k[sl].transpose(0, 1), v[sl].transpose(0, 1))
            qs = q[sl].transpose(0, 1)  # (n_heads, T, head_dim)
            o = F.scaled_dot_product_attention(
                qs[None], keys[None], values[None], attn_mask=_causal_mask(length, offset, x.device),
                enable_gqa=self.n_heads != self.n_kv,
            )
            outs.append(o[0].transpose(0, 1).reshape(length, qd))
        return F.linear(torch.cat(outs) if len(outs) > 1 else outs[0], self.wo, self.bo)


def _causal_mask(length: int, offset: int, device) -> torch.Tensor | None:
    """(T, offset + T) bool mask: row i sees keys up to offset + i. None for one query row."""
    if length == 1:
        return None
    rows = torch.arange(length, device=device)[:, None] + offset
    return torch.arange(offset + length, device=device)[None, :] <= rows


class MLP(nn.Module):
    def __init__(self, w: dict[str, torch.Tensor], p: str):
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.cat([w[p + "gate_proj.weight"], w[p + "up_proj.weight"]]),
                                      requires_grad=False)
        self.w_down = nn.Parameter(w[p + "down_proj.weight"], requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.w_gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w_down)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], i: int):
        super().__init__()
        p = f"model.layers.{i}."
        self.input_layernorm = RMSNorm(w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, w, p + "self_attn.")
        self.post_attention_layernorm = RMSNorm(w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        self.mlp = MLP(w, p + "mlp.")

    def forward(self, x, cos, sin, segments, caches):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segments, caches)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaStage(nn.Module):
    """Layers [first, last]; the embedding on the first stage, norm and head on the last."""

    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], first: int, last: int):
        super().__init__()
        self.cfg, self.first, self.last = cfg, first, last
        is_last = last == cfg.num_hidden_layers - 1
        self.embed = nn.Parameter(w["model.embed_tokens.weight"], requires_grad=False) if first == 0 else None
        self.layers = nn.ModuleList(Block(cfg, w, i) for i in range(first, last + 1))
        self.norm = RMSNorm(w["model.norm.weight"], cfg.rms_norm_eps) if is_last else None
        self.lm_head = None
        if is_last:
            # tied embeddings: the head is the embedding matrix
            head = w.get("lm_head.weight")
            self.lm_head = nn.Parameter(head if head is not None else w["model.embed_tokens.weight"],
                                        requires_grad=False)

    def forward(self, x, cos, sin, segments, caches: list[list[KVCache]], sample_rows=None):
        """x: (N,) token ids on the first stage, else (N, hidden). caches[seq][layer]."""
        if self.embed is not None:
            x = F.embedding(x, self.embed)
        for j, layer in enumerate(self.layers):
            x = layer(x, cos, sin, segments, [c[j] for c in caches])
        if self.lm_head is None:
            return x
        # only the rows that sample reach the head: never a (N, vocab) tensor
        return F.linear(self.norm(x[sample_rows]), self.lm_head).float()

StageModel = LlamaStage
