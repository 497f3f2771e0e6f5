"""Thread pools that stop spinning within a millisecond of their last work: what lets two stages
share one machine's cores, as a pipeline's stages do while they take turns.

After each parallel region torch's OpenMP workers (libgomp) spin 300,000 PAUSEs before they sleep
(~6 ms on Zen 3), and OpenBLAS's workers (MLX's fp32 matmuls) 2^28 cycles (~90 ms): a daemon that
has just finished its step keeps a core busy through the next stage's step. Shorter spins still
cover the gaps between one step's kernels. Measured on 2 cores (`hetpipe bench pipeline`, fp32,
three rounds each): torch+torch daemons against the same stages in one process 0.65-0.88 with the
libraries' defaults, 0.95-1.00 with these; mlx+torch 0.57 and 0.95-1.05; one stage alone unchanged
(bf16 decode, five interleaved runs each, medians 35.1 and 36.1 tokens/s).

`OMP_WAIT_POLICY=PASSIVE`, no spin at all, is not the answer: every parallel region then wakes
sleeping workers, and the same decode calls ran at half speed.

These are read when the libraries load, so the `hetpipe` command sets them first thing, for
itself and the stage daemons and workers it starts; a value the user set is kept.
"""

from __future__ import annotations

import os

SPIN_WAITS = {
    "GOMP_SPINCOUNT": "30000",  # libgomp: ~0.6 ms of PAUSEs, then sleep
    "OPENBLAS_THREAD_TIMEOUT": "20",  # OpenBLAS: 2^20 cycles, ~0.3 ms
}


def apply(env=None) -> dict:
    """Set the short spin-waits in `env` (default: this process's environment) where unset."""
    env = os.environ if env is None else env
    for key, value in SPIN_WAITS.items():
        env.setdefault(key, value)
    return env
