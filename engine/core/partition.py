"""Layer ranges: `FIRST-LAST` text, even splits, and checks that ranges cover a model once."""

from __future__ import annotations

from .errors import UserError


def parse_layer_range(text: str) -> tuple[int, int]:
    """`FIRST-LAST` (or one layer, `N`) as (first, last); both non-negative, first <= last."""
    a, _, b = text.strip().partition("-")
    try:
        first, last = int(a), int(b if b else a)
    except ValueError:
        raise UserError(f"bad layer range {text!r} (want FIRST-LAST)") from None
    if first < 0 or last < first:
        raise UserError(f"bad layer range {text!r} (want FIRST-LAST with 0 <= FIRST <= LAST)")
    return first, last


def check_range(first: int, last: int, num_layers: int) -> None:
    if not 0 <= first <= last < num_layers:
        raise UserError(f"layers {first}-{last} are outside the model's 0-{num_layers - 1}")


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
