"""Llama-family layers in MLX (llama, mistral, qwen2): a contiguous slice of the model.

Uses only `mx.fast.*` kernels and plain array ops, so the same code runs on Metal and on the
CPU. Rows of all sequences are flattened for the projections and the rotary embedding (each row at
its own position); keys and values go to the paged cache (`..cache`) with one scatter per layer, the
decode rows attend in one batched call, and each prefill chunk attends on its own.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from engine.core.config import ModelConfig
from engine.core.quant import QuantTensor, concat_rows

from ..cache import BatchSlots, PagedKV
from ..quant import QuantEmbedding, QuantLinear


def in_out(w: mx.array) -> mx.array:
    """A weight stored (out, in) as the (in, out) operand of `x @ w`, copied contiguous: a plain
    row-major matrix multiplies ~1.4x faster than the transposed view on the CPU backend (OpenBLAS
    GEMV, measured on every projection of SmolLM2 here). Metal keeps the view (see `LlamaStage`)."""
    return mx.contiguous(w.T)


class Dense:
    """x @ w for a float weight, stored as `t` lays it out (see `in_out`)."""

    def __init__(self, w: mx.array, bias: mx.array | None = None, t=in_out):
        self.w, self.bias = t(w), bias

    def __call__(self, x: mx.array) -> mx.array:
        return self.run(self.parameters(), x)

    def key(self):
        return ("dense", self.bias is not None)

    def run(self, p, x):
        y = x @ p[0]
        return y + p[1] if len(p) > 1 else y

    def parameters(self) -> list[mx.array]:
        return [self.w] + ([self.bias] if self.bias is not None else [])


class Stacked:
    """Projections that cannot be one matrix (quantized differently): outputs side by side."""

    def __init__(self, parts, bias=None):
        self.parts, self.bias = parts, bias

    def __call__(self, x):
        y = mx.concatenate([p(x) for p in self.parts], axis=-1)
        return y if self.bias is None else y + self.bias

    def key(self):
        return None  # not compiled

    def parameters(self):
        return [a for p in self.parts for a in p.parameters()] + ([self.bias] if self.bias is not None else [])


def projection(ws: list, dtype, bias=None, t=in_out):
    """One linear layer over the rows of `ws` stacked: float arrays or QuantTensors."""
    if all(isinstance(w, mx.array) for w in ws):
        return Dense(mx.concatenate(ws) if len(ws) > 1 else ws[0], bias, t)
    fused = concat_rows(ws)
    if fused is not None:
        return QuantLinear(fused, dtype, bias)
    return Stacked([projection([w], dtype, None, t) for w in ws], bias)


class Attention:
    def __init__(self, cfg: ModelConfig, w: dict, p: str, rope_freqs: mx.array, dtype, compiled_graphs: dict,
                 t=in_out):
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.rope_freqs = rope_freqs
        bqkv = mx.concatenate([w[p + f"{x}_proj.bias"] for x in "qkv"]) if cfg.attention_bias else None
        self.qkv = projection([w.pop(p + f"{x}_proj.weight") for x in "qkv"], dtype, bqkv, t)  # fused q/k/v
        self.o = projection([w.pop(p + "o_proj.weight")], dtype, w.get(p + "o_proj.bias"), t)
        # decode steps run the projection, RoPE and the cache rows' layout as one compiled graph
        # (a 16-row step of SmolLM2 on the CPU backend: 0.93x the time); one graph per batch size,
        # so prefill, whose every prompt length would be another, runs it as it is
        dims = (self.n_heads, self.n_kv, self.head_dim)
        self._pre = functools.partial(_project_rotate, self.qkv, dims)
        self._pre_decode = compiled(compiled_graphs, ("pre", self.qkv.key(), dims), self._pre)

    def __call__(self, x: mx.array, positions: mx.array, plan: BatchSlots, keys: mx.array,
                 values: mx.array) -> mx.array:
        """keys/values: this layer's paged cache, head-major (n_kv * slots, head_dim), written in place."""
        qd = self.n_heads * self.head_dim
        q, k, v, krows, vrows = (self._pre_decode if plan.all_decode else self._pre)(
            x, positions, self.qkv.parameters(), self.rope_freqs)
        keys[plan.write] = krows  # head-major rows (see ..cache)
        values[plan.write] = vrows
        outs = []
        if plan.decode_rows is not None:  # every one-token row in one call, read through its slots
            qs = q if plan.all_decode else q[plan.decode_rows]  # (B, heads, 1, head_dim)
            ks, vs = keys[plan.decode_index], values[plan.decode_index]  # (B, n_kv, Lmax, head_dim)
            o = mx.fast.scaled_dot_product_attention(qs, ks, vs, scale=self.scale, mask=plan.decode_mask)
            outs.append(o.reshape(-1, qd))
        for start, length, slots in plan.prefill:
            qs = q[start : start + length].reshape(1, length, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
            if slots is None:  # a first chunk: its own rows
                ks = k[start : start + length][None].transpose(0, 2, 1, 3)
                vs = v[start : start + length][None].transpose(0, 2, 1, 3)
            else:  # a later chunk, or one after a cached prefix: everything before it too
                ks, vs = keys[slots], values[slots]  # (1, n_kv, offset + length, head_dim)
            o = mx.fast.scaled_dot_product_attention(qs, ks, vs, scale=self.scale, mask="causal")
            outs.append(o.transpose(0, 2, 1, 3).reshape(length, qd))
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs)
        if plan.inverse is not None:  # decode rows first, then the chunks: back to batch order
            out = out[plan.inverse]
        return self.o(out)


def _project_rotate(qkv, dims, x, positions, qkv_params, freqs):
    """q (N, heads, 1, head_dim) and k, v (N, n_kv, head_dim), rotated at each row's position, and
    k, v as head-major cache rows (see ..cache)."""
    n_heads, n_kv, head_dim = dims
    n, qd, kd = x.shape[0], n_heads * head_dim, n_kv * head_dim
    y = qkv.run(qkv_params, x) if qkv.key() is not None else qkv(x)
    q, k, v = mx.split(y, [qd, qd + kd], axis=-1)
    rope = lambda t, h: mx.fast.rope(t.reshape(n, h, 1, head_dim), head_dim, traditional=False,  # noqa: E731
                                     base=None, scale=1.0, offset=positions, freqs=freqs)
    q, k = rope(q, n_heads), rope(k, n_kv)
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


class Block:
    def __init__(self, cfg: ModelConfig, w: dict, i: int, rope_freqs: mx.array, mlps: dict, t=in_out):
        p = f"model.layers.{i}."
        self.eps = cfg.rms_norm_eps
        self.attn_norm = w[p + "input_layernorm.weight"]
        self.mlp_norm = w[p + "post_attention_layernorm.weight"]
        dtype = self.attn_norm.dtype
        self.attn = Attention(cfg, w, p + "self_attn.", rope_freqs, dtype, mlps, t)
        self.gate_up = projection([w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")], dtype, None, t)
        self.down = projection([w.pop(p + "mlp.down_proj.weight")], dtype, None, t)
        self.mlp = compiled_mlp(self.gate_up, self.down, self.eps, mlps)
        self.mlp_weights = (self.gate_up.parameters(), self.down.parameters())  # the compiled graph's inputs

    def parameters(self) -> list[mx.array]:
        return [self.attn_norm, self.mlp_norm] + [
            a for lin in (self.attn.qkv, self.attn.o, self.gate_up, self.down) for a in lin.parameters()]

    def __call__(self, x, positions, plan, keys, values):
        x = x + self.attn(mx.fast.rms_norm(x, self.attn_norm, self.eps), positions, plan, keys, values)
        return self.mlp(x, self.mlp_norm, *self.mlp_weights)


def compiled_mlp(gate_up, down, eps: float, cache: dict):
    """Norm, gate/up, SiLU-gate, down and the residual as one compiled graph (fewer kernels and
    dispatches), taking the weights as inputs: one graph per kind of layers (float, or quantized at
    given bits and group size), shared by every layer of that kind in the stage."""
    key = (gate_up.key(), down.key(), eps)
    if None in key[:2]:  # projections of mixed schemes: run as they are
        return lambda x, norm, gu, dn: x + down(_swiglu(gate_up(mx.fast.rms_norm(x, norm, eps))))

    def mlp(x, norm, gu, dn):
        return x + down.run(dn, _swiglu(gate_up.run(gu, mx.fast.rms_norm(x, norm, eps))))

    return compiled(cache, ("mlp", *key), mlp)


def _swiglu(gate_up: mx.array) -> mx.array:
    gate, up = mx.split(gate_up, 2, axis=-1)
    return gate * mx.sigmoid(gate) * up


class LlamaStage:
    """Layers [first, last]; the embedding on the first stage, norm and head on the last."""

    def __init__(self, cfg: ModelConfig, w: dict[str, mx.array], first: int, last: int, rope_freqs: mx.array,
                 t=in_out):
        """`t` turns an (out, in) weight into the right operand of `x @ w`: `in_out` (a contiguous copy)
        on the CPU; on Metal the stage passes a plain transposed view, the layout mlx-lm uses and
        MLX's GPU kernels are tuned for (not measured here: no Mac)."""
        self.eps = cfg.rms_norm_eps
        is_last = last == cfg.num_hidden_layers - 1
        # compiled per stage, not at import: MLX keeps compiled graphs per thread, and a thread that
        # ends holding one while Python finalizes aborts the process in its destructor (which takes
        # the GIL). Dropped with the stage, on the thread that ran it, the graphs go with it.
        self.compiled_mlps: dict = {}
        emb = w.get("model.embed_tokens.weight")
        dtype = w[f"model.layers.{first}.input_layernorm.weight"].dtype
        q_emb = QuantEmbedding(emb, dtype) if isinstance(emb, QuantTensor) else None
        self.embed = (q_emb if q_emb is not None else emb) if first == 0 else None
        # projections are fused/re-laid copies: each layer is evaluated as it is built and its
        # originals popped from `w`, so loading never holds two copies of more than one layer
        self.layers = []
        for i in range(first, last + 1):
            self.layers.append(Block(cfg, w, i, rope_freqs, self.compiled_mlps, t))
            mx.eval(self.layers[-1].parameters())
        self.norm = w["model.norm.weight"] if is_last else None
        self.lm_head = None
        if is_last and "lm_head.weight" in w:
            self.lm_head = projection([w["lm_head.weight"]], dtype, None, t)
        elif is_last:  # tied embeddings: the head is the embedding matrix (float: a copy in the (in, out) layout)
            self.lm_head = q_emb if q_emb is not None else Dense(emb, None, t)

    def __call__(self, x, positions: mx.array, plan: BatchSlots, kv: PagedKV, sample_rows=None):
        """x: (N,) token ids on the first stage, else (N, hidden); positions: (N,) of every row."""
        if self.embed is not None:
            x = self.embed[x]
        for j, layer in enumerate(self.layers):
            x = layer(x, positions, plan, kv.keys[j], kv.values[j])
        if self.lm_head is None:
            return x
        # only the rows that sample reach the head: never a (N, vocab) array
        return self.lm_head(mx.fast.rms_norm(x[sample_rows], self.norm, self.eps)).astype(mx.float32)

    def parameters(self) -> list[mx.array]:
        ends = [a for a in (self.embed, self.lm_head) if a is not None]
        out = [a for e in ends for a in (e.parameters() if hasattr(e, "parameters") else [e])]
        return out + ([self.norm] if self.norm is not None else []) + [a for b in self.layers for a in b.parameters()]


StageModel = LlamaStage
