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

//
// The parts: cpu_simd.h (vector operations, planes, grid), cpu_dots_float.h and
// cpu_dots_int8.h (the row kernels), cpu_activations.h (int8 activations, decode inputs,
// prefill tiles), cpu_packed.cpp (the packed rows); here the dispatch of a call to the
// row kernels, nested_linear itself and the registration of the linear ops.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu_ops.h"
#include "cpu_dots_int8.h"
#include "cpu_activations.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

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
        // At decode, four rows at once; two for 4-bit rows of whole half-row groups, where four
        // measured slower (docs/kernels.md).
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

}  // namespace

at::Tensor fqcompile::nested_linear(const at::Tensor& x, at::TensorList planes, at::IntArrayRef widths,
                         const at::Tensor& scale, const at::Tensor& zero, int64_t low, double offset,
                         int64_t group_size, bool int8_activations) {
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
                  static_cast<float>(int64_t{1} << (bits - low)), static_cast<float>(offset)};

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

TORCH_LIBRARY_FRAGMENT(fqcompile, m) {
  m.def("unpack_rows(Tensor codes, int out_features) -> Tensor");
  m.def("pack_rows(Tensor plane, Tensor scale, Tensor zero, int in_features, int group_size) -> Tensor[]");
  m.def("packed_linear(Tensor x, Tensor[] packed, int out_features, int low, float offset, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(fqcompile, CPU, m) {
  m.impl("nested_linear", &fqcompile::nested_linear);
  m.impl("pack_rows", &fqcompile::pack_rows);
  m.impl("packed_linear", &fqcompile::packed_linear);
  m.impl("unpack_rows", &fqcompile::unpack_rows);
}
