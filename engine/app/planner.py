"""Assign contiguous layer ranges to stages in proportion to their measured speed.

Splitting by memory alone is what made exo's clusters slower than one node: a slow machine
with much memory got most of the layers. Here each stage gets layers in proportion to its
speed (1 / ms per layer), capped by what fits in its memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import UserError
from ..core.stage import StageReport


MEMORY_FRACTION = 0.8  # of a stage's free memory its layers may fill (the rest: KV cache, activations)


@dataclass(slots=True)
class StageCapacity:
    address: str
    ms_per_layer: float  # measured decode time of one layer, one token
    max_layers: int  # how many layers fit in its free memory
    head_ms: float = 0.0  # final norm + head, paid by whichever stage is last

    @classmethod
    def of(cls, r: StageReport, memory_fraction: float = MEMORY_FRACTION) -> StageCapacity:
        """A daemon's capacity from what it measured at start-up: layers that fit in a fraction of its free memory."""
        return cls(r.address, r.ms_per_layer, int(memory_fraction * r.free_memory // max(r.layer_bytes, 1)), r.head_ms)


@dataclass(slots=True)
class LayerPlan:
    ranges: list[tuple[int, int]]
    predicted_ms_per_token: float

    def describe(self, caps: list[StageCapacity]) -> str:
        parts = [f"{c.address}={a}-{b} ({b - a + 1} layers x {c.ms_per_layer:.2f} ms)"
                 for c, (a, b) in zip(caps, self.ranges)]
        if caps[-1].head_ms:
            parts[-1] += f" + head {caps[-1].head_ms:.1f} ms"
        return "plan: " + ", ".join(parts) + f"; predicted {self.predicted_ms_per_token:.1f} ms/token"


def plan_layers(caps: list[StageCapacity], num_layers: int, hop_ms: float = 0.1) -> LayerPlan:
    """Layer counts proportional to speed, each at least 1 and at most its memory allows."""
    if sum(min(c.max_layers, num_layers) for c in caps) < num_layers:
        raise UserError(f"the stages' memory holds {sum(c.max_layers for c in caps)} layers; "
                        f"the model has {num_layers}")
    if len(caps) > num_layers:
        raise UserError(f"{len(caps)} stages for a model of {num_layers} layers")
    last = len(caps) - 1
    cost = lambda i, n: n * caps[i].ms_per_layer + (caps[i].head_ms if i == last else 0.0)  # noqa: E731
    counts = [1] * len(caps)
    # hand out the rest one layer at a time to the stage whose time per token stays lowest:
    # balanced stages mean layers in proportion to speed, and no idle stage in a full pipeline
    for _ in range(num_layers - len(caps)):
        open_ = [i for i, c in enumerate(caps) if counts[i] < c.max_layers]
        i = min(open_, key=lambda i: cost(i, counts[i] + 1))
        counts[i] += 1
    ranges, first = [], 0
    for n in counts:
        ranges.append((first, first + n - 1))
        first += n
    predicted = sum(cost(i, n) for i, n in enumerate(counts)) + hop_ms * len(caps)
    return LayerPlan(ranges, predicted)
