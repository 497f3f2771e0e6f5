"""Model configuration, read once from a Hugging Face `config.json`, shared by every backend.

Only framework-neutral facts live here: sizes, the RoPE frequencies (numpy), and which model
families the backends know. Backends build their layers from a `ModelConfig`. A config that asks
for something no backend implements is refused here, naming the key: it is never run wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .quant import QuantScheme

# model_type -> module name under backends/<x>_stage/models/. Families that are Llama with flags
# share its file: mistral (sliding window), qwen2 (q/k/v bias), qwen3 (q/k norms), phi3 (fused
# q/k/v and gate/up tensors, LongRoPE). Gemma 2 and 3 (sandwich norms, soft-capping, embedding
# scale, GELU) share one; Mixtral and Qwen3-MoE (routed experts) another.
MODEL_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "phi3": "llama",
                  "gemma2": "gemma", "gemma3_text": "gemma", "mixtral": "moe", "qwen3_moe": "moe"}

ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# config value -> the name the backends know it by
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass(frozen=True, slots=True)
class MoE:
    """Routed experts: each token's MLP is the weighted sum of its `top_k` of `n_experts` MLPs."""

    n_experts: int
    top_k: int
    norm_topk: bool  # the top-k weights renormalized to sum to 1 (mixtral always; qwen3_moe when asked)
    intermediate_size: int  # each expert's (qwen3_moe: moe_intermediate_size; dense layers keep the model's)
    dense_layers: tuple[int, ...] = ()  # layers with a plain MLP instead (qwen3_moe's mlp_only_layers)

    def routed(self, layer: int) -> bool:
        return layer not in self.dense_layers


@dataclass(slots=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()
    mlp_bias: bool = False
    hidden_act: str = "silu"  # a value of ACTIVATIONS
    qk_norm: bool = False  # RMS norms over each head of q and k before RoPE (qwen3, gemma3)
    # the window of positions each layer attends within (None: all of them); `sliding_window` the largest
    layer_windows: tuple[int | None, ...] = ()
    sliding_window: int | None = None
    attn_scale: float = 0.0  # the softmax scale (0: head_dim ** -0.5)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (gemma2)
    final_softcap: float | None = None  # the same on the logits
    embed_scale: float | None = None  # embeddings times this (gemma: sqrt(hidden_size))
    sandwich_norms: bool = False  # norms after attention and after the MLP too (gemma)
    norm_offset: float = 0.0  # norms multiply by (offset + weight) (gemma: 1)
    local_rope_theta: float | None = None  # RoPE base of the windowed layers, unscaled (gemma3)
    rope_attention_factor: float = 1.0  # q and k scaled after RoPE (LongRoPE's attention factor)
    # positions past this are refused, never run wrong (LongRoPE's long factors are not implemented)
    context_limit: int | None = None
    moe: MoE | None = None
    # a quantized checkpoint's scheme (`quant.py`); None for a float checkpoint
    quantization: QuantScheme | None = None

    def __post_init__(self):
        check_family(self.model_type)
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError("num_attention_heads must be a multiple of num_key_value_heads")
        rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise UserError(f"unsupported rope scaling {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if not self.layer_windows:
            self.layer_windows = (self.sliding_window,) * self.num_hidden_layers
        if not self.attn_scale:
            self.attn_scale = self.head_dim**-0.5

    def windows(self, first: int, last: int) -> list[int | None]:
        """The distinct attention windows of layers [first, last] (None: attends to all)."""
        return sorted(set(self.layer_windows[first : last + 1]), key=lambda w: w or 0)

    def local_rope(self, layer: int) -> bool:
        """Whether `layer` rotates with the windowed layers' own RoPE base (gemma3)."""
        return self.local_rope_theta is not None and self.layer_windows[layer] is not None

    @property
    def family(self) -> str:
        return MODEL_FAMILIES[self.model_type]

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        model_type = check_family(d.get("model_type"))
        refuse_unimplemented(d)
        heads = d["num_attention_heads"]
        theta, scaling, local_theta = _rope(d)
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        gemma = model_type.startswith("gemma")
        windows = _layer_windows(d)
        limit, factor = None, 1.0
        if scaling.get("rope_type", scaling.get("type")) == "longrope":
            limit, factor = _longrope(d, scaling)
        return cls(
            model_type=model_type,
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            vocab_size=d["vocab_size"],
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            # qwen2 always has q/k/v bias; llama says so with `attention_bias`
            attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
            eos_token_ids=eos_ids,
            mlp_bias=bool(d.get("mlp_bias", False)),
            hidden_act=ACTIVATIONS[_activation(d)],
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            layer_windows=windows,
            sliding_window=max((w for w in windows if w), default=None),
            attn_scale=float(d["query_pre_attn_scalar"]) ** -0.5 if gemma else head_dim**-0.5,
            attn_softcap=d.get("attn_logit_softcapping") if gemma else None,
            final_softcap=d.get("final_logit_softcapping") if gemma else None,
            embed_scale=float(d["hidden_size"]) ** 0.5 if gemma else None,
            sandwich_norms=gemma,
            norm_offset=1.0 if gemma else 0.0,
            local_rope_theta=local_theta,
            rope_attention_factor=factor,
            context_limit=limit,
            moe=_moe(d, model_type),
            quantization=QuantScheme.from_config(d),
        )

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise UserError(f"no model at {model_dir}: {path.name} not found (run `hetpipe fetch smollm2`?)")
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
        try:
            return cls.from_dict(d)
        except KeyError as e:
            raise UserError(f"{path}: missing field {e}") from None


def check_family(model_type) -> str:
    if model_type not in MODEL_FAMILIES:
        raise UserError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(MODEL_FAMILIES))}")
    return model_type


def _activation(d: dict) -> str:
    return d.get("hidden_activation") or d.get("hidden_act") or "silu"


def _layer_windows(d: dict) -> tuple[int | None, ...]:
    """Each layer's attention window as transformers applies it (None: the layer attends to all)."""
    n, window = d["num_hidden_layers"], d.get("sliding_window")
    types = d.get("layer_types")
    if types and (len(types) != n or set(types) - {"sliding_attention", "full_attention"}):
        raise UserError(f"config.json sets layer_types {json.dumps(types)[:60]}, which hetpipe does not "
                        "implement (supported: one of sliding_attention or full_attention per layer)")
    if not window:
        return (None,) * n
    if d.get("model_type") in ("qwen2", "qwen3", "qwen3_moe"):  # a window written, applied only when asked
        if not d.get("use_sliding_window") and "sliding_attention" not in (types or []):
            return (None,) * n
        if not types:  # the first max_window_layers layers attend to all
            first = d.get("max_window_layers", n)
            return tuple(None if i < first else int(window) for i in range(n))
    if types:
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    if d.get("model_type") == "gemma2":  # older files: every other layer, from the first
        return tuple(int(window) if i % 2 == 0 else None for i in range(n))
    if d.get("model_type") == "gemma3_text":  # older files: every sliding_window_pattern-th layer is global
        pattern = d.get("sliding_window_pattern", 6)
        return tuple(None if (i + 1) % pattern == 0 else int(window) for i in range(n))
    return (int(window),) * n


def _rope(d: dict) -> tuple[float, dict, float | None]:
    """(theta, scaling of the global layers, theta of the windowed layers where they have their own).

    transformers 5 writes `rope_parameters` (holding rope_theta; gemma3 one dict per layer type);
    older files a top-level `rope_theta`, an optional `rope_scaling` and gemma3's `rope_local_base_freq`."""
    rope = dict(d.get("rope_parameters") or {})
    local = None
    if "full_attention" in rope or "sliding_attention" in rope:
        local = rope.get("sliding_attention", {}).get("rope_theta")
        local_type = rope.get("sliding_attention", {}).get("rope_type", "default")
        if local_type != "default":
            raise UserError(f"config.json sets rope scaling {local_type!r} on sliding layers, which hetpipe does "
                            "not implement yet (supported: default)")
        rope = dict(rope.get("full_attention", {}))
    local = d.get("rope_local_base_freq", local)
    scaling = dict(d.get("rope_scaling") or rope)
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    for k in ("rope_theta", "partial_rotary_factor"):
        scaling.pop(k, None)
    if scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = {}
    return theta, scaling, None if local is None else float(local)


def _longrope(d: dict, sc: dict) -> tuple[int, float]:
    """(positions up to which LongRoPE's short factors apply, its attention factor), as transformers."""
    original = sc.get("original_max_position_embeddings") or d.get("original_max_position_embeddings") \
        or d.get("max_position_embeddings", 4096)
    factor = sc.get("factor") or d.get("max_position_embeddings", original) / original
    attention = sc.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return int(original), float(attention)


def _moe(d: dict, model_type: str) -> MoE | None:
    if model_type not in ("mixtral", "qwen3_moe"):
        return None
    n = d.get("num_local_experts") or d.get("num_experts")
    step = d.get("decoder_sparse_step", 1) or 1
    dense = set(d.get("mlp_only_layers") or [])
    dense |= {i for i in range(d["num_hidden_layers"]) if (i + 1) % step}
    return MoE(n_experts=int(n), top_k=int(d["num_experts_per_tok"]),
               norm_topk=model_type == "mixtral" or bool(d.get("norm_topk_prob")),
               intermediate_size=int(d.get("moe_intermediate_size") or d["intermediate_size"]),
               dense_layers=tuple(sorted(dense)))


def _rope_type(d: dict) -> str:
    sc = d.get("rope_scaling") or d.get("rope_parameters") or {}
    sc = sc.get("full_attention", sc)
    return sc.get("rope_type", sc.get("type", "default"))


# config keys whose other values no backend implements yet: key -> (is the value implemented, what is)
_IMPLEMENTED = {
    "hidden_act": (lambda v: v in ACTIVATIONS, " or ".join(ACTIVATIONS)),
    "hidden_activation": (lambda v: v in ACTIVATIONS, " or ".join(ACTIVATIONS)),
    "partial_rotary_factor": (lambda v: v in (None, 1, 1.0), "1.0"),
    "use_bidirectional_attention": (lambda v: not v, "false"),
    "router_jitter_noise": (lambda v: True, "any: it applies in training only"),
    "shared_expert_intermediate_size": (lambda v: not v, "0"),
}


def refuse_unimplemented(d: dict) -> None:
    """One clear line naming the first key of `d` that asks for what no backend implements."""
    for key, (ok, supported) in _IMPLEMENTED.items():
        value = d.get(key, (d.get("rope_parameters") or {}).get(key))
        if value is not None and not ok(value):
            raise UserError(f"config.json sets {key}: {json.dumps(value)[:60]}, which hetpipe does not implement "
                            f"yet (supported: {supported})")
    if _rope_type(d) not in ROPE_TYPES:
        raise UserError(f"config.json sets rope scaling {_rope_type(d)!r}, which hetpipe does not implement yet "
                        f"(supported: {', '.join(ROPE_TYPES)})")


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """Inverse RoPE frequencies, (head_dim // 2,) float32, with the config's scaling folded in; `local`:
    those of the windowed layers where they have their own base (`ModelConfig.local_rope`).

    Matches transformers' `ROPE_INIT_FUNCTIONS` for default, linear, llama3 and (short-factor) longrope.
    """
    dim = cfg.head_dim
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    inv = 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    inv = inv.astype(np.float32)
    sc = {} if local else cfg.rope_scaling
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "longrope":  # 1 / (short_factor * theta ** (2i / dim)), as transformers computes it
        shape = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        inv = 1.0 / (np.asarray(sc["short_factor"], np.float32) * np.float32(theta) ** shape)
    elif kind == "linear":
        inv = inv / np.float32(sc["factor"])
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)
