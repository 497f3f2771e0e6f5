"""A GGUF's metadata as the Hugging Face `config.json` transformers writes for the same model.

One reader per llama.cpp architecture, each the inverse of what llama.cpp's `convert_hf_to_gguf.py`
writes for it: `llama` (and Mixtral, which llama.cpp stores as llama with experts), `qwen2`, `qwen3`,
`qwen3moe`, `gemma2`, `gemma3` and `phi3`. Anything those files hold that hetpipe does not run is
refused by its key, never dropped.
"""

from __future__ import annotations

import math

import numpy as np

from ..core.errors import UserError

# GGUF architecture -> (model_type, architectures class); llama with experts becomes mixtral
ARCHS = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
}
MIXTRAL = ("mixtral", "MixtralForCausalLM")
# llama.cpp's own sliding-window patterns where the file does not write one: every n-th layer is global
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
# llama.cpp scales gemma's queries by 1/sqrt(hidden / heads) for the 27B models (by layer count), else
# by 1/sqrt(head_dim): transformers' query_pre_attn_scalar
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32(v) -> float:
    """GGUF stores float32: 9.999999747e-06 is the file's spelling of 1e-05."""
    return float(f"{float(v):.7g}")


def tensor(reader, name: str):
    return next((t for t in reader.tensors if t.name == name), None)


def read_config(reader) -> dict:
    arch = field(reader, "general.architecture")
    if arch not in ARCHS:
        raise UserError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHS)}")
    a = lambda key, default=None: field(reader, f"{arch}.{key}", default)  # noqa: E731
    names = {t.name for t in reader.tensors}
    experts = int(a("expert_count", 0) or 0)
    model_type, class_name = MIXTRAL if arch == "llama" and experts else ARCHS[arch]
    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    head_dim = int(a("attention.key_length", 0) or hidden // heads)
    rotary = int(a("rope.dimension_count", head_dim))
    if arch != "phi3" and not a("attention.key_length"):  # older llama files say head_dim only this way
        head_dim = rotary
    if int(a("attention.value_length", head_dim)) != head_dim:
        raise UserError(f"GGUF sets {arch}.attention.value_length != key_length, which hetpipe does not implement")
    if rotary != head_dim:
        raise UserError(f"GGUF sets {arch}.rope.dimension_count {rotary}, not head_dim {head_dim} (partial rotary), "
                        "which hetpipe does not implement")
    embd = tensor(reader, "token_embd.weight")
    theta = _f32(a("rope.freq_base", 10000.0))
    cfg = {
        "architectures": [class_name],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(a("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        # gemma3's converter drops the embedding's rows past the vocabulary: the rows are the model's
        "vocab_size": int(embd.shape[1]) if embd is not None else len(field(reader, "tokenizer.ggml.tokens")),
        "rms_norm_eps": _f32(a("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(a("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "hidden_act": "silu",
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),  # else a family's default, maybe none
        "torch_dtype": "float32",
    }
    rope = _rope(reader, a, names, theta, head_dim)
    if arch.startswith("gemma"):
        _gemma(cfg, arch, a, rope)
    else:
        # transformers 5 reads rope_parameters; older readers a top-level rope_theta: write both
        cfg["rope_theta"], cfg["rope_parameters"] = theta, rope
        if rope["rope_type"] != "default":
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if arch == "phi3":
        window = int(a("attention.sliding_window", 0) or 0)  # 0: the converter's "none" (Phi-4)
        cfg["sliding_window"] = window or None
        if "original_max_position_embeddings" in rope:
            cfg["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    elif a("attention.sliding_window") and not arch.startswith("gemma"):
        raise UserError(f"GGUF sets {arch}.attention.sliding_window, which hetpipe reads only for gemma and phi3")
    if experts:
        _moe(cfg, arch, a, names)
    return cfg


def _rope(reader, a, names: set, theta: float, head_dim: int) -> dict:
    rope = {"rope_theta": theta, "rope_type": "default"}
    kind = a("rope.scaling.type")
    if kind == "linear":
        rope = {"rope_theta": theta, "rope_type": "linear", "factor": _f32(a("rope.scaling.factor"))}
    elif kind not in (None, "none") and not (kind == "longrope" and "rope_factors_long.weight" in names):
        raise UserError(f"GGUF sets rope.scaling.type {kind!r}, which hetpipe does not implement (supported: linear, "
                        "Llama 3's rope_freqs, Phi-3's LongRoPE factors)")
    original = int(a("rope.scaling.original_context_length", 0) or 0)
    if "rope_freqs.weight" in names:  # Llama 3.1's per-frequency factors
        factors = np.asarray(tensor(reader, "rope_freqs.weight").data, np.float64)
        rope = {"rope_theta": theta, **llama3_scaling(factors, theta, head_dim, original or 8192)}
    if "rope_factors_long.weight" in names:  # Phi-3's LongRoPE
        long, short = (np.asarray(tensor(reader, f"rope_factors_{k}.weight").data, np.float64).tolist()
                       for k in ("long", "short"))
        rope = {"rope_theta": theta, "rope_type": "longrope", "long_factor": long, "short_factor": short,
                "original_max_position_embeddings": original or int(a("context_length"))}
        if a("rope.scaling.attn_factor") is not None:
            rope["attention_factor"] = _f32(a("rope.scaling.attn_factor"))
    return rope


def _gemma(cfg: dict, arch: str, a, rope: dict) -> None:
    """Gemma 2/3: GELU-tanh, sandwich norms (in the tensors), query scale, soft-caps and local windows."""
    n, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    del cfg["hidden_act"]
    cfg["hidden_activation"] = "gelu_pytorch_tanh"
    big = n == _GEMMA_27B_LAYERS[arch]
    scale = a("attention.scale")  # no converter writes it for gemma today; honoured where one does
    cfg["query_pre_attn_scalar"] = (_f32(float(scale) ** -2) if scale else
                                    cfg["hidden_size"] // heads if big else cfg["head_dim"])
    cfg["attn_logit_softcapping"] = _f32(a("attn_logit_softcapping")) if a("attn_logit_softcapping") else None
    cfg["final_logit_softcapping"] = _f32(a("final_logit_softcapping")) if a("final_logit_softcapping") else None
    window = int(a("attention.sliding_window", 0) or 0)
    pattern = a("attention.sliding_window_pattern", _SWA_PATTERN[arch])
    if isinstance(pattern, list):  # one flag per layer: true = windowed
        sliding = [bool(p) for p in pattern]
    else:  # llama.cpp's set_swa_pattern(n): the last of every n layers is global
        sliding = [int(pattern) == 0 or i % int(pattern) < int(pattern) - 1 for i in range(n)]
    cfg["sliding_window"] = window or None
    cfg["layer_types"] = ["sliding_attention" if s and window else "full_attention" for s in sliding]
    if arch == "gemma2":
        cfg["rope_parameters"] = rope
        return
    local = {"rope_type": "default", "rope_theta": _f32(a("rope.freq_base_swa", 10000.0))}  # llama.cpp's default
    cfg["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}


def _moe(cfg: dict, arch: str, a, names: set) -> None:
    """Routed experts: counts from the keys, the dense layers from which blocks have no router."""
    n_used = int(a("expert_used_count"))
    if a("expert_shared_count") or a("expert_shared_feed_forward_length"):
        raise UserError(f"GGUF sets {arch}.expert_shared_count (shared experts), which hetpipe does not implement")
    gating = a("expert_gating_func")
    if gating not in (None, 1):  # 1 = softmax
        raise UserError(f"GGUF sets {arch}.expert_gating_func {gating}, which hetpipe does not implement "
                        "(supported: softmax)")
    dense = [i for i in range(cfg["num_hidden_layers"]) if f"blk.{i}.ffn_gate_inp.weight" not in names]
    if cfg["model_type"] == "mixtral":
        if dense:
            raise UserError(f"GGUF block {dense[0]} of a llama MoE has no ffn_gate_inp (router)")
        cfg.update(num_local_experts=int(a("expert_count")), num_experts_per_tok=n_used)
        return
    # llama.cpp's qwen3moe renormalizes the top-k weights unless the file says otherwise
    cfg.update(num_experts=int(a("expert_count")), num_experts_per_tok=n_used,
               moe_intermediate_size=int(a("expert_feed_forward_length")),
               norm_topk_prob=bool(a("expert_weights_norm", True)), decoder_sparse_step=1, mlp_only_layers=dense)


def llama3_scaling(factors: np.ndarray, theta: float, head_dim: int, original: int) -> dict:
    """The llama3 `rope_scaling` whose frequencies are llama.cpp's `rope_freqs` (each default frequency
    divided by its factor), so transformers and mlx-lm read the imported config alike.

    llama.cpp's converter computes the factors from that scaling: `factor` for long wavelengths, 1 for
    short ones, and between them 1 / ((1 - s) / factor + s) with s linear in original / wavelength. The
    line through those middle entries gives the low and high frequency factors (for a given original
    context, which only scales them); anything the fit does not reproduce is refused."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv.shape:
        raise UserError(f"rope_freqs.weight has {factors.size} factors; RoPE of head_dim {head_dim} needs {inv.size}")
    factor = float(factors.max())
    if np.allclose(factors, 1.0):
        return {"rope_type": "default"}
    wavelen = 2 * math.pi / inv
    middle = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if middle.sum() >= 2:
        smooth = (1 / factors[middle] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(original / wavelen[middle], smooth, 1)  # s = (x - lo) / (hi - lo)
        lo, hi = -intercept / slope, -intercept / slope + 1 / slope
    elif middle.sum() == 0 and (factors <= 1 + 1e-6).any():  # no smoothed band: a narrow one between the two
        g = np.sqrt(wavelen[factors <= 1 + 1e-6].max() * wavelen[factors > 1 + 1e-6].min())
        lo, hi = original / (g * 1.0001), original / (g / 1.0001)
    else:
        raise UserError("rope_freqs.weight is not Llama 3's RoPE scaling (one smoothed frequency cannot fix it)")
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(f"{lo:.9g}"),
               "high_freq_factor": float(f"{hi:.9g}"), "original_max_position_embeddings": original}
    from ..core.config import ModelConfig, rope_inv_freq

    cfg = ModelConfig(model_type="llama", hidden_size=head_dim, intermediate_size=1, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=head_dim, vocab_size=1, rms_norm_eps=1e-6,
                      max_position_embeddings=original, rope_theta=theta, rope_scaling=scaling)
    if not np.allclose(rope_inv_freq(cfg), inv / factors, rtol=1e-4):
        raise UserError("rope_freqs.weight is not Llama 3's RoPE scaling, the only per-frequency factors hetpipe "
                        "implements")
    return scaling
