"""`hetpipe import-gguf` of each family as llama.cpp's converter writes it (qwen3, gemma2/3, phi3,
mixtral, qwen3_moe): the imported directory runs in transformers as the original checkpoint does,
and in hetpipe's mixed split with transformers' greedy tokens; quantized experts stay quantized."""

import json

import numpy as np
import pytest

from engine.api import Generator, local_pipeline
from engine.app.gguf_import import import_gguf
from engine.core.errors import UserError
from reference import hf_greedy, hf_logprobs, hf_model
from tiny import make_tiny
from tiny_gguf import write_gguf

IDS = [5, 17, 33, 9, 100, 7, 3, 250, 12, 64, 31]  # longer than the tiny windows (4)
SPLIT = "mlx:0-1,torch:2-3"
# what a GGUF cannot say: llama.cpp scales gemma3's queries by head_dim (16) and its qwen3moe has no
# dense layers
AS_LLAMA_CPP = {"gemma3": {"query_pre_attn_scalar": 16}, "qwen3_moe": {"mlp_only_layers": []}}


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe"])
def test_a_family_imports_from_gguf_as_transformers_runs_it(tmp_path, family):
    hf = make_tiny(tmp_path / "hf", family, **AS_LLAMA_CPP.get(family, {}))
    imported = import_gguf(write_gguf(hf, tmp_path / "m.gguf", "F32"), tmp_path / "imp", progress=False)
    want_cfg, got_cfg = (json.loads((d / "config.json").read_text()) for d in (hf, imported))
    keys = ["layer_types"] if family.startswith("gemma") else []  # elsewhere transformers writes all-full
    want_cfg["head_dim"] = want_cfg.get("head_dim") or want_cfg["hidden_size"] // want_cfg["num_attention_heads"]
    for key in keys + ["model_type", "head_dim", "sliding_window", "num_experts_per_tok", "mlp_only_layers",
                "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"]:
        assert got_cfg.get(key) == want_cfg.get(key), key
    original = hf_model(hf)
    assert np.abs(hf_logprobs(hf_model(imported), IDS) - hf_logprobs(original, IDS)).max() < 1e-4
    want, _ = hf_greedy(original, IDS, 6)
    with Generator(imported, local_pipeline(imported, SPLIT)) as gen:
        assert gen.generate(IDS, max_tokens=6, ignore_eos=True).token_ids == want


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_quantized_gguf_experts_stay_quantized_and_match_their_dequantized_import(tmp_path, family):
    hf = make_tiny(tmp_path / "hf", family, **AS_LLAMA_CPP.get(family, {}))
    path = write_gguf(hf, tmp_path / "m.gguf", "Q4_0", embed_kind="Q8_0")
    q = import_gguf(path, tmp_path / "q", progress=False)
    ref = import_gguf(path, tmp_path / "ref", progress=False, dequantize=True)
    assert json.loads((q / "config.json").read_text())["quantization"]["bits"] == 4
    want, _ = hf_greedy(hf_model(ref), IDS, 6)
    for spec in ("mlx:0-3", "torch:0-3", SPLIT):
        with Generator(q, local_pipeline(q, spec)) as gen:
            assert gen.generate(IDS, max_tokens=6, ignore_eos=True).token_ids == want, spec


@pytest.mark.parametrize("family, key, match", [
    ("qwen3_moe", "expert_shared_count", "shared experts"),
    ("mistral-window", "attention.sliding_window", "sliding_window"),
])
def test_what_a_gguf_asks_for_and_hetpipe_lacks_is_refused_by_key(tmp_path, family, key, match):
    hf = make_tiny(tmp_path / "hf", family, **AS_LLAMA_CPP.get(family, {}))
    path = write_gguf(hf, tmp_path / "m.gguf", "F32", extra_keys={key: 2})
    with pytest.raises(UserError, match=match):
        import_gguf(path, tmp_path / "imp", progress=False)
