"""The `hetpipe::` ops the torch model calls: each defined here in plain torch, which runs on any
device; `native.py` registers our own CPU kernels for them where this CPU can run one.

They are plain library ops, not `torch.library.custom_op`, whose Python wrappers cost ~10 us per
call (a decode step makes ~200), and torch.compile treats them as opaque calls (fake kernels below).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_lib = torch.library.Library("hetpipe", "DEF")


def _define(schema: str, fn) -> None:
    _lib.define(schema)
    _lib.impl(schema.split("(", 1)[0], fn, "CompositeExplicitAutograd")


def _small_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # one row: torch.mv, oneDNN's matrix-vector kernel, faster than its matmul path for a row
    return torch.mv(w, x[0])[None] if x.shape[0] == 1 else F.linear(x, w)


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # the norm in float32 as transformers computes it, cast back, then times the weight
    return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _decode_attention(q, keys, values, slots, lengths, scale: float) -> torch.Tensor:
    # q (B, H, D); keys/values (slots, KV, D); each sequence's cached slots gathered, padded to (B, L)
    ks = keys[slots].transpose(1, 2)  # (B, KV, L, D)
    vs = values[slots].transpose(1, 2)
    mask = (torch.arange(slots.shape[1], device=slots.device) < lengths[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q[:, :, None], ks, vs, attn_mask=mask, scale=scale,
                                       enable_gqa=q.shape[1] != keys.shape[1])
    return o[:, :, 0].contiguous()  # as the CPU kernel returns it


def unpack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K / 2) bytes of 4-bit codes, low nibble first -> (N, K) uint8."""
    return torch.stack([codes & 0x0F, codes >> 4], dim=-1).view(codes.shape[0], -1)


def _qmatmul(x, codes, scales, biases, group_size: int) -> torch.Tensor:
    # the weight dequantized in float32 from its uint8 codes (two a byte if 4-bit), then one matmul
    if codes.shape[1] * 2 == x.shape[1]:
        codes = unpack_nibbles(codes)
    n, k = codes.shape
    w = codes.view(n, k // group_size, group_size).float() * scales[..., None] + biases[..., None]
    return F.linear(x.float(), w.view(n, k)).to(x.dtype)


def quantize_blocks(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) in float32 rounded as 8-bit codes per block of 32 (GGUF's Q8_0, as llama.cpp quantizes
    activations): dx = max|x| / 127 per block, x -> dx * round(x * 127 / max|x|), to nearest even."""
    b = x.float().view(x.shape[0], -1, 32)
    amax = b.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(b * inv) * (amax / 127)).view(x.shape)


def _qmatmul_q8act(x, codes, scales, biases, group_size: int) -> torch.Tensor:
    # _qmatmul with x rounded to 8 bits per block for the codes' products; the biases meet x itself
    if codes.shape[1] * 2 == x.shape[1]:
        codes = unpack_nibbles(codes)
    n, k = codes.shape
    g = k // group_size
    w = codes.view(n, g, group_size).float() * scales[..., None].float()
    xs = x.float().view(x.shape[0], g, group_size).sum(-1)
    return (F.linear(quantize_blocks(x), w.view(n, k)) + xs @ biases.float().t()).to(x.dtype)


def interleave8(codes: torch.Tensor) -> torch.Tensor:
    """(N, K * bits / 8) codes -> the `rows8` layout (N / 8, K * bits / 32, 8, 4): each run of 4 bytes of
    8 rows side by side (moved as int32 words: a uint8 transpose is ~4x slower)."""
    n, nbytes = codes.shape
    words = codes.contiguous().view(torch.int32).view(n // 8, 8, nbytes // 4)
    return words.transpose(1, 2).contiguous().view(torch.uint8).view(n // 8, nbytes // 4, 8, 4)


def deinterleave8(codes: torch.Tensor) -> torch.Tensor:
    words = codes.view(torch.int32).view(codes.shape[:3])
    return words.transpose(1, 2).contiguous().view(torch.uint8).view(codes.shape[0] * 8, -1)


def _qmatmul_rows8(x, codes, scales, biases, group_size: int, bits: int) -> torch.Tensor:
    # codes, scales and biases back in row order; no biases: w = s * (q - 2^(bits - 1))
    s = scales.transpose(1, 2).reshape(-1, scales.shape[1])
    b = -(1 << (bits - 1)) * s.float() if biases is None else biases.transpose(1, 2).reshape(s.shape)
    return _qmatmul_q8act(x, deinterleave8(codes), s, b, group_size)


# the weight position (within a block of 32) that nibble register 4c + j of the q6_k layout holds in
# byte u: register t covers run t // 2, low (t even) or high nibbles: (c, u, j) -> position
_Q6_HIGH = torch.tensor([[[8 * ((4 * c + j) // 2) + 2 * u + (4 * c + j) % 2 for j in range(4)] for u in range(4)]
                         for c in range(2)])


def q6_planes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) 6-bit codes -> the q6_k rows8 layout: low 4 bits as 4-bit codes (N / 8, K / 8, 8, 4), high
    2 bits (N / 8, K / 32, 2, 8, 4) (`kernels/quant_rows8.cpp`)."""
    n, k = codes.shape
    lo, hi = codes & 15, (codes >> 4).to(torch.int32)
    low = interleave8(lo[:, 0::2] | (lo[:, 1::2] << 4))
    fields = hi.view(n, k // 32, 32)[:, :, _Q6_HIGH] << torch.tensor([0, 2, 4, 6])  # (n, K/32, 2, 4, 4)
    high = fields.sum(-1).to(torch.uint8).view(n // 8, 8, k // 32, 2, 4).permute(0, 2, 3, 1, 4).contiguous()
    return low, high


def q6_codes(low: torch.Tensor, high: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of `q6_planes`: the (N, K) codes, or those of `rows`."""
    if rows is None:
        low, high = deinterleave8(low), high.permute(0, 3, 1, 2, 4)
    else:
        low, high = low[rows // 8, :, rows % 8].reshape(len(rows), -1), high[rows // 8, :, :, rows % 8]
    lo = unpack_nibbles(low)
    n, k = lo.shape
    fields = (high.reshape(n, k // 32, 2, 4, 1) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)) & 3
    hi = torch.empty(n, k // 32, 32, dtype=torch.uint8)
    hi[:, :, _Q6_HIGH] = fields
    return lo | (hi.view(n, k) << 4)


def _qmatmul_rows8_q6k(x, low, high, scales, super_scales) -> torch.Tensor:
    # w = d * sc * (q - 32) per group of 16, in row order: _qmatmul_q8act's definition
    q = q6_codes(low, high)
    sc = scales.transpose(1, 2).reshape(q.shape[0], -1).float()
    d = super_scales.transpose(1, 2).reshape(q.shape[0], -1).float()
    s = sc * d.repeat_interleave(16, dim=1)
    return _qmatmul_q8act(x, q, s, -32 * s, 16)


# A few rows times a weight matrix (decode steps of up to 8 sequences): y (M, N) = x (M, K) @ w^T.
_define("small_matmul(Tensor x, Tensor w) -> Tensor", _small_matmul)
# w * norm(x) over the last axis, the norm computed in float32.
_define("rms_norm(Tensor x, Tensor w, float eps) -> Tensor", _rms_norm)
# One query row per sequence against its cached keys and values, read through its slots (B, L)
# padded past each sequence's length (B,).
_define("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor slots, Tensor lengths, float scale) -> Tensor",
        _decode_attention)

# A few rows times a weight held as uint8 codes (N, K), or 4-bit codes two a byte (N, K / 2), with
# float32 scales and biases (N, K / group_size).
_define("qmatmul(Tensor x, Tensor codes, Tensor scales, Tensor biases, int group_size) -> Tensor", _qmatmul)
# The same with x rounded to 8 bits per block of 32 for the codes' products (`quantize_blocks`), over
# codes of 4 or 8 bits interleaved by 8 rows (`interleave8`) and scales and biases (N / 8,
# K / group_size, 8); no biases: w = s * (q - 2^(bits - 1)).
_define("qmatmul_rows8(Tensor x, Tensor codes, Tensor scales, Tensor? biases, int group_size, int bits) -> Tensor",
        _qmatmul_rows8)
# The same over GGUF's Q6_K (`q6_planes`; int8 sub-scales (N / 8, K / 16, 8), float16 scales
# (N / 8, K / 256, 8)): w = d * sc * (q - 32).
_define("qmatmul_rows8_q6k(Tensor x, Tensor low, Tensor high, Tensor scales, Tensor super_scales) -> Tensor",
        _qmatmul_rows8_q6k)

small_matmul = torch.ops.hetpipe.small_matmul
qmatmul = torch.ops.hetpipe.qmatmul
qmatmul_rows8 = torch.ops.hetpipe.qmatmul_rows8
qmatmul_rows8_q6k = torch.ops.hetpipe.qmatmul_rows8_q6k
rms_norm = torch.ops.hetpipe.rms_norm
decode_attention = torch.ops.hetpipe.decode_attention


@torch.library.register_fake("hetpipe::small_matmul")
def _(x, w):
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.register_fake("hetpipe::rms_norm")
def _(x, w, eps):
    return x.new_empty(x.shape)


@torch.library.register_fake("hetpipe::decode_attention")
def _(q, keys, values, slots, lengths, scale):
    return q.new_empty(q.shape)


@torch.library.register_fake("hetpipe::qmatmul")
def _(x, codes, scales, biases, group_size):
    return x.new_empty((x.shape[0], codes.shape[0]))


@torch.library.register_fake("hetpipe::qmatmul_rows8")
def _(x, codes, scales, biases, group_size, bits):
    return x.new_empty((x.shape[0], codes.shape[0] * 8))


@torch.library.register_fake("hetpipe::qmatmul_rows8_q6k")
def _(x, low, high, scales, super_scales):
    return x.new_empty((x.shape[0], low.shape[0] * 8))
