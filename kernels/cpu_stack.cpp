// fqcompile.Stack: a decoder stack run in one call (fqcompile/slim.py's CPU path): Llama and the
// families slim.py describes by their differences (qk-norm, norms after attention and MLP, GeGLU,
// sliding-window layers, per-layer RoPE tables).
//
// A decode step of a small model is ~10 ops a layer, and each op called from Python costs
// a few microseconds of dispatch: on SmolLM2 (30 layers) that was about a third of the step.
// This class holds every layer's tensors (norms, KV cache and the kernel arguments of each
// projection at each resident precision), and forward runs the whole stack over the same
// kernels the ops use (cpu_ops.h), so its output is the per-op loop's, bit for bit. The
// precision of every projection is an argument of each call: the controller still decides
// it per step. Under an error-estimate policy some projections decide for themselves, right
// before they run: a rule (set_rule) maps the mean square of their input to a precision, per
// signal bucket; a block unit's other projections follow its first one's decision.

#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <map>
#include <vector>

#include "cpu_ops.h"

namespace {

struct Linear {
  std::vector<at::Tensor> planes;
  std::vector<int64_t> widths;
  at::Tensor scale, zero;
  int64_t low = 0;
  double offset = 0;
  int64_t group_size = 0;
  c10::optional<at::Tensor> bias;
  std::vector<at::Tensor> packed;  // pack_rows' tensors where the layer holds its planes packed (then no planes)

  at::Tensor operator()(const at::Tensor& x, bool int8_activations) const {
    // FlexLinear._linear's choice: the packed rows serve int8 activations; float ones need the planes
    TORCH_CHECK(!planes.empty() || int8_activations, "Stack: float activations need the nested planes");
    at::Tensor y = int8_activations && !packed.empty()
                       ? fqcompile::packed_linear(x, packed, scale.size(0), low, offset, group_size)
                       : fqcompile::nested_linear(x, planes, widths, scale, zero, low, offset, group_size, int8_activations);
    if (bias) y.add_(*bias);
    return y;
  }
};

// x += y for two contiguous float32 tensors of one shape (at::add_ is a dispatch for ~600 floats).
void add_into(at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == at::kFloat && y.is_contiguous(),
              "Stack: a projection's output ", y.sizes(), " does not match the hidden state ", x.sizes());
  float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const int64_t n = x.numel();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) xp[i] += yp[i];
}

constexpr int64_t kSlots = 4;  // per layer: fused q/k/v, o, fused gate/up, down

// A projection's precision from its input: per signal bucket, increasing mean-square edges and
// the precision of each interval (calibration/estimate.py's rules), or another slot's decision.
struct Rule {
  int64_t follow = -1;  // >= 0: the layer's slot whose decision this one takes
  std::vector<std::vector<double>> edges;
  std::vector<std::vector<int64_t>> bits;
  bool active() const { return follow >= 0 || !bits.empty(); }
};

// Mean square of the last row of x [B, T, features] (the decode token), summed in double.
double mean_square(const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat, "Stack: a rule's input must be contiguous float32");
  const int64_t f = x.size(-1);
  const float* p = x.data_ptr<float>() + (x.numel() - f);
  double sum = 0;
  for (int64_t i = 0; i < f; ++i) sum += static_cast<double>(p[i]) * p[i];
  return sum / f;
}

struct Layer {
  // norms before attention and MLP; after them too where the family has them (else undefined)
  at::Tensor attn_in, attn_out, mlp_in, mlp_out, k_cache, v_cache;
  c10::optional<at::Tensor> q_norm, k_norm;  // qk-norm weights
  int64_t window = 0, rope = 0;              // sliding window (0: none); which RoPE table
  std::array<std::map<int64_t, Linear>, kSlots> linear;  // precision -> kernel arguments
  std::array<Rule, kSlots> rules;
};

at::Tensor float_norm(const c10::optional<at::Tensor>& w) {
  if (!w.has_value()) return at::Tensor();
  TORCH_CHECK(w->scalar_type() == at::kFloat, "Stack: float32 norms");
  return w->contiguous();
}

struct Stack : torch::CustomClassHolder {
  std::vector<Layer> layers;
  double eps, scale;  // RMSNorm epsilon; attention score scale (0: 1/sqrt(head_dim))
  int64_t heads;
  bool gelu;  // GeGLU (GELU-tanh) rather than SwiGLU
  bool timing = false;  // set_timing: clock the projections, attention and whole calls (benchmarks)
  double linear_s = 0, attend_s = 0, forward_s = 0;  // seconds since the last timings()

  Stack(int64_t n_layers, double eps, int64_t heads, double scale, bool gelu)
      : layers(n_layers), eps(eps), scale(scale), heads(heads), gelu(gelu) {}

  Layer& layer(int64_t i) {
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(layers.size()), "Stack: no layer ", i);
    return layers[i];
  }

  void set_layer(int64_t i, const at::Tensor& attn_in, const c10::optional<at::Tensor>& attn_out,
                 const at::Tensor& mlp_in, const c10::optional<at::Tensor>& mlp_out,
                 const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm, int64_t window,
                 int64_t rope) {
    Layer& l = layer(i);
    l.attn_in = float_norm(attn_in);
    l.attn_out = float_norm(attn_out);
    l.mlp_in = float_norm(mlp_in);
    l.mlp_out = float_norm(mlp_out);
    l.q_norm = q_norm.has_value() ? c10::optional<at::Tensor>(float_norm(q_norm)) : c10::nullopt;
    l.k_norm = k_norm.has_value() ? c10::optional<at::Tensor>(float_norm(k_norm)) : c10::nullopt;
    l.window = window;
    l.rope = rope;
  }

  void set_cache(int64_t i, const at::Tensor& k_cache, const at::Tensor& v_cache) {
    layer(i).k_cache = k_cache;  // views of slim.py's cache: written in place
    layer(i).v_cache = v_cache;
  }

  void set_linear(int64_t i, int64_t slot, int64_t bits, std::vector<at::Tensor> planes, std::vector<int64_t> widths,
                  const at::Tensor& scale, const at::Tensor& zero, int64_t low, double offset, int64_t group_size,
                  const c10::optional<at::Tensor>& bias, std::vector<at::Tensor> packed) {
    TORCH_CHECK(slot >= 0 && slot < kSlots, "Stack: slot ", slot);
    layer(i).linear[slot][bits] =
        Linear{std::move(planes), std::move(widths), scale, zero, low, offset, group_size, bias, std::move(packed)};
  }

  // Slot `slot` of layer i decides its precision in `bucket` by the rule (edges, bits), or
  // (follow >= 0) takes the decision of slot `follow`, which runs before it.
  void set_rule(int64_t i, int64_t slot, int64_t bucket, int64_t follow, std::vector<double> edges,
                std::vector<int64_t> bits) {
    TORCH_CHECK(slot >= 0 && slot < kSlots && bucket >= 0 && follow < slot, "Stack.set_rule: needs 0 <= slot < 4, ",
                "bucket >= 0 and follow < slot; got slot ", slot, ", bucket ", bucket, ", follow ", follow);
    TORCH_CHECK(follow >= 0 || bits.size() == edges.size() + 1, "Stack.set_rule: bits needs one entry more than edges");
    Rule& r = layer(i).rules[slot];
    r.follow = follow;
    if (follow >= 0) return;
    if (static_cast<int64_t>(r.bits.size()) <= bucket) {
      r.edges.resize(bucket + 1);
      r.bits.resize(bucket + 1);
    }
    r.edges[bucket] = std::move(edges);
    r.bits[bucket] = std::move(bits);
  }

  void clear_rules() {
    for (Layer& l : layers) l.rules = {};
  }

  const Linear& linear(const Layer& l, int64_t slot, int64_t bits) const {
    const auto found = l.linear[slot].find(bits);
    TORCH_CHECK(found != l.linear[slot].end(), "Stack: no kernel arguments for ", bits, " bits in slot ", slot);
    return found->second;
  }

  void set_timing(bool on) { timing = on; }

  // Seconds in [the projections' kernels, attention, forward as a whole] since the last call; resets them.
  std::vector<double> timings() {
    std::vector<double> out{linear_s, attend_s, forward_s};
    linear_s = attend_s = forward_s = 0;
    return out;
  }

  // fn(), its seconds added to *total while timing is on.
  template <typename Fn>
  at::Tensor clocked(double* total, Fn&& fn) {
    if (!timing) return fn();
    const auto start = std::chrono::steady_clock::now();
    at::Tensor out = fn();
    *total += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return out;
  }

  // The projection at `bits`, or, where `bucket` >= 0 and the slot has a rule, at the precision
  // its rule gives x; the decision (and the mean square it came from) goes to chosen[i, slot].
  at::Tensor project(const Layer& l, size_t i, int64_t slot, int64_t bits, const at::Tensor& x, int64_t int8,
                     int64_t bucket, double* chosen) {
    const Rule& rule = l.rules[slot];
    if (bucket >= 0 && rule.active()) {
      double* row = chosen + (i * kSlots + slot) * 2;
      if (rule.follow >= 0) {
        row[0] = chosen[(i * kSlots + rule.follow) * 2];
        row[1] = chosen[(i * kSlots + rule.follow) * 2 + 1];
      } else {
        TORCH_CHECK(bucket < static_cast<int64_t>(rule.bits.size()), "Stack: no rule for bucket ", bucket);
        const auto& edges = rule.edges[bucket];
        row[1] = mean_square(x);  // bisect_right, as estimate.decide
        row[0] = static_cast<double>(rule.bits[bucket][std::upper_bound(edges.begin(), edges.end(), row[1]) - edges.begin()]);
      }
      bits = static_cast<int64_t>(row[0]);
    }
    const Linear& run = linear(l, slot, bits);
    return clocked(&linear_s, [&] { return run(x, int8 != 0); });
  }

  // x [B, T, hidden] (embedded tokens) -> the last layer's output. plan and int8: kSlots
  // entries a layer, the precision and the int8-activation flag of each projection. bucket
  // (>= 0, one row): the signal bucket whose rules decide the slots that have one; each
  // decision is written to chosen (float64 [layers * kSlots, 2]: precision, input mean square).
  at::Tensor forward(const at::Tensor& x, const std::vector<at::Tensor>& cos, const std::vector<at::Tensor>& sin,
                     int64_t start,
                     const std::vector<int64_t>& plan, const std::vector<int64_t>& int8,
                     const c10::optional<at::Tensor>& mask, int64_t bucket, const c10::optional<at::Tensor>& chosen) {
    double* out = nullptr;
    if (bucket >= 0) {
      TORCH_CHECK(x.size(0) == 1, "Stack.forward: x must have batch size 1 when bucket >= 0");
      TORCH_CHECK(chosen.has_value() && chosen->scalar_type() == at::kDouble && chosen->is_contiguous() &&
                      chosen->numel() == static_cast<int64_t>(layers.size() * kSlots * 2),
                  "Stack: chosen must be float64 [layers * 4, 2]");
      out = chosen->data_ptr<double>();
    }
    return clocked(&forward_s, [&] { return run(x, cos, sin, start, plan, int8, mask, bucket, out); });
  }

  // The sublayer's output, normed where the family norms it (Gemma), added to the residual h.
  void add_normed(at::Tensor& h, const at::Tensor& y, const at::Tensor& norm) {
    add_into(h, norm.defined() ? fqcompile::rms_norm(y, norm, eps) : y);
  }

  at::Tensor run(const at::Tensor& x, const std::vector<at::Tensor>& cos, const std::vector<at::Tensor>& sin,
                 int64_t start,
                 const std::vector<int64_t>& plan, const std::vector<int64_t>& int8,
                 const c10::optional<at::Tensor>& mask, int64_t bucket, double* chosen) {
    const size_t n = layers.size() * kSlots;
    TORCH_CHECK(plan.size() == n && int8.size() == n, "Stack: the plan needs ", n, " entries");
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3, "Stack: x must be float32 [B, T, hidden]");
    // The kernels are called directly, not through the dispatcher: nothing else would stop another device's memory.
    TORCH_CHECK(cos.size() == sin.size(), "Stack: one sin table per cos table");
    bool cpu = x.is_cpu() && (!mask.has_value() || mask->is_cpu());
    for (size_t r = 0; r < cos.size(); ++r) cpu = cpu && cos[r].is_cpu() && sin[r].is_cpu();
    TORCH_CHECK(cpu, "Stack: every input must be on the CPU");
    at::Tensor h = x.contiguous().clone();
    for (size_t i = 0; i < layers.size(); ++i) {
      Layer& l = layers[i];
      const int64_t* bits = plan.data() + i * kSlots;
      const int64_t* q = int8.data() + i * kSlots;
      TORCH_CHECK(l.rope >= 0 && l.rope < static_cast<int64_t>(cos.size()), "Stack: layer ", i, " needs RoPE table ",
                  l.rope);
      const at::Tensor qkv = project(l, i, 0, bits[0], fqcompile::rms_norm(h, l.attn_in, eps), q[0], bucket, chosen);
      const at::Tensor att = clocked(&attend_s, [&] {
        return fqcompile::attend(qkv, cos[l.rope], sin[l.rope], l.k_cache, l.v_cache, start, heads, mask, l.q_norm,
                                 l.k_norm, eps, scale, l.window);
      });
      add_normed(h, project(l, i, 1, bits[1], att, q[1], bucket, chosen), l.attn_out);
      const at::Tensor gate_up = project(l, i, 2, bits[2], fqcompile::rms_norm(h, l.mlp_in, eps), q[2], bucket, chosen);
      add_normed(h, project(l, i, 3, bits[3], fqcompile::gated(gate_up, gelu), q[3], bucket, chosen), l.mlp_out);
    }
    return h;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(fqcompile, m) {
  m.class_<Stack>("Stack")
      .def(torch::init<int64_t, double, int64_t, double, bool>())
      .def("set_layer", &Stack::set_layer)
      .def("set_cache", &Stack::set_cache)
      .def("set_linear", &Stack::set_linear)
      .def("set_rule", &Stack::set_rule)
      .def("clear_rules", &Stack::clear_rules)
      .def("forward", &Stack::forward)
      .def("set_timing", &Stack::set_timing)
      .def("timings", &Stack::timings);
}
