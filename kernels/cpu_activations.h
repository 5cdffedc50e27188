// What every linear entry point does around the row kernels: the int8-activation quantizer,
// a decode batch's inputs, and prefill through dequantized tiles and the BLAS matmul.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu_simd.h"

namespace {

// Rows [n0, n1) of a slice as float32 [n1 - n0, in]: codes(n, buf) writes row n's codes and
// params(n, s, z) its groups' folded scale and zero point (row_params with mult 1, shift 0),
// so the nested planes and the packed rows dequantize to the same floats.
template <class Codes, class Params>
void dequantize_rows(int64_t in, int64_t padded_in, int64_t groups, int64_t group_size, int64_t n0, int64_t n1,
                     float* w, Codes&& codes_of, Params&& params_of) {
  at::parallel_for(n0, n1, 4, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> codes(padded_in);
    std::vector<float> params(2 * groups);
    float *s = params.data(), *z = s + groups;
    for (int64_t n = begin; n < end; ++n) {
      codes_of(n, codes.data());
      params_of(n, s, z);
      float* row = w + (n - n0) * in;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * group_size, k1 = std::min(in, k0 + group_size);
        for (int64_t k = k0; k < k1; ++k) row[k] = (codes[k] - z[g]) * s[g];
      }
    }
  });
}

// The int8-activation mode's quantizer, exactly as kernels/reference.py quantize_activations:
// per row and block of 16 columns, s = max|x| / 127 (1 if all zero), q = round-half-even(x / s).
void quantize_activations(const float* x, int64_t m, int64_t in, int8_t* q, int64_t ld, float* lane_scale,
                          float* xhat) {
  for (int64_t b = 0; b < m; ++b)
    for (int64_t k0 = 0; k0 < in; k0 += kActBlock) {
      const int64_t k1 = std::min(in, k0 + kActBlock);
      const float* row = x + b * in;
#if defined(__AVX512F__)
      if (k1 - k0 == 16) {  // one block is one vector (the scalar loop below is the slow remainder)
        const __m512 v = _mm512_loadu_ps(row + k0);
        float s = _mm512_reduce_max_ps(_mm512_abs_ps(v)) / 127.f;
        if (!(s > 0.f)) s = 1.f;
        const __m512 vs = _mm512_set1_ps(s);
        __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-127.f)), _mm512_set1_ps(127.f));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * ld + k0), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r)));
        _mm512_storeu_ps(xhat + b * in + k0, _mm512_mul_ps(r, vs));
        for (int64_t i = k0 / 4; i < k0 / 4 + kActBlock / 4; ++i) lane_scale[b * (ld / 4) + i] = s;
        continue;
      }
#elif defined(__AVX2__)
      if (k1 - k0 == 16) {  // the same in two 8-lane halves
        const __m256 sign = _mm256_set1_ps(-0.f);
        const __m256 v0 = _mm256_loadu_ps(row + k0), v1 = _mm256_loadu_ps(row + k0 + 8);
        const __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float s = _mm_cvtss_f32(h) / 127.f;
        if (!(s > 0.f)) s = 1.f;
        const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
        auto round = [&](__m256 v) {
          const __m256 r = _mm256_round_ps(_mm256_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          return _mm256_min_ps(_mm256_max_ps(r, lo), hi);
        };
        const __m256 r0 = round(v0), r1 = round(v1);
        const __m256i i0 = _mm256_cvtps_epi32(r0), i1 = _mm256_cvtps_epi32(r1);
        const __m128i w0 = _mm_packs_epi32(_mm256_castsi256_si128(i0), _mm256_extracti128_si256(i0, 1));
        const __m128i w1 = _mm_packs_epi32(_mm256_castsi256_si128(i1), _mm256_extracti128_si256(i1, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * ld + k0), _mm_packs_epi16(w0, w1));
        _mm256_storeu_ps(xhat + b * in + k0, _mm256_mul_ps(r0, vs));
        _mm256_storeu_ps(xhat + b * in + k0 + 8, _mm256_mul_ps(r1, vs));
        for (int64_t i = k0 / 4; i < k0 / 4 + kActBlock / 4; ++i) lane_scale[b * (ld / 4) + i] = s;
        continue;
      }
#endif
      float amax = 0.f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(row[k]));
      float s = amax / 127.f;
      if (!(s > 0.f)) s = 1.f;
      for (int64_t k = k0; k < k1; ++k) {
        const float r = std::min(127.f, std::max(-127.f, std::nearbyint(row[k] / s)));
        q[b * ld + k] = static_cast<int8_t>(r);
        xhat[b * in + k] = r * s;
      }
      for (int64_t i = k0 / 4; i < k0 / 4 + kActBlock / 4; ++i) lane_scale[b * (ld / 4) + i] = s;
    }
}


// A decode-sized batch's inputs to the row kernels: per-group activation sums (over the
// vector width: X_g / VW) and, in int8-activation mode, x^ with its codes and block scales
// (x is then x^). Kept in per-thread buffers reused from call to call: allocating them as
// tensors cost more than a small layer's weights take to read.
struct DecodeInputs {
  const float* x;   // [m, in]
  const float* xs;  // [m, groups]
  Quantized q;
};

DecodeInputs decode_inputs(const float* x, int64_t m, int64_t in, int64_t ld, int64_t groups, int64_t group_size,
                           bool int8_activations) {
  thread_local std::vector<float> scratch;
  thread_local std::vector<int8_t> codes;
  scratch.resize(m * groups + (int8_activations ? m * (in + ld / 4) : 0));
  float* xs = scratch.data();
  DecodeInputs d{x, xs, Quantized{}};
  if (int8_activations) {
    codes.assign(m * ld, 0);  // zero past in_features
    float* xhat = xs + m * groups;
    float* lane_scale = xhat + m * in;
    quantize_activations(x, m, in, codes.data(), ld, lane_scale, xhat);
    d.q = Quantized{codes.data(), ld, lane_scale};
    d.x = xhat;
  }
  for (int64_t b = 0; b < m; ++b)
    for (int64_t g = 0; g < groups; ++g) {
      const float* row = d.x + b * in;
      const int64_t k1 = std::min(in, (g + 1) * group_size);
      int64_t k = g * group_size;
      vf acc = vzero();
      for (; k + VW <= k1; k += VW) acc = vadd(acc, vload(row + k));
      float sum = vsum(acc);
      for (; k < k1; ++k) sum += row[k];
      xs[b * groups + g] = sum / VW;
    }
  return d;
}

// A decode-sized batch: float32 [m, in] rows of x (a view where possible).
at::Tensor float_rows(const at::Tensor& x) {
  at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, x.size(-1)});
  if (x2.scalar_type() != at::kFloat) x2 = x2.to(at::kFloat);
  return x2.is_contiguous() ? x2 : x2.contiguous();
}

// y [m, out] = x2 @ W^T for a batch too large for the row kernels (prefill): tiles of ~4 MiB
// of float weights, each dequantized once by dequantize(n0, n1, w) and multiplied while still
// in cache. In int8-activation mode x is replaced by x^ (only x^ is used here).
template <class Dequantize>
void tiled_linear(at::Tensor x2, bool int8_activations, int64_t out, const at::Tensor& y, Dequantize&& dequantize) {
  const int64_t m = x2.size(0), in = x2.size(1);
  if (int8_activations) {
    const int64_t ld = (in + 7) / 8 * 8, lq = (ld + kActBlock - 1) / kActBlock * kActBlock;
    at::Tensor xhat = at::empty_like(x2), q = at::zeros({m, lq}, x2.options().dtype(at::kChar));
    at::Tensor lane_scale = at::empty({m, lq / 4}, x2.options());
    quantize_activations(x2.data_ptr<float>(), m, in, q.data_ptr<int8_t>(), lq, lane_scale.data_ptr<float>(),
                         xhat.data_ptr<float>());
    x2 = xhat;
  }
  const int64_t rows = std::max<int64_t>(64, (int64_t{1} << 20) / std::max<int64_t>(in, 1) / 64 * 64);
  at::Tensor tile = at::empty({std::min(rows, out), in}, x2.options());
  for (int64_t n0 = 0; n0 < out; n0 += rows) {
    const int64_t n1 = std::min(out, n0 + rows);
    at::Tensor w = tile.narrow(0, 0, n1 - n0);
    dequantize(n0, n1, w.data_ptr<float>());
    y.narrow(1, n0, n1 - n0).copy_(at::mm(x2, w.t()));
  }
}

}  // namespace
