"""Tiny GGUFs of each family written with gguf-py's writer as llama.cpp's `convert_hf_to_gguf.py`
writes them (its keys, its tensor names from gguf-py's map, its permutes, +1 norms and stacked
experts), one block type for every weight matrix (and a SentencePiece vocabulary or Llama 3's
rope_freqs where asked).

Types gguf-py quantizes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are quantized from a transformers-saved
tiny checkpoint by gguf-py's own quantizer. K-quant types have no numpy quantizer in gguf-py, so
their blocks are random bytes with small scales: any valid block is a weight, and the test
compares two readings of the same file.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# rows of K-quant blocks are multiples of 256 weights
K_TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order (its interleaved RoPE layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_blocks(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    b = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    small = lambda lo, hi: rng.uniform(lo, hi, size=(b.shape[0], 1)).astype(np.float16).view(np.uint8)  # noqa: E731
    if kind in ("Q4_K", "Q5_K"):  # d, dmin first
        b[:, 0:2], b[:, 2:4] = small(1e-4, 3e-4), small(1e-4, 3e-4)
    elif kind == "Q6_K":  # d last
        b[:, -2:] = small(1e-4, 2e-4)
    return b.reshape(rows, -1)


def llama3_rope_factors(cfg: dict) -> np.ndarray:
    """`rope_freqs.weight` as llama.cpp's converter computes it from a llama3 rope scaling."""
    import math

    sc = cfg.get("rope_scaling") or cfg["rope_parameters"]
    dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    base = sc.get("rope_theta", cfg.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi, old = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"], \
        sc["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


SPM_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, world! 123 456 7890",
             "naïve café résumé façade", "日本語のテキスト 中文字符", "  leading spaces and\ttabs\nnewlines",
             "emoji 🙂 test", "def f(x): return x * 2", "the other thing is that the theory there then"]


def train_spm(out_dir: Path, vocab_size: int = 360) -> Path:
    """A tiny SentencePiece BPE model with byte fallback (<unk> 0, <s> 1, </s> 2), as Llama's and
    Gemma's tokenizer.model files are."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_TEXTS * 20), model_prefix=str(out_dir / "sp"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    return out_dir / "sp.model"


def write_spm_vocab(wr, spm_model: Path) -> None:
    """A SentencePiece model's vocabulary as llama.cpp writes it (tokenizer.ggml.model = llama)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    n = sp.vocab_size()
    kind = lambda i: 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1  # noqa: E731
    wr.add_tokenizer_model("llama")
    wr.add_token_list([sp.id_to_piece(i) for i in range(n)])
    wr.add_token_scores([sp.get_score(i) for i in range(n)])
    wr.add_token_types([kind(i) for i in range(n)])
    wr.add_bos_token_id(sp.bos_id())
    wr.add_eos_token_id(sp.eos_id())
    wr.add_unk_token_id(sp.unk_id())
    wr.add_add_bos_token(True)


# model_type -> the GGUF architecture llama.cpp's converter writes it as
ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
        "qwen3_moe": "qwen3moe", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}


def _write_keys(wr, cfg: dict, arch: str) -> None:
    """The hyperparameters, as convert_hf_to_gguf.py's TextModel and each family's class write them."""
    from gguf.constants import RopeScalingType

    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    global_rope = rope.get("full_attention", rope)
    wr.add_block_count(cfg["num_hidden_layers"])
    wr.add_context_length(cfg["max_position_embeddings"])
    wr.add_embedding_length(cfg["hidden_size"])
    wr.add_feed_forward_length(cfg["intermediate_size"])
    wr.add_head_count(heads)
    wr.add_head_count_kv(kv)
    wr.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    wr.add_rope_freq_base(cfg.get("rope_theta") or global_rope.get("rope_theta", 10000.0))
    if arch in ("qwen3", "qwen3moe", "gemma2", "gemma3") or "head_dim" in cfg and arch != "phi3":
        wr.add_key_length(head_dim)
        wr.add_value_length(head_dim)
    wr.add_rope_dimension_count(head_dim)
    if global_rope.get("rope_type") == "linear":
        wr.add_rope_scaling_type(RopeScalingType.LINEAR)
        wr.add_rope_scaling_factor(global_rope["factor"])
    if arch.startswith("gemma"):
        if cfg.get("attn_logit_softcapping"):
            wr.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        if cfg.get("final_logit_softcapping"):
            wr.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        wr.add_sliding_window(cfg["sliding_window"])
        if arch == "gemma3":  # the tiny one is not llama.cpp's default pattern (5 local, 1 global): say it per layer
            wr.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
    if arch == "phi3":
        original = cfg["original_max_position_embeddings"]
        wr.add_rope_scaling_orig_ctx_len(original)
        wr.add_sliding_window(cfg.get("sliding_window") or 0)
        scale = cfg["max_position_embeddings"] / original
        wr.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if experts:
        wr.add_expert_count(experts)
        wr.add_expert_used_count(cfg["num_experts_per_tok"])
        if cfg.get("moe_intermediate_size"):
            wr.add_expert_feed_forward_length(cfg["moe_intermediate_size"])


def _converted(w: dict, cfg: dict, arch: str, per_expert: bool = False):
    """(GGUF name, float32 array) as the converter changes them: q/k permuted (llama), gemma's norms
    +1, each layer's experts stacked, named by gguf-py's own tensor map."""
    import re

    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg["num_hidden_layers"])
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, t in w.items():
        t = t.astype(np.float32)
        m = re.match(r"(model\.layers\.\d+\.(?:block_sparse_moe|mlp)\.experts)\.(\d+)\.(\w+)\.weight$", name)
        if m:  # stacked below, as the converter merges them
            experts.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = t
            continue
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = _permute(t, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = _permute(t, kv)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t + 1
        if arch == "gemma2" and name == "lm_head.weight":
            continue
        yield tmap.get_name(name, try_suffixes=(".weight", ".bias")), t
    for merged, per in experts.items():
        name = tmap.get_name(merged + ".weight", try_suffixes=(".weight",))
        if per_expert:  # llama.cpp's first Mixtral files: blk.L.ffn_gate.E.weight
            for e in sorted(per):
                yield name.replace("_exps.weight", f".{e}.weight"), per[e]
        else:
            yield name, np.stack([per[e] for e in sorted(per)])


def write_gguf(hf_dir: Path, out: Path, kind: str, embed_kind: str | None = None, seed: int = 0,
               spm_model: Path | None = None, rope_freqs: bool = False, extra_keys: dict | None = None,
               per_expert: bool = False) -> Path:
    """A GGUF of the tiny checkpoint in `hf_dir`, as llama.cpp's converter writes its family (plus
    `extra_keys`, {name after the architecture: uint32 or string}), with
    every 2-D (and stacked 3-D) weight as block type `kind` (the embedding as `embed_kind`, default the
    same); the vocabulary of `spm_model` if given (else the 256 bytes, byte-level BPE); with
    `rope_freqs`, its llama3 RoPE scaling as llama.cpp writes it; with `per_expert`, one tensor per
    expert as llama.cpp's first Mixtral files had."""
    import json

    import gguf
    from gguf.constants import GGMLQuantizationType as T
    from safetensors.numpy import load_file
    from tokenizers import pre_tokenizers

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = ARCH[cfg["model_type"]]
    w = load_file(str(hf_dir / "model.safetensors"))
    rng = np.random.default_rng(seed)
    wr = gguf.GGUFWriter(str(out), arch)
    _write_keys(wr, cfg, arch)
    for key, value in (extra_keys or {}).items():
        (wr.add_uint32 if isinstance(value, int) else wr.add_string)(f"{arch}.{key}", value)
    if spm_model is not None:
        write_spm_vocab(wr, spm_model)
    else:
        wr.add_tokenizer_model("gpt2")
        wr.add_tokenizer_pre("default")
        wr.add_token_list(sorted(pre_tokenizers.ByteLevel.alphabet()))
        wr.add_token_types([1] * 256)
        wr.add_token_merges([])
        wr.add_bos_token_id(1)
        wr.add_eos_token_id(2)
    if rope_freqs:
        wr.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type") == "longrope":
        wr.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
        wr.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    for gname, t in _converted(w, cfg, arch, per_expert):
        k = (embed_kind or kind) if gname == "token_embd.weight" else kind
        if t.ndim == 1 or k == "F32":
            wr.add_tensor(gname, t)
        elif k in ("Q4_K", "Q5_K", "Q6_K"):
            wr.add_tensor(gname, _random_blocks(k, int(np.prod(t.shape[:-1])), t.shape[-1], rng)
                          .reshape(*t.shape[:-1], -1), raw_dtype=T[k])
        else:
            wr.add_tensor(gname, gguf.quants.quantize(t, T[k]), raw_dtype=T[k])
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return out
