// hetpipe::small_matmul on x86 CPUs with AVX512-BF16: y (M, N) = x (M, K) @ w (N, K)^T in bf16 or
// fp32 for M <= 16 rows: the products of a decode step of up to 16 sequences, or of a speculative
// draft's verification (k + 1 rows). bf16 is summed in fp32 and rounded once, as oneDNN does; the
// two differ only in summation order (an output now and then one bf16 ulp apart).
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

#include <array>
#include <utility>

namespace {

constexpr int64_t kMaxRows = 16;

// Weight rows summed together per pass: R * M accumulators, R weight vectors and one x vector
// must fit the 32 vector registers; each weight load then serves M products, each x load R.
constexpr int block_rows(int M) { return M <= 2 ? 8 : M <= 4 ? 4 : M <= 8 ? 2 : 1; }

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

// fp32 for up to 5 rows of x: y[:, n0:n1] = x . w[n0:n1]^T one weight row at a time (one stream, as
// the AVX2 kernel reads it); K a multiple of 16. L sums per row of x in flight (the FMA latency), as
// many as the 32 registers hold, at most 4. One thread here: 1 to 5 rows of SmolLM2's products read
// 25 to 15 GB/s, oneDNN's 12 to 8.
template <int M>
void rows_f32(const float* x, const float* w, float* y, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  constexpr int L = 31 / (M + 1) < 4 ? 31 / (M + 1) : 4;
  for (int64_t n = n0; n < n1; ++n) {
    const float* r = w + n * K;
    __m512 acc[M][L];
    #pragma GCC unroll 16
    for (int m = 0; m < M; ++m)
      #pragma GCC unroll 16
      for (int l = 0; l < L; ++l) acc[m][l] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 * L <= K; k += 16 * L)
      #pragma GCC unroll 16
      for (int l = 0; l < L; ++l) {
        const __m512 wk = _mm512_loadu_ps(r + k + 16 * l);
        #pragma GCC unroll 16
        for (int m = 0; m < M; ++m) acc[m][l] = _mm512_fmadd_ps(wk, _mm512_loadu_ps(x + m * K + k + 16 * l), acc[m][l]);
      }
    for (; k < K; k += 16) {
      const __m512 wk = _mm512_loadu_ps(r + k);
      #pragma GCC unroll 16
      for (int m = 0; m < M; ++m) acc[m][0] = _mm512_fmadd_ps(wk, _mm512_loadu_ps(x + m * K + k), acc[m][0]);
    }
    #pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      __m512 a = acc[m][0];
      for (int l = 1; l < L; ++l) a = _mm512_add_ps(a, acc[m][l]);
      y[m * N + n] = _mm512_reduce_add_ps(a);
    }
  }
}

// fp32 for 6 to 16 rows of x: R weight rows at a time, each x vector loaded once per R of them
// (R + M loads per R * M products: one weight row at a time, 9 rows read 8 GB/s here, in blocks
// 12). R * M sums, R weight vectors and one x vector fit the 32 registers; past 8 rows of x, each
// block of weight rows meets the first 8, then the rest, its second read from cache.
constexpr int kF32BlockRows = 3;

template <int MC, int R>
inline void block_f32(const float* x, const float* w, float* y, int64_t N, int64_t K, int64_t n) {
  __m512 acc[R][MC];
  #pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
    #pragma GCC unroll 16
    for (int m = 0; m < MC; ++m) acc[i][m] = _mm512_setzero_ps();
  const float* r = w + n * K;
  for (int64_t k = 0; k < K; k += 16) {
    __m512 wk[R];
    #pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(r + i * K + k + R * K), _MM_HINT_T0);  // the next block
      wk[i] = _mm512_loadu_ps(r + i * K + k);
    }
    #pragma GCC unroll 16
    for (int m = 0; m < MC; ++m) {
      const __m512 xk = _mm512_loadu_ps(x + m * K + k);
      #pragma GCC unroll 16
      for (int i = 0; i < R; ++i) acc[i][m] = _mm512_fmadd_ps(wk[i], xk, acc[i][m]);
    }
  }
  #pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
    #pragma GCC unroll 16
    for (int m = 0; m < MC; ++m) y[m * N + n + i] = _mm512_reduce_add_ps(acc[i][m]);
}

template <int M>
void blocks_f32(const float* x, const float* w, float* y, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  constexpr int R = kF32BlockRows;
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    if constexpr (M <= 8) {
      block_f32<M, R>(x, w, y, N, K, n);
    } else {
      block_f32<8, R>(x, w, y, N, K, n);
      block_f32<M - 8, R>(x + 8 * K, w, y + 8 * N, N, K, n);
    }
  }
  if (n < n1) {  // rows past the last whole block: one at a time, 8 rows of x at most each pass
    rows_f32<M <= 8 ? M : 8>(x, w, y, N, K, n, n1);
    if constexpr (M > 8) rows_f32<M - 8>(x + 8 * K, w, y + 8 * N, N, K, n, n1);
  }
}

template <int M>
void run_f32(const float* x, const float* w, float* y, int64_t N, int64_t K) {
  at::parallel_for(0, N, 64, [&](int64_t b, int64_t e) {
    if constexpr (M <= 5) rows_f32<M>(x, w, y, N, K, b, e);
    else blocks_f32<M>(x, w, y, N, K, b, e);
  });
}

template <typename T, template <int> class F, int... Ms>
constexpr auto table(std::integer_sequence<int, Ms...>) {
  return std::array<T, sizeof...(Ms)>{F<Ms + 1>::fn...};
}

using Kernel = void (*)(const at::BFloat16*, const at::BFloat16*, at::BFloat16*, int64_t, int64_t);
using KernelF32 = void (*)(const float*, const float*, float*, int64_t, int64_t);
template <int M> struct Bf16 { static constexpr Kernel fn = run<M>; };
template <int M> struct F32 { static constexpr KernelF32 fn = run_f32<M>; };
constexpr auto kKernels = table<Kernel, Bf16>(std::make_integer_sequence<int, kMaxRows>{});
constexpr auto kKernelsF32 = table<KernelF32, F32>(std::make_integer_sequence<int, kMaxRows>{});

at::Tensor small_matmul(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.size(1) == x.size(1),
              "small_matmul: x (M, K) and w (N, K) expected");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const auto dtype = x.scalar_type();
  const bool bf16 = dtype == at::kBFloat16 && K % 32 == 0, f32 = dtype == at::kFloat && K % 16 == 0;
  if (!(bf16 || f32) || w.scalar_type() != dtype || M == 0 || M > kMaxRows)
    return M == 1 ? at::mv(w, x[0]).unsqueeze(0) : at::linear(x, w);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (f32)
    kKernelsF32[M - 1](xc.const_data_ptr<float>(), wc.const_data_ptr<float>(), y.mutable_data_ptr<float>(), N, K);
  else
    kKernels[M - 1](xc.const_data_ptr<at::BFloat16>(), wc.const_data_ptr<at::BFloat16>(),
                    y.mutable_data_ptr<at::BFloat16>(), N, K);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(hetpipe, CPU, m) { m.impl("small_matmul", &small_matmul); }
