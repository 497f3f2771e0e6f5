"""Import a Llama-family GGUF into a Hugging Face layout directory.

Writes `config.json`, `model.safetensors`,
`tokenizer.json` (built from the GGUF's vocabulary metadata), `tokenizer_config.json` (with the
chat template) and `generation_config.json`. Block-quantized tensors keep their quantization in
MLX's affine layout (`gguf_quant.py`, a directory mlx-lm loads too); with `dequantize` every
tensor is written as float32 instead. The `gguf` package (llama.cpp's own reader) parses;
llama.cpp's converter permuted the rows of q and k for its RoPE layout, which is undone here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..core.quant import QuantTensor, checkpoint_entries
from .gguf_quant import to_quant_tensor

ARCHS = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM")}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# llama.cpp pre-tokenizer names -> how text is split before byte-level BPE
_GPT2_LIKE = {"default", "gpt2", "mpt", "olmo", "jais"}
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"}
_SPLIT_REGEX = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+",
}
_SPLIT_REGEX["llama3"] = _SPLIT_REGEX["llama-v3"] = _SPLIT_REGEX["llama-bpe"]


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def _f32(v) -> float:
    """GGUF stores float32: 9.999999747e-06 is the file's spelling of 1e-05."""
    return float(f"{float(v):.7g}")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` of q/k rows (its interleaved RoPE layout -> HF halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise UserError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHS)}")
    model_type, class_name = ARCHS[arch]
    a = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    theta = _f32(a("rope.freq_base", 10000.0))
    rope = {"rope_theta": theta, "rope_type": "default"}
    if a("rope.scaling.type") == "linear":
        rope = {"rope_theta": theta, "rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
    if "rope_freqs.weight" in names:  # Llama 3.1's per-frequency factors
        factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
        head_dim = int(a("rope.dimension_count", hidden // heads))
        rope = {"rope_theta": theta, **llama3_scaling(np.asarray(factors, np.float64), theta, head_dim,
                                                      int(a("rope.scaling.original_context_length", 8192) or 8192))}
    cfg = {
        "architectures": [class_name],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(a("attention.head_count_kv", heads)),
        "head_dim": int(a("rope.dimension_count", hidden // heads)),
        "vocab_size": int(a("vocab_size", len(tokens))),
        "rms_norm_eps": _f32(a("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(a("context_length", 2048)),
        # transformers 5 reads rope_parameters; older readers a top-level rope_theta: write both
        "rope_theta": theta,
        "rope_parameters": rope,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "hidden_act": "silu",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if rope["rope_type"] != "default":
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return cfg


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
    wavelen = 2 * np.pi / inv
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


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    return None


_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def read_tensors(reader, cfg: dict, progress: bool = True, dequantize: bool = True):
    """Yield (hf_name, float32 array or QuantTensor) for every tensor, un-permuted. Block-quantized
    2-D tensors stay quantized unless `dequantize`."""
    from gguf.quants import dequantize as gguf_dequantize
    from tqdm import tqdm

    unpermute = cfg["model_type"] == "llama"
    for t in tqdm(reader.tensors, desc="importing", unit="tensor", disable=not progress):
        if t.name == "rope_freqs.weight":  # become the config's rope scaling (`read_config`)
            continue
        name = hf_name(t.name)
        if name is None:
            raise UserError(f"unexpected tensor {t.name!r} in GGUF")
        shape = tuple(reversed(t.shape.tolist()))
        kind = t.tensor_type.name
        if not dequantize and kind not in _FLOAT_TYPES and len(shape) == 2:
            w = to_quant_tensor(t.data, kind, *shape)
        else:
            w = np.ascontiguousarray(gguf_dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape))
        heads = None
        if unpermute and name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = cfg["num_attention_heads"]
        elif unpermute and name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = cfg["num_key_value_heads"]
        if heads is not None:
            order = _unpermute(np.arange(shape[0]), heads)
            w = w.rows(order) if isinstance(w, QuantTensor) else np.ascontiguousarray(w[order])
        yield name, w


def spm_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges that reproduce a SentencePiece BPE model from its pieces and scores, as transformers
    derives them (`generate_merges`): every split of a piece into two pieces, by the piece's score."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _spm_tokenizer(reader, tokens: list[str]):
    """A SentencePiece (llama) vocabulary as the `tokenizers` BPE transformers' LlamaTokenizer builds:
    byte fallback, "▁" for spaces, one prepended at the start."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores = list(_field(reader, "tokenizer.ggml.scores", [0.0] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = spm_merges(vocab, dict(zip(tokens, scores)))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tok


def _bpe_tokenizer(reader, tokens: list[str]):
    """A byte-level BPE (gpt2) vocabulary, split as its pre-tokenizer name says."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _SPLIT_REGEX:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in _GPT2_LIKE:
        tok.pre_tokenizer = byte_level
    else:
        raise UserError(f"GGUF pre-tokenizer {pre!r} is not supported yet")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def build_tokenizer(reader):
    """A `tokenizers.Tokenizer` from the GGUF's vocabulary metadata (byte-level BPE, 'gpt2', or
    SentencePiece, 'llama'), plus its config dict."""
    from tokenizers import AddedToken

    kind = _field(reader, "tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise UserError(f"GGUF tokenizer model {kind!r} is not supported yet (byte-level BPE 'gpt2' or "
                        "SentencePiece 'llama')")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = _spm_tokenizer(reader, tokens) if kind == "llama" else _bpe_tokenizer(reader, tokens)
    # 2 = UNKNOWN and 3 = CONTROL (special, never split), 4 = USER_DEFINED (added, not special)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3 or (ty == 2 and kind == "llama")])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])

    def special(key):
        i = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None else None

    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special("bos_token_id"),
        "eos_token": special("eos_token_id"),
        "unk_token": special("unknown_token_id"),
        "pad_token": special("padding_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", kind == "llama")),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "model_max_length": None,
    }
    return tok, tok_cfg


def import_gguf(path: str | Path, out: str | Path, progress: bool = True, dequantize: bool = False) -> Path:
    """Import GGUF `path` into directory `out` (written beside, then renamed into place): quantized
    tensors kept quantized, or all of them float32 with `dequantize`."""
    import gguf
    from safetensors.numpy import save_file

    path, out = Path(path), Path(out)
    if not path.is_file():
        raise UserError(f"no such GGUF file: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises bare ValueError/struct errors on a bad file
        raise UserError(f"{path} is not a readable GGUF file: {e}") from None
    cfg = read_config(reader)
    tok, tok_cfg = build_tokenizer(reader)
    tok_cfg["model_max_length"] = cfg["max_position_embeddings"]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    flat, block = checkpoint_entries(dict(read_tensors(reader, cfg, progress, dequantize)))
    if block:
        cfg["quantization"] = cfg["quantization_config"] = block
    save_file(flat, str(tmp / "model.safetensors"), metadata={"format": "mlx" if block else "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    (tmp / "hetpipe-source.json").write_text(json.dumps({"gguf": path.name, "bytes": path.stat().st_size}))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
