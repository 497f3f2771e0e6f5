"""Assign contiguous layer ranges to stages in proportion to their measured speed.

Splitting by memory alone is what made exo's clusters slower than one node: a slow machine
with much memory got most of the layers. Here each stage gets layers in proportion to its
speed (1 / ms per layer), capped by what fits in its memory. Layers need not cost alike: a MoE
layer holds all its experts but a token reads only its top-k, so time follows the bytes read and
memory the bytes held (`core/layer_cost.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core.errors import UserError
from ..core.layer_cost import LayerCost
from ..core.stage import StageReport


MEMORY_FRACTION = 0.8  # of a stage's free memory its layers may fill (the rest: KV cache, activations)


@dataclass(slots=True)
class StageCapacity:
    address: str
    ms_per_layer: float  # measured decode time of one layer (the calibration layer), one token
    max_layers: int  # how many such layers fit in its free memory
    head_ms: float = 0.0  # final norm + head, paid by whichever stage is last
    dtype: str = ""  # what it computes in (its --dtype, resolved), shown in the plan line

    @classmethod
    def of(cls, r: StageReport, memory_fraction: float = MEMORY_FRACTION, layer_bytes: int = 1) -> StageCapacity:
        """A daemon's capacity from what it measured at start-up: layers that fit in a fraction of its
        free memory (`layer_bytes`: what a layer holds, where the daemon weighed none)."""
        weight = r.layer_bytes or layer_bytes
        return cls(r.address, r.ms_per_layer, int(memory_fraction * r.free_memory // max(weight, 1)), r.head_ms,
                   r.dtype)


@dataclass(slots=True)
class LayerPlan:
    ranges: list[tuple[int, int]]
    predicted_ms_per_token: float
    stage_ms: list[float]  # each stage's predicted time per token (the head included on the last)

    def describe(self, caps: list[StageCapacity]) -> str:
        parts = []
        for i, (c, (a, b), ms) in enumerate(zip(caps, self.ranges, self.stage_ms)):
            head = f" and the head's {c.head_ms:.1f} ms" if i == len(caps) - 1 and c.head_ms else ""
            n = b - a + 1
            dtype = f"{c.dtype}, " if c.dtype else ""
            parts.append(f"{c.address}={a}-{b} ({dtype}{n} layer{'s' * (n > 1)}, {c.ms_per_layer:.2f} ms a timed layer"
                         f"{head}: {ms:.1f} ms)")
        return "plan: " + ", ".join(parts) + f"; predicted {self.predicted_ms_per_token:.1f} ms/token"


def plan_layers(caps: list[StageCapacity], num_layers: int, hop_ms: float = 0.1,
                costs: list[LayerCost] | None = None) -> LayerPlan:
    """Contiguous ranges, in stage order, that minimize the slowest stage's time per token (then the
    total), each stage at least one layer and within its memory.

    `costs`: each layer's held and read bytes relative to the layer the daemons timed and weighed
    (`core.layer_cost.relative_costs`); without them every layer costs the same. A stage's time is its
    ms per layer times the read bytes of its layers, plus the head on the last; its memory holds
    `max_layers` times the weighed layer's bytes."""
    costs = costs or [LayerCost(1.0, 1.0)] * num_layers
    timed = [c.ms_per_layer for c in caps if c.ms_per_layer > 0]
    if len(timed) < len(caps):  # a daemon that did not time a layer (its weights not fetched yet): as fast as the rest
        fill = sum(timed) / len(timed) if timed else 1.0
        caps = [c if c.ms_per_layer > 0 else dataclasses.replace(c, ms_per_layer=fill) for c in caps]
    if len(costs) != num_layers:
        raise ValueError(f"{len(costs)} layer costs for {num_layers} layers")
    if len(caps) > num_layers:
        raise UserError(f"{len(caps)} stages for a model of {num_layers} layers")
    held, read = [0.0], [0.0]  # prefix sums
    for c in costs:
        held.append(held[-1] + c.held)
        read.append(read[-1] + c.read)
    if sum(c.max_layers for c in caps) + 1e-9 < held[-1]:
        raise UserError(f"the stages' memory holds {sum(c.max_layers for c in caps)} layers; "
                        f"the model has {num_layers}")
    last = len(caps) - 1

    def cost(s: int, a: int, b: int) -> float:  # stage s serving layers [a, b)
        return caps[s].ms_per_layer * (read[b] - read[a]) + (caps[s].head_ms if s == last else 0.0)

    # best[s][b]: (slowest stage, total) of stages 0..s serving layers [0, b); cut[s][b]: where stage s starts
    inf = (float("inf"), float("inf"))
    best = [[inf] * (num_layers + 1) for _ in caps]
    cut = [[0] * (num_layers + 1) for _ in caps]
    for s, cap in enumerate(caps):
        for b in range(s + 1, num_layers - (last - s) + 1):
            for a in [0] if s == 0 else range(s, b):
                prev = (0.0, 0.0) if s == 0 else best[s - 1][a]
                if held[b] - held[a] > cap.max_layers + 1e-9 or prev == inf:
                    continue
                t = cost(s, a, b)
                cand = (max(prev[0], t), prev[1] + t)
                if cand < best[s][b]:
                    best[s][b], cut[s][b] = cand, a
    if best[last][num_layers] == inf:
        raise UserError(f"no split of the model's {num_layers} layers fits the stages' memory in this order")
    ranges, b = [], num_layers
    for s in range(last, -1, -1):
        a = cut[s][b]
        ranges.append((a, b - 1))
        b = a
    ranges.reverse()
    stage_ms = [cost(s, a, b + 1) for s, (a, b) in enumerate(ranges)]
    return LayerPlan(ranges, best[last][num_layers][1] + hop_ms * len(caps), stage_ms)
