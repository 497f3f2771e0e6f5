// hetpipe::small_matmul on x86 CPUs with AVX2 and FMA but no AVX512-BF16 (AMD Zen 2-4, older Intel):
// y (M, N) = x (M, K) @ w (N, K)^T in bf16 for M <= 8 rows, the products of every decode step of
// up to 8 sequences. Each bf16 weight is widened to fp32 by a shift (exact), multiplied and summed
// in fp32, and every output rounded once to bf16, as oneDNN does.
//
// Why not oneDNN: without native bf16 instructions its one-row bf16 product (torch.mv) read
// SmolLM2's weights at 9-12 GB/s on a 2-core Zen 3 that streams 20 GB/s, and decode is bound by
// that read.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mv.h>
#include <immintrin.h>
#include <torch/library.h>

#include <vector>

namespace {

constexpr int64_t kMaxRows = 8;

inline __m256 widen(const at::BFloat16* p) {  // 8 bf16 -> 8 fp32: the upper half of each float
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// Accumulators per input row: two for one or two rows (FMA latency), else one: 2M (or M) sums,
// one widened weight vector and the x operands read from L1 fit the 16 vector registers.
constexpr int lanes(int M) { return M <= 2 ? 2 : 1; }

constexpr int64_t kPrefetch = 512;  // elements ahead in the row stream (1 KiB): 15.3 -> 13.0 ms for SmolLM2's products

// y[:, n0:n1] = x . w[n0:n1]^T, one weight row at a time: the weights are read front to back as one
// stream, with a software prefetch ahead of it (blocks of 8 rows read in step, as the AVX512 kernel
// does, ran at 11.7 GB/s here against 20.7 for this). x is already widened to fp32 (M, K); K a
// multiple of 8.
template <int M>
void rows(const float* x, const at::BFloat16* w, at::BFloat16* y, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  constexpr int L = lanes(M);
  for (int64_t n = n0; n < n1; ++n) {
    const at::BFloat16* r = w + n * K;
    __m256 acc[M][L];
    for (int m = 0; m < M; ++m)
      for (int l = 0; l < L; ++l) acc[m][l] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * L <= K; k += 8 * L) {
      _mm_prefetch(reinterpret_cast<const char*>(r + k + kPrefetch), _MM_HINT_T0);
      for (int l = 0; l < L; ++l) {
        const __m256 wk = widen(r + k + 8 * l);
        for (int m = 0; m < M; ++m) acc[m][l] = _mm256_fmadd_ps(wk, _mm256_loadu_ps(x + m * K + k + 8 * l), acc[m][l]);
      }
    }
    for (; k < K; k += 8) {
      const __m256 wk = widen(r + k);
      for (int m = 0; m < M; ++m) acc[m][0] = _mm256_fmadd_ps(wk, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
    }
    for (int m = 0; m < M; ++m) {
      __m256 a = acc[m][0];
      for (int l = 1; l < L; ++l) a = _mm256_add_ps(a, acc[m][l]);
      y[m * N + n] = at::BFloat16(sum8(a));
    }
  }
}

template <int M>
void run(const float* x, const at::BFloat16* w, at::BFloat16* y, int64_t N, int64_t K) {
  // threads split the weight rows into contiguous ranges: one stream each
  at::parallel_for(0, N, 64, [&](int64_t b, int64_t e) { rows<M>(x, w, y, N, K, b, e); });
}

using Kernel = void (*)(const float*, const at::BFloat16*, at::BFloat16*, int64_t, int64_t);
constexpr Kernel kKernels[kMaxRows] = {run<1>, run<2>, run<3>, run<4>, run<5>, run<6>, run<7>, run<8>};

at::Tensor small_matmul(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.size(1) == x.size(1),
              "small_matmul: x (M, K) and w (N, K) expected");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  if (x.scalar_type() != at::kBFloat16 || w.scalar_type() != at::kBFloat16 || K % 8 != 0 || M == 0 ||
      M > kMaxRows)
    return M == 1 ? at::mv(w, x[0]).unsqueeze(0) : at::linear(x, w);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  std::vector<float> xf(M * K);  // x widened once: every weight row meets it
  const at::BFloat16* xp = xc.const_data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(xp[i]);
  at::Tensor y = at::empty({M, N}, x.options());
  kKernels[M - 1](xf.data(), wc.const_data_ptr<at::BFloat16>(), y.mutable_data_ptr<at::BFloat16>(), N, K);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(hetpipe, CPU, m) { m.impl("small_matmul", &small_matmul); }
