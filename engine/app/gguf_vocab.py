"""A GGUF's vocabulary as the `tokenizers` Tokenizer transformers builds for the same model.

Two kinds, as llama.cpp's `tokenizer.ggml.model` names them: byte-level BPE (`gpt2`: merges and a
pre-tokenizer named by `tokenizer.ggml.pre`) and SentencePiece (`llama`: pieces and scores, rebuilt
as transformers' LlamaTokenizer builds them, with BPE merges derived from the scores).
"""

from __future__ import annotations

from ..core.errors import UserError
from .gguf_config import field as _field

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
