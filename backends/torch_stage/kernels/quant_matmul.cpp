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
#include <immintrin.h>
#include <torch/library.h>

#include <vector>

namespace {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kPrefetchBytes = 512;

inline float sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

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

template <int M, int Bits>
void rows(const float* x, const float* xs, const uint8_t* q, const float* s, const float* b, float* y,
          int64_t N, int64_t K, int64_t g, int64_t n0, int64_t n1) {
  const int64_t G = K / g, row_bytes = K * Bits / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* r = q + n * row_bytes;
    const float* sn = s + n * G;
    const float* bn = b + n * G;
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t j = 0; j < G; ++j) group_dot<M, Bits>(r, x, K, j * g, g, _mm256_set1_ps(sn[j]), acc);
    for (int m = 0; m < M; ++m) {
      float bias = 0.f;
      for (int64_t j = 0; j < G; ++j) bias += bn[j] * xs[m * G + j];
      y[m * N + n] = sum8(acc[m]) + bias;
    }
  }
}

template <int M, int Bits>
void run(const float* x, const float* xs, const uint8_t* q, const float* s, const float* b, float* y, int64_t N,
         int64_t K, int64_t g) {
  at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) { rows<M, Bits>(x, xs, q, s, b, y, N, K, g, lo, hi); });
}

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& biases,
                   int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2 && codes.scalar_type() == at::kByte,
              "qmatmul: x (M, K) and uint8 codes (N, K) or (N, K / 2) expected");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && biases.scalar_type() == at::kFloat,
              "qmatmul: float32 scales and biases expected");
  const int64_t M = x.size(0), N = codes.size(0), K = x.size(1), g = group_size;
  const bool nibbles = codes.size(1) * 2 == K;
  TORCH_CHECK(nibbles || codes.size(1) == K, "qmatmul: codes hold K or K / 2 bytes a row");
  TORCH_CHECK(M >= 1 && M <= kMaxRows && g % 32 == 0 && K % g == 0, "qmatmul: 1-8 rows, groups of a multiple of 32");
  at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t G = K / g;
  std::vector<float> xs(M * G, 0.f);  // each row's sum per group: what the biases multiply
  {
    const float* xp = xf.const_data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xs[m * G + k / g] += xp[m * K + k];
  }
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
  at::Tensor y = at::empty({M, N}, xf.options());
  using Kernel = void (*)(const float*, const float*, const uint8_t*, const float*, const float*, float*, int64_t,
                          int64_t, int64_t);
  constexpr Kernel k8[kMaxRows] = {run<1, 8>, run<2, 8>, run<3, 8>, run<4, 8>,
                                   run<5, 8>, run<6, 8>, run<7, 8>, run<8, 8>};
  constexpr Kernel k4[kMaxRows] = {run<1, 4>, run<2, 4>, run<3, 4>, run<4, 4>,
                                   run<5, 4>, run<6, 4>, run<7, 4>, run<8, 4>};
  (nibbles ? k4 : k8)[M - 1](xf.const_data_ptr<float>(), xs.data(), qc.const_data_ptr<uint8_t>(),
                             sc.const_data_ptr<float>(), bc.const_data_ptr<float>(), y.mutable_data_ptr<float>(), N,
                             K, g);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(hetpipe, CPU, m) { m.impl("qmatmul", &qmatmul); }
