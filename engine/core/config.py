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

# model_type -> module name under backends/<x>_stage/models/. Mistral and Qwen2 are Llama with
# flags (qwen2: bias on q/k/v), so they share the llama file.
MODEL_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama"}

ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu",)


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
    # attention limited to the last `sliding_window` positions on some layers; no backend applies
    # it yet, so requests that would reach past it are refused (`Engine`), and shorter ones are exact
    sliding_window: int | None = None
    # a quantized checkpoint's scheme (`quant.py`); None for a float checkpoint
    quantization: QuantScheme | None = None

    def __post_init__(self):
        check_family(self.model_type)
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError("num_attention_heads must be a multiple of num_key_value_heads")
        rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise UserError(f"unsupported rope scaling {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")

    @property
    def family(self) -> str:
        return MODEL_FAMILIES[self.model_type]

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        model_type = check_family(d.get("model_type"))
        refuse_unimplemented(d)
        heads = d["num_attention_heads"]
        # transformers 5 writes `rope_parameters` (holding rope_theta); older files a top-level
        # `rope_theta` and an optional `rope_scaling`.
        rope = dict(d.get("rope_parameters") or {})
        scaling = dict(d.get("rope_scaling") or rope)
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling.pop("rope_theta", None)
        if scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            scaling = {}
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            vocab_size=d["vocab_size"],
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # qwen2 always has q/k/v bias; llama says so with `attention_bias`
            attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
            eos_token_ids=eos_ids,
            sliding_window=_sliding_window(d),
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


def _sliding_window(d: dict) -> int | None:
    """The window some layer attends within, as transformers applies it (None: every layer is global)."""
    window = d.get("sliding_window")
    if not window:
        return None
    if d.get("model_type") == "qwen2":  # qwen2 writes a window but applies it only when asked to
        layer_types = d.get("layer_types") or []
        if not d.get("use_sliding_window") and "sliding_attention" not in layer_types:
            return None
    return int(window)


def _rope_type(d: dict) -> str:
    sc = d.get("rope_scaling") or d.get("rope_parameters") or {}
    return sc.get("rope_type", sc.get("type", "default"))


# config keys whose other values no backend implements yet: key -> (is the value implemented, what is)
_IMPLEMENTED = {
    "mlp_bias": (lambda v: not v, "false"),
    "hidden_act": (lambda v: v in ACTIVATIONS, " or ".join(ACTIVATIONS)),
    "partial_rotary_factor": (lambda v: v in (None, 1, 1.0), "1.0"),
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


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies, (head_dim // 2,) float32, with the config's scaling folded in.

    Matches transformers' `ROPE_INIT_FUNCTIONS` for default, linear and llama3 rope types.
    """
    dim = cfg.head_dim
    inv = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    inv = inv.astype(np.float32)
    sc = cfg.rope_scaling
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
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
