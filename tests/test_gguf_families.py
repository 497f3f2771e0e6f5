"""`hetpipe import-gguf` of every family as llama.cpp's own converter writes it (llama, mixtral,
qwen2, qwen3, qwen3_moe, gemma2, gemma3, phi3): the imported directory runs in transformers exactly as
the original checkpoint does, and in hetpipe's mixed split with transformers' greedy tokens; experts
the converter quantized stay quantized and match their dequantized import."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from engine.api import Generator, local_pipeline
from engine.app.gguf_import import import_gguf
from engine.core.errors import UserError
from llama_cpp_convert import convert
from reference import hf_greedy, hf_logprobs, hf_model
from tiny import make_tiny
from tiny_gguf import train_spm, write_gguf

IDS = [5, 17, 33, 9, 100, 7, 3, 250, 12, 64, 31]  # longer than the tiny windows (4)
SPLIT = "mlx:0-1,torch:2-3"
FAMILIES = ["llama", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3", "phi3"]
# What a GGUF cannot say, set as llama.cpp assumes it: gemma3's queries scaled by head_dim (16) and its
# layers five local to one global (so six layers here); qwen3moe without dense layers.
AS_LLAMA_CPP = {
    "gemma3": {"query_pre_attn_scalar": 16, "num_hidden_layers": 6,
               "layer_types": ["sliding_attention"] * 5 + ["full_attention"]},
    "qwen3_moe": {"mlp_only_layers": []},
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, real_model):
    """family -> (tiny checkpoint, {outtype: its GGUF by llama.cpp's converter}), converted in one process.

    The converter takes a SentencePiece tokenizer.model where the family's converter reads one; its
    qwen3moe reads a byte-level BPE tokenizer.json it must recognize, so that one gets SmolLM2's."""
    base = tmp_path_factory.mktemp("llama-cpp")
    spm = train_spm(base)
    out, jobs = {}, []
    for family in FAMILIES:
        bpe = family == "qwen3_moe"
        hf = make_tiny(base / family, family, vocab_size=49152 if bpe else 360, **AS_LLAMA_CPP.get(family, {}))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (hf / f).unlink()
            if bpe:
                shutil.copy(real_model / f, hf / f)
        if not bpe:
            shutil.copy(spm, hf / "tokenizer.model")
        kinds = ("f32", "q8_0") if family in ("mixtral", "qwen3_moe") else ("f32",)
        out[family] = (hf, {k: base / f"{family}-{k}.gguf" for k in kinds})
        jobs += [(hf, path, k) for k, path in out[family][1].items()]
    convert(jobs)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_imports_from_llama_cpps_gguf_as_transformers_runs_it(converted, tmp_path, family):
    hf, ggufs = converted[family]
    imported = import_gguf(ggufs["f32"], tmp_path / "imp", progress=False)
    want_cfg, got_cfg = (json.loads((d / "config.json").read_text()) for d in (hf, imported))
    want_cfg["head_dim"] = want_cfg.get("head_dim") or want_cfg["hidden_size"] // want_cfg["num_attention_heads"]
    keys = ["layer_types"] if family.startswith("gemma") else []  # elsewhere transformers writes all-full
    for key in keys + ["model_type", "head_dim", "sliding_window", "num_experts_per_tok", "mlp_only_layers",
                       "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"]:
        assert got_cfg.get(key) == want_cfg.get(key), key
    original = hf_model(hf)
    assert np.abs(hf_logprobs(hf_model(imported), IDS) - hf_logprobs(original, IDS)).max() < 1e-6
    want, _ = hf_greedy(original, IDS, 6)
    layers = want_cfg["num_hidden_layers"]
    with Generator(imported, local_pipeline(imported, f"mlx:0-1,torch:2-{layers - 1}")) as gen:
        assert gen.generate(IDS, max_tokens=6, ignore_eos=True).token_ids == want


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_llama_cpps_q8_0_experts_stay_quantized_and_match_their_dequantized_import(converted, tmp_path, family):
    path = converted[family][1]["q8_0"]
    q = import_gguf(path, tmp_path / "q", progress=False)
    ref = import_gguf(path, tmp_path / "ref", progress=False, dequantize=True)
    assert json.loads((q / "config.json").read_text())["quantization"]["bits"] == 8
    want, _ = hf_greedy(hf_model(ref), IDS, 6)
    for spec in ("mlx:0-3", "torch:0-3", SPLIT):  # float32: a 49152-token random head ties in bf16
        with Generator(q, local_pipeline(q, spec, dtype="float32")) as gen:
            assert gen.generate(IDS, max_tokens=6, ignore_eos=True).token_ids == want, spec


@pytest.mark.parametrize("family, per_expert", [("mixtral", False), ("qwen3_moe", False), ("mixtral", True)],
                         ids=["mixtral", "qwen3_moe", "mixtral-one-tensor-per-expert"])
def test_4_bit_gguf_experts_stay_quantized_and_match_their_dequantized_import(tmp_path, family, per_expert):
    """Q4_0 experts (llama.cpp's quantizer writes them from an f32 GGUF; gguf-py's here), stacked or,
    as llama.cpp's first Mixtral files, one tensor per expert."""
    hf = make_tiny(tmp_path / "hf", family, **AS_LLAMA_CPP.get(family, {}))
    path = write_gguf(hf, tmp_path / "m.gguf", "Q4_0", embed_kind="Q8_0", per_expert=per_expert)
    q = import_gguf(path, tmp_path / "q", progress=False)
    ref = import_gguf(path, tmp_path / "ref", progress=False, dequantize=True)
    assert json.loads((q / "config.json").read_text())["quantization"]["bits"] == 4
    # the dequantized import is the checkpoint, tensor by tensor, within Q4_0's rounding (~9% RMS)
    want_w, got_w = (load_file(str(d / "model.safetensors")) for d in (hf, ref))
    assert want_w.keys() == got_w.keys()
    for k in want_w:
        assert np.linalg.norm(got_w[k] - want_w[k]) < 0.15 * np.linalg.norm(want_w[k]), k
    want, _ = hf_greedy(hf_model(ref), IDS, 6)
    for spec in ("mlx:0-3", "torch:0-3", SPLIT):
        with Generator(q, local_pipeline(q, spec)) as gen:
            assert gen.generate(IDS, max_tokens=6, ignore_eos=True).token_ids == want, spec


@pytest.mark.parametrize("family, key, value, match", [
    ("qwen3_moe", "expert_shared_count", 2, "shared experts"),
    ("qwen3_moe", "expert_gating_func", 2, "gating_func 2"),
    ("mistral-window", "attention.sliding_window", 4, "sliding_window"),
    ("qwen3", "rope.scaling.type", "yarn", "'yarn'"),
])
def test_what_a_gguf_asks_for_and_hetpipe_lacks_is_refused_by_key(tmp_path, family, key, value, match):
    hf = make_tiny(tmp_path / "hf", family, **AS_LLAMA_CPP.get(family, {}))
    path = write_gguf(hf, tmp_path / "m.gguf", "F32", extra_keys={key: value})
    with pytest.raises(UserError, match=match):
        import_gguf(path, tmp_path / "imp", progress=False)


@pytest.mark.parametrize("family, tokenizer_class", [("gemma2", "GemmaTokenizer"), ("phi3", "LlamaTokenizer")])
def test_a_sentencepiece_vocabulary_llama_cpp_wrote_tokenizes_as_transformers(converted, tmp_path, family,
                                                                              tokenizer_class):
    """Gemma's has no space prefix (`tokenizer.ggml.add_space_prefix` false); transformers' own tokenizer
    class reads the same tokenizer.model."""
    from transformers import AutoTokenizer

    from engine.serving.text import Tokenizer
    from test_tokenizer import TEXTS
    from tiny_gguf import SPM_TEXTS

    hf, ggufs = converted[family]
    ours = Tokenizer(import_gguf(ggufs["f32"], tmp_path / "imp", progress=False))
    d = tmp_path / "hf-tok"
    d.mkdir()
    shutil.copy(hf / "tokenizer.model", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class, "bos_token": "<s>",
                                                         "eos_token": "</s>", "unk_token": "<unk>"}))
    theirs = AutoTokenizer.from_pretrained(d)
    bos = theirs.bos_token_id
    for text in TEXTS + SPM_TEXTS:
        ids = ours.encode(text)
        assert ids[1:] == [i for i in theirs(text).input_ids if i != bos], text
        assert ours.decode(ids[1:]) == theirs.decode(ids[1:]), text
