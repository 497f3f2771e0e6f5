// hetpipe::qmatmul on the CPU: a few rows (a decode step) times a weight held as uint8 codes with a
// float32 scale and bias per group along K: w[n, k] = s[n, k / g] * q[n, k] + b[n, k / g]. Codes are
// one byte per weight (8 bits, and the odd widths unpacked at load) or two per byte (4 bits, MLX's
// own order: the low nibble of byte i is weight 2i). Per output n:
//   y[m, n] = sum_g s[n, g] * (sum_{k in g} x[m, k] q[n, k]) + b[n, g] * (sum_{k in g} x[m, k])
// The codes are widened to fp32 eight at a time and meet every row of x; the row sums per group
// of x are computed once. Parallel over N.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "quant_common.h"

namespace {

using namespace hetpipe_q;

inline __m256 codes8(const uint8_t* p) {  // 8 codes widened to fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Codes of one group (g weights, g a multiple of 32) times the M rows of x, scaled by sj and added
// to acc[m]. Four independent accumulators per row, so the FMAs do not wait on each other's
// latency; they are locals (written to `acc` once), as __m256 may alias anything.
template <int M, int Bits>
inline void group_dot(const uint8_t* r, const float* x, int64_t K, int64_t k0, int64_t g, __m256 sj,
                      __m256* acc) {
  __m256 part[M][4];
  _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m)
    _Pragma("GCC unroll 4") for (int u = 0; u < 4; ++u) part[m][u] = _mm256_setzero_ps();
  // ahead along the row: the hardware prefetcher stops at page boundaries
  _mm_prefetch(reinterpret_cast<const char*>(r + (k0 + g) * Bits / 8 + kPrefetchBytes), _MM_HINT_T0);
  if constexpr (Bits == 8) {
    for (int64_t k = k0; k < k0 + g; k += 32)
      _Pragma("GCC unroll 4") for (int u = 0; u < 4; ++u) {
        const __m256 wk = codes8(r + k + 8 * u);
        _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m)
          part[m][u] = _mm256_fmadd_ps(wk, _mm256_loadu_ps(x + m * K + k + 8 * u), part[m][u]);
      }
  } else {  // 4 bits: byte i holds weights 2i (low nibble) and 2i+1; x was reordered to match (see qmatmul)
    const __m256i low = _mm256_set1_epi32(0x0F);
    for (int64_t k = k0; k < k0 + g; k += 32) {
      const uint8_t* b = r + k / 2;
      _Pragma("GCC unroll 4") for (int u = 0; u < 2; ++u) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8 * u)));
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, low));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
        _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) {
          const float* xk = x + m * K + k + 16 * u;
          part[m][2 * u] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xk), part[m][2 * u]);
          part[m][2 * u + 1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xk + 8), part[m][2 * u + 1]);
        }
      }
    }
  }
  _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) {
    const __m256 p = _mm256_add_ps(_mm256_add_ps(part[m][0], part[m][1]), _mm256_add_ps(part[m][2], part[m][3]));
    acc[m] = _mm256_fmadd_ps(p, sj, acc[m]);
  }
}

template <int M, int Bits, typename S>
void rows(const float* x, const float* xs, const uint8_t* q, const S* s, const S* b, float* y,
          int64_t N, int64_t K, int64_t g, int64_t n0, int64_t n1) {
  const int64_t G = K / g, row_bytes = K * Bits / 8;
  float sbuf[kMaxGroups], bbuf[kMaxGroups];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* r = q + n * row_bytes;
    const float* sn = row_floats(s + n * G, sbuf, G);
    const float* bn = row_floats(b + n * G, bbuf, G);
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t j = 0; j < G; ++j) group_dot<M, Bits>(r, x, K, j * g, g, _mm256_set1_ps(sn[j]), acc);
    for (int m = 0; m < M; ++m) {
      y[m * N + n] = sum8(acc[m]) + bias_dot(bn, sn, 0.f, xs + m * G, G);
    }
  }
}

template <int M, int Bits, typename S>
void run(const float* x, const float* xs, const uint8_t* q, const S* s, const S* b, float* y, int64_t N,
         int64_t K, int64_t g) {
  at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) { rows<M, Bits, S>(x, xs, q, s, b, y, N, K, g, lo, hi); });
}

#ifdef __AVX512BF16__
// 4-bit codes times bf16 rows of x with AVX512-BF16, where the CPU has it: each code c becomes the
// bf16 number 128 + c (the bits 0x4300 | c: exact), and _mm512_dpbf16_ps sums x * (128 + c) in
// fp32, exactly as the fp32 path sums x * c (bf16 x times a small integer is exact), plus 128 * x,
// which the bias term takes back: y = sum_g s (dot - 128 xs) + b xs. One 32-weight step is 16 code
// bytes: low nibbles (weights 2i) in the first 16 lanes, high nibbles in the last, x reordered to
// match (`reorder32`). Groups of a multiple of 32; up to 8 rows.
namespace bf16dot {

inline __m512i codes32(const uint8_t* p) {  // 16 bytes -> 32 bf16 words 0x4300 | c
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m256i lh = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
  return _mm512_or_si512(_mm512_cvtepu8_epi16(lh), _mm512_set1_epi16(0x4300));
}

template <int M, typename S>
void rows(const at::BFloat16* x, const float* xs, const uint8_t* q, const S* s, const S* b, float* y,
          int64_t N, int64_t K, int64_t g, int64_t n0, int64_t n1) {
  const int64_t G = K / g, row_bytes = K / 2;
  float sbuf[kMaxGroups], bbuf[kMaxGroups];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* r = q + n * row_bytes;
    const float* sn = row_floats(s + n * G, sbuf, G);
    const float* bn = row_floats(b + n * G, bbuf, G);
    __m512 acc[M];
    _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t j = 0; j < G; ++j) {
      __m512 part[M];
      _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) part[m] = _mm512_setzero_ps();
      _mm_prefetch(reinterpret_cast<const char*>(r + (j + 1) * g / 2 + kPrefetchBytes), _MM_HINT_T0);
      for (int64_t k = j * g; k < (j + 1) * g; k += 32) {
        const __m512bh w = (__m512bh)codes32(r + k / 2);
        _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m)
          part[m] = _mm512_dpbf16_ps(part[m], w, (__m512bh)_mm512_loadu_si512(x + m * K + k));
      }
      const __m512 sj = _mm512_set1_ps(sn[j]);
      _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(part[m], sj, acc[m]);
    }
    _Pragma("GCC unroll 8") for (int m = 0; m < M; ++m) {
      y[m * N + n] = _mm512_reduce_add_ps(acc[m]) + bias_dot(bn, sn, -128.f, xs + m * G, G);
    }
  }
}

template <int M, typename S>
void run(const at::BFloat16* x, const float* xs, const uint8_t* q, const S* s, const S* b, float* y,
         int64_t N, int64_t K, int64_t g) {
  at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) { rows<M, S>(x, xs, q, s, b, y, N, K, g, lo, hi); });
}

// x (M, K) bf16 -> the same, each 32 reordered (x0, x2, ..., x30, x1, x3, ..., x31) as codes32 lays out
at::Tensor reorder32(const at::Tensor& x) {
  return x.view({x.size(0), x.size(1) / 32, 16, 2}).transpose(2, 3).contiguous().view({x.size(0), x.size(1)});
}

template <typename S>
at::Tensor qmatmul4(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& biases,
                    int64_t g, const std::vector<float>& xs) {
  const int64_t M = x.size(0), N = codes.size(0), K = x.size(1);
  const at::Tensor xr = reorder32(x.contiguous());
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  using Kernel = void (*)(const at::BFloat16*, const float*, const uint8_t*, const S*, const S*, float*,
                          int64_t, int64_t, int64_t);
  constexpr Kernel kernels[kMaxRows] = {run<1, S>, run<2, S>, run<3, S>, run<4, S>,
                                        run<5, S>, run<6, S>, run<7, S>, run<8, S>};
  kernels[M - 1](xr.const_data_ptr<at::BFloat16>(), xs.data(), codes.const_data_ptr<uint8_t>(),
                 scales.const_data_ptr<S>(), biases.const_data_ptr<S>(), y.mutable_data_ptr<float>(), N, K, g);
  return y.to(at::kBFloat16);
}

}  // namespace bf16dot
#endif

template <typename S>
at::Tensor qmatmul_as(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                      const at::Tensor& biases, int64_t g) {
  const int64_t M = x.size(0), K = x.size(1);
  const bool nibbles = codes.size(1) * 2 == K;
  at::Tensor xf = x.to(at::kFloat).contiguous();
  const std::vector<float> xs = group_sums(xf.const_data_ptr<float>(), M, K, g);
#ifdef __AVX512BF16__
  if (nibbles && x.scalar_type() == at::kBFloat16)
    return bf16dot::qmatmul4<S>(x, codes.contiguous(), scales.contiguous(), biases.contiguous(), g, xs);
#endif
  if (nibbles) {  // x reordered per 16 weights to (even, odd): the low and high nibbles of 8 bytes
    at::Tensor xr = at::empty_like(xf);
    const float* xp = xf.const_data_ptr<float>();
    float* rp = xr.mutable_data_ptr<float>();
    for (int64_t i = 0; i < M * K; i += 16)
      for (int j = 0; j < 8; ++j) {
        rp[i + j] = xp[i + 2 * j];
        rp[i + 8 + j] = xp[i + 2 * j + 1];
      }
    xf = xr;
  }
  const at::Tensor qc = codes.contiguous(), sc = scales.contiguous(), bc = biases.contiguous();
  at::Tensor y = at::empty({M, codes.size(0)}, xf.options());
  using Kernel = void (*)(const float*, const float*, const uint8_t*, const S*, const S*, float*, int64_t,
                          int64_t, int64_t);
  constexpr Kernel k8[kMaxRows] = {run<1, 8, S>, run<2, 8, S>, run<3, 8, S>, run<4, 8, S>,
                                   run<5, 8, S>, run<6, 8, S>, run<7, 8, S>, run<8, 8, S>};
  constexpr Kernel k4[kMaxRows] = {run<1, 4, S>, run<2, 4, S>, run<3, 4, S>, run<4, 4, S>,
                                   run<5, 4, S>, run<6, 4, S>, run<7, 4, S>, run<8, 4, S>};
  (nibbles ? k4 : k8)[M - 1](xf.const_data_ptr<float>(), xs.data(), qc.const_data_ptr<uint8_t>(),
                             sc.const_data_ptr<S>(), bc.const_data_ptr<S>(), y.mutable_data_ptr<float>(), codes.size(0),
                             K, g);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& biases,
                   int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2 && codes.scalar_type() == at::kByte,
              "qmatmul: x (M, K) and uint8 codes (N, K) or (N, K / 2) expected");
  TORCH_CHECK((scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf) &&
                  biases.scalar_type() == scales.scalar_type(),
              "qmatmul: float32 or float16 scales and biases (both alike) expected");
  const int64_t M = x.size(0), K = x.size(1), g = group_size;
  const bool nibbles = codes.size(1) * 2 == K;
  TORCH_CHECK(nibbles || codes.size(1) == K, "qmatmul: codes hold K or K / 2 bytes a row");
  TORCH_CHECK(M >= 1 && M <= kMaxRows && g % 32 == 0 && K % g == 0 && K / g <= kMaxGroups,
              "qmatmul: 1-8 rows, groups of a multiple of 32, at most 4096 a row");
  return scales.scalar_type() == at::kHalf ? qmatmul_as<at::Half>(x, codes, scales, biases, g)
                                           : qmatmul_as<float>(x, codes, scales, biases, g);
}


}  // namespace

TORCH_LIBRARY_IMPL(hetpipe, CPU, m) { m.impl("qmatmul", &qmatmul); }
