// CPU fast path of fqcompile::nested_linear: y = x @ W_b^T over nested-bit planes.
//
// Built on first use by kernels/cpu.py (torch cpp_extension, -O3 -march=native, cached
// per machine). The format is formats/nested.py's: planes most significant first, each
// byte of a w-bit plane holding code j of each of the row's 8/w segments.
//
// Per output row, the top planes are unpacked into a small code buffer (it stays in L1)
// and the row is reduced group by group without ever building a float weight:
//     y = sum_g s_g * (sum_{k in g} q_k x_k  -  z_g * sum_{k in g} x_k)
// so the inner loop is one u8->f32 conversion and one FMA per weight. Converting, not
// reading memory, is what limits a 2-core AVX2/AVX-512 machine, so each converted
// weight is reused for every activation row of a small batch. Larger batches
// (prefill) dequantize a tile of rows once and hand it to the BLAS matmul.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu_ops.h"

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
  // A vector at a time: done per row one group at a time, this was ~15% of a decode step
  // (perf, AVX2), most of it on narrow rows (576 columns: 5 groups against 288 code bytes).
  const vf vinv = vset(inv), vcells = vset(grid.cells), vmult = vset(mult), vhalf = vset(0.5f);
  const vf vneg_half = vset(-0.5f), vshift = vset(shift), vinv_mult = vset(inv_mult);
  for (; g + VW <= count; g += VW) {
    const vf z = vfma(vadd(vcodes(zero + g), vhalf), vcells, vneg_half);
    vstore(sm + g, vmul(vmult, vmul(vhalves(scale + g), vinv)));
    vstore(zc + g, vmul(vadd(vshift, z), vinv_mult));
  }
#endif
  for (; g < count; ++g) {
    const float s = half_to_float(scale[g]) * inv;
    const float z = (static_cast<float>(zero[g]) + 0.5f) * grid.cells - 0.5f;
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

template <int B>
inline void finish_group(vf (&c)[B], const Activations& a, int64_t groups, int64_t g, float sm, float zc, vf (&total)[B]) {
  const vf s = vset(sm);
  FQ_UNROLL
  for (int b = 0; b < B; ++b) total[b] = vfma(s, vadd(c[b], vset(-zc * a.xq[b * groups + g])), total[b]);
}

// Group g of the first half row and group g + gh of the second: sum each activation row's
// U partial accumulators, then apply the groups' scales and zero points.
template <int B, int U>
inline void finish_halves(vf (&a0)[B][U], vf (&a1)[B][U], const Activations& a, const Grid& grid, int64_t g,
                          int64_t gh, const float* sm, const float* zc, vf (&total)[B]) {
  vf c0[B], c1[B];
  FQ_UNROLL
  for (int b = 0; b < B; ++b) {
    c0[b] = a0[b][0];
    c1[b] = a1[b][0];
    FQ_UNROLL
    for (int u = 1; u < U; ++u) { c0[b] = vadd(c0[b], a0[b][u]); c1[b] = vadd(c1[b], a1[b][u]); }
  }
  finish_group<B>(c0, a, grid.groups, g, sm[g], zc[g], total);
  finish_group<B>(c1, a, grid.groups, g + gh, sm[g + gh], zc[g + gh], total);
}

// y[b, n] over unpacked codes; U independent accumulators per row hide FMA latency.
template <int B, int U>
void row_dot(const uint8_t* __restrict codes, const Activations& a, int64_t in, const Grid& grid,
             const float* sm, const float* zc, float* __restrict yn, int64_t ldy) {
  vf total[B];
  float tails[B];
  FQ_UNROLL
  for (int b = 0; b < B; ++b) { total[b] = vzero(); tails[b] = 0.f; }
  for (int64_t g = 0; g < grid.groups; ++g) {
    const int64_t k0 = g * grid.group_size, k1 = std::min(in, k0 + grid.group_size);
    vf acc[B][U];
    FQ_UNROLL
    for (int b = 0; b < B; ++b)
      FQ_UNROLL
      for (int u = 0; u < U; ++u) acc[b][u] = vzero();
    int64_t k = k0;
    for (; k + U * VW <= k1; k += U * VW)
      FQ_UNROLL
      for (int u = 0; u < U; ++u) {
        const vf q = vcodes(codes + k + u * VW);
        FQ_UNROLL
        for (int b = 0; b < B; ++b) acc[b][u] = vfma(q, vload(a.x + b * a.ldx + k + u * VW), acc[b][u]);
      }
    for (; k + VW <= k1; k += VW) {
      const vf q = vcodes(codes + k);
      FQ_UNROLL
      for (int b = 0; b < B; ++b) acc[b][0] = vfma(q, vload(a.x + b * a.ldx + k), acc[b][0]);
    }
    vf c[B];
    FQ_UNROLL
    for (int b = 0; b < B; ++b) {
      c[b] = acc[b][0];
      FQ_UNROLL
      for (int u = 1; u < U; ++u) c[b] = vadd(c[b], acc[b][u]);
      float tail = 0.f;
      for (int64_t t = k; t < k1; ++t) tail += codes[t] * a.x[b * a.ldx + t];
      tails[b] += sm[g] * tail;
    }
    finish_group<B>(c, a, grid.groups, g, sm[g], zc[g], total);
  }
  FQ_UNROLL
  for (int b = 0; b < B; ++b) yn[b * ldy] = vsum(total[b]) + tails[b];
}

#if defined(__AVX512F__) && defined(__AVX512VBMI__) && defined(__AVX512VL__)
#define FQ_MAGIC 1
#endif

#if defined(FQ_SIMD)
// Fused path for nibble planes (ladder [4, 8] at 4 or 8 bits: NP = 1 or 2 planes of width
// 4). Byte j of a nibble plane holds column j (low nibble) and column half + j (high
// nibble), so one load feeds both halves of the row; nothing is unpacked to memory.
// Needs half % group_size == 0 and group_size % (U * VW) == 0 (checked by the caller).
#ifndef FQ_HINT
#define FQ_HINT _MM_HINT_T1  // into L2: L1 prefetches hold line-fill buffers that demand loads need
#endif
#ifndef FQ_PREFETCH
#define FQ_PREFETCH 4096
#endif
constexpr int kPrefetch = FQ_PREFETCH;  // bytes ahead within a plane: the hardware prefetcher alone lags

template <int B, int NP, int U>
void row_dot_nibbles(const uint8_t* __restrict r0, const uint8_t* __restrict r1, int64_t half,
                     const Activations& a, const Grid& grid, const float* sm, const float* zc,
                     float* __restrict yn, int64_t ldy) {
  const __m128i m = _mm_set1_epi8(0x0F), mh = _mm_set1_epi8(static_cast<char>(0xF0));
  const int64_t gh = half / grid.group_size;  // groups per half row
  vf total[B];
  FQ_UNROLL
  for (int b = 0; b < B; ++b) total[b] = vzero();
  for (int64_t g = 0; g < gh; ++g) {
    vf a0[B][U], a1[B][U];
    FQ_UNROLL
    for (int b = 0; b < B; ++b)
      FQ_UNROLL
      for (int u = 0; u < U; ++u) a0[b][u] = a1[b][u] = vzero();
    const int64_t j1 = (g + 1) * grid.group_size;
    for (int64_t j = g * grid.group_size; j < j1; j += U * VW)
      FQ_UNROLL
      for (int u = 0; u < U; ++u) {
        const int64_t jj = j + u * VW;
        _mm_prefetch(reinterpret_cast<const char*>(r0 + jj + kPrefetch), FQ_HINT);
        if constexpr (NP == 2) _mm_prefetch(reinterpret_cast<const char*>(r1 + jj + kPrefetch), FQ_HINT);
        const __m128i v = bload(r0 + jj);
        vf q0, q1;
        if constexpr (NP == 1) {
          q0 = vcodes(_mm_and_si128(v, m));
          q1 = vcodes(_mm_and_si128(_mm_srli_epi16(v, 4), m));
        } else {  // top nibble from plane 0, bottom nibble from plane 1
          const __m128i w = bload(r1 + jj);
          q0 = vcodes(_mm_or_si128(_mm_slli_epi16(_mm_and_si128(v, m), 4), _mm_and_si128(w, m)));
          q1 = vcodes(_mm_or_si128(_mm_and_si128(v, mh), _mm_and_si128(_mm_srli_epi16(w, 4), m)));
        }
        FQ_UNROLL
        for (int b = 0; b < B; ++b) {
          a0[b][u] = vfma(q0, vload(a.x + b * a.ldx + jj), a0[b][u]);
          a1[b][u] = vfma(q1, vload(a.x + b * a.ldx + half + jj), a1[b][u]);
        }
      }
    finish_halves<B, U>(a0, a1, a, grid, g, gh, sm, zc, total);
  }
  FQ_UNROLL
  for (int b = 0; b < B; ++b) yn[b * ldy] = vsum(total[b]);
}
#endif

#if defined(FQ_MAGIC)
// Nibble planes on AVX-512 VBMI, 64 bytes of each plane (128 codes) per step; a byte
// permute moves 16 codes at once into the 32-bit lanes.
//  NP = 1 (4-bit): the byte 0x80 | q << 3 placed as byte 2 of 0x3F800000 is the float
//    1 + q/16, so no int->float conversion is needed: the accumulators hold
//    sum (1 + q/16) x, rescaled by row_params(mult = 16, shift = 16).
//  NP = 2 (8-bit): the code is zero-extended by the permute, then converted.
// Needs half % group_size == 0 and group_size % 64 == 0 (checked by the caller).
template <int B, int NP>
void row_dot_wide(const uint8_t* __restrict r0, const uint8_t* __restrict r1, int64_t half, const Activations& a,
                  const Grid& grid, const float* sm, const float* zc, float* __restrict yn, int64_t ldy) {
  const __m512i m0f = _mm512_set1_epi8(0x0F), mf0 = _mm512_set1_epi8(static_cast<char>(0xF0));
  const __m512i m78 = _mm512_set1_epi8(0x78), m80 = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i one = _mm512_set1_epi32(0x3F800000);
  const int at = NP == 1 ? 16 : 0;  // bit position of the code's byte within each 32-bit lane
  const __m512i lane = _mm512_slli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), at);
  const __m512i step = _mm512_set1_epi32(16 << at);
  const __m512i idx[4] = {lane, _mm512_add_epi32(lane, step), _mm512_add_epi32(lane, _mm512_add_epi32(step, step)),
                          _mm512_add_epi32(lane, _mm512_add_epi32(step, _mm512_add_epi32(step, step)))};
  constexpr __mmask64 kByte = NP == 1 ? 0x4444444444444444ULL : 0x1111111111111111ULL;
  constexpr int A = B == 1 ? 2 : 1;  // accumulators per half and row: enough chains to hide FMA latency
  const int64_t gh = half / grid.group_size;
  vf total[B];
  FQ_UNROLL
  for (int b = 0; b < B; ++b) total[b] = vzero();
  for (int64_t g = 0; g < gh; ++g) {
    vf a0[B][A], a1[B][A];
    FQ_UNROLL
    for (int b = 0; b < B; ++b)
      FQ_UNROLL
      for (int u = 0; u < A; ++u) a0[b][u] = a1[b][u] = vzero();
    for (int64_t j = g * grid.group_size; j < (g + 1) * grid.group_size; j += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(r0 + j + kPrefetch), FQ_HINT);
      const __m512i v = _mm512_loadu_si512(r0 + j);
      __m512i lo, hi;  // codes of columns j.. (low nibbles) and half + j.. (high nibbles)
      if constexpr (NP == 1) {
        lo = _mm512_ternarylogic_epi32(_mm512_slli_epi16(v, 3), m78, m80, 0xEA);  // (v << 3 & 0x78) | 0x80
        hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 1), m78, m80, 0xEA);
      } else {
        _mm_prefetch(reinterpret_cast<const char*>(r1 + j + kPrefetch), FQ_HINT);
        const __m512i w = _mm512_loadu_si512(r1 + j);
        lo = _mm512_ternarylogic_epi32(mf0, _mm512_slli_epi16(v, 4), w, 0xCA);  // top nibble from plane 0
        hi = _mm512_ternarylogic_epi32(mf0, v, _mm512_srli_epi16(w, 4), 0xCA);
      }
      FQ_UNROLL
      for (int i = 0; i < 4; ++i) {
        vf q0, q1;
        if constexpr (NP == 1) {
          q0 = _mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(one, kByte, idx[i], lo));
          q1 = _mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(one, kByte, idx[i], hi));
        } else {
          q0 = _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(kByte, idx[i], lo));
          q1 = _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(kByte, idx[i], hi));
        }
        FQ_UNROLL
        for (int b = 0; b < B; ++b) {
          const float* xb = a.x + b * a.ldx + j + 16 * i;
          a0[b][i % A] = vfma(q0, vload(xb), a0[b][i % A]);
          a1[b][i % A] = vfma(q1, vload(xb + half), a1[b][i % A]);
        }
      }
    }
    finish_halves<B, A>(a0, a1, a, grid, g, gh, sm, zc, total);
  }
  FQ_UNROLL
  for (int b = 0; b < B; ++b) yn[b * ldy] = vsum(total[b]);
}
#endif

#if defined(FQ_MAGIC)
// Nibble planes whose half rows do not split into whole groups (e.g. 576 columns, group
// 128): columns in order, 16 at a time; column k < half is the low nibble of byte k,
// column k >= half the high nibble of byte k - half. Needs half % 16 == 0 and
// group_size % 16 == 0. Same arithmetic as row_dot_wide, a chunk at a time.
template <int B, int NP>
void row_dot_chunks(const uint8_t* __restrict r0, const uint8_t* __restrict r1, int64_t half, int64_t in,
                    const Activations& a, const Grid& grid, const float* sm, const float* zc,
                    float* __restrict yn, int64_t ldy) {
  const __m128i m0f = _mm_set1_epi8(0x0F), mf0 = _mm_set1_epi8(static_cast<char>(0xF0));
  const __m128i m78 = _mm_set1_epi8(0x78), m80 = _mm_set1_epi8(static_cast<char>(0x80));
  const __m512i one = _mm512_set1_epi32(0x3F800000);
  const __m512i idx2 = _mm512_slli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 16);
  constexpr __mmask64 kByte2 = 0x4444444444444444ULL;
  constexpr int A = B == 1 ? 4 : (B == 2 ? 2 : 1);  // independent FMA chains per row (latency 4)
  auto codes = [&](int64_t k) -> vf {  // the 16 codes of columns k .. k + 15 as floats
    const bool high = k >= half;
    const int64_t j = high ? k - half : k;
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + j));
    if constexpr (NP == 1) {
      const __m128i t = high ? _mm_srli_epi16(v, 1) : _mm_slli_epi16(v, 3);
      const __m128i byte = _mm_ternarylogic_epi32(t, m78, m80, 0xEA);  // 0x80 | q << 3
      return _mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(one, kByte2, idx2, _mm512_castsi128_si512(byte)));
    } else {
      const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r1 + j));
      const __m128i code = high ? _mm_ternarylogic_epi32(mf0, v, _mm_srli_epi16(w, 4), 0xCA)
                                : _mm_ternarylogic_epi32(mf0, _mm_slli_epi16(v, 4), _mm_and_si128(w, m0f), 0xCA);
      return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(code));
    }
  };
  vf total[B];
  FQ_UNROLL
  for (int b = 0; b < B; ++b) total[b] = vzero();
  for (int64_t g = 0; g < grid.groups; ++g) {
    const int64_t k0 = g * grid.group_size, k1 = std::min(in, k0 + grid.group_size);
    vf acc[B][A];
    FQ_UNROLL
    for (int b = 0; b < B; ++b)
      FQ_UNROLL
      for (int u = 0; u < A; ++u) acc[b][u] = vzero();
    int64_t k = k0;
    for (; k + 16 * A <= k1; k += 16 * A)
      FQ_UNROLL
      for (int u = 0; u < A; ++u) {
        const vf q = codes(k + 16 * u);
        FQ_UNROLL
        for (int b = 0; b < B; ++b) acc[b][u] = vfma(q, vload(a.x + b * a.ldx + k + 16 * u), acc[b][u]);
      }
    for (; k < k1; k += 16) {
      const vf q = codes(k);
      FQ_UNROLL
      for (int b = 0; b < B; ++b) acc[b][0] = vfma(q, vload(a.x + b * a.ldx + k), acc[b][0]);
    }
    vf c[B];
    FQ_UNROLL
    for (int b = 0; b < B; ++b) {
      c[b] = acc[b][0];
      FQ_UNROLL
      for (int u = 1; u < A; ++u) c[b] = vadd(c[b], acc[b][u]);
    }
    finish_group<B>(c, a, grid.groups, g, sm[g], zc[g], total);
  }
  FQ_UNROLL
  for (int b = 0; b < B; ++b) yn[b * ldy] = vsum(total[b]);
}
#endif

#if defined(FQ_MAGIC) && defined(__AVX512VNNI__)
#define FQ_VNNI 1
// Int8-activation mode on nibble planes: codes (u8) times quantized activations (s8) with
// VNNI's 4-way u8 x s8 dot products, 64 per instruction. Each 32-bit lane then holds 4
// columns of one 16-column activation block, so it is converted and scaled by that
// block's scale at once; the weight group's zero point is applied as in the float path.
template <int B, int NP>
void row_dot_vnni(const uint8_t* __restrict r0, const uint8_t* __restrict r1, int64_t half, const Activations& a,
                  const Quantized& xq, const Grid& grid, const float* sm, const float* zc, float* __restrict yn,
                  int64_t ldy) {
  const __m512i m0f = _mm512_set1_epi8(0x0F), mf0 = _mm512_set1_epi8(static_cast<char>(0xF0));
  const __m512i zero = _mm512_setzero_si512();
  const int64_t gh = half / grid.group_size;
  vf total[B];
  FQ_UNROLL
  for (int b = 0; b < B; ++b) total[b] = vzero();
  for (int64_t g = 0; g < gh; ++g) {
    vf a0[B], a1[B];
    FQ_UNROLL
    for (int b = 0; b < B; ++b) a0[b] = a1[b] = vzero();
    for (int64_t j = g * grid.group_size; j < (g + 1) * grid.group_size; j += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(r0 + j + kPrefetch), FQ_HINT);
      const __m512i v = _mm512_loadu_si512(r0 + j);
      __m512i lo, hi;
      if constexpr (NP == 1) {
        lo = _mm512_and_si512(v, m0f);
        hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
      } else {
        _mm_prefetch(reinterpret_cast<const char*>(r1 + j + kPrefetch), FQ_HINT);
        const __m512i w = _mm512_loadu_si512(r1 + j);
        lo = _mm512_ternarylogic_epi32(mf0, _mm512_slli_epi16(v, 4), w, 0xCA);
        hi = _mm512_ternarylogic_epi32(mf0, v, _mm512_srli_epi16(w, 4), 0xCA);
      }
      FQ_UNROLL
      for (int b = 0; b < B; ++b) {
        const int8_t* q = xq.q + b * xq.ld;
        const float* ls = xq.lane_scale + b * (xq.ld / 4);
        const __m512i d0 = _mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(q + j));
        const __m512i d1 = _mm512_dpbusd_epi32(zero, hi, _mm512_loadu_si512(q + half + j));
        a0[b] = vfma(_mm512_cvtepi32_ps(d0), vload(ls + j / 4), a0[b]);
        a1[b] = vfma(_mm512_cvtepi32_ps(d1), vload(ls + (half + j) / 4), a1[b]);
      }
    }
    finish_group<B>(a0, a, grid.groups, g, sm[g], zc[g], total);
    finish_group<B>(a1, a, grid.groups, g + gh, sm[g + gh], zc[g + gh], total);
  }
  FQ_UNROLL
  for (int b = 0; b < B; ++b) yn[b * ldy] = vsum(total[b]);
}

// The same for half rows that do not split into whole groups (e.g. 576 columns, group 128),
// as row_dot_chunks walks them: columns in order, each step the low or the high nibbles of
// consecutive bytes: 64 columns where they lie on one side of the half row, else 32 (half
// and the group size multiples of 32). A group's sum is finished over 8 lanes:
// X_g / 8 = 2 * (X_g / 16).
template <int B, int NP, int R = 1>
void row_dot_vnni_chunks(const uint8_t* __restrict r0, const uint8_t* __restrict r1, int64_t half, int64_t in,
                         const Activations& a, const Quantized& xq, const Grid& grid, const float* sm,
                         const float* zc, float* __restrict yn, int64_t ldy) {
  // R adjacent rows at once (row r at r0 + r * half, its parameters at sm + r * groups).
  const __m512i m0f = _mm512_set1_epi8(0x0F), mf0 = _mm512_set1_epi8(static_cast<char>(0xF0));
  auto codes = [&](auto load, auto srli, auto slli, auto band, auto tern, int64_t k, int r) {
    const bool high = k >= half;
    const int64_t j = (high ? k - half : k) + r * half;
    const auto v = load(r0 + j);
    if constexpr (NP == 1) {
      return band(high ? srli(v, 4) : v);
    } else {
      const auto w = load(r1 + j);
      return high ? tern(v, srli(w, 4)) : tern(slli(v, 4), band(w));
    }
  };
  auto load512 = [](const uint8_t* p) { return _mm512_loadu_si512(p); };
  auto srli512 = [](__m512i v, int n) { return _mm512_srli_epi16(v, n); };
  auto slli512 = [](__m512i v, int n) { return _mm512_slli_epi16(v, n); };
  auto and512 = [&](__m512i v) { return _mm512_and_si512(v, m0f); };
  auto tern512 = [&](__m512i hi, __m512i lo) { return _mm512_ternarylogic_epi32(mf0, hi, lo, 0xCA); };
  const __m256i m0f8 = _mm256_set1_epi8(0x0F), mf08 = _mm256_set1_epi8(static_cast<char>(0xF0));
  auto load256 = [](const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  auto srli256 = [](__m256i v, int n) { return _mm256_srli_epi16(v, n); };
  auto slli256 = [](__m256i v, int n) { return _mm256_slli_epi16(v, n); };
  auto and256 = [&](__m256i v) { return _mm256_and_si256(v, m0f8); };
  auto tern256 = [&](__m256i hi, __m256i lo) { return _mm256_ternarylogic_epi32(mf08, hi, lo, 0xCA); };
  __m256 total[R][B];
  FQ_UNROLL
  for (int r = 0; r < R; ++r)
    FQ_UNROLL
    for (int b = 0; b < B; ++b) total[r][b] = _mm256_setzero_ps();
  for (int64_t g = 0; g < grid.groups; ++g) {
    const int64_t k0 = g * grid.group_size, k1 = std::min(in, k0 + grid.group_size);
    __m512 wide[R][B];
    __m256 acc[R][B];
    FQ_UNROLL
    for (int r = 0; r < R; ++r)
      FQ_UNROLL
      for (int b = 0; b < B; ++b) {
        wide[r][b] = _mm512_setzero_ps();
        acc[r][b] = _mm256_setzero_ps();
      }
    for (int64_t k = k0; k < k1;) {
      if (k + 64 <= k1 && (k >= half || k + 64 <= half)) {
        FQ_UNROLL
        for (int b = 0; b < B; ++b) {
          const __m512i q = _mm512_loadu_si512(xq.q + b * xq.ld + k);
          const __m512 ls = _mm512_loadu_ps(xq.lane_scale + b * (xq.ld / 4) + k / 4);
          FQ_UNROLL
          for (int r = 0; r < R; ++r) {
            const __m512i code = codes(load512, srli512, slli512, and512, tern512, k, r);
            const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), code, q);
            wide[r][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), ls, wide[r][b]);
          }
        }
        k += 64;
      } else {
        FQ_UNROLL
        for (int b = 0; b < B; ++b) {
          const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.q + b * xq.ld + k));
          const __m256 ls = _mm256_loadu_ps(xq.lane_scale + b * (xq.ld / 4) + k / 4);
          FQ_UNROLL
          for (int r = 0; r < R; ++r) {
            const __m256i code = codes(load256, srli256, slli256, and256, tern256, k, r);
            const __m256i d = _mm256_dpbusd_epi32(_mm256_setzero_si256(), code, q);
            acc[r][b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), ls, acc[r][b]);
          }
        }
        k += 32;
      }
    }
    FQ_UNROLL
    for (int r = 0; r < R; ++r) {
      const float* smr = sm + r * grid.groups;
      const float* zcr = zc + r * grid.groups;
      const __m256 s = _mm256_set1_ps(smr[g]);
      FQ_UNROLL
      for (int b = 0; b < B; ++b) {
        const __m256 sum = _mm256_add_ps(acc[r][b], _mm256_add_ps(_mm512_castps512_ps256(wide[r][b]),
                                                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(wide[r][b]), 1))));
        total[r][b] = _mm256_fmadd_ps(s, _mm256_add_ps(sum, _mm256_set1_ps(-2.f * zcr[g] * a.xq[b * grid.groups + g])),
                                      total[r][b]);
      }
    }
  }
  FQ_UNROLL
  for (int r = 0; r < R; ++r)
    FQ_UNROLL
    for (int b = 0; b < B; ++b) {
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(total[r][b]), _mm256_extractf128_ps(total[r][b], 1));
      yn[r + b * ldy] = _mm_cvtss_f32(_mm_hadd_ps(_mm_hadd_ps(h, h), h));
    }
}
#endif

#if defined(FQ_SIMD) && defined(__AVX2__) && !defined(__AVX512F__)
#define FQ_I8 1
// Int8-activation mode on nibble planes with AVX2 (VW = 8). No 4-way dot instruction, so
// maddubs (u8 x s8 pairs into s16) then madd (s16 pairs into s32) stand in for VNNI's
// dpbusd, giving the same lanes of 4 columns of one activation block. maddubs saturates its
// s16 sums: safe for codes up to 15 (2 x 15 x 127), not 255, so at 8 bits (NP = 2) each
// plane's nibbles go in alone and madd weights the top plane's by 16.
template <int NP>
inline __m256i dot_i8(__m256i top, __m256i bottom, __m256i q) {
  if constexpr (NP == 1) return _mm256_madd_epi16(_mm256_maddubs_epi16(top, q), _mm256_set1_epi16(1));
  return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(top, q), _mm256_set1_epi16(16)),
                          _mm256_madd_epi16(_mm256_maddubs_epi16(bottom, q), _mm256_set1_epi16(1)));
}

inline __m256i nibbles32(const uint8_t* p, bool high) {  // the low or the high nibbles of 32 bytes
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm256_and_si256(high ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0x0F));
}

// R adjacent rows at once (row r at r0 + r * half, its parameters at sm + r * groups, its
// output at yn + r): R independent chains of FMAs that share the activation loads.
//
// One load of each plane feeds column j (low nibbles) and column half + j (high nibbles), 32
// bytes a step, as row_dot_nibbles walks a row. Each half has its accumulators, finished at
// its own group ends: half and the group size are multiples of 32, so a step never
// straddles one, but a group may span the middle of the row (576 columns, group 128: columns
// 256 .. 383 are the last 32 bytes' low nibbles and the first 96 bytes' high nibbles). Such
// a group is finished once from each half; its zero-point term goes in with the second.
template <int B, int NP, int R = 1>
void row_dot_i8(const uint8_t* __restrict r0, const uint8_t* __restrict r1, int64_t half, const Activations& a,
                const Quantized& xq, const Grid& grid, const float* sm, const float* zc, float* __restrict yn,
                int64_t ldy) {
  const int64_t size = grid.group_size, groups = grid.groups;
  vf total[R][B], a0[R][B], a1[R][B];
  FQ_UNROLL
  for (int r = 0; r < R; ++r)
    FQ_UNROLL
    for (int b = 0; b < B; ++b) total[r][b] = a0[r][b] = a1[r][b] = vzero();
  // Finish half accumulators acc as group g (with or without the zero-point term), then clear them.
  auto finish = [&](vf (&acc)[R][B], int64_t g, bool zero_term) {
    FQ_UNROLL
    for (int r = 0; r < R; ++r) {
      finish_group<B>(acc[r], a, groups, g, sm[r * groups + g], zero_term ? zc[r * groups + g] : 0.f, total[r]);
      FQ_UNROLL
      for (int b = 0; b < B; ++b) acc[r][b] = vzero();
    }
  };
  // The current group of each half and the step (in bytes) where it ends: no division per step.
  int64_t g0 = 0, g1 = half / size;
  int64_t end0 = std::min(size, half), end1 = std::min((g1 + 1) * size - half, half);
  for (int64_t j = 0; j < half; j += 32) {
    FQ_UNROLL
    for (int b = 0; b < B; ++b) {
      const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.q + b * xq.ld + j));
      const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.q + b * xq.ld + half + j));
      const vf s0 = vload(xq.lane_scale + b * (xq.ld / 4) + j / 4);
      const vf s1 = vload(xq.lane_scale + b * (xq.ld / 4) + (half + j) / 4);
      FQ_UNROLL
      for (int r = 0; r < R; ++r) {
        const uint8_t* p0 = r0 + r * half + j;
        if (b == 0) _mm_prefetch(reinterpret_cast<const char*>(p0 + kPrefetch), FQ_HINT);
        const __m256i top0 = nibbles32(p0, false), top1 = nibbles32(p0, true);
        __m256i bottom0 = top0, bottom1 = top1;
        if constexpr (NP == 2) {
          const uint8_t* p1 = r1 + r * half + j;
          if (b == 0) _mm_prefetch(reinterpret_cast<const char*>(p1 + kPrefetch), FQ_HINT);
          bottom0 = nibbles32(p1, false);
          bottom1 = nibbles32(p1, true);
        }
        a0[r][b] = vfma(_mm256_cvtepi32_ps(dot_i8<NP>(top0, bottom0, q0)), s0, a0[r][b]);
        a1[r][b] = vfma(_mm256_cvtepi32_ps(dot_i8<NP>(top1, bottom1, q1)), s1, a1[r][b]);
      }
    }
    if (j + 32 == end0) {  // a group of the first half ends (or the half does, maybe inside one)
      finish(a0, g0++, end0 % size == 0);
      end0 = std::min(end0 + size, half);
    }
    if (j + 32 == end1) {
      finish(a1, g1++, true);
      end1 = std::min(end1 + size, half);
    }
  }
  FQ_UNROLL
  for (int r = 0; r < R; ++r)
    FQ_UNROLL
    for (int b = 0; b < B; ++b) yn[r + b * ldy] = vsum(total[r][b]);
}
#endif

// Row i of a parameter block of `block` rows: run(R) on rows i .. i + R - 1, R up to `most`
// (4 or 2) at batch 1 while the block has them, else 1; run advances the row index by R - 1.
template <int B, class Run>
inline void by_rows(int64_t i, int64_t block, int most, Run&& run) {
  if constexpr (B == 1) {
    if (most >= 4 && i + 3 < block) return run(std::integral_constant<int, 4>{});
    if (most >= 2 && i + 1 < block) return run(std::integral_constant<int, 2>{});
  }
  run(std::integral_constant<int, 1>{});
}

template <int B>
void gemv(const Planes& planes, const Grid& grid, const Activations& a, const Quantized* xq, int64_t in, int64_t out,
          float* y) {
  constexpr int U = B >= 4 ? 1 : (B >= 2 ? 2 : 4);
  bool nibbles = false;
#if defined(FQ_SIMD)
  constexpr int UN = B >= 2 ? 1 : 2;
  const int64_t half = planes.padded_in / 2, np = static_cast<int64_t>(planes.data.size());
  nibbles = in == planes.padded_in && half % grid.group_size == 0 && grid.group_size % (UN * VW) == 0 && np <= 2;
  for (int64_t w : planes.widths) nibbles = nibbles && w == 4;
#else
  const int64_t half = 0, np = 0;
#endif
#if defined(FQ_MAGIC)
  const bool wide = nibbles && grid.group_size % 64 == 0;
  // Nibble planes whose halves do not split into whole groups: 16 columns at a time.
  bool chunks = !wide && np <= 2 && in == planes.padded_in && half % 16 == 0 && grid.group_size % 16 == 0;
  for (int64_t w : planes.widths) chunks = chunks && w == 4;
  const bool chunks32 = chunks && half % 32 == 0 && grid.group_size % 32 == 0;
  const bool magic = (wide || chunks) && np == 1 && !((wide || chunks32) && xq);
#else
  constexpr bool magic = false;
#endif
  const float mult = magic ? 16.f : 1.f, shift = magic ? 16.f : 0.f;
#if defined(FQ_I8)
  bool i8 = xq && np <= 2 && in == planes.padded_in && half % 32 == 0 && grid.group_size % 32 == 0;
  for (int64_t w : planes.widths) i8 = i8 && w == 4;
#endif
  constexpr int64_t kRows = 16;  // rows whose slice parameters are computed together
  at::parallel_for(0, out, kRows, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> params;  // per thread, reused from call to call
    thread_local std::vector<uint8_t> codes;
    params.resize(2 * grid.groups * kRows);
    codes.resize(nibbles ? 0 : planes.padded_in);
    float* const pbuf = params.data();
    uint8_t* const cbuf = codes.data();
    int64_t block = 0;  // rows in the current parameter block
    for (int64_t n = begin; n < end; ++n) {
      const int64_t i = (n - begin) % kRows;
      if (i == 0) {
        block = std::min(kRows, end - n);
        row_params(grid, n, mult, shift, pbuf, pbuf + grid.groups * block, block);
      }
      const float* sm = pbuf + i * grid.groups;
      const float* zc = pbuf + (block + i) * grid.groups;
#if defined(FQ_SIMD)
#if defined(FQ_VNNI)
      if (wide && xq) {
        const uint8_t* r0 = planes.data[0] + n * half;
        if (np == 1)
          row_dot_vnni<B, 1>(r0, nullptr, half, a, *xq, grid, sm, zc, y + n, out);
        else
          row_dot_vnni<B, 2>(r0, planes.data[1] + n * half, half, a, *xq, grid, sm, zc, y + n, out);
        continue;
      }
#endif
#if defined(FQ_VNNI)
      if (chunks32 && xq) {
        const uint8_t* r0 = planes.data[0] + n * half;
        const uint8_t* r1 = np == 2 ? planes.data[1] + n * half : nullptr;
        auto run = [&](auto rows) {
          constexpr int R = decltype(rows)::value;
          if (np == 1)
            row_dot_vnni_chunks<B, 1, R>(r0, nullptr, half, in, a, *xq, grid, sm, zc, y + n, out);
          else
            row_dot_vnni_chunks<B, 2, R>(r0, r1, half, in, a, *xq, grid, sm, zc, y + n, out);
          n += R - 1;
        };
        // At decode, four rows at once: they share the activation loads and the loop, much
        // of a row's cost when it has only 576 weights.
        by_rows<B>(i, block, 4, run);
        continue;
      }
#endif
#if defined(FQ_MAGIC)
      if (chunks) {
        const uint8_t* r0 = planes.data[0] + n * half;
        if (np == 1)
          row_dot_chunks<B, 1>(r0, nullptr, half, in, a, grid, sm, zc, y + n, out);
        else
          row_dot_chunks<B, 2>(r0, planes.data[1] + n * half, half, in, a, grid, sm, zc, y + n, out);
        continue;
      }
      if (wide) {
        const uint8_t* r0 = planes.data[0] + n * half;
        if (np == 1)
          row_dot_wide<B, 1>(r0, nullptr, half, a, grid, sm, zc, y + n, out);
        else
          row_dot_wide<B, 2>(r0, planes.data[1] + n * half, half, a, grid, sm, zc, y + n, out);
        continue;
      }
#endif
#if defined(FQ_I8)
      if (i8) {
        const uint8_t* r0 = planes.data[0] + n * half;
        const uint8_t* r1 = np == 2 ? planes.data[1] + n * half : nullptr;
        auto run = [&](auto rows) {
          constexpr int R = decltype(rows)::value;
          if (np == 1) row_dot_i8<B, 1, R>(r0, r1, half, a, *xq, grid, sm, zc, y + n, out);
          else row_dot_i8<B, 2, R>(r0, r1, half, a, *xq, grid, sm, zc, y + n, out);
          n += R - 1;
        };
        // At decode, four rows at once; two for 4-bit rows of whole half-row groups (measured:
        // four rows were 5% slower there, 11-16% faster on 576-wide rows and at 8 bits).
        by_rows<B>(i, block, np == 1 && half % grid.group_size == 0 ? 2 : 4, run);
        continue;
      }
#endif
      if (nibbles) {
        const uint8_t* r0 = planes.data[0] + n * half;
        if (np == 1)
          row_dot_nibbles<B, 1, UN>(r0, nullptr, half, a, grid, sm, zc, y + n, out);
        else
          row_dot_nibbles<B, 2, UN>(r0, planes.data[1] + n * half, half, a, grid, sm, zc, y + n, out);
        continue;
      }
#endif
      unpack_row(planes, n, cbuf);
      row_dot<B, U>(cbuf, a, in, grid, sm, zc, y + n, out);
    }
  });
}

using GemvFn = void (*)(const Planes&, const Grid&, const Activations&, const Quantized*, int64_t, int64_t, float*);
constexpr GemvFn kGemv[kMaxGemvBatch] = {gemv<1>, gemv<2>, gemv<3>, gemv<4>, gemv<5>, gemv<6>, gemv<7>, gemv<8>};

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
      if (k1 - k0 == 16) {  // one block is one vector (the scalar loop below costs ~5 us per 1536 columns)
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


#if defined(FQ_I8)
// ---- A slice's one plane packed by rows, for the AVX2 int8-activation decode path ------
// In the nested planes each output row is a run of bytes, so a kernel's vector lanes are
// columns: every 32 weights cost a maddubs, a madd, a conversion and a scaling FMA per
// row, and each row's groups are finished one at a time. pack_rows lays 8 rows side by
// side instead, lanes = rows, 16 columns (one activation block) at a time:
// - a 4-bit plane (the top nibble plane: 4 bits of a [4, 8] ladder): two 32-byte vectors
//   for columns k .. k + 7 and k + 8 .. k + 15, lane r of the first holding row r's codes of
//   k .. k + 3 (low nibbles) and k + 4 .. k + 7 (high nibbles);
// - an 8-bit plane (the 8-bit head): four vectors, lane r of the i-th holding row r's codes
//   of columns k + 4i .. k + 4i + 3.
// One broadcast of 4 activation codes then serves 8 rows, a block needs one conversion and
// one scaling FMA, and a group is finished for 8 rows at once. Nibbles: the block's four
// maddubs add up in 16 bits (4 x 2 x 15 x 127 < 2^15) before one madd. Bytes: maddubs wants
// one side unsigned and would saturate on codes up to 255, so the codes go in centred,
// w = c - 128 (a xor), as |w| against q with w's sign (a pair sums to at most 2 x 128 x
// 127 < 2^15), each maddubs through its own madd; the zero point takes the 128 back.
constexpr int64_t kPackRows = 8;

struct Packed {
  const uint8_t* codes;       // [blocks, in / 16, 16 * width]: per 8 rows and activation block
  const uint8_t* low;         // the bottom nibble plane packed the same, for 8 bits as two planes (else null)
  const c10::Half* scale;     // [blocks, groups, 8]
  const uint8_t* zero;        // [blocks, groups, 8]
  int64_t in, groups, group_size;
  float cells;
  int64_t width;              // the slice's bits (8 for two nibble planes)
};

// Row n's codes of the packed slice, columns in order (the top nibble plane shifted over the
// bottom one for two). Lane r of each 32-byte vector holds row r's 4 bytes of it: 4 codes of
// an 8-bit plane, or 4 columns' low and 4 columns' high nibbles; they are moved 4 at a time.
void packed_row(const Packed& w, int64_t n, uint8_t* __restrict out) {
  const bool bytes = w.width == 8 && !w.low;
  const int64_t block = bytes ? 128 : 64, r = n % kPackRows;
  const uint8_t* top = w.codes + n / kPackRows * (w.in / kActBlock) * block + 4 * r;
  const uint8_t* bottom = w.low ? w.low + (top - w.codes) : nullptr;
  auto lane = [](const uint8_t* p) { uint32_t u; std::memcpy(&u, p, 4); return u; };
  constexpr uint32_t kLow = 0x0F0F0F0F;
  for (int64_t k = 0; k < w.in; k += kActBlock, top += block) {
    if (bytes) {
      for (int i = 0; i < 4; ++i) std::memcpy(out + k + 4 * i, top + 32 * i, 4);
      continue;
    }
    for (int h = 0; h < 2; ++h) {  // vector h: columns k + 8h .. k + 8h + 7
      uint32_t lo = lane(top + 32 * h) & kLow, hi = lane(top + 32 * h) >> 4 & kLow;
      if (bottom) {
        const uint32_t b = lane(bottom + 32 * h);
        lo = lo << 4 | (b & kLow);
        hi = hi << 4 | (b >> 4 & kLow);
      }
      std::memcpy(out + k + 8 * h, &lo, 4);
      std::memcpy(out + k + 8 * h + 4, &hi, 4);
    }
    if (bottom) bottom += block;
  }
}

// Row n's folded group parameters, as row_params(mult 1, shift 0) gives them for the nested planes.
void packed_params(const Packed& w, int64_t n, float* s, float* z) {
  const int64_t nb = n / kPackRows, r = n % kPackRows;
  const float inv = 1.f / w.cells;
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t at = (nb * w.groups + g) * kPackRows + r;
    s[g] = half_to_float(w.scale[at]) * inv;
    z[g] = (static_cast<float>(w.zero[at]) + 0.5f) * w.cells - 0.5f;
  }
}

// Rows 8 nb .. 8 nb + 7 for B rows of activations: y[b * ldy + r] (r < rows). W: the bits of
// a packed plane; NP: nibble planes (2: 8 bits as top and bottom, each block's sums of the
// top weighted by 16 in its madd). RB = 2: the same for block nb + gap too, in the same loop
// (two weight streams in flight; both blocks whole).
template <int B, int W, int NP, int RB = 1>
void packed_block(const Packed& w, int64_t nb, const Quantized& xq, const float* xs, float* y, int64_t ldy,
                  int64_t rows, int64_t gap = 1) {
  constexpr int64_t kBlockBytes = 16 * W;  // 8 rows x 16 columns
  const __m256i m0f = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256 inv = _mm256_set1_ps(1.f / w.cells), cells = _mm256_set1_ps(w.cells);
  const __m256 shift = _mm256_set1_ps(W == 8 ? -128.f : 0.f);  // the centring of 8-bit codes
  const int64_t blocks_per_group = w.group_size / kActBlock, act_blocks = w.in / kActBlock;
  const int64_t stride = act_blocks * kBlockBytes;  // one 8-row block's bytes
  const uint8_t* codes = w.codes + nb * stride;
  __m256 total[RB][B];
  FQ_UNROLL
  for (int rb = 0; rb < RB; ++rb)
    FQ_UNROLL
    for (int b = 0; b < B; ++b) total[rb][b] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256 acc[RB][B];
    FQ_UNROLL
    for (int rb = 0; rb < RB; ++rb)
      FQ_UNROLL
      for (int b = 0; b < B; ++b) acc[rb][b] = _mm256_setzero_ps();
    const int64_t k1 = std::min(act_blocks, (g + 1) * blocks_per_group);
    for (int64_t kb = g * blocks_per_group; kb < k1; ++kb) {
      FQ_UNROLL
      for (int rb = 0; rb < RB; ++rb) {
      const uint8_t* v = codes + rb * gap * stride + kb * kBlockBytes;
      FQ_UNROLL
      for (int64_t line = 0; line < kBlockBytes; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(v + kPrefetch + line), FQ_HINT);
      __m256i c[4], sign[4], d[4];  // per 4 columns: the codes (4-bit; d: the bottom plane's), or |w| and w (8-bit)
      if constexpr (W == 4) {
        auto nibbles = [&](const uint8_t* p, __m256i (&out)[4]) {
          const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
          const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
          out[0] = _mm256_and_si256(v0, m0f);
          out[1] = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m0f);
          out[2] = _mm256_and_si256(v1, m0f);
          out[3] = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m0f);
        };
        nibbles(v, c);
        if constexpr (NP == 2) {
          const uint8_t* u = w.low + (v - w.codes);
          _mm_prefetch(reinterpret_cast<const char*>(u + kPrefetch), FQ_HINT);
          nibbles(u, d);
        }
      } else {
        FQ_UNROLL
        for (int i = 0; i < 4; ++i) {
          sign[i] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32 * i)), flip);
          c[i] = _mm256_abs_epi8(sign[i]);
        }
      }
      FQ_UNROLL
      for (int b = 0; b < B; ++b) {
        const int8_t* q = xq.q + b * xq.ld + kb * kActBlock;
        __m256i dot, bottom;
        FQ_UNROLL
        for (int i = 0; i < 4; ++i) {  // columns 4i .. 4i + 3 of the block, broadcast to every row
          int32_t bytes;
          std::memcpy(&bytes, q + 4 * i, 4);
          const __m256i four = _mm256_set1_epi32(bytes);
          if constexpr (W == 4) {
            const __m256i pairs = _mm256_maddubs_epi16(c[i], four);
            dot = i == 0 ? pairs : _mm256_add_epi16(dot, pairs);
            if constexpr (NP == 2) {
              const __m256i low = _mm256_maddubs_epi16(d[i], four);
              bottom = i == 0 ? low : _mm256_add_epi16(bottom, low);
            }
          } else {
            const __m256i quads = _mm256_madd_epi16(_mm256_maddubs_epi16(c[i], _mm256_sign_epi8(four, sign[i])), ones);
            dot = i == 0 ? quads : _mm256_add_epi32(dot, quads);
          }
        }
        if constexpr (W == 4 && NP == 1) dot = _mm256_madd_epi16(dot, ones);
        if constexpr (NP == 2)
          dot = _mm256_add_epi32(_mm256_madd_epi16(dot, _mm256_set1_epi16(16)), _mm256_madd_epi16(bottom, ones));
        acc[rb][b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot),
                                     _mm256_set1_ps(xq.lane_scale[b * (xq.ld / 4) + kb * kActBlock / 4]), acc[rb][b]);
      }
      }
    }
    FQ_UNROLL
    for (int rb = 0; rb < RB; ++rb) {
      // The 8 rows' parameters of group g, folded as row_params does (mult 1).
      const int64_t at = ((nb + rb * gap) * w.groups + g) * kPackRows;
      const __m256 s = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.scale + at))), inv);
      const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.zero + at))));
      const __m256 zc = _mm256_add_ps(shift, _mm256_fmadd_ps(_mm256_add_ps(z, _mm256_set1_ps(0.5f)), cells, _mm256_set1_ps(-0.5f)));
      FQ_UNROLL
      for (int b = 0; b < B; ++b)  // xs holds X_g / VW
        total[rb][b] = _mm256_fmadd_ps(s, _mm256_fnmadd_ps(zc, _mm256_set1_ps(xs[b * w.groups + g] * VW), acc[rb][b]), total[rb][b]);
    }
  }
  FQ_UNROLL
  for (int rb = 0; rb < RB; ++rb)
    FQ_UNROLL
    for (int b = 0; b < B; ++b) {
      float* out = y + rb * gap * kPackRows + b * ldy;
      if (rows == kPackRows) {
        _mm256_storeu_ps(out, total[rb][b]);
      } else {
        alignas(32) float last[kPackRows];
        _mm256_store_ps(last, total[rb][b]);
        std::copy(last, last + rows, out);
      }
    }
}

// Each thread streams its range of blocks. The 4-bit plane at batch 1-2 walks the two halves
// of it side by side: one stream per thread read it at ~25.5 GB/s on the AMD EPYC against
// 8 bits' ~27 (two planes, two streams); two streams take 0.90-0.93x the time (TinyLlama's
// layers), 0.95-0.99x on SmolLM2's. (Two adjacent blocks at once were 1.13-1.17x slower.)
// RB = 2 keeps 2B + 2B accumulators and 8 code vectors in the 16 registers for B <= 2.
template <int B, int W, int NP>
void packed_gemv(const Packed& w, const Quantized& xq, const float* xs, int64_t out, float* y) {
  const int64_t blocks = (out + kPackRows - 1) / kPackRows;
  constexpr int RB = (B <= 2 && W == 4 && NP == 1) ? 2 : 1;
  at::parallel_for(0, blocks, 2, [&](int64_t begin, int64_t end) {
    if (RB == 2) {
      const int64_t half = (end - begin) / 2;
      for (int64_t i = 0; i < half; ++i) {
        const int64_t a = begin + i, b = begin + half + i;
        if (b * kPackRows + kPackRows <= out)
          packed_block<B, W, NP, RB>(w, a, xq, xs, y + a * kPackRows, out, kPackRows, half);
        else {
          packed_block<B, W, NP, 1>(w, a, xq, xs, y + a * kPackRows, out, kPackRows);
          packed_block<B, W, NP, 1>(w, b, xq, xs, y + b * kPackRows, out, std::min(kPackRows, out - b * kPackRows));
        }
      }
      for (int64_t n = begin + 2 * half; n < end; ++n)
        packed_block<B, W, NP, 1>(w, n, xq, xs, y + n * kPackRows, out, std::min(kPackRows, out - n * kPackRows));
    } else {
      for (int64_t nb = begin; nb < end; ++nb)
        packed_block<B, W, NP, 1>(w, nb, xq, xs, y + nb * kPackRows, out, std::min(kPackRows, out - nb * kPackRows));
    }
  });
}

using PackedFn = void (*)(const Packed&, const Quantized&, const float*, int64_t, float*);
// [a 4-bit plane, an 8-bit plane, two nibble planes][batch - 1]
constexpr PackedFn kPacked[3][fqcompile::kMaxPackedBatch] = {
    {packed_gemv<1, 4, 1>, packed_gemv<2, 4, 1>, packed_gemv<3, 4, 1>, packed_gemv<4, 4, 1>, packed_gemv<5, 4, 1>,
     packed_gemv<6, 4, 1>, packed_gemv<7, 4, 1>, packed_gemv<8, 4, 1>},
    {packed_gemv<1, 8, 1>, packed_gemv<2, 8, 1>, packed_gemv<3, 8, 1>, packed_gemv<4, 8, 1>, packed_gemv<5, 8, 1>,
     packed_gemv<6, 8, 1>, packed_gemv<7, 8, 1>, packed_gemv<8, 8, 1>},
    {packed_gemv<1, 4, 2>, packed_gemv<2, 4, 2>, packed_gemv<3, 4, 2>, packed_gemv<4, 4, 2>, packed_gemv<5, 4, 2>,
     packed_gemv<6, 4, 2>, packed_gemv<7, 4, 2>, packed_gemv<8, 4, 2>}};
#endif

// A decode-sized batch's inputs to the row kernels: per-group activation sums (over the
// vector width: X_g / VW) and, in int8-activation mode, x^ with its codes and block scales
// (x is then x^). Kept in per-thread buffers reused from call to call: allocating them as
// tensors was a good part of the ~6 us a call cost beyond reading its weights.
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

at::Tensor fqcompile::nested_linear(const at::Tensor& x, at::TensorList planes, at::IntArrayRef widths,
                         const at::Tensor& scale, const at::Tensor& zero, int64_t low, int64_t group_size,
                         bool int8_activations) {
  TORCH_CHECK(!planes.empty() && planes.size() == widths.size(), "nested_linear: one width per plane");
  TORCH_CHECK(scale.dim() == 2 && scale.scalar_type() == at::kHalf && scale.is_contiguous(), "nested_linear: scale must be contiguous fp16 [N, G]");
  TORCH_CHECK(zero.sizes() == scale.sizes() && zero.scalar_type() == at::kByte && zero.is_contiguous(), "nested_linear: zero must be contiguous uint8 [N, G]");
  const int64_t in = x.size(-1), out = scale.size(0);
  const int64_t groups = (in + group_size - 1) / group_size;
  TORCH_CHECK(group_size > 0 && scale.size(1) == groups, "nested_linear: scale has ", scale.size(1), " groups, expected ", groups);
  Planes p;
  p.padded_in = (in + 7) / 8 * 8;
  int64_t bits = 0;
  for (size_t i = 0; i < planes.size(); ++i) {
    const int64_t w = widths[i];
    TORCH_CHECK(w == 1 || w == 2 || w == 4 || w == 8, "nested_linear: plane width ", w);
    TORCH_CHECK(planes[i].scalar_type() == at::kByte && planes[i].is_contiguous() && planes[i].dim() == 2 &&
                    planes[i].size(0) == out && planes[i].size(1) == p.padded_in * w / 8,
                "nested_linear: plane ", i, " must be contiguous uint8 [", out, ", ", p.padded_in * w / 8, "]");
    TORCH_CHECK(w < 8 || planes.size() == 1, "nested_linear: an 8-bit plane is always the only one");
    p.data.push_back(planes[i].data_ptr<uint8_t>());
    p.widths.push_back(w);
    bits += w;
  }
  TORCH_CHECK(bits <= 8 && low >= 1 && low <= bits, "nested_linear: planes hold ", bits, " bits, lowest rung ", low);
  const Grid grid{scale.data_ptr<c10::Half>(), zero.data_ptr<uint8_t>(), groups, group_size,
                  static_cast<float>(int64_t{1} << (bits - low))};

  auto shape = x.sizes().vec();
  shape.back() = out;
  at::Tensor x2 = float_rows(x);
  const int64_t m = x2.size(0);
  at::Tensor y = at::empty({m, out}, x2.options());
  if (m == 0) return y.view(shape).to(x.scalar_type());  // (shape is only needed here and at the end)

  // Int8-activation mode: every path computes W x^ for the group-quantized x^; decode-sized
  // batches use the integer codes directly with AVX-512 VNNI, or on nibble planes with AVX2.
  const int64_t ld = (p.padded_in + kActBlock - 1) / kActBlock * kActBlock;
  if (m > kMaxGemvBatch) {
    tiled_linear(x2, int8_activations, out, y, [&](int64_t n0, int64_t n1, float* w) {
      dequantize_rows(in, p.padded_in, groups, group_size, n0, n1, w,
                      [&](int64_t n, uint8_t* codes) { unpack_row(p, n, codes); },
                      [&](int64_t n, float* s, float* z) { row_params(grid, n, 1.f, 0.f, s, z); });
    });
  } else {
    const DecodeInputs d = decode_inputs(x2.data_ptr<float>(), m, in, ld, groups, group_size, int8_activations);
#if defined(FQ_VNNI) || defined(FQ_I8)
    const Quantized* xq = int8_activations ? &d.q : nullptr;
#else
    const Quantized* xq = nullptr;
#endif
    kGemv[m - 1](p, grid, Activations{d.x, in, d.xs}, xq, in, out, y.data_ptr<float>());
  }
  if (x.dim() != 2) y = y.view(shape);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

std::vector<at::Tensor> fqcompile::pack_rows(const at::Tensor& plane, const at::Tensor& scale, const at::Tensor& zero,
                                             int64_t in_features, int64_t group_size) {
  const int64_t in = (in_features + 7) / 8 * 8;  // the planes' padded width
  TORCH_CHECK(plane.scalar_type() == at::kByte && plane.dim() == 2 && plane.is_contiguous() &&
                  (plane.size(1) == in / 2 || plane.size(1) == in),
              "pack_rows: the plane must be contiguous uint8 [N, ", in / 2, "] (4-bit) or [N, ", in, "] (8-bit)");
  const int64_t out = plane.size(0), width = plane.size(1) == in ? 8 : 4;
  TORCH_CHECK(group_size > 0, "pack_rows: group size ", group_size);
  const int64_t groups = (in_features + group_size - 1) / group_size;
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.dim() == 2 && scale.size(0) == out && scale.size(1) == groups &&
                  scale.is_contiguous() && zero.scalar_type() == at::kByte && zero.sizes() == scale.sizes() &&
                  zero.is_contiguous(),
              "pack_rows: scale (fp16) and zero (uint8) must be contiguous [", out, ", ", groups, "]");
#if defined(FQ_I8)
  if (in_features % kActBlock != 0 || group_size % kActBlock != 0) return {};
  const int64_t blocks = (out + kPackRows - 1) / kPackRows, half = in / 2;
  at::Tensor codes = at::zeros({blocks, in / kActBlock, kActBlock * width}, plane.options());
  at::Tensor pscale = at::zeros({blocks, groups, kPackRows}, scale.options());
  at::Tensor pzero = at::zeros({blocks, groups, kPackRows}, zero.options());
  const uint8_t *src = plane.data_ptr<uint8_t>(), *z = zero.data_ptr<uint8_t>();
  const c10::Half* s = scale.data_ptr<c10::Half>();
  uint8_t *dst = codes.data_ptr<uint8_t>(), *pz = pzero.data_ptr<uint8_t>();
  c10::Half* ps = pscale.data_ptr<c10::Half>();
  auto nibble = [&](int64_t n, int64_t k) {  // column k of row n in a nibble plane
    const uint8_t byte = src[n * half + (k < half ? k : k - half)];
    return k < half ? byte & 0x0F : byte >> 4;
  };
  at::parallel_for(0, out, kPackRows, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t nb = n / kPackRows, r = n % kPackRows;
      uint8_t* rows = dst + nb * in * width;  // this row's block: 32 bytes per 8 (4-bit) or 4 (8-bit) columns
      if (width == 4) {
        for (int64_t k = 0; k < in; k += 8)
          for (int i = 0; i < 4; ++i)
            rows[k * 4 + r * 4 + i] = static_cast<uint8_t>(nibble(n, k + i) | (nibble(n, k + 4 + i) << 4));
      } else {
        for (int64_t k = 0; k < in; k += 4)
          for (int i = 0; i < 4; ++i) rows[k * 8 + r * 4 + i] = src[n * in + k + i];
      }
      for (int64_t g = 0; g < groups; ++g) {
        ps[(nb * groups + g) * kPackRows + r] = s[n * groups + g];
        pz[(nb * groups + g) * kPackRows + r] = z[n * groups + g];
      }
    }
  });
  return {codes, pscale, pzero};
#else
  return {};  // this build's int8 decode kernels read the nested planes as they are
#endif
}

at::Tensor fqcompile::packed_linear(const at::Tensor& x, at::TensorList packed, int64_t out_features, int64_t low,
                                    int64_t group_size) {
#if defined(FQ_I8)
  // [codes, scale, zero], or [top, bottom, scale, zero] for two nibble planes
  const bool two = packed.size() == 4;
  TORCH_CHECK((packed.size() == 3 || two) && packed[0].scalar_type() == at::kByte && packed[0].dim() == 3 &&
                  (packed[0].size(2) == 4 * kActBlock || (packed[0].size(2) == 8 * kActBlock && !two)) &&
                  (!two || packed[1].sizes() == packed[0].sizes()) &&
                  packed[0].size(0) == (out_features + kPackRows - 1) / kPackRows,
              "packed_linear: expected pack_rows' tensors for ", out_features, " rows");
  const at::Tensor &scale = packed[packed.size() - 2], &zero = packed[packed.size() - 1];
  const int64_t in = packed[0].size(1) * kActBlock, groups = scale.size(1);
  const int64_t width = two ? 8 : packed[0].size(2) / kActBlock;
  TORCH_CHECK(x.size(-1) == in && group_size % kActBlock == 0 && groups == (in + group_size - 1) / group_size &&
                  low >= 1 && low <= width,
              "packed_linear: input of ", x.size(-1), " columns for packed rows of ", in);
  for (const at::Tensor& t : packed) TORCH_CHECK(t.is_contiguous() && t.is_cpu(), "packed_linear: contiguous CPU tensors");
  at::Tensor x2 = float_rows(x);
  const int64_t m = x2.size(0);
  at::Tensor y = at::empty({m, out_features}, x2.options());
  const Packed w{packed[0].data_ptr<uint8_t>(), two ? packed[1].data_ptr<uint8_t>() : nullptr,
                 scale.data_ptr<c10::Half>(), zero.data_ptr<uint8_t>(), in, groups, group_size,
                 static_cast<float>(int64_t{1} << (width - low)), width};
  if (m > fqcompile::kMaxPackedBatch) {  // prefill: when the packs are all that is resident
    tiled_linear(x2, true, out_features, y, [&](int64_t n0, int64_t n1, float* t) {
      dequantize_rows(in, in, groups, group_size, n0, n1, t,
                      [&](int64_t n, uint8_t* codes) { packed_row(w, n, codes); },
                      [&](int64_t n, float* s, float* z) { packed_params(w, n, s, z); });
    });
  } else if (m > 0) {
    const DecodeInputs d = decode_inputs(x2.data_ptr<float>(), m, in, in, groups, group_size, true);
    kPacked[two ? 2 : width == 8][m - 1](w, d.q, d.xs, out_features, y.data_ptr<float>());
  }
  auto shape = x.sizes().vec();
  shape.back() = out_features;
  if (x.dim() != 2) y = y.view(shape);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
#else
  TORCH_CHECK(false, "packed_linear: this build has no packed kernel (pack_rows returned nothing)");
#endif
}

at::Tensor fqcompile::unpack_rows(const at::Tensor& codes, int64_t out_features) {
#if defined(FQ_I8)
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 3 && codes.is_contiguous() &&
                  (codes.size(2) == 4 * kActBlock || codes.size(2) == 8 * kActBlock) &&
                  codes.size(0) == (out_features + kPackRows - 1) / kPackRows,
              "unpack_rows: expected one plane of pack_rows for ", out_features, " rows");
  const int64_t in = codes.size(1) * kActBlock, width = codes.size(2) / kActBlock, half = in / 2;
  at::Tensor plane = at::empty({out_features, in * width / 8}, codes.options());
  const Packed one{codes.data_ptr<uint8_t>(), nullptr, nullptr, nullptr, in, 0, 0, 1.f, width};
  uint8_t* dst = plane.data_ptr<uint8_t>();
  at::parallel_for(0, out_features, kPackRows, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> row(in);
    for (int64_t n = begin; n < end; ++n) {
      packed_row(one, n, row.data());
      uint8_t* o = dst + n * plane.size(1);
      if (width == 8) std::copy(row.begin(), row.end(), o);
      else  // byte j: column j in the low nibble, column half + j in the high one (formats/nested.py)
        for (int64_t j = 0; j < half; ++j) o[j] = static_cast<uint8_t>(row[j] | row[half + j] << 4);
    }
  });
  return plane;
#else
  TORCH_CHECK(false, "unpack_rows: this build has no packed rows");
#endif
}

TORCH_LIBRARY_FRAGMENT(fqcompile, m) {
  m.def("unpack_rows(Tensor codes, int out_features) -> Tensor");
  m.def("pack_rows(Tensor plane, Tensor scale, Tensor zero, int in_features, int group_size) -> Tensor[]");
  m.def("packed_linear(Tensor x, Tensor[] packed, int out_features, int low, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(fqcompile, CPU, m) {
  m.impl("nested_linear", &fqcompile::nested_linear);
  m.impl("pack_rows", &fqcompile::pack_rows);
  m.impl("packed_linear", &fqcompile::packed_linear);
  m.impl("unpack_rows", &fqcompile::unpack_rows);
}
