// The CPU kernels' building blocks, per instruction set (AVX-512, AVX2 + FMA, or portable
// code): a few vector operations, the nested planes and the group grid of a slice, and the
// activations as the row kernels take them.
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


namespace {

// Small loops over batch rows and accumulators: unrolled, so the accumulators live in registers.
#define FQ_UNROLL _Pragma("GCC unroll 16")

constexpr int64_t kMaxGemvBatch = 8;  // above this, dequantize tiles and use the BLAS matmul

// ---- a few vector operations, per instruction set -------------------------------------
#if defined(__AVX512F__)
constexpr int VW = 16;
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset(float s) { return _mm512_set1_ps(s); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vcodes(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
inline __m128i bload(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline vf vcodes(__m128i r) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(r)); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vhalves(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#define FQ_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int VW = 8;
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset(float s) { return _mm256_set1_ps(s); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vcodes(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline float vsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline __m128i bload(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
inline vf vcodes(__m128i r) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(r)); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
#if defined(__F16C__)
inline vf vhalves(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif
#define FQ_SIMD 1
#else  // portable: 8 lanes the compiler may vectorize for whatever the machine has
constexpr int VW = 8;
struct vf { float v[8]; };
inline vf vzero() { return vf{}; }
inline vf vset(float s) { vf r; for (int i = 0; i < 8; ++i) r.v[i] = s; return r; }
inline vf vload(const float* p) { vf r; std::memcpy(r.v, p, sizeof r.v); return r; }
inline vf vcodes(const uint8_t* p) { vf r; for (int i = 0; i < 8; ++i) r.v[i] = p[i]; return r; }
inline vf vfma(vf a, vf b, vf c) { for (int i = 0; i < 8; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
inline vf vadd(vf a, vf b) { for (int i = 0; i < 8; ++i) a.v[i] += b.v[i]; return a; }
inline float vsum(vf a) { float s = 0; for (int i = 0; i < 8; ++i) s += a.v[i]; return s; }
#endif

struct Planes {
  std::vector<const uint8_t*> data;  // row 0 of each plane
  std::vector<int64_t> widths;
  int64_t padded_in;
};

// The top sum(widths) bits of every code of row n, into out[0, padded_in).
void unpack_row(const Planes& p, int64_t n, uint8_t* __restrict out) {
  const int64_t width = p.padded_in;
  for (size_t i = 0; i < p.data.size(); ++i) {
    const int w = static_cast<int>(p.widths[i]);
    const int k = 8 / w;
    const int64_t len = width / k;  // bytes per row of this plane
    const uint8_t* __restrict row = p.data[i] + n * len;
    const uint8_t mask = static_cast<uint8_t>((1 << w) - 1);
    if (w == 8) {  // a whole byte is the code: only ever the sole plane
      std::memcpy(out, row, len);
      continue;
    }
    for (int s = 0; s < k; ++s) {
      uint8_t* __restrict o = out + s * len;
      const int shift = s * w;
      int64_t j = 0;
#if defined(__AVX2__)
      // Byte shifts via 16-bit ones: the masks drop the bits that cross between bytes.
      const __m256i low = _mm256_set1_epi8(static_cast<char>(mask));
      const __m256i high = _mm256_set1_epi8(static_cast<char>((0xFF << w) & 0xFF));
      for (; j + 32 <= len; j += 32) {
        const __m256i r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j));
        __m256i v = _mm256_and_si256(_mm256_srli_epi16(r, shift), low);
        if (i > 0) {
          const __m256i prev = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(o + j));
          v = _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(prev, w), high), v);
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + j), v);
      }
#endif
      for (; j < len; ++j) {
        const uint8_t v = static_cast<uint8_t>((row[j] >> shift) & mask);
        o[j] = i == 0 ? v : static_cast<uint8_t>((o[j] << w) | v);
      }
    }
  }
}

struct Grid {
  const c10::Half* scale;  // [N, G]
  const uint8_t* zero;     // [N, G]
  int64_t groups, group_size;
  float cells;             // 2^(bits - low): b-bit cells per lowest-rung step
  float offset;            // z_b = z * cells + offset (formats/nested.py rung_offset)
};

inline float half_to_float(c10::Half h) {
#if defined(__F16C__)
  return _cvtsh_ss(h.x);  // one instruction; c10's conversion is done in software
#else
  return static_cast<float>(h);
#endif
}

// Slice parameters of rows n .. n + rows - 1 for every group (formats/nested.py slice_params),
// row after row, folded for accumulators that hold sum (q + shift) x / mult:
// y_g = sm[g] * (acc_g - zc[g] * X_g) with sm = mult * s_b and zc = (shift + z_b) / mult,
// X_g the group's activation sum.
void row_params(const Grid& grid, int64_t n, float mult, float shift, float* sm, float* zc, int64_t rows = 1) {
  const float inv = 1.f / grid.cells, inv_mult = 1.f / mult;
  const c10::Half* scale = grid.scale + n * grid.groups;
  const uint8_t* zero = grid.zero + n * grid.groups;
  const int64_t count = rows * grid.groups;  // the rows' parameters are contiguous
  int64_t g = 0;
#if defined(FQ_SIMD) && defined(__F16C__)
  // A vector at a time: one group at a time it was a visible share of a decode step, most
  // of it on narrow rows (576 columns: 5 groups against 288 code bytes).
  const vf vinv = vset(inv), vcells = vset(grid.cells), vmult = vset(mult), voffset = vset(grid.offset);
  const vf vshift = vset(shift), vinv_mult = vset(inv_mult);
  for (; g + VW <= count; g += VW) {
    const vf z = vfma(vcodes(zero + g), vcells, voffset);
    vstore(sm + g, vmul(vmult, vmul(vhalves(scale + g), vinv)));
    vstore(zc + g, vmul(vadd(vshift, z), vinv_mult));
  }
#endif
  for (; g < count; ++g) {
    const float s = half_to_float(scale[g]) * inv;
    const float z = static_cast<float>(zero[g]) * grid.cells + grid.offset;
    sm[g] = mult * s;
    zc[g] = (shift + z) * inv_mult;
  }
}

// The centring happens inside each group, spread evenly over the vector lanes (xq holds
// X_g / VW), so that only small, centred values are summed across groups: subtracting
// one large sum of z * X at the end would cancel catastrophically when the activations
// have a large mean.
struct Activations {
  const float* x;   // [B, ldx]
  int64_t ldx;
  const float* xq;  // [B, groups]: X_g / VW
};

// Activations quantized to int8 in blocks of kActBlock columns (the int8-activation mode).
constexpr int64_t kActBlock = 16;
struct Quantized {
  const int8_t* q;           // [B, ld], zero past in_features
  int64_t ld;                // a multiple of kActBlock
  const float* lane_scale;   // [B, ld / 4]: the scale of the block holding columns 4i .. 4i + 3
};

}  // namespace
