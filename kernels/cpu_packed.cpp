// The packed rows: a slice's plane laid out 8 rows side by side for the AVX2 int8-activation
// decode kernel (pack_rows), that kernel (packed_linear), and the way back (unpack_rows).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include "cpu_ops.h"
#include "cpu_dots_int8.h"
#include "cpu_activations.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

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
  float cells, offset;        // z_b = z * cells + offset
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
    z[g] = static_cast<float>(w.zero[at]) * w.cells + w.offset;
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
  const __m256 inv = _mm256_set1_ps(1.f / w.cells), cells = _mm256_set1_ps(w.cells), offset = _mm256_set1_ps(w.offset);
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
      const __m256 zc = _mm256_add_ps(shift, _mm256_fmadd_ps(z, cells, offset));
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
// of it side by side: two weight streams per thread, as 8 bits' two planes have, read
// faster than one (docs/kernels.md).
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

}  // namespace

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
                                    double offset, int64_t group_size) {
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
                 static_cast<float>(int64_t{1} << (width - low)), static_cast<float>(offset), width};
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
  const Packed one{codes.data_ptr<uint8_t>(), nullptr, nullptr, nullptr, in, 0, 0, 1.f, 0.f, width};
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
