// hetpipe::qmatmul_rows8 on the CPU: a few rows of x (a decode step) times a 4- or 8-bit weight, with
// x quantized to 8 bits as llama.cpp multiplies its quantized weights (against Q8_0 activations).
// Each block of 32 of a row of x becomes int8 codes xi and one scale dx = max|x| / 127 (xi =
// round(x * 127 / max|x|), to nearest even); they meet the weight's uint8 codes in integer dot
// products:
//   y[m, n] = sum_blocks s[n, g(block)] * dx[m, block] * (sum_{k in block} q[n, k] xi[m, k])
//           + sum_g b[n, g] * (sum_{k in g} x[m, k])      (the bias term on x itself, unquantized)
// The weight is held with 8 rows interleaved (below), so the products of 8 rows land in the 8
// int32 lanes of one register. With AVX512-VNNI one vpdpbusd multiplies 4 code bytes of each row by
// 4 of x; with AVX2, vpmaddubsw + vpmaddwd do the same: 4-bit codes as they are (pair sums cannot
// saturate int16), 8-bit ones as |q - 128| against x with q - 128's signs (sum q xi = sum (q - 128)
// xi + 128 sum xi; |q - 128| <= 128 and |xi| <= 127, so neither the sign flip nor the int16 pair sums
// overflow). Parallel over groups of 8 rows. Below, the same for GGUF's Q6_K (hetpipe::qmatmul_rows8_q6k).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "quant_common.h"

namespace {

using namespace hetpipe_q;

constexpr int64_t kBlock = 32;

// x (M, K) float32 -> int8 codes (M, K) in the weight's order and a scale per block (M, K / 32)
// `order`: 0 natural, 8: within each run of 8, the even positions then the odd ones (4-bit codes)
void quantize_rows(const float* x, int64_t M, int64_t K, int order, int8_t* xi, float* dx) {
  for (int64_t i = 0; i < M * K / kBlock; ++i) {
    const float* v = x + i * kBlock;
    float amax = 0.f;
    for (int k = 0; k < kBlock; ++k) amax = std::fmax(amax, std::fabs(v[k]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    dx[i] = amax / 127.f;
    int8_t* o = xi + i * kBlock;
    for (int k = 0; k < kBlock; ++k) {
      const int at = order ? (k / order) * order + (k % 2) * order / 2 + (k % order) / 2 : k;
      o[at] = static_cast<int8_t>(std::nearbyint(v[k] * inv));
    }
  }
}

// x as the kernels read it: float32 (M, K), its int8 codes and block scales, its sums per group of g
struct QuantizedX {
  at::Tensor xf;
  std::vector<int8_t> xi;
  std::vector<float> dx, xs;

  QuantizedX(const at::Tensor& x, int order, int64_t g)
      : xf(x.to(at::kFloat).contiguous()), xi(x.numel()), dx(x.numel() / kBlock) {
    const int64_t M = x.size(0), K = x.size(1);
    quantize_rows(xf.const_data_ptr<float>(), M, K, order, xi.data(), dx.data());
    xs = group_sums(xf.const_data_ptr<float>(), M, K, g);
  }

  // each row's sum per group of g of its quantized values: dx times its codes' sum
  std::vector<float> quantized_sums(int64_t g) const {
    std::vector<float> out(xs.size(), 0.f);
    for (size_t i = 0; i < dx.size(); ++i) {
      int t = 0;
      for (int k = 0; k < kBlock; ++k) t += xi[i * kBlock + k];
      out[i * kBlock / g] += dx[i] * static_cast<float>(t);
    }
    return out;
  }
};

#ifdef __AVX512VNNI__
constexpr bool kShifted8 = false;
#else
constexpr bool kShifted8 = true;  // 8-bit codes are multiplied as q - 128: add 128 * sum(xq) back
#endif

// ---- Eight weight rows interleaved (`rows8` layout): codes (N / 8, K * Bits / 32, 8, 4): for each
// run of 4 code bytes along K, the 8 rows' 4 bytes side by side, so one 256-bit register holds 4 bytes
// of each row and one vpdpbusd against 4 bytes of x broadcast gives every row its own int32 lane: no
// horizontal sums, and the 8 rows' scales (N / 8, K / g, 8) are one vector. 4 code bytes are 4
// weights (8 bits) or 8 (4 bits: the low nibbles are weights 0, 2, 4, 6 of the run, the high ones
// 1, 3, 5, 7; x is quantized in that order). Biases (N / 8, K / g, 8), or none: w = s * (q - 2^(Bits-1)),
// GGUF's symmetric Q4_0 and Q8_0.

constexpr int64_t kAhead = 4;  // blocks

inline __m256i dot4(__m256i acc, __m256i w, const int8_t* x) {  // acc += w . x (4 bytes of x to all lanes)
  const __m256i xv = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(x));
#ifdef __AVX512VNNI__
  return _mm256_dpbusd_epi32(acc, w, xv);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), _mm256_set1_epi16(1)));
#endif
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The 8 rows' int32 dots over one block of 32 weights against one row of x (xb: its 32 codes).
template <int Bits>
inline __m256i block_dot(const __m256i* w, const int8_t* xb) {
  __m256i a[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  _Pragma("GCC unroll 8") for (int t = 0; t < 8; ++t) a[t % 4] = dot4(a[t % 4], w[t], xb + 4 * t);
  return _mm256_add_epi32(_mm256_add_epi32(a[0], a[1]), _mm256_add_epi32(a[2], a[3]));
}

template <int Bits>
inline void block_codes8(const uint8_t* c, __m256i* w) {  // one block of 8 rows -> 8 registers
  if constexpr (Bits == 8) {
    _Pragma("GCC unroll 8") for (int t = 0; t < 8; ++t) {
      w[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * t));
      if constexpr (kShifted8) w[t] = _mm256_xor_si256(w[t], _mm256_set1_epi8(static_cast<char>(0x80)));
    }
  } else {
    const __m256i low = _mm256_set1_epi8(0x0F);
    _Pragma("GCC unroll 4") for (int t = 0; t < 4; ++t) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * t));
      w[2 * t] = _mm256_and_si256(v, low);
      w[2 * t + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
  }
}

#ifndef __AVX512VNNI__
template <>
inline __m256i block_dot<8>(const __m256i* w, const int8_t* xb) {  // w holds q - 128: signs moved onto w
  __m256i a[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
  const __m256i ones = _mm256_set1_epi16(1);
  _Pragma("GCC unroll 8") for (int t = 0; t < 8; ++t) {
    const __m256i xv = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(xb + 4 * t));
    a[t % 2] = _mm256_add_epi32(a[t % 2],
                                _mm256_madd_epi16(
                                    _mm256_maddubs_epi16(_mm256_abs_epi8(w[t]), _mm256_sign_epi8(xv, w[t])), ones));
  }
  return _mm256_add_epi32(a[0], a[1]);
}
#endif

template <int M, int Bits, typename S>
void rows8(const int8_t* xi, const float* dx, const float* xs, const float* xq, const uint8_t* q, const S* s,
           const S* b, float* y, int64_t N, int64_t K, int64_t g, int64_t r0, int64_t r1) {
  const int64_t G = K / g, per = g / kBlock, B = K / kBlock, block_bytes = 8 * kBlock * Bits / 8;
  const __m256 zero = _mm256_set1_ps(-static_cast<float>(1 << (Bits - 1)));
  for (int64_t R = r0; R < r1; ++R) {
    const uint8_t* r = q + R * 8 * K * Bits / 8;
    __m256 acc[M];
    _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t j = 0; j < G; ++j) {
      const __m256 sj = load8(s + (R * G + j) * 8);
      for (int64_t blk = j * per; blk < (j + 1) * per; ++blk) {
        const uint8_t* c = r + blk * block_bytes;
        _Pragma("GCC unroll 4") for (int64_t o = 0; o < block_bytes; o += 64)  // each line, a few blocks ahead
          _mm_prefetch(reinterpret_cast<const char*>(c + kAhead * block_bytes + o), _MM_HINT_T0);
        __m256i w[8];
        block_codes8<Bits>(c, w);
        _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) {
          const __m256 d = _mm256_cvtepi32_ps(block_dot<Bits>(w, xi + m * K + blk * kBlock));
          acc[m] = _mm256_fmadd_ps(d, _mm256_mul_ps(sj, _mm256_set1_ps(dx[m * B + blk])), acc[m]);
        }
      }
      // the bias term: b, or -2^(Bits-1) s, times the group's sum of x; q - 128 taken back where shifted
      const __m256 bj = b ? load8(b + (R * G + j) * 8) : _mm256_mul_ps(sj, zero);
      _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) {
        acc[m] = _mm256_fmadd_ps(bj, _mm256_set1_ps(xs[m * G + j]), acc[m]);
        if constexpr (Bits == 8 && kShifted8)
          acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(sj, _mm256_set1_ps(128.f)), _mm256_set1_ps(xq[m * G + j]), acc[m]);
      }
    }
    _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) _mm256_storeu_ps(y + m * N + R * 8, acc[m]);
  }
}

template <int M, int Bits, typename S>
void run8(const int8_t* xi, const float* dx, const float* xs, const float* xq, const uint8_t* q, const S* s,
          const S* b, float* y, int64_t N, int64_t K, int64_t g) {
  at::parallel_for(0, N / 8, 8,
                   [&](int64_t lo, int64_t hi) { rows8<M, Bits, S>(xi, dx, xs, xq, q, s, b, y, N, K, g, lo, hi); });
}

template <int Bits, typename S>
at::Tensor rows8_as(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                    const c10::optional<at::Tensor>& biases, int64_t g) {
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0) * 8;
  const QuantizedX q(x, Bits == 4 ? 8 : 0, g);
  const std::vector<float> xq = Bits == 8 && kShifted8 ? q.quantized_sums(g) : std::vector<float>();
  const at::Tensor qc = codes.contiguous(), sc = scales.contiguous();
  const at::Tensor bc = biases ? biases->contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, q.xf.options());
  using Kernel = void (*)(const int8_t*, const float*, const float*, const float*, const uint8_t*, const S*,
                          const S*, float*, int64_t, int64_t, int64_t);
  constexpr Kernel kernels[kMaxRows] = {run8<1, Bits, S>, run8<2, Bits, S>, run8<3, Bits, S>, run8<4, Bits, S>,
                                        run8<5, Bits, S>, run8<6, Bits, S>, run8<7, Bits, S>, run8<8, Bits, S>};
  kernels[M - 1](q.xi.data(), q.dx.data(), q.xs.data(), xq.data(), qc.const_data_ptr<uint8_t>(), sc.const_data_ptr<S>(),
                 biases ? bc.const_data_ptr<S>() : nullptr, y.mutable_data_ptr<float>(), N, K, g);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// x (M, K) times 8-row interleaved codes (N / 8, K * bits / 32, 8, 4), scales and biases (N / 8, K / g, 8)
at::Tensor qmatmul_rows8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                         const c10::optional<at::Tensor>& biases, int64_t group_size, int64_t bits) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 4 && codes.size(2) == 8 && codes.size(3) == 4 &&
                  codes.scalar_type() == at::kByte && (bits == 4 || bits == 8),
              "qmatmul_rows8: x (M, K) and uint8 codes (N / 8, K * bits / 32, 8, 4) of 4 or 8 bits expected");
  const int64_t M = x.size(0), K = x.size(1), g = group_size;
  TORCH_CHECK(codes.size(1) * 32 == K * bits, "qmatmul_rows8: codes hold K * bits / 8 bytes a row");
  TORCH_CHECK((scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf) &&
                  (!biases || biases->scalar_type() == scales.scalar_type()),
              "qmatmul_rows8: float32 or float16 scales and biases (both alike) expected");
  TORCH_CHECK(M >= 1 && M <= kMaxRows && g % kBlock == 0 && K % g == 0 && K / g <= kMaxGroups &&
                  scales.numel() == codes.size(0) * 8 * (K / g),
              "qmatmul_rows8: 1-8 rows, groups of a multiple of 32, scales (N / 8, K / g, 8)");
  const bool half = scales.scalar_type() == at::kHalf;
  if (bits == 4)
    return half ? rows8_as<4, at::Half>(x, codes, scales, biases, g) : rows8_as<4, float>(x, codes, scales, biases, g);
  return half ? rows8_as<8, at::Half>(x, codes, scales, biases, g) : rows8_as<8, float>(x, codes, scales, biases, g);
}

// ---- Q6_K (mode "q6_k") in the rows8 layout: the low 4 bits of each code as 4-bit codes are held
// (N / 8, K / 8, 8, 4); the high 2 bits (N / 8, K / 32, 2, 8, 4): per block of 32, register c (0, 1)
// holds in byte u of a row's lane, at bits 2j, the high bits of the weight that nibble register
// 4c + j holds in byte u; int8 sub-scales per 16 (N / 8, K / 16, 8) and float16 scales per 256
// (N / 8, K / 256, 8). w = d * sc * (q - 32), so per super-block of 256:
//   y += d * (sum_blocks dx * (sc0 * dot(first 16) + sc1 * dot(last 16)) - 32 * sum_16 sc * xs16)
// The codes are below 64, so vpmaddubsw's pair sums cannot saturate either.

inline __m256i dot16(const __m256i* w, const int8_t* xb) {  // 4 registers: 16 weights of 8 rows
  const __m256i a = dot4(dot4(_mm256_setzero_si256(), w[0], xb), w[1], xb + 4);
  const __m256i b = dot4(dot4(_mm256_setzero_si256(), w[2], xb + 8), w[3], xb + 12);
  return _mm256_add_epi32(a, b);
}

inline void add_high(__m256i* w, __m256i h) {  // the high 2 bits of 4 registers' codes, into bits 4-5
  const __m256i m = _mm256_set1_epi8(0x30);  // (16-bit shifts: what crosses a byte lands outside 0x30)
  w[0] = _mm256_or_si256(w[0], _mm256_and_si256(_mm256_slli_epi16(h, 4), m));
  w[1] = _mm256_or_si256(w[1], _mm256_and_si256(_mm256_slli_epi16(h, 2), m));
  w[2] = _mm256_or_si256(w[2], _mm256_and_si256(h, m));
  w[3] = _mm256_or_si256(w[3], _mm256_and_si256(_mm256_srli_epi16(h, 2), m));
}

inline __m256i subscales(const int8_t* p) {  // 8 rows' int8 sub-scales as int32
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

template <int M>
void rows8_q6(const int8_t* xi, const float* dx, const float* xs, const uint8_t* low, const uint8_t* high,
              const int8_t* sc, const at::Half* d, float* y, int64_t N, int64_t K, int64_t r0, int64_t r1) {
  const int64_t B = K / kBlock, G = K / 16, S = K / 256;
  for (int64_t R = r0; R < r1; ++R) {
    const uint8_t* lo = low + R * 8 * K / 2;
    const uint8_t* hi = high + R * 8 * K / 4;
    const int8_t* sr = sc + R * G * 8;
    __m256 acc[M];
    _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < S; ++sb) {
      __m256 part[M], bias[M];
      _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) part[m] = bias[m] = _mm256_setzero_ps();
      for (int64_t blk = sb * 8; blk < (sb + 1) * 8; ++blk) {
        _Pragma("GCC unroll 2") for (int64_t o = 0; o < 128; o += 64)
          _mm_prefetch(reinterpret_cast<const char*>(lo + (blk + kAhead) * 128 + o), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(hi + (blk + kAhead) * 64), _MM_HINT_T0);
        __m256i w[8];
        block_codes8<4>(lo + blk * 128, w);
        add_high(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + blk * 64)));
        add_high(w + 4, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + blk * 64 + 32)));
        const __m256i s0 = subscales(sr + 2 * blk * 8), s1 = subscales(sr + (2 * blk + 1) * 8);
        const __m256 f0 = _mm256_cvtepi32_ps(s0), f1 = _mm256_cvtepi32_ps(s1);
        _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) {
          const int8_t* xb = xi + m * K + blk * kBlock;
          const __m256i t = _mm256_add_epi32(_mm256_mullo_epi32(s0, dot16(w, xb)),
                                             _mm256_mullo_epi32(s1, dot16(w + 4, xb + 16)));
          part[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(dx[m * B + blk]), part[m]);
          bias[m] = _mm256_fmadd_ps(f0, _mm256_set1_ps(xs[m * G + 2 * blk]), bias[m]);
          bias[m] = _mm256_fmadd_ps(f1, _mm256_set1_ps(xs[m * G + 2 * blk + 1]), bias[m]);
        }
      }
      const __m256 dv = load8(d + (R * S + sb) * 8);
      _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m)
        acc[m] = _mm256_fmadd_ps(dv, _mm256_fmadd_ps(bias[m], _mm256_set1_ps(-32.f), part[m]), acc[m]);
    }
    _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) _mm256_storeu_ps(y + m * N + R * 8, acc[m]);
  }
}

template <int M>
void run8_q6(const int8_t* xi, const float* dx, const float* xs, const uint8_t* low, const uint8_t* high,
             const int8_t* sc, const at::Half* d, float* y, int64_t N, int64_t K) {
  at::parallel_for(0, N / 8, 8,
                   [&](int64_t a, int64_t b) { rows8_q6<M>(xi, dx, xs, low, high, sc, d, y, N, K, a, b); });
}

at::Tensor qmatmul_rows8_q6k(const at::Tensor& x, const at::Tensor& low, const at::Tensor& high,
                             const at::Tensor& scales, const at::Tensor& super_scales) {
  TORCH_CHECK(x.dim() == 2 && low.dim() == 4 && high.dim() == 5 && low.scalar_type() == at::kByte &&
                  high.scalar_type() == at::kByte && scales.scalar_type() == at::kChar &&
                  super_scales.scalar_type() == at::kHalf,
              "qmatmul_rows8_q6k: x (M, K), uint8 low (N / 8, K / 8, 8, 4) and high (N / 8, K / 32, 2, 8, 4), "
              "int8 scales and float16 super-scales expected");
  const int64_t M = x.size(0), K = x.size(1), N = low.size(0) * 8;
  TORCH_CHECK(M >= 1 && M <= kMaxRows && K % 256 == 0 && low.size(1) * 8 == K && high.size(1) * 32 == K &&
                  scales.numel() == N * K / 16 && super_scales.numel() == N * K / 256,
              "qmatmul_rows8_q6k: 1-8 rows, K a multiple of 256, planes and scales of the same weight");
  const QuantizedX q(x, 8, 16);
  const at::Tensor lc = low.contiguous(), hc = high.contiguous();
  const at::Tensor sc = scales.contiguous(), dc = super_scales.contiguous();
  at::Tensor y = at::empty({M, N}, q.xf.options());
  using Kernel = void (*)(const int8_t*, const float*, const float*, const uint8_t*, const uint8_t*, const int8_t*,
                          const at::Half*, float*, int64_t, int64_t);
  constexpr Kernel kernels[kMaxRows] = {run8_q6<1>, run8_q6<2>, run8_q6<3>, run8_q6<4>,
                                        run8_q6<5>, run8_q6<6>, run8_q6<7>, run8_q6<8>};
  kernels[M - 1](q.xi.data(), q.dx.data(), q.xs.data(), lc.const_data_ptr<uint8_t>(), hc.const_data_ptr<uint8_t>(),
                 sc.const_data_ptr<int8_t>(), dc.const_data_ptr<at::Half>(), y.mutable_data_ptr<float>(), N, K);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(hetpipe, CPU, m) {
  m.impl("qmatmul_rows8", &qmatmul_rows8);
  m.impl("qmatmul_rows8_q6k", &qmatmul_rows8_q6k);
}
