// hetpipe::small_matmul on x86 CPUs with AVX512-BF16: y (M, N) = x (M, K) @ w (N, K)^T in bf16 for
// M <= 8 rows, the products of every decode step of up to 8 sequences. Summed in fp32 and rounded
// once, as oneDNN does; the two differ only in summation order (an output now and then one bf16
// ulp apart).
//
// Why not oneDNN: decode is bound by reading the weights, and oneDNN's bf16 kernels (torch.mv for
// one row, its matmul for 2-8) read them at about half the rate this loop does here (121 products
// of SmolLM2-135M: 18-22 ms against 9-12 ms on 2 cores), and cost ~30 us of set-up per call besides.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mv.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t kMaxRows = 8;

// Weight rows summed together per pass: R * M accumulators, R weight vectors and one x vector
// must fit the 32 vector registers; each weight load then serves M products, each x load R.
constexpr int block_rows(int M) { return M <= 2 ? 8 : M <= 4 ? 4 : 2; }

// y[:, n0:n1] = x . w[n0:n1]^T; K a multiple of 32 (one 64-byte vector holds 32 bf16)
template <int M>
void block(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t N, int64_t K,
           int64_t n0, int64_t n1) {
  constexpr int R = block_rows(M);
  const int64_t kb = K / 32;
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m512 acc[R][M];
    const __m512i* r[R];
    for (int i = 0; i < R; ++i) {
      r[i] = reinterpret_cast<const __m512i*>(w + (n + i) * K);
      for (int m = 0; m < M; ++m) acc[i][m] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < kb; ++k) {
      for (int i = 0; i < R; ++i) {
        // the same spot of the next block of rows: the hardware prefetchers stop at page
        // boundaries, and this doubled the read rate here (17 -> 12 ms for the 121 products)
        _mm_prefetch(reinterpret_cast<const char*>(r[i] + k) + R * K * 2, _MM_HINT_T0);
        const __m512bh wk = (__m512bh)_mm512_loadu_si512(r[i] + k);
        for (int m = 0; m < M; ++m) {
          const __m512bh xk = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const __m512i*>(x + m * K) + k);
          acc[i][m] = _mm512_dpbf16_ps(acc[i][m], wk, xk);
        }
      }
    }
    for (int i = 0; i < R; ++i)
      for (int m = 0; m < M; ++m) y[m * N + n + i] = at::BFloat16(_mm512_reduce_add_ps(acc[i][m]));
  }
  for (; n < n1; ++n) {  // rows past the last whole block
    const auto* r = reinterpret_cast<const __m512i*>(w + n * K);
    for (int m = 0; m < M; ++m) {
      const auto* xv = reinterpret_cast<const __m512i*>(x + m * K);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < kb; ++k)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(r + k), (__m512bh)_mm512_loadu_si512(xv + k));
      y[m * N + n] = at::BFloat16(_mm512_reduce_add_ps(acc));
    }
  }
}

template <int M>
void run(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t N, int64_t K) {
  constexpr int R = block_rows(M);
  const int64_t blocks = N / R;
  if (blocks == 0) return block<M>(x, w, y, N, K, 0, N);
  // threads split the weight rows; the last one takes the rows past the final whole block
  at::parallel_for(0, blocks, 16, [&](int64_t b, int64_t e) {
    block<M>(x, w, y, N, K, b * R, e == blocks ? N : e * R);
  });
}

using Kernel = void (*)(const at::BFloat16*, const at::BFloat16*, at::BFloat16*, int64_t, int64_t);
constexpr Kernel kKernels[kMaxRows] = {run<1>, run<2>, run<3>, run<4>, run<5>, run<6>, run<7>, run<8>};

at::Tensor small_matmul(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.size(1) == x.size(1),
              "small_matmul: x (M, K) and w (N, K) expected");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  if (x.scalar_type() != at::kBFloat16 || w.scalar_type() != at::kBFloat16 || K % 32 != 0 || M == 0 ||
      M > kMaxRows)
    return M == 1 ? at::mv(w, x[0]).unsqueeze(0) : at::linear(x, w);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  kKernels[M - 1](xc.const_data_ptr<at::BFloat16>(), wc.const_data_ptr<at::BFloat16>(),
                  y.mutable_data_ptr<at::BFloat16>(), N, K);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(hetpipe, CPU, m) { m.impl("small_matmul", &small_matmul); }
