// CPU fast paths of the decode step's glue: fqcompile::rms_norm, ::attend, ::gated and ::entropy.
//
// Built with cpu_nested.cpp into one library (kernels/cpu.py). At decode, a token's
// activations are a few hundred floats, so torch's composite versions of these steps
// (~6 dispatched ops per RMSNorm; RoPE, two cache writes and SDPA per attention) cost more
// in dispatch than in arithmetic. Here each is one call over plain loops, float32 only:
// kernels/ops.py sends other dtypes to the references (kernels/reference.py), which define the semantics.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define FQ_AVX2 1  // 8-lane versions of the AVX-512 loops below (the exp-heavy ones: ~10x the scalar loop)
#endif

namespace {

float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

#if defined(__AVX512F__)
// e^x for x <= 0 (what a softmax needs): 2^n * 2^f, f in [-1/2, 1/2], degree-6 polynomial
// (relative error ~2e-7); exactly 0 below -87 (masked keys, underflow), never a denormal.
inline __m512 exp_neg(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718f));  // e^f = 2^(t - n)
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.f / 720), f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(live, _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f)), n);
}
#elif defined(FQ_AVX2)
// The same on 8 lanes; no scalef, so 2^n is built in the exponent bits (n >= -126: normal).
inline __m256 exp_neg(__m256 x) {
  const __m256 floor = _mm256_set1_ps(-87.f);
  const __m256 live = _mm256_cmp_ps(x, floor, _CMP_GE_OQ);
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, floor), _mm256_set1_ps(1.44269504f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.69314718f));
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.f / 720), f, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(live, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#endif

// p[j] = e^(p[j] - top) for j < n (every p[j] <= top); returns their sum.
float exp_shifted(float* __restrict p, int64_t n, float top) {
  float total = 0.f;
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  const __m512 vtop = _mm512_set1_ps(top);
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(p + j), vtop));
    _mm512_storeu_ps(p + j, e);
    acc = _mm512_add_ps(acc, e);
  }
  total = _mm512_reduce_add_ps(acc);
#elif defined(FQ_AVX2)
  __m256 acc = _mm256_setzero_ps();
  const __m256 vtop = _mm256_set1_ps(top);
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(p + j), vtop));
    _mm256_storeu_ps(p + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  total = hsum(acc);
#endif
  for (; j < n; ++j) total += (p[j] = std::exp(p[j] - top));
  return total;
}

}  // namespace

at::Tensor fqcompile::rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "rms_norm: float32 only");
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d, "rms_norm: weight must be [", d, "]");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t rows = d ? xc.numel() / d : 0;
  const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xp + r * d;
    const float inv = 1.f / std::sqrt(dot(row, row, d) / static_cast<float>(d) + static_cast<float>(eps));
    float* out = yp + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) out[i] = wp[i] * (row[i] * inv);
  }
  return y;
}

namespace {

// RoPE on the first r of d dims: out[i] = x[i] cos[i] + x[(i + r/2) % r] sin[i] for i < r, x[i] beyond
// (partial rotary); sin has its first half negated (slim.py).
void rope(const float* __restrict x, const float* __restrict cos, const float* __restrict sin, int64_t d, int64_t r,
          float* __restrict out) {
  const int64_t half = r / 2;
  for (int64_t i = 0; i < r; ++i) out[i] = x[i] * cos[i] + x[i < half ? i + half : i - half] * sin[i];
  std::copy(x + r, x + d, out + r);
}

// out = w * x / rms(x) over one head (qk-norm), as rms_norm computes a row.
void norm_row(const float* __restrict x, const float* __restrict w, int64_t d, float eps, float* __restrict out) {
  const float inv = 1.f / std::sqrt(dot(x, x, d) / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = w[i] * (x[i] * inv);
}

// out[j] = scale * q . k_j for the n rows k_j at k + j * stride (the attention scores).
void scores(const float* __restrict q, const float* __restrict k, int64_t n, int64_t stride, int64_t d, float scale,
            float* __restrict out) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  // Four keys at a time: one dot product alone is a chain of dependent FMAs and a
  // horizontal sum per key (~45 cycles at d = 64, most of an attention step); four
  // chains run side by side and one horizontal-add tree sums them all.
  if (d % 8 == 0)
    for (; j + 4 <= n; j += 4) {
      const float* kj = k + j * stride;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t i = 0; i < d; i += 8) {
        const __m256 qi = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(kj + i), a0);
        a1 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(kj + stride + i), a1);
        a2 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(kj + 2 * stride + i), a2);
        a3 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(kj + 3 * stride + i), a3);
      }
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  // per 128-bit half
      const __m128 sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      _mm_storeu_ps(out + j, _mm_mul_ps(sum, _mm_set1_ps(scale)));
    }
#endif
  for (; j < n; ++j) out[j] = scale * dot(q, k + j * stride, d);
}

// out[0, d) = sum_j w[j] v_j over n rows v_j at v + j * stride: the softmax-weighted values
// (added to out with `accumulate`: a ring cache's keys come in two runs).
void weighted_sum(const float* __restrict w, const float* __restrict v, int64_t n, int64_t stride, int64_t d,
                  float* __restrict out, bool accumulate) {
  int64_t e = 0;
#if defined(__AVX512F__)
  // 64 columns at a time in four registers (a memory accumulator would cost a store per key).
  for (; e + 64 <= d; e += 64) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    if (accumulate) {
      a0 = _mm512_loadu_ps(out + e), a1 = _mm512_loadu_ps(out + e + 16);
      a2 = _mm512_loadu_ps(out + e + 32), a3 = _mm512_loadu_ps(out + e + 48);
    }
    for (int64_t j = 0; j < n; ++j) {
      const __m512 wj = _mm512_set1_ps(w[j]);
      const float* row = v + j * stride + e;
      a0 = _mm512_fmadd_ps(wj, _mm512_loadu_ps(row), a0);
      a1 = _mm512_fmadd_ps(wj, _mm512_loadu_ps(row + 16), a1);
      a2 = _mm512_fmadd_ps(wj, _mm512_loadu_ps(row + 32), a2);
      a3 = _mm512_fmadd_ps(wj, _mm512_loadu_ps(row + 48), a3);
    }
    _mm512_storeu_ps(out + e, a0);
    _mm512_storeu_ps(out + e + 16, a1);
    _mm512_storeu_ps(out + e + 32, a2);
    _mm512_storeu_ps(out + e + 48, a3);
  }
#elif defined(FQ_AVX2)
  for (; e + 64 <= d; e += 64) {  // the same in eight 8-lane registers
    __m256 a[8];
    for (int r = 0; r < 8; ++r) a[r] = accumulate ? _mm256_loadu_ps(out + e + 8 * r) : _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m256 wj = _mm256_set1_ps(w[j]);
      const float* row = v + j * stride + e;
      for (int r = 0; r < 8; ++r) a[r] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(row + 8 * r), a[r]);
    }
    for (int r = 0; r < 8; ++r) _mm256_storeu_ps(out + e + 8 * r, a[r]);
  }
#endif
  if (e == d) return;
  if (!accumulate) std::fill(out + e, out + d, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const float* row = v + j * stride;
#pragma omp simd
    for (int64_t i = e; i < d; ++i) out[i] += w[j] * row[i];
  }
}

}  // namespace

// qkv [B, T, (H + 2 KV) D]: qk-norm and RoPE on q and k, k and v into cache slots (start + i) % C,
// then each query head attends to the slots the mask and the window allow (kernels/reference.py:
// attend_reference).
at::Tensor fqcompile::attend(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                             at::Tensor& v_cache, int64_t start, int64_t heads, const c10::optional<at::Tensor>& mask,
                             const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
                             double eps, double scale, int64_t window) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat, "attend: float32 only");
  TORCH_CHECK(qkv.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(), "attend: bad shapes");
  const int64_t b = qkv.size(0), t = qkv.size(1), kv = k_cache.size(1), cap = k_cache.size(2),
                d = k_cache.size(3), length = start + t, r = cos.size(-1);
  TORCH_CHECK(heads % kv == 0 && qkv.size(2) == (heads + 2 * kv) * d && k_cache.size(0) == b,
              "attend: qkv does not match the cache");
  const int64_t lo = std::max<int64_t>(0, length - cap);  // the oldest slot still held (a ring beyond C)
  TORCH_CHECK(start >= 0 && window >= 0 && (lo == 0 || (window > 0 && cap >= window + t - 1)), "attend: slots ",
              start, "..", length, " outside the cache of ", cap, " (window ", window, ")");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 3 && cos.size(0) == b && cos.size(1) == t && r <= d &&
                  r % 2 == 0, "attend: cos/sin must be [B, T, R] with an even R <= D");
  const float* norm[2] = {nullptr, nullptr};
  at::Tensor norms[2];
  for (int i = 0; i < 2; ++i) {
    const auto& w = i ? k_norm : q_norm;
    if (!w.has_value()) continue;
    TORCH_CHECK(w->scalar_type() == at::kFloat && w->numel() == d, "attend: qk-norm weights must be float32 [D]");
    norms[i] = w->contiguous();
    norm[i] = norms[i].data_ptr<float>();
  }
  at::Tensor m;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "attend: the mask must be bool (True = attend)");
    m = mask->expand({b, 1, t, length}).contiguous();
  }
  const at::Tensor x = qkv.contiguous(), c = cos.contiguous(), s = sin.contiguous();
  const float *xp = x.data_ptr<float>(), *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
  float *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  const bool* mp = m.defined() ? m.data_ptr<bool>() : nullptr;
  const int64_t width = (heads + 2 * kv) * d;
  const float fe = static_cast<float>(eps);
  auto slot = [&](float* cache, int64_t bi, int64_t h, int64_t j) { return cache + ((bi * kv + h) * cap + j) * d; };
  // qk-norm (where the model has it) then RoPE, one head at a time
  auto embed = [&](const float* head, const float* w, int64_t pos, float* tmp, float* out) {
    if (w) {
      norm_row(head, w, d, fe, tmp);
      head = tmp;
    }
    rope(head, cp + pos * r, sp + pos * r, d, r, out);
  };
  std::vector<float> tmp(d);
  for (int64_t bi = 0; bi < b; ++bi)
    for (int64_t ti = 0; ti < t; ++ti) {
      const int64_t pos = bi * t + ti, at_slot = (start + ti) % cap;
      const float* row = xp + pos * width;
      for (int64_t h = 0; h < kv; ++h) {
        embed(row + (heads + h) * d, norm[1], pos, tmp.data(), slot(kp, bi, h, at_slot));
        std::copy_n(row + (heads + kv + h) * d, d, slot(vp, bi, h, at_slot));
      }
    }
  at::Tensor y = at::empty({b, t, heads * d}, qkv.options());
  float* yp = y.data_ptr<float>();
  const float sc = scale > 0 ? static_cast<float>(scale) : 1.f / std::sqrt(static_cast<float>(d));
  at::parallel_for(0, b * heads, 1, [&](int64_t first, int64_t last) {
    std::vector<float> q(d), qt(d), p(std::min(length, cap));  // a query sees at most C keys
    for (int64_t i = first; i < last; ++i) {
      const int64_t bi = i / heads, h = i % heads, g = h / (heads / kv);
      for (int64_t ti = 0; ti < t; ++ti) {
        const int64_t pos = bi * t + ti, self = start + ti;
        const int64_t from = std::max(lo, window ? self - window + 1 : int64_t{0}), n = length - from;
        embed(xp + pos * width + h * d, norm[0], pos, qt.data(), q.data());
        // the keys [from, length) lie in at most two runs of the ring
        auto runs = [&](auto&& fn) {
          for (int64_t j = from; j < length;) {
            const int64_t phys = j % cap, len = std::min(length - j, cap - phys);
            fn(j - from, phys, len);
            j += len;
          }
        };
        runs([&](int64_t off, int64_t phys, int64_t len) {
          scores(q.data(), slot(kp, bi, g, phys), len, d, d, sc, p.data() + off);
        });
        const bool* allowed = mp ? mp + pos * length + from : nullptr;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          if (allowed && !allowed[j]) p[j] = -std::numeric_limits<float>::infinity();
          top = std::max(top, p[j]);
        }
        const float total = exp_shifted(p.data(), n, top);
        for (int64_t j = 0; j < n; ++j) p[j] /= total;
        float* out = yp + pos * heads * d + h * d;
        runs([&](int64_t off, int64_t phys, int64_t len) {
          weighted_sum(p.data() + off, slot(vp, bi, g, phys), len, d, d, out, off != 0);
        });
      }
    }
  });
  return y;
}

namespace {

// GELU's tanh approximation is x * sigmoid(z) with z = 2 sqrt(2/pi) (x + 0.044715 x^3).
constexpr float kGeluA = 1.5957691216057308f, kGeluB = 0.044715f;

#if defined(__AVX512F__)
inline __m512 sigmoid(__m512 v) {  // 1 / (1 + e^-x), or e^x / (1 + e^x) for x < 0
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 e = exp_neg(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(v)));  // e^-|x|
  const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_div_ps(_mm512_mask_blend_ps(neg, one, e), _mm512_add_ps(one, e));
}
inline __m512 gelu_arg(__m512 v) {
  const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
  return _mm512_mul_ps(_mm512_set1_ps(kGeluA), _mm512_fmadd_ps(_mm512_set1_ps(kGeluB), v3, v));
}
#elif defined(FQ_AVX2)
inline __m256 sigmoid(__m256 v) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 e = exp_neg(_mm256_or_ps(v, _mm256_set1_ps(-0.f)));  // e^-|x|
  return _mm256_div_ps(_mm256_blendv_ps(one, e, _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ)),
                       _mm256_add_ps(one, e));
}
inline __m256 gelu_arg(__m256 v) {
  const __m256 v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
  return _mm256_mul_ps(_mm256_set1_ps(kGeluA), _mm256_fmadd_ps(_mm256_set1_ps(kGeluB), v3, v));
}
#endif

}  // namespace

// act(gate) * up over a fused gate/up projection's output [..., 2I] -> [..., I]; act is SiLU,
// or GELU's tanh approximation with `gelu`.
at::Tensor fqcompile::gated(const at::Tensor& gate_up, bool gelu) {
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat && gate_up.size(-1) % 2 == 0, "gated: float32 [..., 2I]");
  const at::Tensor x = gate_up.contiguous();
  const int64_t inner = x.size(-1) / 2, rows = inner ? x.numel() / (2 * inner) : 0;
  auto sizes = x.sizes().vec();
  sizes.back() = inner;
  at::Tensor y = at::empty(sizes, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float *g = xp + r * 2 * inner, *u = g + inner;
    float* out = yp + r * inner;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= inner; i += 16) {
      const __m512 v = _mm512_loadu_ps(g + i);
      const __m512 sig = sigmoid(gelu ? gelu_arg(v) : v);
      _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(v, sig), _mm512_loadu_ps(u + i)));
    }
#elif defined(FQ_AVX2)
    for (; i + 8 <= inner; i += 8) {
      const __m256 v = _mm256_loadu_ps(g + i);
      const __m256 sig = sigmoid(gelu ? gelu_arg(v) : v);
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(v, sig), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < inner; ++i) {
      const float z = gelu ? kGeluA * (g[i] + kGeluB * g[i] * g[i] * g[i]) : g[i];
      out[i] = g[i] / (1.f + std::exp(-z)) * u[i];
    }
  }
  return y;
}

// Entropy (nats) of softmax(logits) per row: log Z - sum p (l - m), in a pass after the max
// (both passes vectorized: the max is not a scalar loop).
// The precision controller's signal, every decode step, over a whole vocabulary.
namespace {

float span_max(const float* __restrict x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 a = _mm512_set1_ps(m), b = a, c = a, d = a;  // four chains: max has a latency of 4
  for (; i + 64 <= n; i += 64) {
    a = _mm512_max_ps(a, _mm512_loadu_ps(x + i));
    b = _mm512_max_ps(b, _mm512_loadu_ps(x + i + 16));
    c = _mm512_max_ps(c, _mm512_loadu_ps(x + i + 32));
    d = _mm512_max_ps(d, _mm512_loadu_ps(x + i + 48));
  }
  m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(a, b), _mm512_max_ps(c, d)));
#elif defined(FQ_AVX2)
  __m256 a = _mm256_set1_ps(m), b = a, c = a, d = a;
  for (; i + 32 <= n; i += 32) {
    a = _mm256_max_ps(a, _mm256_loadu_ps(x + i));
    b = _mm256_max_ps(b, _mm256_loadu_ps(x + i + 8));
    c = _mm256_max_ps(c, _mm256_loadu_ps(x + i + 16));
    d = _mm256_max_ps(d, _mm256_loadu_ps(x + i + 24));
  }
  m = hmax(_mm256_max_ps(_mm256_max_ps(a, b), _mm256_max_ps(c, d)));
#endif
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// {sum e^(x - m), sum e^(x - m) (x - m)} over x[0, n), every x <= m.
std::pair<double, double> span_sums(const float* __restrict x, int64_t n, float m) {
  double z = 0, zl = 0;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 vz = _mm512_setzero_ps(), vzl = _mm512_setzero_ps(), wz = vz, wzl = vz;  // two chains each
  const __m512 vm = _mm512_set1_ps(m), floor = _mm512_set1_ps(-87.f);  // 0 * -inf would be NaN
  for (; i + 32 <= n; i += 32) {
    const __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(x + i), vm), d1 = _mm512_sub_ps(_mm512_loadu_ps(x + i + 16), vm);
    const __m512 e0 = exp_neg(d0), e1 = exp_neg(d1);
    vz = _mm512_add_ps(vz, e0);
    wz = _mm512_add_ps(wz, e1);
    vzl = _mm512_fmadd_ps(e0, _mm512_max_ps(d0, floor), vzl);
    wzl = _mm512_fmadd_ps(e1, _mm512_max_ps(d1, floor), wzl);
  }
  z = _mm512_reduce_add_ps(_mm512_add_ps(vz, wz));
  zl = _mm512_reduce_add_ps(_mm512_add_ps(vzl, wzl));
#elif defined(FQ_AVX2)
  __m256 vz = _mm256_setzero_ps(), vzl = vz, wz = vz, wzl = vz;
  const __m256 vm = _mm256_set1_ps(m), floor = _mm256_set1_ps(-87.f);
  for (; i + 16 <= n; i += 16) {
    const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + i), vm), d1 = _mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vm);
    const __m256 e0 = exp_neg(d0), e1 = exp_neg(d1);
    vz = _mm256_add_ps(vz, e0);
    wz = _mm256_add_ps(wz, e1);
    vzl = _mm256_fmadd_ps(e0, _mm256_max_ps(d0, floor), vzl);
    wzl = _mm256_fmadd_ps(e1, _mm256_max_ps(d1, floor), wzl);
  }
  z = hsum(_mm256_add_ps(vz, wz));
  zl = hsum(_mm256_add_ps(vzl, wzl));
#endif
  for (; i < n; ++i) {
    const float d = x[i] - m, e = std::exp(d);
    z += e;
    zl += e > 0.f ? e * d : 0.f;
  }
  return {z, zl};
}

at::Tensor entropy(const at::Tensor& logits) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() >= 1, "entropy: float32 only");
  const at::Tensor l = logits.contiguous();
  const int64_t v = l.size(-1), rows = v ? l.numel() / v : 0;
  auto sizes = l.sizes().vec();
  sizes.pop_back();
  at::Tensor h = at::empty(sizes, l.options());
  const float* lp = l.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  // Each row in chunks on the threads, each chunk with its own max, then combined exactly:
  // sum e^(x - m) (x - m) over a chunk = e^(m_c - m) (zl_c + (m_c - m) z_c). On one thread
  // this was most of the controller's time (docs/kernels.md).
  constexpr int64_t kChunk = 8192;
  const int64_t chunks = (v + kChunk - 1) / kChunk;
  std::vector<float> cmax(chunks);
  std::vector<std::pair<double, double>> csum(chunks);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = lp + r * v;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t n = std::min(kChunk, v - c * kChunk);
        cmax[c] = span_max(row + c * kChunk, n);
        if (cmax[c] > -std::numeric_limits<float>::infinity())  // an all -inf chunk adds nothing
          csum[c] = span_sums(row + c * kChunk, n, cmax[c]);
      }
    });
    const float m = *std::max_element(cmax.begin(), cmax.end());
    double z = 0, zl = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      if (!(cmax[c] > -std::numeric_limits<float>::infinity())) continue;
      const double shift = static_cast<double>(cmax[c]) - m, w = std::exp(shift);
      z += w * csum[c].first;
      zl += w * (csum[c].second + shift * csum[c].first);
    }
    hp[r] = static_cast<float>(std::log(z) - zl / z);
  }
  return h;
}

}  // namespace

TORCH_LIBRARY_IMPL(fqcompile, CPU, m) {
  m.impl("rms_norm", &fqcompile::rms_norm);
  m.impl("attend", &fqcompile::attend);
  m.impl("entropy", &entropy);
  m.impl("gated", &fqcompile::gated);
}
