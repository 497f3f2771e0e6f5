"""Linear layers and embeddings over quantized weights (`engine/core/quant.py`) in MLX.

The codes are MLX's own layout, so they load as they are: `mx.quantized_matmul` multiplies,
`mx.dequantize` looks embedding rows up, on Metal and on the CPU alike. Scales and biases are
held in the activation dtype (float32: the checkpoint's own; bfloat16: rounded).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from engine.core.quant import QuantTensor


class QuantLinear:
    def __init__(self, t: QuantTensor, dtype: mx.Dtype, bias: mx.array | None = None):
        s, b = t.float_parts()
        self.w = mx.array(np.ascontiguousarray(t.codes))
        self.scales, self.biases = mx.array(s).astype(dtype), mx.array(b).astype(dtype)
        self.bits, self.group_size, self.bias = t.bits, t.group_size, bias

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.quantized_matmul(x, self.w, self.scales, self.biases, transpose=True, group_size=self.group_size,
                                bits=self.bits)
        return y if self.bias is None else y + self.bias

    def parameters(self) -> list[mx.array]:
        return [self.w, self.scales, self.biases] + ([self.bias] if self.bias is not None else [])


class QuantEmbedding(QuantLinear):
    """Rows looked up and dequantized; called as a linear layer it is the tied head (`as_linear`)."""

    def __getitem__(self, ids: mx.array) -> mx.array:
        return mx.dequantize(self.w[ids], self.scales[ids], self.biases[ids], group_size=self.group_size,
                             bits=self.bits)
