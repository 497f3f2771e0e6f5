"""Layer ranges: parsing `--local` specs and splitting a model into contiguous stages."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError
from .stage import BACKENDS


@dataclass(slots=True)
class StageSpec:
    backend: str
    first: int
    last: int

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise UserError(f"unknown backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if self.first < 0 or self.last < self.first:
            raise UserError(f"bad layer range {self.first}-{self.last}")


def even_split(num_layers: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous ranges as equal as possible, earlier ranges taking the remainder."""
    if parts > num_layers:
        raise UserError(f"{parts} stages for a model of {num_layers} layers")
    base, extra = divmod(num_layers, parts)
    out, first = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        out.append((first, first + n - 1))
        first += n
    return out


def parse_local_spec(spec: str, num_layers: int) -> list[StageSpec]:
    """`mlx:0-14,torch:15-29`, or backends alone (`torch`, `mlx,torch`) for an even split."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise UserError("empty stage spec")
    with_ranges = [":" in s for s in items]
    if any(with_ranges) and not all(with_ranges):
        raise UserError(f"stage spec {spec!r}: give a range for every stage or for none")
    if not any(with_ranges):
        return [StageSpec(b, first, last) for b, (first, last) in zip(items, even_split(num_layers, len(items)))]
    stages = []
    for item in items:
        backend, _, rng = item.partition(":")
        try:
            a, _, b = rng.partition("-")
            first, last = int(a), int(b if b else a)
        except ValueError:
            raise UserError(f"bad layer range {rng!r} in {item!r} (want FIRST-LAST)") from None
        stages.append(StageSpec(backend, first, last))
    check_coverage([(s.first, s.last) for s in stages], num_layers)
    return stages


def check_coverage(ranges: list[tuple[int, int]], num_layers: int) -> None:
    """Ranges, in pipeline order, must cover 0..num_layers-1 exactly once, without gaps."""
    expect = 0
    for first, last in ranges:
        if first < expect:
            raise UserError(f"layer ranges overlap at layer {first}")
        if first > expect:
            raise UserError(f"layer ranges leave a gap: layers {expect}-{first - 1} are not assigned")
        expect = last + 1
    if expect > num_layers:
        raise UserError(f"layer range runs past the model's last layer {num_layers - 1}")
    if expect < num_layers:
        raise UserError(f"layers {expect}-{num_layers - 1} are not assigned to any stage")
