"""Models at the widths big-model users run, with random weights made in memory (no files): what
`hetpipe bench backends --shape` times. A few layers and the head of Llama-3-8B, Llama-3-70B or
Qwen3-30B-A3B measure what one layer and the head cost at those widths, where a decode step is bound
by reading the weights; the values are random, so only speed and memory mean anything.

A `ShapeModel` stands where a model directory would: `weights.load_stage_tensors` asks it for a
stage's tensors, already in the layout loading builds (a MoE layer's experts stacked; quantized
weights as `QuantTensor`s of random codes at the bits and group size asked for).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .errors import UserError
from .quant import QuantScheme, QuantTensor, check_scheme
from .tensors import TypedArray

_LLAMA3 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "vocab_size": 128256, "tie_word_embeddings": False, "head_dim": 128,
           "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}
SHAPES = {
    "llama-3-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                   "num_key_value_heads": 8},
    "llama-3-70b": {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                    "num_key_value_heads": 8},
    "qwen3-30b-a3b": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_act": "silu",
                      "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                      "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
                      "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1e6, "vocab_size": 151936,
                      "tie_word_embeddings": False, "max_position_embeddings": 40960, "torch_dtype": "bfloat16"},
}
_BLOCK = 1 << 20  # random values made once and tiled: a weight of any size is filled at copy speed


@dataclass(frozen=True)
class ShapeModel:
    name: str  # one of SHAPES
    layers: int = 2  # layers made (the model's first ones; the last of them is followed by the head)
    bits: int | None = None  # quantized: every 2-D weight at these bits and group size, as `hetpipe quantize`
    group_size: int | None = None

    def __post_init__(self):
        if self.name not in SHAPES:
            raise UserError(f"unknown shape {self.name!r}: one of {', '.join(SHAPES)}")
        if not 1 <= self.layers <= 8:
            raise UserError("a shape is timed on 1 to 8 layers")
        if self.bits is not None:
            check_scheme(self.bits, self.group_size)

    @property
    def spec(self) -> str:
        """What a worker process is told: `shape:NAME:LAYERS[:BITS:GROUP]` (`parse` reads it)."""
        return f"shape:{self.name}:{self.layers}" + (f":{self.bits}:{self.group_size}" if self.bits else "")

    @classmethod
    def parse(cls, spec: str) -> ShapeModel:
        _, name, layers, *quant = spec.split(":")
        return cls(name, int(layers), *(int(q) for q in quant))

    def __str__(self) -> str:
        layers = f"{self.layers} layer" + ("s" if self.layers > 1 else "")
        return f"{self.name} ({layers}" + (f", {self.bits}-bit g{self.group_size})" if self.bits else ")")

    @property
    def config(self) -> ModelConfig:
        d = {**SHAPES[self.name], "num_hidden_layers": self.layers}
        if self.bits:
            d["quantization"] = QuantScheme(self.bits, self.group_size).to_config()
        return ModelConfig.from_dict(d)

    def stage_tensors(self, first: int, last: int) -> dict:
        """Layers [first, last] (and the embedding on the first stage, norm and head on the last)."""
        cfg, rng = self.config, np.random.default_rng(first)
        block = (rng.standard_normal(_BLOCK) * 0.02).astype(np.float32)
        block16 = TypedArray.from_float32(block, "bfloat16").data
        H, hd, V = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
        out = {}

        def weight(name: str, *shape: int) -> None:  # the last two axes (out, in); a leading one: experts
            out[name] = self._weight(block, block16, rng, shape)

        for i in range(first, last + 1):
            p = f"model.layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                out[p + norm + ".weight"] = TypedArray(np.ones(H, np.float32), "float32")
            weight(p + "self_attn.q_proj.weight", cfg.num_attention_heads * hd, H)
            weight(p + "self_attn.k_proj.weight", cfg.num_key_value_heads * hd, H)
            weight(p + "self_attn.v_proj.weight", cfg.num_key_value_heads * hd, H)
            weight(p + "self_attn.o_proj.weight", H, cfg.num_attention_heads * hd)
            if cfg.qk_norm:
                for norm in ("q_norm", "k_norm"):
                    out[p + f"self_attn.{norm}.weight"] = TypedArray(np.ones(hd, np.float32), "float32")
            if cfg.moe is not None:  # stacked as loading stacks them (`experts.py`)
                E, inter = cfg.moe.n_experts, cfg.moe.intermediate_size
                weight(p + "mlp.gate.weight", E, H)
                weight(p + "mlp.experts.gate_up_proj", E, 2 * inter, H)
                weight(p + "mlp.experts.down_proj", E, H, inter)
            else:
                weight(p + "mlp.gate_proj.weight", cfg.intermediate_size, H)
                weight(p + "mlp.up_proj.weight", cfg.intermediate_size, H)
                weight(p + "mlp.down_proj.weight", H, cfg.intermediate_size)
        if first == 0:
            weight("model.embed_tokens.weight", V, H)
        if last == cfg.num_hidden_layers - 1:
            out["model.norm.weight"] = TypedArray(np.ones(H, np.float32), "float32")
            weight("lm_head.weight", V, H)
        return out

    def _weight(self, block: np.ndarray, block16: np.ndarray, rng, shape: tuple[int, ...]):
        if self.bits is None:  # bfloat16, as the models these shapes stand for ship (and at half float32's memory)
            return TypedArray(np.resize(block16, shape), "bfloat16")
        *lead, n, k = shape
        groups = (*lead, n, k // self.group_size)
        codes = rng.integers(0, 1 << 32, (*lead, n, k * self.bits // 32), dtype=np.uint32)
        # float16 scales and biases, as a GGUF file's Q4_0/Q4_1/Q8_0 blocks hold them
        scales = np.resize(np.abs(block) * 0.01 + 1e-3, groups).astype(np.float16)
        biases = np.resize(block, groups).astype(np.float16)
        return QuantTensor(codes, TypedArray(scales, "float16"), TypedArray(biases, "float16"), self.bits,
                           self.group_size)
