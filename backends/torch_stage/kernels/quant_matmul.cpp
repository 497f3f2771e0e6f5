// hetpipe::qmatmul on the CPU: a few rows (a decode step) times a weight held as one uint8 code per
// weight with a float32 scale and bias per group along K: w[n, k] = s[n, k / g] * q[n, k] + b[n, k / g].
// Used for 8-bit weights and the odd widths (2, 3, 5, 6 bits, unpacked to a byte at load); 4-bit
// weights go through torch's int4 kernel. Per output n:
//   y[m, n] = sum_g s[n, g] * (sum_{k in g} x[m, k] q[n, k]) + b[n, g] * (sum_{k in g} x[m, k])
// The codes are widened to fp32 eight at a time and meet every row of x; the row sums per group
// of x are computed once. Parallel over N.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <vector>

namespace {

constexpr int64_t kMaxRows = 8;

inline float sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

inline __m256 codes8(const uint8_t* p) {  // 8 codes widened to fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

template <int M>
void rows(const float* x, const float* xs, const uint8_t* q, const float* s, const float* b, float* y,
          int64_t N, int64_t K, int64_t g, int64_t n0, int64_t n1) {
  const int64_t G = K / g;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* r = q + n * K;
    const float* sn = s + n * G;
    const float* bn = b + n * G;
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t j = 0; j < G; ++j) {
      __m256 part[M];
      for (int m = 0; m < M; ++m) part[m] = _mm256_setzero_ps();
      for (int64_t k = j * g; k < (j + 1) * g; k += 8) {
        const __m256 wk = codes8(r + k);
        for (int m = 0; m < M; ++m) part[m] = _mm256_fmadd_ps(wk, _mm256_loadu_ps(x + m * K + k), part[m]);
      }
      const __m256 sj = _mm256_set1_ps(sn[j]);
      for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(part[m], sj, acc[m]);
    }
    for (int m = 0; m < M; ++m) {
      float bias = 0.f;
      for (int64_t j = 0; j < G; ++j) bias += bn[j] * xs[m * G + j];
      y[m * N + n] = sum8(acc[m]) + bias;
    }
  }
}

template <int M>
void run(const float* x, const float* xs, const uint8_t* q, const float* s, const float* b, float* y, int64_t N,
         int64_t K, int64_t g) {
  at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) { rows<M>(x, xs, q, s, b, y, N, K, g, lo, hi); });
}

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& biases,
                   int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2 && codes.size(1) == x.size(1) && codes.scalar_type() == at::kByte,
              "qmatmul: x (M, K) and uint8 codes (N, K) expected");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && biases.scalar_type() == at::kFloat,
              "qmatmul: float32 scales and biases expected");
  const int64_t M = x.size(0), N = codes.size(0), K = codes.size(1), g = group_size;
  TORCH_CHECK(M >= 1 && M <= kMaxRows && g % 8 == 0 && K % g == 0, "qmatmul: 1-8 rows, groups of a multiple of 8");
  const at::Tensor xf = x.to(at::kFloat).contiguous(), qc = codes.contiguous();
  const at::Tensor sc = scales.contiguous(), bc = biases.contiguous();
  const float* xp = xf.const_data_ptr<float>();
  const int64_t G = K / g;
  std::vector<float> xs(M * G, 0.f);  // each row's sum per group: what the biases multiply
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xs[m * G + k / g] += xp[m * K + k];
  at::Tensor y = at::empty({M, N}, xf.options());
  using Kernel = void (*)(const float*, const float*, const uint8_t*, const float*, const float*, float*, int64_t,
                          int64_t, int64_t);
  constexpr Kernel kernels[kMaxRows] = {run<1>, run<2>, run<3>, run<4>, run<5>, run<6>, run<7>, run<8>};
  kernels[M - 1](xp, xs.data(), qc.const_data_ptr<uint8_t>(), sc.const_data_ptr<float>(), bc.const_data_ptr<float>(),
                 y.mutable_data_ptr<float>(), N, K, g);
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(hetpipe, CPU, m) { m.impl("qmatmul", &qmatmul); }
