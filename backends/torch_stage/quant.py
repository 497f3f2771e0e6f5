"""Linear layers over quantized weights (`engine/core/quant.py`), re-laid at load for the kernel
that runs them on this host; the weights stay quantized in memory.

- 4 bits, CPU: torch's `_weight_int4pack_mm_for_cpu`, packed here with
  `_convert_weight_to_int4pack_for_cpu`, in any activation dtype.
- 4 bits, CUDA, bf16 activations: `_weight_int4pack_mm` (sm80+), packed with
  `_convert_weight_to_int4pack`. Not run here (no GPU): where packing fails, the codes path below.
- Other widths (8; 2, 3, 5, 6 unpacked to one byte per weight): uint8 codes with float32 scales
  and biases. A decode step (up to 8 rows) on a CPU goes through `hetpipe::qmatmul` (our AVX2
  kernel, `kernels/quant_matmul.cpp`); more rows, or other devices, dequantize the weight for
  the call and multiply.

Both int4 kernels compute `w = (q - 8) * scale + zero`, so `zero = bias + 8 * scale` (exact in
float32). The scales and zeros are held in the activation dtype: with bfloat16 they round to
bfloat16, with float32 they are the checkpoint's own.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.core.quant import QuantTensor

from .ops import qmatmul

SMALL_ROWS = 8


def _inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


class QuantLinear(nn.Module):
    def __init__(self, t: QuantTensor, dtype: torch.dtype, device: torch.device, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = t.shape
        self.bits, self.group_size = t.bits, t.group_size
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        s, b = (torch.from_numpy(np.ascontiguousarray(a)) for a in t.float_parts())
        q = torch.from_numpy(t.unpack())
        self.kind = "codes"
        if t.bits == 4 and device.type == "cpu":
            self.kind = "int4-cpu"
            self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        elif t.bits == 4 and device.type == "cuda" and dtype == torch.bfloat16:
            try:
                u8 = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)
                self.register_buffer("packed", torch._convert_weight_to_int4pack(u8, _inner_k_tiles(t.shape[1])))
                self.kind = "int4-cuda"
            except (RuntimeError, StopIteration):
                pass
        if self.kind == "codes":
            self.register_buffer("codes", q.to(device))
            self.register_buffer("scales", s.to(device))
            self.register_buffer("biases", b.to(device))
        else:  # (K / group, N, 2): scale and zero per group and output
            sz = torch.stack([s, b + 8 * s], dim=-1).transpose(0, 1).contiguous()
            self.register_buffer("scales_zeros", sz.to(device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "int4-cpu":
            y = torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_zeros)
        elif self.kind == "int4-cuda":
            y = torch._weight_int4pack_mm(x, self.packed, self.group_size, self.scales_zeros)
        elif x.device.type == "cpu" and x.shape[0] <= SMALL_ROWS:
            y = qmatmul(x, self.codes, self.scales, self.biases, self.group_size)
        else:
            n, k = self.codes.shape
            w = self.codes.view(n, k // self.group_size, self.group_size).to(x.dtype) * self.scales[..., None].to(
                x.dtype) + self.biases[..., None].to(x.dtype)
            y = F.linear(x, w.view(n, k))
        return y if self.bias is None else y + self.bias


class QuantEmbedding(nn.Module):
    """Rows of a quantized embedding, dequantized as they are looked up; `as_linear` is the tied head."""

    def __init__(self, t: QuantTensor, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.group_size, self.dtype = t.group_size, dtype
        s, b = (torch.from_numpy(np.ascontiguousarray(a)) for a in t.float_parts())
        self.register_buffer("codes", torch.from_numpy(t.unpack()).to(device))
        self.register_buffer("scales", s.to(device))
        self.register_buffer("biases", b.to(device))
        self.source = t

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.codes[ids].float()
        n, k = q.shape
        w = q.view(n, k // self.group_size, self.group_size) * self.scales[ids][..., None] + self.biases[ids][..., None]
        return w.view(n, k).to(self.dtype)

    def as_linear(self) -> nn.Module:
        """The tied head: the same codes where the head runs on codes, else packed for int4."""
        if self.source.bits == 4:
            return QuantLinear(self.source, self.dtype, self.codes.device)
        head = QuantLinear.__new__(QuantLinear)
        nn.Module.__init__(head)
        head.out_features, head.in_features = self.codes.shape
        head.bits, head.group_size, head.kind, head.bias = self.source.bits, self.group_size, "codes", None
        head.codes, head.scales, head.biases = self.codes, self.scales, self.biases
        return head
