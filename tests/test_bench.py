"""`hetpipe bench backends|pipeline` write JSON, Markdown and PNG; results carry a time breakdown."""

import json
import math
import statistics
import subprocess
import sys

import pytest
from safetensors import safe_open

from engine.compose import allocator
from engine.app.bench.backends import decode_weight_bytes
from engine.app.bench.stats import ratio_interval, t_quantile_975
from engine.api import local_pipeline
from engine.core.config import ModelConfig
from engine.core.shapes import ShapeModel
from engine.api import Generator


def run(*args, timeout=600):
    r = subprocess.run([sys.executable, "-m", "engine.app.cli", "bench", *args], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_bench_backends_times_every_backend_and_writes_three_files(real_model, tmp_path):
    rows = run("backends", "--model", str(real_model), "--layers", "0-1", "--dtypes", "float32",
               "--prompt-len", "8", "--max-tokens", "2", "--quant", "4:32", "--out", str(tmp_path), "--json")
    assert sorted((r["backend"], r["weights"]) for r in rows) == [("mlx", "4-bit g32"), ("mlx", "float"),
                                                                   ("torch", "4-bit g32"), ("torch", "float")]
    by = {(r["backend"], r["weights"]): r for r in rows}
    for b in ("mlx", "torch"):  # 4 bits + a float32 scale and bias per 32 weights: 0.75 of 4 bytes a weight
        q, f = by[b, "4-bit g32"], by[b, "float"]
        assert (q["bits"], q["group_size"], f["bits"]) == (4, 32, None)
        assert 0.15 < q["weight_bytes_per_token"] / f["weight_bytes_per_token"] < 0.25
    assert all(r["layers"] == [0, 1] and r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
               and r["ms_per_layer"] > 0 for r in rows)
    # weights read per second and the memory floor: both backends measure their device's bandwidth
    for r in rows:
        assert r["weights_gb_per_s"] == pytest.approx(r["weight_bytes_per_token"] * r["decode_tokens_per_s"] / 1e9)
        assert r["memory_read_gb_per_s"] > 0.1
        assert r["floor_tokens_per_s"] == pytest.approx(r["memory_read_gb_per_s"] * 1e9 / r["weight_bytes_per_token"])
    assert json.loads((tmp_path / "backends.json").read_text()) == rows
    # the `hetpipe` command restarts itself on tcmalloc where the system has it; its stages inherit it
    assert {r["allocator"] for r in rows} == {"tcmalloc" if allocator.library() else "system"}
    table = (tmp_path / "backends.md").read_text().splitlines()
    assert table[0].startswith("| model | backend |") and sorted(line.split("|")[2].strip() for line in table[2:]) == [
        "mlx", "mlx", "torch", "torch"]
    assert (tmp_path / "backends.png").read_bytes()[:4] == b"\x89PNG"
    # --backends picks which run, with a model as with --shape
    only = run("backends", "--model", str(real_model), "--layers", "0-0", "--dtypes", "float32", "--backends",
               "torch", "--prompt-len", "4", "--max-tokens", "2", "--quant", "", "--out", str(tmp_path / "o"), "--json")
    assert [(r["backend"], r["weights"]) for r in only] == [("torch", "float")]


def test_bench_backends_times_a_big_models_widths_made_in_memory(tmp_path):
    """`--shape`: one layer and the head of Llama-3-8B, random, float and 4-bit; what a token reads is
    the config's count: the 4-bit copy 4 bits and a scale and bias in the activation dtype per 32
    weights (`layer_cost.per_weight`)."""
    rows = run("backends", "--shape", "llama-3-8b", "--layers", "1", "--backends", "torch", "--dtypes", "bfloat16",
               "--prompt-len", "4", "--max-tokens", "2", "--quant", "4:32", "--out", str(tmp_path), "--json")
    by = {r["weights"]: r for r in rows}
    assert sorted(by) == ["4-bit g32", "float"] and {r["model"] for r in rows} == {
        "llama-3-8b (1 layer)", "llama-3-8b (1 layer, 4-bit g32)"}
    cfg = ShapeModel("llama-3-8b", 1).config
    assert by["float"]["weight_bytes_per_token"] == decode_weight_bytes(cfg, 0, 0, "bfloat16")
    assert by["4-bit g32"]["weight_bytes_per_token"] / by["float"]["weight_bytes_per_token"] == pytest.approx(
        (0.5 + 2 * 2 / 32) / 2, rel=0.01)
    assert all(r["decode_tokens_per_s"] > 0 and r["memory_read_gb_per_s"] > 0.1 for r in rows)
    for bad, why in ((["--model", "x"], "one or the other"), (["--layers", "0-1"], "how many layers")):
        r = subprocess.run([sys.executable, "-m", "engine.app.cli", "bench", "backends", "--shape", "llama-3-8b", *bad],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr


def test_a_shape_makes_what_loading_a_checkpoint_of_it_would():
    """Qwen3-30B-A3B's first layer, 4-bit: every tensor a stage needs, experts stacked as loading
    stacks them, codes packed at 4 bits."""
    from engine.core.quant import QuantTensor
    from engine.core.weights import _required_names, load_stage_tensors

    shape = ShapeModel("qwen3-30b-a3b", 1, 4, 32)
    w = load_stage_tensors(shape, shape.config, 0, 0)
    assert set(_required_names(shape.config, 0, 0)) <= set(w) and "lm_head.weight" in w
    gate_up, down = w["model.layers.0.mlp.experts.gate_up_proj"], w["model.layers.0.mlp.experts.down_proj"]
    assert isinstance(gate_up, QuantTensor) and gate_up.codes.shape == (128, 2 * 768, 2048 * 4 // 32)
    assert down.scales.data.shape == (128, 2048, 768 // 32)
    assert w["model.layers.0.mlp.gate.weight"].shape == (128, 2048)


def test_decode_weight_bytes_are_the_checkpoints_tensors(real_model):
    """What a decode step reads, counted from the config, against the tensors in the checkpoint."""
    cfg = ModelConfig.load(real_model)
    with safe_open(str(real_model / "model.safetensors"), "np") as f:
        sizes = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}

    def layers(*ids):
        return sum(v for k, v in sizes.items() if k.startswith(tuple(f"model.layers.{i}." for i in ids)))

    head = sizes.get("lm_head.weight", sizes["model.embed_tokens.weight"]) + sizes["model.norm.weight"]
    n = cfg.num_hidden_layers
    assert decode_weight_bytes(cfg, 0, 1, "float32") == 4 * layers(0, 1)
    assert decode_weight_bytes(cfg, n - 2, n - 1, "bfloat16") == 2 * (layers(n - 2, n - 1) + head)


def test_bench_pipeline_compares_four_ways_in_one_run(real_model, tmp_path):
    r = run("pipeline", "--model", str(real_model), "--rounds", "2", "--max-tokens", "3", "--out", str(tmp_path),
            "--json")
    assert set(r["tokens_per_s"]) == {"mlx+torch in-process", "torch+torch in-process", "mlx+torch zeromq",
                                      "torch+torch zeromq"}
    assert all(v > 0 for v in r["ratios"].values()) and len(r["ratios"]) == 4
    runs = r["runs"]
    assert all(len(v) == 2 for v in runs.values())
    per_round = [runs["mlx+torch zeromq"][i] / runs["mlx+torch in-process"][i] for i in range(2)]
    assert r["paired_ratios"]["mlx+torch zeromq / in-process"] == pytest.approx(sum(per_round) / 2)
    assert r["ratios"]["mlx+torch zeromq / in-process"] == pytest.approx(
        statistics.median(runs["mlx+torch zeromq"]) / statistics.median(runs["mlx+torch in-process"]))
    iv = r["ratio_intervals"]["mlx+torch zeromq / in-process"]
    assert iv["mean"] == pytest.approx((per_round[0] * per_round[1]) ** 0.5)
    assert iv["low"] < iv["mean"] < iv["high"] or per_round[0] == per_round[1]
    assert [len(b["compute_ms_per_step"]) for b in r["step_breakdown"].values()] == [2] * 4
    assert "95% interval" in (tmp_path / "pipeline.md").read_text()
    zmq_profile = r["last_profile"]["torch+torch zeromq"]
    assert [s["compute_ms"] > 0 for s in zmq_profile["stages"]] == [True, True] and zmq_profile["wire_ms"] > 0
    # per hop (coordinator -> stage 1 -> stage 2 -> coordinator): within the step's wire time
    for name, b in r["step_breakdown"].items():
        hops = b["hop_ms_per_step"]
        if "in-process" in name:
            assert hops == []
        else:
            assert len(hops) == 3 and all(h >= 0 for h in hops) and sum(hops) <= b["wire_ms_per_step"] * 1.05 + 0.2
    assert "ms per hop" in (tmp_path / "pipeline.md").read_text()
    assert (tmp_path / "pipeline.png").read_bytes()[:4] == b"\x89PNG" and "| ratio |" in (
        tmp_path / "pipeline.md").read_text()


@pytest.mark.parametrize("df,table", [(1, 12.706), (3, 3.182), (5, 2.571), (10, 2.228), (20, 2.086), (60, 2.000)])
def test_t_quantile_matches_the_tables(df, table):
    assert t_quantile_975(df) == pytest.approx(table, rel=2e-3)


def test_ratio_interval_is_a_t_interval_on_the_logs():
    # logs of the ratios: -0.1, 0, 0.1 -> mean 0, sd 0.1, half width t(2) * 0.1 / sqrt(3)
    iv = ratio_interval([math.exp(-0.1), 1.0, math.exp(0.1)])
    assert iv["mean"] == pytest.approx(1.0)
    assert math.log(iv["high"]) == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-3)
    assert math.log(iv["low"]) == pytest.approx(-math.log(iv["high"]))
    assert ratio_interval([0.97]) is None


def test_every_result_carries_its_profile(real_model):
    gen = Generator(real_model, local_pipeline(str(real_model), "mlx:0-14,torch:15-29"))
    res = gen.generate([1, 2, 3, 4], max_tokens=5, ignore_eos=True)
    p = res.profile
    assert p["steps"] == 5 and p["ttft_ms"] == res.ttft_ms and 0 < p["itl_ms_p50"] <= p["itl_ms_p95"]
    assert [s["stage"] for s in p["stages"]] == ["mlx:0-14", "torch:15-29"]
    assert all(s["compute_ms"] > 0 for s in p["stages"])
    gen.close()
