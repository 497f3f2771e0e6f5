"""Tokenizer and chat template against transformers' tokenizer loaded from the same GGUF."""

import pytest

from engine.app.fetch import SOURCE_GGUF
from engine.serving.text import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world!",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # recursion\n",
    "café naïve résumé Ærøskøbing façade",
    "emoji 😀🎉👩‍👩‍👧 ok",
    "中文字符 日本語のテキスト 한국어",
    "a    b\t\tc\n\n\nd   \n  ",
    "<|im_start|>user\nhi<|im_end|>",
    "version 3.14159 in 2026, call 555-0100",
    "   leading spaces and trailing   ",
    "",
]


@pytest.fixture(scope="module")
def hf_tok(real_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model, gguf_file=SOURCE_GGUF)


@pytest.fixture(scope="module")
def tok(real_model):
    return Tokenizer(real_model)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_transformers_gguf_tokenizer(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye ✌️"}],
])
def test_chat_template_equals_transformers(tok, hf_tok, real_model, messages):
    import gguf

    # the template as the GGUF itself holds it (transformers' GGUF tokenizer does not carry it)
    template = gguf.GGUFReader(real_model / SOURCE_GGUF).fields["tokenizer.chat_template"].contents()
    ref = hf_tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    assert tok.apply_chat_template(messages) == list(ref)


def test_special_tokens_and_eos(tok):
    assert tok.encode("<|im_end|>") == [2]
    assert 2 in tok.eos_ids
    assert not tok.add_bos  # the GGUF says add_bos_token False; the template writes <|im_start|>


def test_incremental_detokenizer_never_splits_a_character(tok):
    text = "Zürich 😀 中文 ok"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # the emoji spans several byte tokens: some steps must have held text back
    assert any(p == "" for p in pieces[:-1])
