"""Llama-family layers in MLX (llama, mistral, qwen2): a contiguous slice of the model.

Uses only `mx.fast.*` kernels and plain array ops, so the same code runs on Metal and on the
CPU. Rows of all sequences are flattened for the projections; attention runs per sequence.
"""

from __future__ import annotations

import mlx.core as mx

from engine.core.config import ModelConfig

from ..cache import KVCache


def in_out(w: mx.array) -> mx.array:
    """A weight stored (out, in) as the (in, out) operand of `x @ w`, copied contiguous: a plain
    row-major matrix multiplies ~1.4x faster than the transposed view on the CPU backend (OpenBLAS
    GEMV, measured on every projection of SmolLM2 here). Metal keeps the view (see `LlamaStage`)."""
    return mx.contiguous(w.T)


class Attention:
    def __init__(self, cfg: ModelConfig, w: dict[str, mx.array], p: str, rope_freqs: mx.array, t=in_out):
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.rope_freqs = rope_freqs
        # fused q/k/v, stored transposed (in, out) for x @ w
        self.wqkv = t(mx.concatenate([w.pop(p + f"{x}_proj.weight") for x in "qkv"]))
        self.bqkv = mx.concatenate([w[p + f"{x}_proj.bias"] for x in "qkv"]) if cfg.attention_bias else None
        self.wo = t(w.pop(p + "o_proj.weight"))
        self.bo = w.get(p + "o_proj.bias")

    def __call__(self, x: mx.array, segments, caches: list[KVCache]) -> mx.array:
        qd, kd = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        qkv = x @ self.wqkv
        if self.bqkv is not None:
            qkv = qkv + self.bqkv
        q, k, v = mx.split(qkv, [qd, qd + kd], axis=-1)
        outs = []
        for (start, length, offset), cache in zip(segments, caches):
            # (1, heads, T, head_dim)
            qs = q[start : start + length].reshape(1, length, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
            ks = k[start : start + length].reshape(1, length, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
            vs = v[start : start + length].reshape(1, length, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
            qs = mx.fast.rope(qs, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset,
                              freqs=self.rope_freqs)
            ks = mx.fast.rope(ks, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset,
                              freqs=self.rope_freqs)
            keys, values = cache.update_and_fetch(ks, vs)
            o = mx.fast.scaled_dot_product_attention(qs, keys, values, scale=self.scale,
                                                     mask="causal" if length > 1 else None)
            outs.append(o.transpose(0, 2, 1, 3).reshape(length, qd))
        out = (mx.concatenate(outs) if len(outs) > 1 else outs[0]) @ self.wo
        return out + self.bo if self.bo is not None else out


class Block:
    def __init__(self, cfg: ModelConfig, w: dict[str, mx.array], i: int, rope_freqs: mx.array, mlp, t=in_out):
        p = f"model.layers.{i}."
        self.mlp = mlp
        self.eps = cfg.rms_norm_eps
        self.attn_norm = w[p + "input_layernorm.weight"]
        self.mlp_norm = w[p + "post_attention_layernorm.weight"]
        self.attn = Attention(cfg, w, p + "self_attn.", rope_freqs, t)
        self.w_gate_up = t(mx.concatenate([w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")]))
        self.w_down = t(w.pop(p + "mlp.down_proj.weight"))

    def parameters(self) -> list[mx.array]:
        out = [self.attn_norm, self.mlp_norm, self.attn.wqkv, self.attn.wo, self.w_gate_up, self.w_down]
        return out + [a for a in (self.attn.bqkv, self.attn.bo) if a is not None]

    def __call__(self, x, segments, caches):
        x = x + self.attn(mx.fast.rms_norm(x, self.attn_norm, self.eps), segments, caches)
        return self.mlp(x, self.mlp_norm, self.w_gate_up, self.w_down, self.eps)


def mlp(x, norm, w_gate_up, w_down, eps):
    """Norm, gate/up, SiLU-gate, down and the residual as one compiled graph (fewer kernels and dispatches)."""
    gate, up = mx.split(mx.fast.rms_norm(x, norm, eps) @ w_gate_up, 2, axis=-1)
    return x + (gate * mx.sigmoid(gate) * up) @ w_down


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
        self.compiled_mlp = mx.compile(mlp)
        self.embed = w["model.embed_tokens.weight"] if first == 0 else None
        # projections are fused/re-laid copies: each layer is evaluated as it is built and its
        # originals popped from `w`, so loading never holds two copies of more than one layer
        self.layers = []
        for i in range(first, last + 1):
            self.layers.append(Block(cfg, w, i, rope_freqs, self.compiled_mlp, t))
            mx.eval(self.layers[-1].parameters())
        self.norm = w["model.norm.weight"] if is_last else None
        # tied embeddings: the head is the embedding matrix (a copy in the (in, out) layout)
        self.lm_head = t(w.get("lm_head.weight", w.get("model.embed_tokens.weight"))) if is_last else None

    def __call__(self, x, segments, caches: list[list[KVCache]], sample_rows=None):
        """x: (N,) token ids on the first stage, else (N, hidden). caches[seq][layer]."""
        if self.embed is not None:
            x = self.embed[x]
        for j, layer in enumerate(self.layers):
            x = layer(x, segments, [c[j] for c in caches])
        if self.lm_head is None:
            return x
        # only the rows that sample reach the head: never a (N, vocab) array
        return (mx.fast.rms_norm(x[sample_rows], self.norm, self.eps) @ self.lm_head).astype(mx.float32)

    def parameters(self) -> list[mx.array]:
        return [a for a in (self.embed, self.norm, self.lm_head) if a is not None] + [
            a for b in self.layers for a in b.parameters()]


StageModel = LlamaStage
