"""What a checkpoint asks for is implemented or refused with one line naming the key, never run wrong."""

import json

import pytest

from engine.api import Generator, local_pipeline
from engine.core.config import ModelConfig
from engine.core.errors import UserError
from reference import hf_greedy, hf_model
from tiny import make_tiny


@pytest.mark.parametrize("key,value", [("use_bidirectional_attention", True), ("hidden_act", "gelu"),
                                       ("layer_types", ["chunked_attention"] * 4), ("shared_expert_intermediate_size", 64), ("partial_rotary_factor", 0.5),
                                       ("quantization_config", {"quant_method": "awq", "bits": 4}),
                                       ("rope_scaling", {"rope_type": "yarn", "factor": 4.0})])
def test_an_unimplemented_key_is_refused_by_name(tiny_dirs, tmp_path, key, value):
    d = json.loads((tiny_dirs["llama"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, key: value}))
    with pytest.raises(UserError) as e:
        ModelConfig.load(tmp_path)
    message = str(e.value)
    assert "\n" not in message and ("rope scaling" if key == "rope_scaling" else key) in message


def test_the_cli_refuses_an_unimplemented_activation_in_one_line(tmp_path):
    import subprocess
    import sys

    d = make_tiny(tmp_path / "m", "llama", hidden_act="relu")
    r = subprocess.run([sys.executable, "-m", "engine.app.cli", "generate", "--model", str(d), "--local", "torch",
                        "hello"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "hidden_act" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A mistral checkpoint whose layers attend within a window of 6 positions."""
    return make_tiny(tmp_path_factory.mktemp("win") / "mistral", "mistral", sliding_window=6)


def test_generation_far_past_the_sliding_window_equals_transformers(windowed):
    ids = [5, 17, 33, 9, 100, 7, 3, 250, 64, 12]
    ref = hf_model(windowed)
    want, _ = hf_greedy(ref, ids, 12)  # 22 positions: most keys fall out of each row's window
    with Generator(windowed, local_pipeline(windowed, "mlx:0-1,torch:2-3")) as gen:
        assert gen.generate(ids, max_tokens=12, ignore_eos=True).token_ids == want
    unwindowed, _ = hf_greedy(hf_model(make_tiny(windowed.parent / "full", "mistral", sliding_window=None)), ids, 12)
    assert unwindowed != want  # the window changes the tokens: the check above would catch it ignored


def test_longrope_runs_exact_within_its_original_context_and_refuses_past_it(tmp_path):
    d = make_tiny(tmp_path / "phi3", "phi3")  # original_max_position_embeddings 64
    ids = list(range(3, 40))
    want, _ = hf_greedy(hf_model(d), ids, 8)
    with Generator(d, local_pipeline(d, "torch:0-1,mlx:2-3")) as gen:
        assert gen.generate(ids, max_tokens=8, ignore_eos=True).token_ids == want
        with pytest.raises(UserError, match="past position 64: .*LongRoPE"):
            gen.generate(ids, max_tokens=30)


def test_qwen2_applies_its_window_only_when_asked(tiny_dirs):
    d = json.loads((tiny_dirs["qwen2"] / "config.json").read_text())
    d.pop("layer_types", None)  # as files before transformers 5: the window from use_sliding_window
    assert ModelConfig.from_dict({**d, "sliding_window": 8, "use_sliding_window": False}).layer_windows == (None,) * 4
    on = ModelConfig.from_dict({**d, "sliding_window": 8, "use_sliding_window": True, "max_window_layers": 2})
    assert on.layer_windows == (None, None, 8, 8)  # the first max_window_layers attend to all
    full = ["full_attention"] * 4  # transformers 5 writes layer_types, and follows them
    assert ModelConfig.from_dict({**d, "sliding_window": 8, "use_sliding_window": True,
                                  "layer_types": full}).layer_windows == (None,) * 4
