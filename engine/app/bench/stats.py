"""Statistics for benchmark ratios on a noisy shared machine: t intervals on log ratios."""

from __future__ import annotations

import numpy as np


def t_quantile_975(df: int) -> float:
    """Student's t 97.5% quantile: Abramowitz & Stegun 26.7.5 (within 0.1% from 3 degrees of freedom;
    exact figures for 1 and 2), so a confidence interval needs no scipy."""
    if df < 3:
        return {1: 12.706, 2: 4.303}[df]
    z = 1.959964
    g = [(z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
         (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
         (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160]
    return z + sum(gi / df ** (i + 1) for i, gi in enumerate(g))


def ratio_interval(ratios: list[float]) -> dict | None:
    """Geometric mean of per-round ratios and its 95% confidence interval (t on the logs).

    A shared machine's speed moves by 10-15% between rounds; the interval says whether a few
    percent of pipeline overhead is resolved by this run at all. None with fewer than 2 rounds.
    """
    if len(ratios) < 2:
        return None
    logs = np.log(ratios)
    mean, half = float(logs.mean()), t_quantile_975(len(logs) - 1) * float(logs.std(ddof=1)) / len(logs) ** 0.5
    return {"mean": float(np.exp(mean)), "low": float(np.exp(mean - half)), "high": float(np.exp(mean + half))}
