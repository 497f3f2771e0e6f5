"""The stage specs users write: `--local mlx:0-14,torch:15-29` and `--stages ADDR=0-14,ADDR=15-29`."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import UserError
from ..core.partition import check_coverage, even_split, parse_layer_range
from .stages import check_backend


@dataclass(slots=True)
class StageSpec:
    backend: str
    first: int
    last: int

    def __post_init__(self):
        check_backend(self.backend)


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
        backend, _, text = item.partition(":")
        stages.append(StageSpec(backend, *parse_layer_range(text)))
    check_coverage([(s.first, s.last) for s in stages], num_layers)
    return stages


def parse_stages_spec(spec: str) -> list[tuple[str, tuple[int, int] | None]]:
    """`tcp://a:5555=0-14,tcp://b:5555=15-29`, or addresses alone for the planner to split."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        address, _, text = item.partition("=")
        check_address(address)
        out.append((address, parse_layer_range(text) if text else None))
    if not out:
        raise UserError("no stage addresses given")
    given = [layers is not None for _, layers in out]
    if any(given) and not all(given):
        raise UserError("stage addresses: give a range for every stage or for none")
    return out


def check_address(address: str) -> str:
    if not address.startswith(("tcp://", "ipc://")):
        raise UserError(f"stage address {address!r} needs a scheme, like tcp://host:port or ipc:///path")
    return address
