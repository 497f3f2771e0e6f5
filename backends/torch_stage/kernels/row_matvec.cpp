// hetpipe::row_matvec on x86 CPUs with AVX512-BF16: y (1, N) = x (1, K) @ w (N, K)^T in bf16, the
// product of every single-stream decode step. Summed in fp32 and rounded once, as oneDNN does; the
// two differ only in summation order (an output now and then one bf16 ulp apart).
//
// Why not torch.mv: decode is bound by reading the weights, and oneDNN's bf16 matrix-vector kernel
// read them at ~60% of the rate this loop does here (121 products of SmolLM2-135M: 22 ms against
// 12 ms on 2 cores), and costs ~30 us of set-up per call besides.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mv.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t kRows = 8;  // rows summed together: each x load serves 8 weight loads

// y[n0:n1] = w[n0:n1] . x; K a multiple of 32 (one 64-byte vector holds 32 bf16)
void rows(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t K, int64_t n0, int64_t n1) {
  const auto* xv = reinterpret_cast<const __m512i*>(x);
  const int64_t kb = K / 32;
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows) {
    __m512 acc[kRows];
    const __m512i* r[kRows];
    for (int i = 0; i < kRows; ++i) {
      acc[i] = _mm512_setzero_ps();
      r[i] = reinterpret_cast<const __m512i*>(w + (n + i) * K);
    }
    for (int64_t k = 0; k < kb; ++k) {
      const __m512bh xk = (__m512bh)_mm512_loadu_si512(xv + k);
      for (int i = 0; i < kRows; ++i) {
        // the same spot of the next block of rows: the hardware prefetchers stop at page
        // boundaries, and this doubled the read rate here (17 -> 12 ms for the 121 products)
        _mm_prefetch(reinterpret_cast<const char*>(r[i] + k) + kRows * K * 2, _MM_HINT_T0);
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(r[i] + k), xk);
      }
    }
    for (int i = 0; i < kRows; ++i) y[n + i] = at::BFloat16(_mm512_reduce_add_ps(acc[i]));
  }
  for (; n < n1; ++n) {
    __m512 acc = _mm512_setzero_ps();
    const auto* r = reinterpret_cast<const __m512i*>(w + n * K);
    for (int64_t k = 0; k < kb; ++k)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(r + k), (__m512bh)_mm512_loadu_si512(xv + k));
    y[n] = at::BFloat16(_mm512_reduce_add_ps(acc));
  }
}

at::Tensor row_matvec(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && w.dim() == 2 && w.size(1) == x.size(1),
              "row_matvec: x (1, K) and w (N, K) expected");
  if (x.scalar_type() != at::kBFloat16 || w.scalar_type() != at::kBFloat16 || w.size(1) % 32 != 0)
    return at::mv(w, x[0]).unsqueeze(0);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1), blocks = N / kRows;
  at::Tensor y = at::empty({1, N}, x.options());
  const auto* xp = xc.const_data_ptr<at::BFloat16>();
  const auto* wp = wc.const_data_ptr<at::BFloat16>();
  auto* yp = y.mutable_data_ptr<at::BFloat16>();
  // threads split the rows; the last takes the rows past the final whole block
  at::parallel_for(0, blocks, 16, [&](int64_t b, int64_t e) {
    rows(xp, wp, yp, K, b * kRows, e == blocks ? N : e * kRows);
  });
  if (blocks == 0) rows(xp, wp, yp, K, 0, N);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(hetpipe, CPU, m) { m.impl("row_matvec", &row_matvec); }
