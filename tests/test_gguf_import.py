"""`hetpipe import-gguf` of what llama.cpp writes beyond byte-level BPE: a SentencePiece vocabulary
(TinyLlama's kind) and Llama 3.1's per-frequency RoPE factors, each against transformers."""

import json

import numpy as np
import pytest

from engine.app.gguf_import import import_gguf
from engine.serving.text import Tokenizer
from reference import hf_greedy, hf_model
from test_tokenizer import TEXTS
from tiny import make_tiny
from tiny_gguf import SPM_TEXTS, train_spm, write_gguf

TRAIN = SPM_TEXTS
MORE = ["ünïcödé the unseen: ЖЗИЙ ΑΒΓ", "tokens the model never saw: qwxz vbnm", "  two  spaces  ", "\n\nnewlines\n",
        "the theory of the other", "🙂🙂 and 🎉"]


@pytest.fixture(scope="module")
def spm_dirs(tmp_path_factory):
    """(a SentencePiece BPE model with byte fallback, the directory import-gguf makes of a GGUF holding it)."""
    base = tmp_path_factory.mktemp("spm")
    spm = train_spm(base)
    hf = make_tiny(base / "hf", "llama", vocab_size=360)
    gguf = write_gguf(hf, base / "m.gguf", "F32", spm_model=spm)
    return spm, import_gguf(gguf, base / "imported", progress=False)


@pytest.fixture(scope="module")
def hf_spm(spm_dirs):
    """transformers' own LlamaTokenizer, converted from the SentencePiece model file."""
    import shutil

    from transformers import AutoTokenizer

    model, imported = spm_dirs
    d = imported.parent / "hf-tok"
    d.mkdir(exist_ok=True)
    shutil.copy(model, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                                         "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return AutoTokenizer.from_pretrained(d)


@pytest.mark.parametrize("text", TEXTS + MORE + TRAIN[:3])
def test_a_sentencepiece_gguf_tokenizes_as_transformers(spm_dirs, hf_spm, text):
    """transformers' ids, which differ from sentencepiece's own where its NFKC normalizer folds runs of
    whitespace; on plain text all three agree."""
    import sentencepiece

    model, imported = spm_dirs
    tok = Tokenizer(imported)
    ids = tok.encode(text)
    assert ids == hf_spm(text).input_ids
    assert tok.decode(ids[1:]) == hf_spm.decode(ids[1:])
    if text in TRAIN[:3] + MORE[:2]:
        assert ids[1:] == sentencepiece.SentencePieceProcessor(model_file=str(model)).encode(text)


def test_a_sentencepiece_gguf_config_names_its_special_tokens(spm_dirs):
    cfg = json.loads((spm_dirs[1] / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"], cfg["add_bos_token"]) == ("<s>", "</s>", "<unk>", True)


@pytest.mark.parametrize("scaling", [
    None,  # the tiny llama3-rope: factor 8, its 8 frequencies either unscaled or scaled, none smoothed
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=8.0, original_max_position_embeddings=256),
], ids=["no-smoothed-band", "smoothed-band"])
def test_rope_freqs_become_the_llama3_scaling_transformers_runs(tmp_path, scaling):
    hf = make_tiny(tmp_path / "hf", "llama3-rope", **({} if scaling is None else {"rope_scaling": scaling}))
    imported = import_gguf(write_gguf(hf, tmp_path / "m.gguf", "F32", rope_freqs=True), tmp_path / "imp",
                           progress=False)
    cfg = json.loads((imported / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    ids = [5, 17, 33, 9, 100, 7, 3, 250]
    want, _ = hf_greedy(hf_model(hf), ids, 8)
    assert hf_greedy(hf_model(imported), ids, 8)[0] == want  # transformers reads the fitted scaling alike

    from engine.api import Generator, local_pipeline

    with Generator(imported, local_pipeline(imported, "mlx:0-1,torch:2-3")) as gen:
        assert gen.generate(ids, max_tokens=8, ignore_eos=True).token_ids == want


def test_rope_freqs_of_another_shape_are_refused(tmp_path):
    from engine.app.gguf_config import llama3_scaling
    from engine.core.errors import UserError

    inv = 1 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    with pytest.raises(UserError, match="not Llama 3"):
        llama3_scaling(np.linspace(1, 8, 8)[::-1] * 0 + np.array([1, 3, 1, 5, 2, 8, 8, 8.0]), 10000.0, 16, 8192)
    assert llama3_scaling(np.ones_like(inv), 10000.0, 16, 8192) == {"rope_type": "default"}
