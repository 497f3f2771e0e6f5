"""A lean torch generation loop for Llama-family checkpoints: the yardstick for hetpipe's own path.

What a careful engineer writes in ~100 lines (gpt-fast's manner): weights cast once, q/k/v and
gate/up fused into one matmul each, a static KV cache, `F.scaled_dot_product_attention` with GQA,
`F.rms_norm`, greedy decoding, everything on the one thread that loaded it. No batching, no
serving, no stages: `examples/bench_model_core.py` runs it beside `hetpipe generate`'s own path.

    python examples/lean_torch_loop.py MODEL_DIR [--dtype bfloat16] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


class LeanLlama:
    def __init__(self, model_dir: str, dtype: torch.dtype = torch.bfloat16, max_len: int = 2048):
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        w = {k: v.to(dtype) for k, v in load_file(str(Path(model_dir) / "model.safetensors")).items()}
        self.n, self.h = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        self.kv, self.eps = cfg["num_key_value_heads"], cfg["rms_norm_eps"]
        self.hd = cfg.get("head_dim") or cfg["hidden_size"] // self.h
        theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
        p = "model.layers.{}."
        self.layers = [dict(
            qkv=torch.cat([w[p.format(i) + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
            o=w[p.format(i) + "self_attn.o_proj.weight"],
            gate_up=torch.cat([w[p.format(i) + f"mlp.{x}_proj.weight"] for x in ("gate", "up")]),
            down=w[p.format(i) + "mlp.down_proj.weight"],
            ln1=w[p.format(i) + "input_layernorm.weight"], ln2=w[p.format(i) + "post_attention_layernorm.weight"],
        ) for i in range(self.n)]
        self.embed, self.norm = w["model.embed_tokens.weight"], w["model.norm.weight"]
        self.head = w.get("lm_head.weight", self.embed)
        inv = 1.0 / theta ** (torch.arange(0, self.hd, 2).float() / self.hd)
        freqs = torch.outer(torch.arange(max_len).float(), inv)
        emb = torch.cat([freqs, freqs], -1)
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)
        self.k = torch.zeros(self.n, 1, self.kv, max_len, self.hd, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def rope(self, x, pos):  # x: (1, heads, T, hd)
        cos, sin = self.cos[pos], self.sin[pos]
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """ids: (T,) at positions start..start+T-1; returns the logits of the last position."""
        t = ids.shape[0]
        pos = torch.arange(start, start + t)
        x = F.embedding(ids, self.embed)
        qd, kd = self.h * self.hd, self.kv * self.hd
        for i, L in enumerate(self.layers):
            y = F.rms_norm(x, (x.shape[-1],), L["ln1"], self.eps)
            q, k, v = F.linear(y, L["qkv"]).split([qd, kd, kd], -1)
            q = self.rope(q.view(t, self.h, self.hd).transpose(0, 1)[None], pos)
            k = self.rope(k.view(t, self.kv, self.hd).transpose(0, 1)[None], pos)
            self.k[i, :, :, start:start + t] = k
            self.v[i, :, :, start:start + t] = v.view(t, self.kv, self.hd).transpose(0, 1)[None]
            keys, values = self.k[i, :, :, :start + t], self.v[i, :, :, :start + t]
            a = F.scaled_dot_product_attention(q, keys, values, is_causal=t > 1 and start == 0, enable_gqa=True)
            x = x + F.linear(a[0].transpose(0, 1).reshape(t, qd), L["o"])
            g, u = F.linear(F.rms_norm(x, (x.shape[-1],), L["ln2"], self.eps), L["gate_up"]).chunk(2, -1)
            x = x + F.linear(F.silu(g) * u, L["down"])
        return F.linear(F.rms_norm(x[-1:], (x.shape[-1],), self.norm, self.eps), self.head).float()[0]


def run(model_dir: str, dtype: str, prompt: list[int], long_prompt: list[int], tokens: int) -> dict:
    """Median decode tokens/s (greedy, `tokens` tokens) and TTFT of `long_prompt`, as bench_model_core reports."""
    m = LeanLlama(model_dir, getattr(torch, dtype))

    def generate(ids, n):
        t0 = time.perf_counter()
        tok = int(m.forward(torch.tensor(ids), 0).argmax())
        first = time.perf_counter()
        for i in range(n - 1):
            tok = int(m.forward(torch.tensor([tok]), len(ids) + i).argmax())
        return first - t0, (n - 1) / (time.perf_counter() - first) if n > 1 else math.nan

    generate(prompt, 8)  # warm-up
    rates = sorted(generate(prompt, tokens)[1] for _ in range(3))
    ttft = sorted(generate(long_prompt, 1)[0] * 1000 for _ in range(3))
    return {"decode_tokens_per_s": rates[1], "ttft_512_ms": ttft[1]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    print(json.dumps(run(a.model, a.dtype, [1, 2, 3, 4], list(range(100, 612)), a.tokens)))
