// hetpipe::small_matmul on x86 CPUs with AVX2 and FMA but no AVX512-BF16 (AMD Zen 2-4, older Intel):
// y (M, N) = x (M, K) @ w (N, K)^T in bf16 or fp32 for M <= 8 rows, the products of every decode
// step of up to 8 sequences. bf16 weights are widened to fp32 by a shift (exact); sums are fp32 and
// each bf16 output is rounded once, as oneDNN does.
//
// Why not torch's: decode is bound by reading the weights, and on a 2-core Zen 3 that streams
// 20 GB/s, oneDNN's one-row bf16 product (torch.mv) read SmolLM2's at 9-12 GB/s and MKL's fp32 one
// at ~5 GB/s (a fp32 decode step took 111 ms).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mv.h>
#include <immintrin.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kMaxRows = 8;

inline __m256 load8(const at::BFloat16* p) {  // 8 bf16 widened to fp32: the upper half of each float
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline float sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// Accumulators per input row: two for one or two rows (FMA latency), else one: 2M (or M) sums,
// one weight vector and the x operands read from L1 fit the 16 vector registers.
constexpr int lanes(int M) { return M <= 2 ? 2 : 1; }

// A software prefetch this far ahead in the row stream helped bf16 (15.3 -> 13.0 ms for SmolLM2's
// products) and hurt fp32 (38 -> 44-46 ms, same period): fp32 streams on the hardware prefetchers.
template <typename T>
constexpr int64_t kPrefetchBytes = std::is_same_v<T, at::BFloat16> ? 1024 : 0;

// y[:, n0:n1] = x . w[n0:n1]^T, one weight row at a time: the weights are read front to back as one
// stream (blocks of 8 rows read in step, as the AVX512 kernel does, ran at 11.7 GB/s here against
// 20.7 for this). x is fp32 (M, K); K a multiple of 8.
template <int M, typename T>
void rows(const float* x, const T* w, T* y, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  constexpr int L = lanes(M);
  constexpr int64_t ahead = kPrefetchBytes<T> / sizeof(T);
  for (int64_t n = n0; n < n1; ++n) {
    const T* r = w + n * K;
    __m256 acc[M][L];
    for (int m = 0; m < M; ++m)
      for (int l = 0; l < L; ++l) acc[m][l] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * L <= K; k += 8 * L) {
      if constexpr (ahead > 0) _mm_prefetch(reinterpret_cast<const char*>(r + k + ahead), _MM_HINT_T0);
      for (int l = 0; l < L; ++l) {
        const __m256 wk = load8(r + k + 8 * l);
        for (int m = 0; m < M; ++m) acc[m][l] = _mm256_fmadd_ps(wk, _mm256_loadu_ps(x + m * K + k + 8 * l), acc[m][l]);
      }
    }
    for (; k < K; k += 8) {
      const __m256 wk = load8(r + k);
      for (int m = 0; m < M; ++m) acc[m][0] = _mm256_fmadd_ps(wk, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
    }
    for (int m = 0; m < M; ++m) {
      __m256 a = acc[m][0];
      for (int l = 1; l < L; ++l) a = _mm256_add_ps(a, acc[m][l]);
      y[m * N + n] = static_cast<T>(sum8(a));
    }
  }
}

template <int M, typename T>
void run(const float* x, const T* w, T* y, int64_t N, int64_t K) {
  // threads split the weight rows into contiguous ranges: one stream each
  at::parallel_for(0, N, 64, [&](int64_t b, int64_t e) { rows<M, T>(x, w, y, N, K, b, e); });
}

template <typename T>
void dispatch(int64_t M, const float* x, const T* w, T* y, int64_t N, int64_t K) {
  using Kernel = void (*)(const float*, const T*, T*, int64_t, int64_t);
  constexpr Kernel kernels[kMaxRows] = {run<1, T>, run<2, T>, run<3, T>, run<4, T>,
                                        run<5, T>, run<6, T>, run<7, T>, run<8, T>};
  kernels[M - 1](x, w, y, N, K);
}

at::Tensor small_matmul(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.size(1) == x.size(1),
              "small_matmul: x (M, K) and w (N, K) expected");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const auto dtype = x.scalar_type();
  if ((dtype != at::kBFloat16 && dtype != at::kFloat) || w.scalar_type() != dtype || K % 8 != 0 || M == 0 ||
      M > kMaxRows)
    return M == 1 ? at::mv(w, x[0]).unsqueeze(0) : at::linear(x, w);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (dtype == at::kFloat) {
    dispatch<float>(M, xc.const_data_ptr<float>(), wc.const_data_ptr<float>(), y.mutable_data_ptr<float>(), N, K);
    return y;
  }
  std::vector<float> xf(M * K);  // x widened once: every weight row meets it
  const at::BFloat16* xp = xc.const_data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(xp[i]);
  dispatch<at::BFloat16>(M, xf.data(), wc.const_data_ptr<at::BFloat16>(), y.mutable_data_ptr<at::BFloat16>(), N, K);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(hetpipe, CPU, m) { m.impl("small_matmul", &small_matmul); }
