"""The planner: layers in proportion to speed, within memory, the head counted on the last stage."""

import pytest

from engine.core.errors import UserError
from engine.app.planner import StageCapacity, plan_layers


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
