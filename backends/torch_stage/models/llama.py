"""Llama-family layers in PyTorch (llama, mistral, qwen2, qwen3, phi3): a contiguous slice of the model.

Layers are `torch.nn.Module`s, and the MLX backend's `models/llama.py` has the same classes in the
same order (its MLP is a compiled graph its `Block` builds). Weights are popped from the loaded dict
as each projection takes them, on both sides, so loading never holds a second copy of more than one
layer. Rows of all sequences in a batch are flattened to (N, hidden) for every projection. Attention
reads the paged KV cache (`cache.py`): all one-token (decode) rows attend in one padded call,
each prefill chunk against its own sequence. q/k/v and gate/up are fused into one matmul each.
The other families' files (`gemma.py`, `moe.py`) build on these layers: attention with per-layer
windows, q/k norms, soft-capping and RoPE bases, and a gated MLP with either activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.core.config import ModelConfig
from engine.core.quant import QuantTensor, concat_rows

from .. import native
from ..cache import PagedKV
from ..ops import decode_attention, rms_norm, small_matmul
from ..quant import QuantEmbedding, QuantLinear


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


SMALL_ROWS = 16  # up to this many rows (a decode step, a draft's verification) go through `small_matmul`
# Many bf16/fp16 rows (a prefill) on a CPU without native bf16 arithmetic: oneDNN's half-precision
# GEMM emulates it, several times slower than widening both operands and multiplying in fp32 (the
# same fp32 sums, rounded once). CPUs with AVX512-BF16 or AMX keep oneDNN's own.
WIDEN_HALF_GEMM = native.lacks_half_gemm()


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except on a CPU: a few rows (a decode step) go through `small_matmul`, and many bf16
    or fp16 rows (a prefill) through fp32 where the CPU has no half-precision arithmetic of its own."""
    if x.device.type != "cpu":
        return F.linear(x, w, b)
    if x.shape[0] <= SMALL_ROWS:
        y = small_matmul(x, w)
        return y if b is None else y + b
    if WIDEN_HALF_GEMM and x.dtype != torch.float32:
        return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    return F.linear(x, w, b)


class Dense(nn.Module):
    def __init__(self, w: torch.Tensor, b: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = None if b is None else nn.Parameter(b, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Stacked(nn.Module):
    """Projections that cannot be one matrix (quantized differently): their outputs side by side."""

    def __init__(self, parts: list[nn.Module], b: torch.Tensor | None = None):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.bias = None if b is None else nn.Parameter(b, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([p(x) for p in self.parts], dim=-1)
        return y if self.bias is None else y + self.bias


def projection(ws: list, like: torch.Tensor, b: torch.Tensor | None = None) -> nn.Module:
    """One linear layer over the rows of `ws` stacked (float tensors or QuantTensors); `like` gives
    the activation dtype and device."""
    if all(isinstance(w, torch.Tensor) for w in ws):
        return Dense(torch.cat(ws) if len(ws) > 1 else ws[0], b)
    fused = concat_rows(ws)
    if fused is not None:
        return QuantLinear(fused, like.dtype, like.device, b)
    return Stacked([projection([w], like) for w in ws], b)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], p: str, layer: int, like: torch.Tensor):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale, self.softcap, self.window = cfg.attn_scale, cfg.attn_softcap, cfg.layer_windows[layer]
        self.local_rope = cfg.local_rope(layer)
        bqkv = torch.cat([w[p + f"{x}_proj.bias"] for x in "qkv"]) if cfg.attention_bias else None
        fused = [w.pop(p + "qkv_proj.weight")] if p + "qkv_proj.weight" in w else \
            [w.pop(p + f"{x}_proj.weight") for x in "qkv"]  # phi3 ships q/k/v fused
        self.qkv = projection(fused, like, bqkv)  # fused q/k/v
        self.o = projection([w.pop(p + "o_proj.weight")], like, w.get(p + "o_proj.bias"))
        self.q_norm = RMSNorm(w[p + "q_norm.weight"], cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(w[p + "k_norm.weight"], cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, rope: dict, plans: dict, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """rope: (cos, sin) by `local_rope`; plans: the batch's slots by attention window; keys/values:
        this layer's slots of the paged cache, (slots, n_kv, head_dim)."""
        cos, sin = rope[self.local_rope]
        plan = plans[self.window]
        n = x.shape[0]
        qd, kd = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        qk, v = self.qkv(x).split([qd + kd, kd], dim=-1)
        qk = qk.reshape(n, self.n_heads + self.n_kv, self.head_dim)  # q and k heads rotated together
        if self.q_norm is not None:  # each head normed first (qwen3, gemma3)
            q, k = qk.split([self.n_heads, self.n_kv], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        qk = qk * cos + rotate_half(qk) * sin
        q, k = qk.split([self.n_heads, self.n_kv], dim=1)  # (N, n_heads, head_dim), (N, n_kv, head_dim)
        v = v.view(n, self.n_kv, self.head_dim)
        keys.index_copy_(0, plan.write, k)
        values.index_copy_(0, plan.write, v)
        out = None if plan.all_decode else q.new_empty((n, self.n_heads, self.head_dim))
        if plan.decode_rows is not None:  # every one-token row in one call, read through its slots
            qs = q if plan.all_decode else q[plan.decode_rows]
            if self.softcap is None:
                o = decode_attention(qs, keys, values, plan.decode_slots, plan.decode_lengths, self.scale)
            else:
                valid = torch.arange(plan.decode_slots.shape[1], device=x.device) < plan.decode_lengths[:, None]
                o = self.attend(qs[:, :, None], keys[plan.decode_slots].transpose(1, 2),
                                values[plan.decode_slots].transpose(1, 2), valid[:, None, None, :])[:, :, 0]
            if plan.all_decode:
                out = o
            else:
                out[plan.decode_rows] = o
        for start, length, slots, mask in plan.prefill:
            qs = q[start : start + length].transpose(0, 1)[None]
            if slots is None:  # a first chunk: its own rows
                ks = k[start : start + length].transpose(0, 1)[None]
                vs = v[start : start + length].transpose(0, 1)[None]
            else:
                ks = keys[slots].transpose(0, 1)[None]  # (1, n_kv, offset + T, head_dim)
                vs = values[slots].transpose(0, 1)[None]
            o = self.attend(qs, ks, vs, mask)
            out[start : start + length] = o[0].transpose(0, 1)
        return self.o(out.reshape(n, qd))

    def attend(self, q, k, v, mask):
        """q (B, heads, T, head_dim) against k, v (B, n_kv, L, head_dim); mask None: causal. Soft-capped
        scores (gemma2) have no fused kernel: computed as transformers does."""
        gqa = self.n_heads != self.n_kv
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                                  enable_gqa=gqa)
        if mask is None:
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
        if gqa:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        s = (q @ k.transpose(-1, -2)) * self.scale
        s = torch.tanh(s / self.softcap) * self.softcap
        s = s.masked_fill(~mask, float("-inf"))
        return torch.softmax(s.float(), dim=-1).to(v.dtype) @ v


ACT = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], p: str, like: torch.Tensor):
        super().__init__()
        bias = lambda *xs: torch.cat([w[p + f"{x}_proj.bias"] for x in xs]) if cfg.mlp_bias else None  # noqa: E731
        fused = [w.pop(p + "gate_up_proj.weight")] if p + "gate_up_proj.weight" in w else \
            [w.pop(p + "gate_proj.weight"), w.pop(p + "up_proj.weight")]  # phi3 ships gate/up fused
        self.gate_up = projection(fused, like, bias("gate", "up"))  # fused
        self.down = projection([w.pop(p + "down_proj.weight")], like, bias("down"))
        self.act = ACT[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], i: int):
        super().__init__()
        p = f"model.layers.{i}."
        like = w[p + "input_layernorm.weight"]  # a float tensor: the activation dtype and device
        self.input_layernorm = RMSNorm(like, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, w, p + "self_attn.", i, like)
        self.post_attention_layernorm = RMSNorm(w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        self.mlp = self.make_mlp(cfg, w, i, like)

    def make_mlp(self, cfg: ModelConfig, w: dict, i: int, like: torch.Tensor) -> nn.Module:
        return MLP(cfg, w, f"model.layers.{i}.mlp.", like)

    def forward(self, x, rope, plans, keys, values):
        x = x + self.self_attn(self.input_layernorm(x), rope, plans, keys, values)
        return x + self.mlp(self.post_attention_layernorm(x))


class Rope(nn.Module):
    """Each row's cos and sin at its own position, from RoPE's inverse frequencies (`engine.core.config.
    rope_inv_freq`; the MLX side hands the same periods to `mx.fast.rope`), times LongRoPE's
    attention factor."""

    def __init__(self, inv_freq: torch.Tensor, factor: float, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.factor, self.dtype = factor, dtype

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # (N, 1, head_dim)
        return (emb.cos() * self.factor).to(self.dtype), (emb.sin() * self.factor).to(self.dtype)


class Embedding(nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(w, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class LlamaStage(nn.Module):
    """Layers [first, last]; the embedding on the first stage, norm and head on the last."""

    block = Block  # what each layer is (another family's file swaps it)

    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], first: int, last: int,
                 inv_freq: dict[bool, torch.Tensor]):
        """`inv_freq`: RoPE's inverse frequencies by `cfg.local_rope(layer)`."""
        super().__init__()
        self.cfg, self.first, self.last = cfg, first, last
        is_last = last == cfg.num_hidden_layers - 1
        like = w[f"model.layers.{first}.input_layernorm.weight"]
        self.ropes = nn.ModuleDict({"local" if local else "global": Rope(inv, cfg.rope_attention_factor, like.dtype)
                                    for local, inv in inv_freq.items()})
        emb = w.get("model.embed_tokens.weight")
        q_emb = QuantEmbedding(emb, like.dtype, like.device) if isinstance(emb, QuantTensor) else None
        self.embed = None
        if first == 0:
            self.embed = q_emb if q_emb is not None else Embedding(emb)
        self.layers = nn.ModuleList(self.block(cfg, w, i) for i in range(first, last + 1))
        self.norm = RMSNorm(w["model.norm.weight"], cfg.rms_norm_eps) if is_last else None
        self.lm_head = None
        if is_last:
            head = w.get("lm_head.weight")
            if head is not None:
                self.lm_head = projection([head], like)
            else:  # tied embeddings: the head is the embedding matrix
                self.lm_head = q_emb.as_linear() if q_emb is not None else Dense(emb)

    def forward(self, x, positions: torch.Tensor, plans: dict, kv: PagedKV, sample_rows=None):
        """x: (N,) token ids on the first stage, else (N, hidden); positions: (N,) of every row; plans:
        the batch's cache slots by attention window."""
        rope = {name == "local": r(positions) for name, r in self.ropes.items()}
        if self.embed is not None:
            x = self.embed(x)
            if self.cfg.embed_scale is not None:  # gemma: scaled in the activation dtype, as transformers
                x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        for j, layer in enumerate(self.layers):
            x = layer(x, rope, plans, kv.keys[j], kv.values[j])
        if self.lm_head is None:
            return x
        # only the rows that sample reach the head: never a (N, vocab) tensor
        logits = self.lm_head(self.norm(x[sample_rows])).float()
        if self.cfg.final_softcap is not None:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits


StageModel = LlamaStage
