"""Linear layers over quantized weights (`engine/core/quant.py`), re-laid at load for the kernel
that runs them on this host; the weights stay quantized in memory.

- Codes with float32 scales and biases (float16 on a CPU where both are exactly float16, as GGUF's
  d and m are): 4-bit codes two a byte as MLX packs them, other widths (8; 2, 3, 5, 6 unpacked)
  one byte a weight.
- On a CPU where our kernels run, 4- and 8-bit weights with half activations (bf16, fp16) are held
  with 8 rows interleaved (`rows8`), and a decode step (a few rows) goes through
  `hetpipe::qmatmul_rows8` (`kernels/quant_rows8.cpp`): x rounded to 8 bits per block of 32 as
  llama.cpp does (an error within 1/254 of the block's largest value: coarser than bf16 for values
  well below it; on SmolLM2 Q4_1 a token's log-probability moves up to ~0.3 from float32's, against
  ~0.07 for bf16 products of exact x), integer dot products with AVX512-VNNI or AVX2. Symmetric
  weights (GGUF's Q4_0 and Q8_0: b = -2^(bits-1) s exactly) keep no biases; GGUF's Q6_K keeps its
  6 bits and two-level scales (`hetpipe::qmatmul_rows8_q6k`). Float32 activations keep exact products through
  `hetpipe::qmatmul` (`kernels/quant_matmul.cpp`), as do the other widths (Q6_K requantized to 8
  bits for them).
- More rows, or other devices, dequantize the weight for the call and multiply (in fp32 on CPUs
  without bf16 arithmetic).
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
from .ops import (deinterleave8, interleave8, q6_codes, q6_planes, qmatmul, qmatmul_rows8, qmatmul_rows8_q6k,
                  unpack_nibbles)

SMALL_ROWS = 8
WIDEN_HALF_GEMM = native.lacks_half_gemm()  # as in models/llama.py: bf16 GEMMs in fp32 on such CPUs


def _inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


def _our_kernels() -> bool:
    return native.load() is None


def held(t: QuantTensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scales and biases a CPU kernel reads: float16 where the checkpoint holds them so (exact:
    GGUF's d and m, `core.quant.from_codes`), else float32; no biases for a symmetric tensor."""
    if device.type == "cpu" and t.scales.dtype == "float16" and (t.biases is None or t.biases.dtype == "float16"):
        return tuple(None if a is None else torch.from_numpy(np.array(a.data)) for a in (t.scales, t.biases))
    s, b = (torch.from_numpy(np.ascontiguousarray(a)) for a in t.float_parts())
    return s, (None if t.biases is None else b)


def rows8(t: QuantTensor, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `t` is held in the `rows8` layout: see the module's docstring."""
    fits = t.bits in (4, 8) and t.group_size % 32 == 0 if t.mode != "q6_k" else t.shape[1] % 256 == 0
    return (device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and t.shape[0] % 8 == 0 and fits
            and _our_kernels())


def _interleaved(a: torch.Tensor) -> torch.Tensor:  # (N, G) per-row parts -> (N / 8, G, 8)
    return a.view(a.shape[0] // 8, 8, -1).transpose(1, 2).contiguous()


class Codes(nn.Module):
    """A quantized matrix's codes, scales and biases as a CPU or GPU holds them: in row order, or
    with 8 rows interleaved (`rows8`: codes (N / 8, K * bits / 32, 8, 4), scales and biases
    (N / 8, K / group, 8), and no biases where b = -2^(bits-1) s), or GGUF's Q6_K in that manner
    (`q6`: the codes' low and high bits in two planes, `ops.q6_planes`; int8 sub-scales and float16
    super-scales (N / 8, K / 16 or K / 256, 8)). Q6_K is requantized to 8 bits where `rows8` does
    not apply (`QuantTensor.requantized8`)."""

    def __init__(self, t: QuantTensor, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.rows8 = rows8(t, dtype, device)
        self.q6 = self.rows8 and t.mode == "q6_k"
        if t.mode == "q6_k" and not self.q6:
            t = t.requantized8()
        self.bits, self.group_size, self.shape = t.bits, t.group_size, t.shape
        if self.q6:
            low, high = q6_planes(torch.from_numpy(t.unpack()))
            self.register_buffer("codes", low)
            self.register_buffer("high", high)
            self.register_buffer("scales", _interleaved(torch.from_numpy(np.array(t.scales.data))))
            self.register_buffer("super_scales", _interleaved(torch.from_numpy(np.array(t.super_scales.data))))
            self.register_buffer("biases", None)
            return
        q = torch.from_numpy(np.array(t.codes).view(np.uint8) if t.bits == 4 else t.unpack())
        s, b = held(t, device)
        if self.rows8:
            q, s, b = interleave8(q), _interleaved(s), None if b is None else _interleaved(b)
            if b is not None and torch.equal(b.float(), -(1 << (t.bits - 1)) * s.float()):
                b = None  # symmetric in all but name (an affine checkpoint of Q4_0 or Q8_0 weights)
        elif b is None:  # the float kernel and the dequantized path take biases
            b = -(1 << (t.bits - 1)) * s
        self.register_buffer("codes", q.to(device))
        self.register_buffer("scales", s.to(device))
        self.register_buffer("biases", None if b is None else b.to(device))

    def natural(self, rows: torch.Tensor | None = None):
        """(codes, scales, biases) of `rows` (all by default) in row order, codes a byte a weight."""
        if self.q6:
            q = q6_codes(self.codes, self.high, rows)
            sc, d = (a.transpose(1, 2).reshape(-1, a.shape[1]) for a in (self.scales, self.super_scales))
            if rows is not None:
                sc, d = sc[rows], d[rows]
            s = sc.float() * d.float().repeat_interleave(256 // self.group_size, dim=1)
            return q, s, -32 * s
        q, s, b = self.codes, self.scales, self.biases
        if self.rows8:
            if rows is None:
                q, s = deinterleave8(q), s.transpose(1, 2).reshape(-1, s.shape[1])
                b = None if b is None else b.transpose(1, 2).reshape(s.shape)
            else:
                hi, lo = rows // 8, rows % 8
                q, s = q[hi, :, lo].reshape(len(rows), -1), s[hi, :, lo]
                b = None if b is None else b[hi, :, lo]
            b = -(1 << (self.bits - 1)) * s.float() if b is None else b
        elif rows is not None:
            q, s, b = q[rows], s[rows], b[rows]
        return (unpack_nibbles(q) if self.bits == 4 else q), s, b

    def dequantized(self, dt: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
        q, s, b = self.natural(rows)
        n, k = q.shape
        g = self.group_size
        return (q.view(n, k // g, g).to(dt) * s[..., None].to(dt) + b[..., None].to(dt)).view(n, k)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) times the matrix: a decode step through our kernels, else dequantized."""
        if x.device.type == "cpu" and x.shape[0] <= SMALL_ROWS:
            if self.q6:
                return qmatmul_rows8_q6k(x, self.codes, self.high, self.scales, self.super_scales)
            if self.rows8:
                return qmatmul_rows8(x, self.codes, self.scales, self.biases, self.group_size, self.bits)
            return qmatmul(x, self.codes, self.scales, self.biases, self.group_size)
        dt = torch.float32 if x.device.type == "cpu" and (WIDEN_HALF_GEMM or x.dtype == torch.float32) else x.dtype
        return F.linear(x.to(dt), self.dequantized(dt)).to(x.dtype)


class QuantLinear(nn.Module):
    def __init__(self, t: QuantTensor, dtype: torch.dtype, device: torch.device, bias: torch.Tensor | None = None,
                 int4pack: bool | None = None):
        """`int4pack`: on a CPU, use torch's int4 kernel for 4 bits (default: where ours do not run)."""
        super().__init__()
        self.out_features, self.in_features = t.shape
        self.bits, self.group_size = t.bits, t.group_size
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
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
        if self.kind == "codes":
            self.weight = Codes(t, dtype, device)
            self.kind = "rows8" if self.weight.rows8 else "codes"
        else:  # (K / group, N, 2): scale and zero per group and output
            s, b = (torch.from_numpy(np.ascontiguousarray(a)) for a in t.float_parts())  # exact, any mode
            sz = torch.stack([s, b + 8 * s], dim=-1).transpose(0, 1).contiguous()
            self.register_buffer("scales_zeros", sz.to(device=device, dtype=dtype))

    @classmethod
    def sharing(cls, emb: QuantEmbedding) -> QuantLinear:
        """A linear layer over an embedding's own codes (the tied head): no second copy."""
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.out_features, head.in_features = emb.weight.shape
        head.bits, head.group_size, head.bias = emb.weight.bits, emb.weight.group_size, None
        head.weight = emb.weight
        head.kind = "rows8" if head.weight.rows8 else "codes"
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "int4-cpu":
            y = torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_zeros)
        elif self.kind == "int4-cuda":
            y = torch._weight_int4pack_mm(x, self.packed, self.group_size, self.scales_zeros)
        else:
            y = self.weight.matmul(x)
        return y if self.bias is None else y + self.bias


class QuantEmbedding(nn.Module):
    """Rows of a quantized embedding, dequantized as they are looked up; `as_linear` is the tied head,
    on the same codes."""

    def __init__(self, t: QuantTensor, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.dtype = dtype
        self.weight = Codes(t, dtype, device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.dequantized(torch.float32, ids).to(self.dtype)

    def as_linear(self) -> nn.Module:
        return QuantLinear.sharing(self)
