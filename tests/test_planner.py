"""The planner: layers in proportion to speed, within memory, the head counted on the last stage; a
layer's time by the weight bytes a token reads from it, its memory by the bytes it holds."""

import json
import math

import pytest

from engine.compose.planner import StageCapacity, plan_layers
from engine.core.config import ModelConfig
from engine.core.errors import UserError
from engine.core.layer_cost import LayerCost, calibration_layer, layer_cost, relative_costs
from engine.core.weights import layer_bytes


def test_faster_stage_gets_proportionally_more_layers():
    plan = plan_layers([StageCapacity("a", 1.0, 100), StageCapacity("b", 3.0, 100)], 32)
    assert plan.ranges == [(0, 23), (24, 31)]  # 24 x 1 ms vs 8 x 3 ms: balanced


def test_memory_caps_a_fast_stage():
    plan = plan_layers([StageCapacity("a", 1.0, 10), StageCapacity("b", 3.0, 100)], 30)
    assert plan.ranges == [(0, 9), (10, 29)]


def test_head_cost_moves_layers_off_the_last_stage():
    even = plan_layers([StageCapacity("a", 2.0, 100), StageCapacity("b", 2.0, 100)], 30)
    headed = plan_layers([StageCapacity("a", 2.0, 100), StageCapacity("b", 2.0, 100, head_ms=8.0)], 30)
    assert even.ranges == [(0, 14), (15, 29)]
    assert headed.ranges == [(0, 16), (17, 29)]
    assert headed.predicted_ms_per_token > even.predicted_ms_per_token


def test_not_enough_memory_or_too_many_stages():
    with pytest.raises(UserError, match="memory holds"):
        plan_layers([StageCapacity("a", 1.0, 5), StageCapacity("b", 1.0, 5)], 30)
    with pytest.raises(UserError, match="stages for a model"):
        plan_layers([StageCapacity(str(i), 1.0, 9) for i in range(4)], 3)


def test_layers_are_planned_by_the_bytes_a_token_reads_and_held_by_the_bytes_held():
    dense_first = [LayerCost(held=0.5, read=2.5)] + [LayerCost(1.0, 1.0)] * 3  # a MoE with a dense layer 0
    even = [StageCapacity("a", 1.0, 100), StageCapacity("b", 1.0, 100)]
    assert plan_layers(even, 4).ranges == [(0, 1), (2, 3)]
    plan = plan_layers(even, 4, costs=dense_first)
    assert plan.ranges == [(0, 0), (1, 3)] and plan.stage_ms == [2.5, 3.0]  # not 3.5 | 2 ms
    assert "0-0 (1 layer, 1.00 ms a timed layer: 2.5 ms)" in plan.describe(even)
    # a fast stage with room for two routed layers holds two dense ones and a routed one
    small_fast = [StageCapacity("a", 0.1, 2), StageCapacity("b", 1.0, 100)]
    two_dense = [LayerCost(0.5, 1.0)] * 2 + [LayerCost(1.0, 1.0)] * 4
    assert plan_layers(small_fast, 6).ranges == [(0, 1), (2, 5)]
    assert plan_layers(small_fast, 6, costs=two_dense).ranges == [(0, 2), (3, 5)]


@pytest.mark.parametrize("family", ["llama", "gemma3", "mixtral", "qwen3_moe"])
def test_layer_costs_are_the_checkpoints_tensors(tmp_path, family):
    """Held bytes are every tensor of the layer in the checkpoint; a token reads all but the experts it
    does not route to."""
    from safetensors import safe_open

    from tiny import make_tiny

    model = make_tiny(tmp_path / family, family)
    cfg = ModelConfig.load(model)
    with safe_open(str(model / "model.safetensors"), "np") as f:
        sizes = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}
    for i in range(cfg.num_hidden_layers):
        layer = {k: v for k, v in sizes.items() if k.startswith(f"model.layers.{i}.")}
        cost = layer_cost(cfg, i, "float32")
        assert cost.held == 4 * sum(layer.values())
        one_expert = sum(v for k, v in layer.items() if ".experts.0." in k)
        unread = cfg.moe.n_experts - cfg.moe.top_k if cfg.moe and cfg.moe.routed(i) else 0
        assert cost.read == cost.held - 4 * unread * one_expert
        assert (one_expert > 0) == (unread > 0)
    if cfg.moe:  # qwen3_moe's layer 1 is dense: the routed layers are the ones timed
        assert cfg.moe.routed(calibration_layer(cfg))
        assert relative_costs(cfg)[calibration_layer(cfg)] == LayerCost(1.0, 1.0)
        # a two-layer model whose one routed layer is the last: layer 0 is timed, not the head's stage
        two = ModelConfig.from_dict({**json.loads((model / "config.json").read_text()), "num_hidden_layers": 2,
                                     "mlp_only_layers": [0], "decoder_sparse_step": 1})
        assert calibration_layer(two) == 0


def test_daemons_calibrate_a_moe_on_a_routed_layer_and_the_split_generates_as_transformers(tmp_path):
    from engine.api import Generator, connect_pipeline
    from engine.app.procs import start_stage, stop_stages
    from reference import hf_greedy, hf_model
    from tiny import make_tiny

    model = make_tiny(tmp_path / "moe", "qwen3_moe", mlp_only_layers=[0])  # layer 0 dense: not the one timed
    cfg = ModelConfig.load(model)
    assert calibration_layer(cfg) == 1
    procs = [start_stage(backend, model) for backend in ("mlx", "torch")]
    try:
        logs = []
        pipe = connect_pipeline(model, ",".join(a for _, a in procs), log=logs.append)
        reports = [s.report for s in pipe.stages]
        assert all(r.ms_per_layer > 0 for r in reports)
        assert {r.layer_bytes for r in reports} == {layer_bytes(model, cfg, "float32", 1)}
        caps = [StageCapacity.of(r) for r in reports]
        ranges = [(s.info.first, s.info.last) for s in pipe.stages]
        assert ranges == plan_layers(caps, 4, costs=relative_costs(cfg, "float32")).ranges
        ids = [5, 17, 33, 9, 100, 7, 3, 250, 12, 64, 31]
        with Generator(model, pipe) as gen:
            assert gen.generate(ids, max_tokens=6, ignore_eos=True).token_ids == hf_greedy(hf_model(model), ids, 6)[0]
    finally:
        stop_stages([p for p, _ in procs])
