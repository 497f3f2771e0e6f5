"""Tiny random-config checkpoints of each supported model_type, written by transformers itself."""

from __future__ import annotations

from pathlib import Path

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5,
            rope_theta=10000.0, bos_token_id=1, eos_token_id=2)

VARIANTS = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "llama-tied": dict(model_type="llama", tie_word_embeddings=True),
    "llama3-rope": dict(model_type="llama", rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=32), rope_theta=500000.0),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    # the other families, with windows shorter than the tests' prompts (11 tokens)
    "llama-mlp-bias": dict(model_type="llama", mlp_bias=True),
    "mistral-window": dict(model_type="mistral", sliding_window=4),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "gemma2": dict(model_type="gemma2", head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    "gemma3": dict(model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=12, sliding_window=4,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}),
    "phi3": dict(model_type="phi3", pad_token_id=0, max_position_embeddings=256, original_max_position_embeddings=64,
                 rope_scaling=dict(rope_type="longrope", short_factor=[1.0 + i / 8 for i in range(8)],
                                   long_factor=[2.0 + i for i in range(8)])),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1]),
}


def write_byte_tokenizer(out: Path) -> None:
    """A byte-level tokenizer whose 256 ids are the 256 bytes (no merges): the tiny models' vocabulary,
    so text goes through the whole serving path."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": alphabet[2]}))


def make_tiny(out: Path, variant: str, seed: int = 0, shard: bool = False, **overrides) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**TINY, **VARIANTS[variant], **overrides}
    model_type = kw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random init is small; widen it so layers matter and tokens differ
        for p in model.parameters():
            p.normal_(0, 0.08)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="100KB" if shard else "2GB")
    write_byte_tokenizer(out)
    return out
