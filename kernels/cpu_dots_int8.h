// Row kernels in the int8-activation mode: codes times int8 activation codes, with
// AVX-512 VNNI (FQ_VNNI) or AVX2 (FQ_I8) integer dot products.
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

#include "cpu_dots_float.h"

namespace {

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

}  // namespace
