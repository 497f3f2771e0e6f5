"""`hetpipe plan` on real configs (Llama-3.1-70B, Qwen3-30B-A3B, Mixtral-8x7B as their repos ship
them, in tests/configs): every figure is the config's arithmetic, written out here; a plan that
does not fit is refused with its shortfall and the width that fits."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).parent / "configs"
GB = 10**9


def model(tmp_path, name) -> Path:
    d = tmp_path / name
    d.mkdir()
    shutil.copy(CONFIGS / f"{name}.json", d / "config.json")
    return d


def plan(*args):
    r = subprocess.run([sys.executable, "-m", "engine.app.cli", "plan", *args], capture_output=True, text=True,
                       timeout=120)
    return r, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else None)


def bits_per_weight(bits):  # MLX affine: the codes, and a bf16 scale and bias per group of 64
    return 2.0 if bits == 16 else bits / 8 + 2 * 2 / 64


def dense_layer(h, kv, i, heads_dim, bits, qk_norm_dim=0):
    q = heads_dim
    return (h * q + 2 * h * kv + q * h + 3 * h * i) * bits_per_weight(bits) + (2 * h + 2 * qk_norm_dim) * 2


def test_llama_70b_at_4_bits_on_a_mac_and_a_4090(tmp_path):
    h, kv, i, v, n = 8192, 8 * 128, 28672, 128256, 80
    r, p = plan("--model", str(model(tmp_path, "llama-3.1-70b")), "--devices",
                "mac=mlx:m2-max:64GB,linux=torch:rtx4090:24GB", "--bits", "4", "--context", "8192", "--json")
    assert r.returncode == 0, r.stderr
    layer = dense_layer(h, kv, i, 64 * 128, 4)
    kv_layer = 2 * 8 * 128 * 2 * 8192  # K and V: 2 x KV heads x head dim x 2 bytes x tokens
    embed, head = v * h * bits_per_weight(4), v * h * bits_per_weight(4) + h * 2
    (a, b), (c, d) = [s["layers"] for s in p["stages"]]
    assert (a, d, b + 1) == (0, n - 1, c) and p["fits"]
    for s, ends, memory in ((p["stages"][0], embed, 64 * GB), (p["stages"][1], head, 24 * GB)):
        layers = s["layers"][1] - s["layers"][0] + 1
        assert s["weight_bytes"] == pytest.approx(layers * layer + ends, abs=layers + 2)
        assert s["kv_bytes"] == layers * kv_layer
        assert s["free_bytes"] == pytest.approx(0.9 * memory - s["weight_bytes"] - s["kv_bytes"], abs=2)
    # one stream reads every weight once a token (of the embedding, one row: not counted): each
    # stage's bytes over its bandwidth, 400 GB/s (M2 Max) and 1008 GB/s (RTX 4090)
    ms = 1000 * (p["stages"][0]["weight_bytes"] - embed) / (400 * GB) + 1000 * p["stages"][1]["weight_bytes"] / (1008 * GB)
    assert p["predicted_tokens_per_s"] == pytest.approx(1000 / ms, rel=1e-6)


def test_moe_layers_hold_every_expert(tmp_path):
    """Qwen3-30B-A3B (128 experts, qk norms) and Mixtral-8x7B at 16 bits, each on one big device."""
    for name, h, kv, q, n_exp, moe_i, qk in (("qwen3-30b-a3b", 2048, 4 * 128, 32 * 128, 128, 768, 128),
                                             ("mixtral-8x7b", 4096, 8 * 128, 32 * 128, 8, 14336, 0)):
        r, p = plan("--model", str(model(tmp_path, name)), "--devices", "a=torch:h200:141GB", "--bits", "16",
                    "--context", "4096", "--json")
        assert r.returncode == 0, r.stderr
        cfg = json.loads((CONFIGS / f"{name}.json").read_text())
        attn = (h * q + 2 * h * kv + q * h) * 2 + (2 * h + 2 * qk) * 2
        layer = attn + n_exp * h * 2 + n_exp * 3 * h * moe_i * 2  # attention, router, every expert
        ends = 2 * cfg["vocab_size"] * h * 2 + h * 2
        s = p["stages"][0]
        assert s["weight_bytes"] == pytest.approx(cfg["num_hidden_layers"] * layer + ends, rel=1e-9)
        assert s["kv_bytes"] == cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * 128 * 2 * 4096


def test_a_plan_that_does_not_fit_is_refused_with_its_shortfall(tmp_path):
    d = str(model(tmp_path, "llama-3.1-70b"))
    r, p = plan("--model", d, "--devices", "a=torch:rtx4090:24GB,b=torch:rtx4090:24GB", "--bits", "16",
                "--context", "4096", "--json")
    assert r.returncode == 2 and not p["fits"] and p["shortfall_bytes"] > 0
    assert p["fits_at_bits"] == 4 and "short by" in r.stderr and "at 4 bits it fits" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r, p = plan("--model", d, "--devices", "a=torch:rtx4090:24GB,b=torch:rtx4090:24GB", "--bits", "4",
                "--context", "4096", "--json")
    assert r.returncode == 0 and p["fits"]


def test_a_faster_single_device_is_named(tmp_path):
    r, p = plan("--model", str(model(tmp_path, "mixtral-8x7b")), "--devices",
                "slow=torch:ddr5-2ch:256GB,fast=torch:h200:141GB", "--bits", "8", "--context", "4096", "--json")
    assert r.returncode == 0 and p["faster_on_one_device"] == "fast"


def test_bad_device_specs_are_one_line(tmp_path):
    r, _ = plan("--model", str(model(tmp_path, "mixtral-8x7b")), "--devices", "mac=metal:64GB")
    assert r.returncode == 2 and "NAME=BACKEND:DEVICE:MEMORY" in r.stderr
