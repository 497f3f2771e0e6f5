"""Tiny Llama GGUFs written with gguf-py's writer, one block type for every 2-D weight (and, as
llama.cpp writes them, a SentencePiece vocabulary or Llama 3's rope_freqs where asked).

Types gguf-py quantizes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are quantized from a transformers-saved
tiny checkpoint by gguf-py's own quantizer. K-quant types have no numpy quantizer in gguf-py, so
their blocks are random bytes with small scales: any valid block is a weight, and the test
compares two readings of the same file.
"""

from __future__ import annotations

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


def write_gguf(hf_dir: Path, out: Path, kind: str, embed_kind: str | None = None, seed: int = 0,
               spm_model: Path | None = None, rope_freqs: bool = False) -> Path:
    """A GGUF of the tiny checkpoint in `hf_dir` with every 2-D weight as block type `kind`
    (the embedding as `embed_kind`, default the same); the vocabulary of `spm_model` if given (else
    the 256 bytes, byte-level BPE); with `rope_freqs`, its llama3 RoPE scaling as llama.cpp writes it."""
    import json

    import gguf
    from gguf.constants import GGMLQuantizationType as T
    from safetensors.numpy import load_file
    from tokenizers import pre_tokenizers

    cfg = json.loads((hf_dir / "config.json").read_text())
    w = load_file(str(hf_dir / "model.safetensors"))
    rng = np.random.default_rng(seed)
    wr = gguf.GGUFWriter(str(out), "llama")
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    wr.add_block_count(cfg["num_hidden_layers"])
    wr.add_context_length(cfg["max_position_embeddings"])
    wr.add_embedding_length(cfg["hidden_size"])
    wr.add_feed_forward_length(cfg["intermediate_size"])
    wr.add_head_count(heads)
    wr.add_head_count_kv(kv)
    wr.add_rope_dimension_count(cfg["hidden_size"] // heads)
    wr.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    wr.add_rope_freq_base(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
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
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    block = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in w.items():
        if name in names:
            gname = names[name]
        else:
            i, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{i}.{block[rest.rsplit('.', 1)[0]]}.weight"
        t = t.astype(np.float32)
        if name.endswith("q_proj.weight"):
            t = _permute(t, heads)
        elif name.endswith("k_proj.weight"):
            t = _permute(t, kv)
        k = (embed_kind or kind) if gname == "token_embd.weight" else kind
        if t.ndim == 1:
            wr.add_tensor(gname, t)
        elif k in ("Q4_K", "Q5_K", "Q6_K"):
            wr.add_tensor(gname, _random_blocks(k, *t.shape, rng), raw_dtype=T[k])
        else:
            wr.add_tensor(gname, gguf.quants.quantize(t, T[k]), raw_dtype=T[k])
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return out
