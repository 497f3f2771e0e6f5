"""Linear layers over quantized weights (`engine/core/quant.py`), re-laid at load for the kernel
that runs them on this host; the weights stay quantized in memory.

- Codes with float32 scales and biases (float16 on a CPU where both are exactly float16, as GGUF's
  d and m are): 4-bit codes two a byte as MLX packs them, other widths (8; 2, 3, 5, 6 unpacked)
  one byte a weight. A decode step (a few rows) on a CPU goes through
  `hetpipe::qmatmul` (our AVX2/AVX-512 kernel, `kernels/quant_matmul.cpp`); more rows, or other devices,
  dequantize the weight for the call and multiply (in fp32 on CPUs without bf16 arithmetic).
- 4 bits on a CPU where our kernels do not run (HETPIPE_NATIVE=0, not x86-64...): torch's
  `_weight_int4pack_mm_for_cpu`, packed here with `_convert_weight_to_int4pack_for_cpu`. Where
  ours run they are used instead: no slower for a row in bf16, ~14x faster in fp32, and a
  dequantized fp32 GEMM beats int4pack for a prefill (docs/benchmarks.md).
- 4 bits, CUDA, bf16 activations: `_weight_int4pack_mm` (sm80+), packed with
  `_convert_weight_to_int4pack`. Not run here (no GPU): where packing fails, the codes path.

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

from . import native
from .ops import qmatmul, unpack_nibbles

SMALL_ROWS = 8
WIDEN_HALF_GEMM = native.lacks_half_gemm()  # as in models/llama.py: bf16 GEMMs in fp32 on such CPUs


def _inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


def _our_kernels() -> bool:
    return native.load() is None


def held(t: QuantTensor, s: torch.Tensor, b: torch.Tensor, device: torch.device):
    """The scales and biases a CPU kernel reads: float16 where the checkpoint holds them so (exact:
    GGUF's d and m, `core.quant.from_codes`), else the float32 `s` and `b`."""
    if device.type == "cpu" and t.scales.dtype == t.biases.dtype == "float16":
        return tuple(torch.from_numpy(np.ascontiguousarray(a.data)) for a in (t.scales, t.biases))
    return s, b


class QuantLinear(nn.Module):
    def __init__(self, t: QuantTensor, dtype: torch.dtype, device: torch.device, bias: torch.Tensor | None = None,
                 int4pack: bool | None = None):
        """`int4pack`: on a CPU, use torch's int4 kernel for 4 bits (default: where ours do not run)."""
        super().__init__()
        self.out_features, self.in_features = t.shape
        self.bits, self.group_size = t.bits, t.group_size
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        s, b = (torch.from_numpy(np.ascontiguousarray(a)) for a in t.float_parts())
        self.kind = "codes"
        if int4pack is None:
            int4pack = not _our_kernels()
        if t.bits == 4 and device.type == "cpu" and int4pack:
            self.kind = "int4-cpu"
            q = torch.from_numpy(t.unpack()).to(torch.int32)
            self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 1))
        elif t.bits == 4 and device.type == "cuda" and dtype == torch.bfloat16:
            try:
                q = torch.from_numpy(t.unpack())
                u8 = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)
                self.register_buffer("packed", torch._convert_weight_to_int4pack(u8, _inner_k_tiles(t.shape[1])))
                self.kind = "int4-cuda"
            except (RuntimeError, StopIteration):
                pass
        if self.kind == "codes":  # 4-bit codes two a byte, as MLX packs them; other widths a byte each
            q = np.array(t.codes).view(np.uint8) if t.bits == 4 else t.unpack()
            self.register_buffer("codes", torch.from_numpy(q).to(device))
            s, b = held(t, s, b, device)
            self.register_buffer("scales", s.to(device))
            self.register_buffer("biases", b.to(device))
        else:  # (K / group, N, 2): scale and zero per group and output
            sz = torch.stack([s, b + 8 * s], dim=-1).transpose(0, 1).contiguous()
            self.register_buffer("scales_zeros", sz.to(device=device, dtype=dtype))

    @classmethod
    def sharing(cls, emb: QuantEmbedding) -> QuantLinear:
        """A linear layer over an embedding's own codes (the tied head): no second copy."""
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.out_features, head.in_features = emb.codes.shape[0], emb.in_features
        head.bits, head.group_size, head.kind, head.bias = emb.bits, emb.group_size, "codes", None
        head.codes, head.scales, head.biases = emb.codes, emb.scales, emb.biases
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "int4-cpu":
            y = torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_zeros)
        elif self.kind == "int4-cuda":
            y = torch._weight_int4pack_mm(x, self.packed, self.group_size, self.scales_zeros)
        elif x.device.type == "cpu" and x.shape[0] <= SMALL_ROWS:
            y = qmatmul(x, self.codes, self.scales, self.biases, self.group_size)
        else:
            y = self._dequantized_linear(x)
        return y if self.bias is None else y + self.bias

    def _dequantized_linear(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.codes if self.codes.shape[1] == self.in_features else unpack_nibbles(self.codes)
        n, k = codes.shape
        dt = torch.float32 if x.device.type == "cpu" and (WIDEN_HALF_GEMM or x.dtype == torch.float32) else x.dtype
        w = codes.view(n, k // self.group_size, self.group_size).to(dt) * self.scales[..., None].to(dt) \
            + self.biases[..., None].to(dt)
        return F.linear(x.to(dt), w.view(n, k)).to(x.dtype)


class QuantEmbedding(nn.Module):
    """Rows of a quantized embedding, dequantized as they are looked up; `as_linear` is the tied head,
    on the same codes (4-bit ones two a byte)."""

    def __init__(self, t: QuantTensor, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.group_size, self.dtype, self.bits = t.group_size, dtype, t.bits
        s, b = (torch.from_numpy(np.ascontiguousarray(a)) for a in t.float_parts())
        q = np.array(t.codes).view(np.uint8) if t.bits == 4 else t.unpack()
        self.register_buffer("codes", torch.from_numpy(q).to(device))
        s, b = held(t, s, b, device)
        self.register_buffer("scales", s.to(device))
        self.register_buffer("biases", b.to(device))
        self.in_features = t.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.codes[ids]
        q = (unpack_nibbles(q) if self.bits == 4 else q).float()
        n, k = q.shape
        w = q.view(n, k // self.group_size, self.group_size) * self.scales[ids][..., None].float() \
            + self.biases[ids][..., None].float()
        return w.view(n, k).to(self.dtype)

    def as_linear(self) -> nn.Module:
        return QuantLinear.sharing(self)
