"""Linear layers and embeddings over quantized weights (`engine/core/quant.py`) in MLX.

The codes are MLX's own layout, so they load as they are (a symmetric tensor's biases made from its
scales; Q6_K's groups of 16 requantized to 8 bits at load): `mx.quantized_matmul` multiplies,
`mx.dequantize` looks embedding rows up, on Metal and on the CPU alike. Scales and biases are
held in the activation dtype (float32: the checkpoint's own; bfloat16: rounded).

On the CPU backend `quantized_matmul` has no fast path for many rows: for a prefill it is ~40x
slower than dequantizing the weight and multiplying with BLAS. So on the CPU a call of more than
`CPU_QMM_ROWS` rows dequantizes the weight for the call; decode rows keep `quantized_matmul`
(cheaper than a dequantize). On Metal every call is `quantized_matmul`, as in mlx-lm. Figures:
docs/benchmarks.md.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.core.quant import QuantTensor

CPU_QMM_ROWS = 8


class QuantLinear(nn.Module):
    """`nn.QuantizedLinear`'s arrays (weight: the packed codes, scales, biases; bias), built from a
    `QuantTensor` as it is, and its CPU prefill path."""

    def __init__(self, t: QuantTensor, dtype: mx.Dtype, bias: mx.array | None = None):
        super().__init__()
        if t.mode == "q6_k":  # groups of 16, which MLX's kernels do not take
            t = t.requantized8()
        s, b = t.float_parts()
        self.weight = mx.array(np.ascontiguousarray(t.codes))
        self.scales, self.biases = mx.array(s).astype(dtype), mx.array(b).astype(dtype)
        self.bits, self.group_size, self.bias = t.bits, t.group_size, bias
        self.max_qmm_rows = CPU_QMM_ROWS if mx.default_device() == mx.cpu else None

    def __call__(self, x: mx.array) -> mx.array:
        return self.run(self, x)

    def key(self):
        """What a compiled graph over `run` depends on besides its inputs (`models/llama.py`)."""
        return ("q", self.bits, self.group_size, self.bias is not None)

    def run(self, p, x):
        """The layer with its arrays `p` (its parameters) passed in, for a compiled graph."""
        y = self.matmul(x, p["weight"], p["scales"], p["biases"])
        return y + p["bias"] if "bias" in p else y

    def matmul(self, x, w, scales, biases) -> mx.array:
        if self.max_qmm_rows is not None and x.shape[0] > self.max_qmm_rows:
            return x @ mx.dequantize(w, scales, biases, group_size=self.group_size, bits=self.bits).T
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=self.group_size, bits=self.bits)


class QuantEmbedding(QuantLinear):
    """`nn.QuantizedEmbedding`: called with token ids, their rows dequantized; `as_linear`, the tied head."""

    def __call__(self, ids: mx.array) -> mx.array:
        return mx.dequantize(self.weight[ids], self.scales[ids], self.biases[ids], group_size=self.group_size,
                             bits=self.bits)

    def as_linear(self, x: mx.array) -> mx.array:
        return self.run(self, x)
