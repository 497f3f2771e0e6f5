"""Llama-family layers in MLX (llama, mistral, qwen2, qwen3, phi3): a contiguous slice of the model.

The other families' files (`gemma.py`, `moe.py`) build on these layers: attention with per-layer
windows, q/k norms, soft-capping and RoPE bases, and a gated MLP with either activation.

Layers are `mlx.nn.Module`s, as in mlx-lm, and the torch backend's `models/llama.py` has the same
classes in the same order. Uses only `mx.fast.*` kernels and plain array ops, so the same code runs
on Metal and on the CPU. Rows of all sequences are flattened for the projections and the rotary embedding (each row at
its own position); keys and values go to the paged cache (`..cache`) with one scatter per layer, the
decode rows attend in one batched call, and each prefill chunk attends on its own.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

from engine.core.config import ModelConfig
from engine.core.quant import QuantTensor, concat_rows

from ..cache import BatchSlots, PagedKV
from ..quant import QuantEmbedding, QuantLinear


def keep(module: nn.Module, name: str, value) -> None:
    """An attribute that is not one of the module's parameters (a compiled graph, the arrays a graph
    takes as inputs, gathered once at load rather than walked from the module on every call)."""
    object.__setattr__(module, name, value)


class Dense(nn.Module):
    """x @ weight.T for a float weight stored (out, in), as `nn.Linear` (the transposed view is the
    operand MLX's kernels are tuned for; on the CPU backend it multiplies as fast as a contiguous
    copy, and faster for a wide head: docs/benchmarks.md)."""

    def __init__(self, weight: mx.array, bias: mx.array | None = None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def __call__(self, x: mx.array) -> mx.array:
        return self.run(self, x)

    def key(self):
        return ("dense", self.bias is not None)

    @staticmethod
    def run(p, x):
        """The layer with its arrays `p` (its parameters) passed in, for a compiled graph."""
        y = x @ p["weight"].T
        return y + p["bias"] if "bias" in p else y


class Embedding(nn.Module):
    """`nn.Embedding`: called with token ids, their rows; `as_linear`, the tied head."""

    def __init__(self, weight: mx.array):
        super().__init__()
        self.weight = weight

    def __call__(self, ids: mx.array) -> mx.array:
        return self.weight[ids]

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self.weight.T


class Stacked(nn.Module):
    """Projections that cannot be one matrix (quantized differently): outputs side by side."""

    def __init__(self, parts, bias=None):
        super().__init__()
        self.parts, self.bias = parts, bias

    def __call__(self, x):
        y = mx.concatenate([p(x) for p in self.parts], axis=-1)
        return y if self.bias is None else y + self.bias

    def key(self):
        return None  # not compiled


def projection(ws: list, dtype, bias=None) -> nn.Module:
    """One linear layer over the rows of `ws` stacked: float arrays or QuantTensors."""
    if all(isinstance(w, mx.array) for w in ws):
        return Dense(mx.concatenate(ws) if len(ws) > 1 else ws[0], bias)
    fused = concat_rows(ws)
    if fused is not None:
        return QuantLinear(fused, dtype, bias)
    return Stacked([projection([w], dtype) for w in ws], bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, w: dict, p: str, layer: int, rope_freqs: mx.array, dtype,
                 compiled_graphs: dict):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap
        self.window = cfg.layer_windows[layer]
        self.rope_freqs = rope_freqs
        bqkv = mx.concatenate([w[p + f"{x}_proj.bias"] for x in "qkv"]) if cfg.attention_bias else None
        fused = [w.pop(p + "qkv_proj.weight")] if p + "qkv_proj.weight" in w else \
            [w.pop(p + f"{x}_proj.weight") for x in "qkv"]  # phi3 ships q/k/v fused
        self.qkv = projection(fused, dtype, bqkv)  # fused q/k/v
        self.o = projection([w.pop(p + "o_proj.weight")], dtype, w.get(p + "o_proj.bias"))
        self.norms = [w[p + "q_norm.weight"], w[p + "k_norm.weight"]] if cfg.qk_norm else []
        # decode steps run the projection, RoPE and the cache rows' layout as one compiled graph
        # (a 16-row step of SmolLM2 on the CPU backend: 0.93x the time); one graph per batch size,
        # so prefill, whose every prompt length would be another, runs it as it is
        spec = (self.n_heads, self.n_kv, self.head_dim, cfg.rms_norm_eps if cfg.qk_norm else None,
                cfg.rope_attention_factor)
        keep(self, "_pre", functools.partial(_project_rotate, self.qkv, spec))
        keep(self, "_pre_decode", compiled(compiled_graphs, ("pre", self.qkv.key(), spec), self._pre))
        keep(self, "_qkv", dict(self.qkv.parameters()))  # the graph's inputs

    def __call__(self, x: mx.array, positions: mx.array, plans: dict[int | None, BatchSlots], keys: mx.array,
                 values: mx.array) -> mx.array:
        """keys/values: this layer's paged cache, head-major (n_kv * slots, head_dim), written in place;
        `plans`: the batch's slots as each window reads them (`PagedKV.plan`)."""
        plan = plans[self.window]
        qd = self.n_heads * self.head_dim
        q, k, v, krows, vrows = (self._pre_decode if plan.all_decode else self._pre)(
            x, positions, self._qkv, self.rope_freqs, self.norms)
        keys[plan.write] = krows  # head-major rows (see ..cache)
        values[plan.write] = vrows
        outs = []
        if plan.decode_rows is not None:  # every one-token row in one call, read through its slots
            qs = q if plan.all_decode else q[plan.decode_rows]  # (B, heads, 1, head_dim)
            ks, vs = keys[plan.decode_index], values[plan.decode_index]  # (B, n_kv, Lmax, head_dim)
            outs.append(self.attend(qs, ks, vs, plan.decode_mask).reshape(-1, qd))
        for start, length, slots, mask in plan.prefill:
            qs = q[start : start + length].reshape(1, length, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
            if slots is None:  # a first chunk: its own rows
                ks = k[start : start + length][None].transpose(0, 2, 1, 3)
                vs = v[start : start + length][None].transpose(0, 2, 1, 3)
            else:  # a later chunk, or one after a cached prefix: everything before it too
                ks, vs = keys[slots], values[slots]  # (1, n_kv, offset + length, head_dim)
            o = self.attend(qs, ks, vs, mask)
            outs.append(o.transpose(0, 2, 1, 3).reshape(length, qd))
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs)
        if plan.inverse is not None:  # decode rows first, then the chunks: back to batch order
            out = out[plan.inverse]
        return self.o(out)

    def attend(self, q, k, v, mask):
        """q (B, heads, T, head_dim) against k, v (B, n_kv, L, head_dim); mask None: causal, as on the
        torch side (the T rows are the last T of the L positions: a decode row sees them all), else
        bool (B or 1, 1, T, L). Soft-capped scores (gemma2) have no fused kernel: computed as
        transformers does."""
        if self.softcap is None:
            causal = mask is None and q.shape[2] > 1  # one row per sequence needs no mask at all
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal" if causal else mask)
        b, h, n, d = q.shape
        rep = h // self.n_kv
        s = (q.reshape(b, self.n_kv, rep, n, d) @ k[:, :, None].swapaxes(-1, -2)) * self.scale
        s = mx.tanh(s / self.softcap) * self.softcap  # (B, n_kv, rep, T, L)
        if mask is None:
            mask = mx.arange(k.shape[2])[None, :] <= mx.arange(n)[:, None] + (k.shape[2] - n)
        s = mx.where(mask.reshape(mask.shape[0], 1, 1, *mask.shape[-2:]) if mask.ndim == 4 else mask,
                     s, mx.array(-mx.inf, s.dtype))
        probs = mx.softmax(s.astype(mx.float32), axis=-1).astype(v.dtype)
        return (probs @ v[:, :, None]).reshape(b, h, n, d)


def _project_rotate(qkv, spec, x, positions, qkv_params, freqs, norms):
    """q (N, heads, 1, head_dim) and k, v (N, n_kv, head_dim), q and k normed per head (qwen3, gemma3)
    and rotated at each row's position, and k, v as head-major cache rows (see ..cache)."""
    n_heads, n_kv, head_dim, norm_eps, factor = spec
    n, qd, kd = x.shape[0], n_heads * head_dim, n_kv * head_dim
    y = qkv.run(qkv_params, x) if qkv.key() is not None else qkv(x)
    q, k, v = mx.split(y, [qd, qd + kd], axis=-1)
    q, k = q.reshape(n, n_heads, 1, head_dim), k.reshape(n, n_kv, 1, head_dim)
    if norm_eps is not None:
        q, k = mx.fast.rms_norm(q, norms[0], norm_eps), mx.fast.rms_norm(k, norms[1], norm_eps)
    rope = lambda t: mx.fast.rope(t, head_dim, traditional=False, base=None, scale=1.0,  # noqa: E731
                                  offset=positions, freqs=freqs)
    q, k = rope(q), rope(k)
    if factor != 1.0:  # LongRoPE's attention factor: cos and sin scaled, as transformers does
        q, k = q * factor, k * factor
    k, v = k.reshape(n, n_kv, head_dim), v.reshape(n, n_kv, head_dim)
    return q, k, v, k.transpose(1, 0, 2).reshape(-1, head_dim), v.transpose(1, 0, 2).reshape(-1, head_dim)


def compiled(cache: dict, key, fn):
    """`fn` compiled once per key in the stage's `cache` (None in the key: projections of mixed
    schemes, run as they are). The graphs live in that dict, never in a layer: dropped with the
    stage, on the thread that ran it, nothing keeps them alive to be freed at exit (see LlamaStage)."""
    if None in key:
        return fn
    if key not in cache:
        cache[key] = mx.compile(fn)
    return cache[key]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, w: dict, i: int, rope_freqs: mx.array, graphs: dict):
        super().__init__()
        p = f"model.layers.{i}."
        self.eps = cfg.rms_norm_eps
        self.attn_norm = w[p + "input_layernorm.weight"]
        self.mlp_norm = w[p + "post_attention_layernorm.weight"]
        dtype = self.attn_norm.dtype
        self.attn = Attention(cfg, w, p + "self_attn.", i, rope_freqs, dtype, graphs)
        self.init_mlp(cfg, w, p + "mlp.", dtype, graphs)

    def init_mlp(self, cfg: ModelConfig, w: dict, p: str, dtype, graphs: dict, post_norm: bool = False) -> None:
        bias = lambda *xs: mx.concatenate([w[p + f"{x}_proj.bias"] for x in xs]) if cfg.mlp_bias else None  # noqa: E731
        fused = [w.pop(p + "gate_up_proj.weight")] if p + "gate_up_proj.weight" in w else \
            [w.pop(p + "gate_proj.weight"), w.pop(p + "up_proj.weight")]  # phi3 ships gate/up fused
        self.gate_up = projection(fused, dtype, bias("gate", "up"))
        self.down = projection([w.pop(p + "down_proj.weight")], dtype, bias("down"))
        keep(self, "mlp", compiled_mlp(self.gate_up, self.down, self.eps, cfg.hidden_act, graphs, post_norm))
        keep(self, "mlp_weights", (dict(self.gate_up.parameters()), dict(self.down.parameters())))  # its inputs

    def __call__(self, x, positions, plans, keys, values):
        x = x + self.attn(mx.fast.rms_norm(x, self.attn_norm, self.eps), positions, plans, keys, values)
        return self.mlp(x, self.mlp_norm, *self.mlp_weights)


def compiled_mlp(gate_up, down, eps: float, act: str, cache: dict, post_norm: bool = False):
    """Norm, gate/up, the gated activation, down (and with `post_norm` a norm after it, gemma) and the
    residual as one compiled graph (fewer kernels and dispatches), taking the weights as inputs: one
    graph per kind of layers (float, or quantized at given bits and group size), shared by every layer
    of that kind in the stage. Called (x, norm, gate_up weights, down weights[, post norm])."""
    key = (gate_up.key(), down.key(), eps, act, post_norm)
    gated = GATED[act]
    if None in key[:2]:  # projections of mixed schemes: run as they are
        def mlp(x, norm, gu, dn, post=None):
            y = down(gated(gate_up(mx.fast.rms_norm(x, norm, eps))))
            return x + (y if post is None else mx.fast.rms_norm(y, post, eps))
        return mlp

    def mlp(x, norm, gu, dn, post=None):
        y = down.run(dn, gated(gate_up.run(gu, mx.fast.rms_norm(x, norm, eps))))
        return x + (y if post is None else mx.fast.rms_norm(y, post, eps))

    return compiled(cache, ("mlp", *key), mlp)


def _swiglu(gate_up: mx.array) -> mx.array:
    gate, up = mx.split(gate_up, 2, axis=-1)
    return gate * mx.sigmoid(gate) * up


def _geglu(gate_up: mx.array) -> mx.array:
    """GELU's tanh approximation (transformers' gelu_pytorch_tanh) times up."""
    gate, up = mx.split(gate_up, 2, axis=-1)
    return 0.5 * gate * (1 + mx.tanh(0.7978845608028654 * (gate + 0.044715 * gate * gate * gate))) * up


GATED = {"silu": _swiglu, "gelu_tanh": _geglu}


class LlamaStage(nn.Module):
    """Layers [first, last]; the embedding on the first stage, norm and head on the last."""

    block = Block  # what each layer is (another family's file swaps it)

    def __init__(self, cfg: ModelConfig, w: dict[str, mx.array], first: int, last: int,
                 rope_freqs: dict[bool, mx.array]):
        """`rope_freqs`: RoPE periods by `cfg.local_rope(layer)`."""
        super().__init__()
        self.cfg, self.eps = cfg, cfg.rms_norm_eps
        is_last = last == cfg.num_hidden_layers - 1
        # compiled per stage, not at import: MLX keeps compiled graphs per thread, and a thread that
        # ends holding one while Python finalizes aborts the process in its destructor (which takes
        # the GIL). Dropped with the stage, on the thread that ran it, the graphs go with it.
        keep(self, "compiled_mlps", {})
        emb = w.get("model.embed_tokens.weight")
        dtype = w[f"model.layers.{first}.input_layernorm.weight"].dtype
        table = None if emb is None else QuantEmbedding(emb, dtype) if isinstance(emb, QuantTensor) else Embedding(emb)
        self.embed = table if first == 0 else None
        # projections are fused/re-laid copies: each layer is evaluated as it is built and its
        # originals popped from `w`, so loading never holds two copies of more than one layer
        self.layers = []
        for i in range(first, last + 1):
            self.layers.append(self.block(cfg, w, i, rope_freqs[cfg.local_rope(i)], self.compiled_mlps))
            mx.eval(self.layers[-1].parameters())
        self.norm = w["model.norm.weight"] if is_last else None
        self.lm_head = None
        if is_last and "lm_head.weight" in w:
            self.lm_head = projection([w["lm_head.weight"]], dtype)
        elif is_last:  # tied embeddings: the head is the embedding matrix
            self.lm_head = table
        keep(self, "head", None if self.lm_head is None else getattr(self.lm_head, "as_linear", self.lm_head))

    def __call__(self, x, positions: mx.array, plans: dict, kv: PagedKV, sample_rows=None):
        """x: (N,) token ids on the first stage, else (N, hidden); positions: (N,) of every row; plans:
        the batch's cache slots by attention window."""
        if self.embed is not None:
            x = self.embed(x)
            if self.cfg.embed_scale is not None:  # gemma: scaled in the activation dtype, as transformers
                x = x * mx.array(self.cfg.embed_scale, x.dtype)
        for j, layer in enumerate(self.layers):
            x = layer(x, positions, plans, kv.keys[j], kv.values[j])
        if self.lm_head is None:
            return x
        # only the rows that sample reach the head: never a (N, vocab) array
        logits = self.head(mx.fast.rms_norm(x[sample_rows], self.norm, self.eps)).astype(mx.float32)
        if self.cfg.final_softcap is not None:
            logits = mx.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits


StageModel = LlamaStage
