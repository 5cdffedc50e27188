// The CPU kernels that more than one source file calls directly (not through the
// dispatcher): cpu_stack.cpp runs a whole decoder stack with them in one call.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fqcompile {

at::Tensor nested_linear(const at::Tensor& x, at::TensorList planes, at::IntArrayRef widths,
                         const at::Tensor& scale, const at::Tensor& zero, int64_t low, double offset,
                         int64_t group_size, bool int8_activations);
// A 4- or 8-bit plane packed 8 rows at a time for the int8-activation decode kernel (AVX2 builds;
// empty where it does not apply), and W x^ over such planes (the kernel up to kMaxPackedBatch
// rows of x, dequantized tiles beyond: prefill where the packs are all that is resident).
constexpr int64_t kMaxPackedBatch = 8;  // as nested_linear's row kernels
std::vector<at::Tensor> pack_rows(const at::Tensor& plane, const at::Tensor& scale, const at::Tensor& zero,
                                  int64_t in_features, int64_t group_size);
at::Tensor packed_linear(const at::Tensor& x, at::TensorList packed, int64_t out_features, int64_t low,
                         double offset, int64_t group_size);
// The nested plane (formats/nested.py) that one of pack_rows' planes was made from.
at::Tensor unpack_rows(const at::Tensor& codes, int64_t out_features);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor attend(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                  at::Tensor& v_cache, int64_t start, int64_t heads, const c10::optional<at::Tensor>& mask,
                  const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm, double eps,
                  double scale, int64_t window);
at::Tensor gated(const at::Tensor& gate_up, bool gelu);

}  // namespace fqcompile
