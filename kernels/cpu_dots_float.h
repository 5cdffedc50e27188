// Row kernels with float activations: y_n = sum_g s_g (sum_{k in g} q_k x_k - z_g X_g), the
// generic one (codes unpacked to a small buffer) and the fused ones for nibble planes.
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

}  // namespace
