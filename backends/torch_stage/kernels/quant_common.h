// What both quantized-matmul kernels (quant_matmul.cpp: float activations; quant_rows8.cpp: 8-bit
// activations) share: limits, horizontal sums, a weight row's scales widened to fp32, the bias term
// and the per-group sums of x it multiplies.
#pragma once

#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include <vector>

namespace hetpipe_q {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kPrefetchBytes = 512;
constexpr int64_t kMaxGroups = 4096;

inline float sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// A weight row's scales (or biases) as fp32: held as fp32, or as fp16 where that is exact (the
// GGUF formats' own d and m), widened eight at a time into `buf` (kMaxGroups floats).
inline const float* row_floats(const float* p, float*, int64_t) { return p; }

inline const float* row_floats(const at::Half* p, float* buf, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
  for (; i < n; ++i) buf[i] = _cvtsh_ss(reinterpret_cast<const uint16_t*>(p)[i]);
  return buf;
}

// sum_j (b[j] + c * s[j]) * xs[j] over a row's G groups, eight at a time: the bias term (a serial
// scalar sum cost ~4 cycles a group, as much as the group's own products)
inline float bias_dot(const float* b, const float* s, float c, const float* xs, int64_t G) {
  __m256 acc = _mm256_setzero_ps();
  const __m256 cv = _mm256_set1_ps(c);
  int64_t j = 0;
  for (; j + 8 <= G; j += 8) {
    const __m256 bj = _mm256_fmadd_ps(cv, _mm256_loadu_ps(s + j), _mm256_loadu_ps(b + j));
    acc = _mm256_fmadd_ps(bj, _mm256_loadu_ps(xs + j), acc);
  }
  float out = sum8(acc);
  for (; j < G; ++j) out += (b[j] + c * s[j]) * xs[j];
  return out;
}

// Each row's sum per group of g (M, K / g): what the biases multiply.
inline std::vector<float> group_sums(const float* x, int64_t M, int64_t K, int64_t g) {
  const int64_t G = K / g;
  std::vector<float> xs(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < G; ++j) {
      float t = 0.f;
      for (int64_t k = j * g; k < (j + 1) * g; ++k) t += x[m * K + k];
      xs[m * G + j] = t;
    }
  return xs;
}

}  // namespace hetpipe_q
