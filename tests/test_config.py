"""What a checkpoint asks for is implemented or refused with one line naming the key, never run wrong."""

import json

import numpy as np
import pytest

from engine.api import Generator, local_pipeline
from engine.core.config import ModelConfig
from engine.core.errors import UserError
from reference import hf_greedy, hf_model
from tiny import make_tiny


@pytest.mark.parametrize("key,value", [("mlp_bias", True), ("hidden_act", "gelu"), ("partial_rotary_factor", 0.5),
                                       ("quantization_config", {"quant_method": "awq", "bits": 4}),
                                       ("rope_scaling", {"rope_type": "yarn", "factor": 4.0})])
def test_an_unimplemented_key_is_refused_by_name(tiny_dirs, tmp_path, key, value):
    d = json.loads((tiny_dirs["llama"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, key: value}))
    with pytest.raises(UserError) as e:
        ModelConfig.load(tmp_path)
    message = str(e.value)
    assert "\n" not in message and ("rope scaling" if key == "rope_scaling" else key) in message


def test_the_cli_refuses_mlp_bias_in_one_line(tmp_path):
    import subprocess
    import sys

    d = make_tiny(tmp_path / "m", "llama", mlp_bias=True)
    r = subprocess.run([sys.executable, "-m", "engine.app.cli", "generate", "--model", str(d), "--local", "torch",
                        "hello"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "mlp_bias" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A mistral checkpoint whose layers attend within a window of 16 positions."""
    return make_tiny(tmp_path_factory.mktemp("win") / "mistral", "mistral", sliding_window=16)


def test_requests_within_a_sliding_window_are_exact_and_past_it_refused(windowed):
    ids = [5, 17, 33, 9, 100, 7, 3, 250, 64, 12]
    want, _ = hf_greedy(hf_model(windowed), ids, 6)  # 16 positions: all inside the window
    with Generator(windowed, local_pipeline(windowed, "mlx:0-1,torch:2-3")) as gen:
        assert gen.generate(ids, max_tokens=6, ignore_eos=True).token_ids == want
        with pytest.raises(UserError, match="sliding_window of 16"):
            gen.generate(ids, max_tokens=7)
        assert np.all(np.array(gen.generate(ids[:4], max_tokens=2, ignore_eos=True).token_ids) >= 0)


def test_qwen2_applies_its_window_only_when_asked(tiny_dirs):
    d = json.loads((tiny_dirs["qwen2"] / "config.json").read_text())
    assert ModelConfig.from_dict({**d, "sliding_window": 8, "use_sliding_window": False}).sliding_window is None
    assert ModelConfig.from_dict({**d, "sliding_window": 8, "use_sliding_window": True}).sliding_window == 8
