// chatsmith's native int8/int4 decode and prefill steps for Llama-family models.
//
// The same ATen calls, in the same order and on the same shapes, as LlamaRunner._layers_quantized
// and its decode and prefill attention in chatsmith/infer/runners.py, so the logits are bit-for-bit
// the Python path's (tested). What it removes is the Python interpreter between the ~2000 small
// operations of one step, which on a CPU costs as much as the matmuls themselves.
//
// Prefill takes chunks of several sequences at once: their rows go through every matmul together
// (the int8 and int4 kernels compute each row on its own, so a row's numbers do not depend on the
// others) and attention runs per chunk over its own sequence's cache.
#include <torch/extension.h>
#include <torch/csrc/jit/api/object.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <limits>
#include <vector>

namespace chatsmith_q4 {  // q4.cpp
bool supported();
void set_parallel(bool on);
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& d, const at::Tensor& m,
                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& norm, double eps);
at::Tensor linear8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& d,
                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& norm, double eps);
}  // namespace chatsmith_q4

namespace {

struct Linear {
  c10::IValue packed;                // int8: fbgemm LinearPackedParams (one scale per row)
  at::Tensor w4, sz;                 // int4: packed codes and [in/g, out, 2] bf16 scales and zeros
  int64_t group = 0;                 // int4 group size (0: this is an int8 layer)
  bool q4 = false;                   // int4 on chatsmith's own kernel (q4.cpp): w4 codes, sz scales, m offsets
  bool q8 = false;                   // int8 in blocks of 32 on chatsmith's kernel (q4.cpp): w4 codes, sz scales
  at::Tensor m;
  at::Tensor in_scale;               // [in]: int8: the RMSNorm weight and SmoothQuant factors; int4: the RMSNorm weight
  c10::optional<at::Tensor> bias;    // [out]
  at::Tensor buf;                    // [rows + 1, in]; row 0 pins the activations' int8 range to [-1, 1]
  int64_t in = 0, out = 0;
};

// Row 0 is [1, -1, 0, ...]: it pins the dynamic int8 range to [-1, 1] (see Int8Linear in runners.py).
at::Tensor pinned_buffer(int64_t rows, int64_t in) {
  auto buf = at::zeros({rows, in}, at::kFloat);
  buf.index_put_({0, 0}, 1.0);
  buf.index_put_({0, 1}, -1.0);
  return buf;
}

class Decoder {
 public:
  Decoder(int64_t n_heads, int64_t n_kv, int64_t head_dim, double eps, bool reduce_range)
      : nh_(n_heads), nkv_(n_kv), hd_(head_dim), eps_(eps), reduce_range_(reduce_range),
        op_(c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_dynamic", "")) {}

  // kind: 0 qkv, 1 o, 2 gate_up, 3 down (for layer `layer`), or layer == -1 for the LM head.
  void add_linear(int64_t layer, int64_t kind, const torch::jit::Object& packed, at::Tensor in_scale,
                  c10::optional<at::Tensor> bias, int64_t in, int64_t out) {
    Linear l;
    l.packed = c10::IValue(packed._ivalue());
    l.in_scale = in_scale;
    l.bias = bias;
    l.in = in;
    l.out = out;
    l.buf = pinned_buffer(17, in);
    place(layer, kind, l);
  }

  // The int4 twin of add_linear: codes packed by _convert_weight_to_int4pack_for_cpu, group-wise
  // scales and zeros, the RMSNorm weight in front (undefined for o and down).
  void add_linear4(int64_t layer, int64_t kind, at::Tensor w4, at::Tensor sz, int64_t group,
                   c10::optional<at::Tensor> norm_weight, c10::optional<at::Tensor> bias, int64_t in, int64_t out) {
    place(layer, kind, blockwise(w4, sz, at::Tensor(), group, norm_weight, bias, in, out));
  }

  // int4 on chatsmith's own kernel (q4.cpp): codes [out, in/2], scales and offsets [out, in/32].
  void add_linear_q4(int64_t layer, int64_t kind, at::Tensor w, at::Tensor d, at::Tensor m,
                     c10::optional<at::Tensor> norm_weight, c10::optional<at::Tensor> bias, int64_t in, int64_t out) {
    Linear l = blockwise(w, d, m, 32, norm_weight, bias, in, out);
    l.q4 = true;
    place(layer, kind, l);
  }

  // int8 in blocks of 32 (Q8_0) on chatsmith's kernel: codes [out, in], scales [out, in/32].
  void add_linear_q8(int64_t layer, int64_t kind, at::Tensor w, at::Tensor d, c10::optional<at::Tensor> norm_weight,
                     c10::optional<at::Tensor> bias, int64_t in, int64_t out) {
    Linear l = blockwise(w, d, at::Tensor(), 32, norm_weight, bias, in, out);
    l.q8 = true;
    place(layer, kind, l);
  }

  void set_gate_up_sizes(std::vector<int64_t> sizes) { gate_up_sizes_ = sizes; }

  // Chunks of several sequences: h [1, T, H] holds their rows one chunk after another; chunk c has
  // lens[c] rows for slot slots[c] from position starts[c]. cos, sin [1, T, 1, hd]. Writes each
  // chunk's keys and values into its slot and returns the last hidden states [1, T, H] (before the
  // final norm, which the LM head applies).
  at::Tensor prefill(at::Tensor h, at::Tensor cos, at::Tensor sin, std::vector<int64_t> slots,
                     std::vector<int64_t> starts, std::vector<int64_t> lens, std::vector<at::Tensor> K,
                     std::vector<at::Tensor> V) {
    at::NoGradGuard no_grad;
    const int64_t T = h.size(1);
    const int64_t half = hd_ / 2;
    using at::indexing::Slice;
    std::vector<at::Tensor> masks;
    for (size_t c = 0; c < slots.size(); ++c) {
      const int64_t start = starts[c], n = lens[c], end = start + n;
      // Query i (at position start + i) sees keys 0..start + i.
      masks.push_back(at::arange(end, at::kLong).unsqueeze(0) <= (at::arange(n, at::kLong) + start).unsqueeze(1));
    }
    for (size_t i = 0; i < layers_.size(); ++i) {
      auto& L = layers_[i];
      auto qkv = after_rms_norm(L[0], h).view({1, T, nh_ + 2 * nkv_, hd_});
      auto qk = qkv.slice(2, 0, nh_ + nkv_);
      qk = qk * cos + qk.roll({half}, {-1}) * sin;
      auto q = qk.slice(2, 0, nh_).transpose(1, 2);
      auto k = qk.slice(2, nh_).transpose(1, 2);
      auto v = qkv.slice(2, nh_ + nkv_).transpose(1, 2);
      std::vector<at::Tensor> outs;
      int64_t off = 0;
      for (size_t c = 0; c < slots.size(); ++c) {
        const int64_t s = slots[c], start = starts[c], n = lens[c], end = start + n;
        auto kc = k.slice(2, off, off + n), vc = v.slice(2, off, off + n), qc = q.slice(2, off, off + n);
        K[i].select(0, s).slice(1, start, end).copy_(kc.select(0, 0));
        V[i].select(0, s).slice(1, start, end).copy_(vc.select(0, 0));
        auto o = at::scaled_dot_product_attention(qc, K[i].slice(0, s, s + 1).slice(2, 0, end),
                                                  V[i].slice(0, s, s + 1).slice(2, 0, end), masks[c], 0.0, false,
                                                  1.0, nkv_ != nh_);
        outs.push_back(o.transpose(1, 2).reshape({1, n, -1}));
        off += n;
      }
      auto o = outs.size() == 1 ? outs[0] : at::cat(outs, 1);
      h = h + plain(L[1], o);
      auto gu = after_rms_norm(L[2], h);
      auto parts = gu.split_with_sizes(gate_up_sizes_, -1);
      auto m = at::silu(parts[0]) * parts[1];
      h = h + plain(L[3], m);
    }
    return h;
  }

  // h [B, 1, H]; cos, sin [B, 1, 1, hd] (sin with the rotate_half sign folded in);
  // K, V: per layer [slots, n_kv, T, hd]. Returns logits [B, vocab].
  at::Tensor decode(at::Tensor h, at::Tensor cos, at::Tensor sin, std::vector<int64_t> slots,
                    std::vector<int64_t> positions, std::vector<at::Tensor> K, std::vector<at::Tensor> V) {
    at::NoGradGuard no_grad;  // like the Python path under torch.no_grad: plain tensors out
    const int64_t B = h.size(0);
    const int64_t H = h.size(-1);
    const int64_t half = hd_ / 2;
    const int64_t groups = nh_ / nkv_;
    using at::indexing::Slice;
    for (size_t i = 0; i < layers_.size(); ++i) {
      auto& L = layers_[i];
      auto qkv = after_rms_norm(L[0], h).view({B, 1, nh_ + 2 * nkv_, hd_});
      auto qk = qkv.slice(2, 0, nh_ + nkv_);
      qk = qk * cos + qk.roll({half}, {-1}) * sin;
      auto q = qk.slice(2, 0, nh_).transpose(1, 2);
      auto k = qk.slice(2, nh_).transpose(1, 2);
      auto v = qkv.slice(2, nh_ + nkv_).transpose(1, 2);
      std::vector<at::Tensor> outs;
      outs.reserve(B);
      for (int64_t r = 0; r < B; ++r) {
        const int64_t s = slots[r], p = positions[r];
        K[i].select(0, s).select(1, p).copy_(k.select(0, r).select(1, 0));
        V[i].select(0, s).select(1, p).copy_(v.select(0, r).select(1, 0));
      }
      for (int64_t r = 0; r < B; ++r) {
        const int64_t s = slots[r], p = positions[r];
        auto qr = q.select(0, r).reshape({nkv_, groups, hd_});
        auto scores = at::matmul(qr, K[i].select(0, s).slice(1, 0, p + 1).transpose(1, 2));
        outs.push_back(at::matmul(scores.softmax(-1), V[i].select(0, s).slice(1, 0, p + 1)));
      }
      auto o = (B == 1 ? outs[0] : at::stack(outs)).reshape({B, 1, -1});
      h = h + plain(L[1], o);
      auto gu = after_rms_norm(L[2], h);
      auto parts = gu.split_with_sizes(gate_up_sizes_, -1);
      auto m = at::silu(parts[0]) * parts[1];
      h = h + plain(L[3], m);
    }
    return after_rms_norm(head_, h.select(1, h.size(1) - 1));
  }

 private:
  // A layer with block-wise weights: codes, scales (and offsets), the RMSNorm weight in front.
  static Linear blockwise(at::Tensor w, at::Tensor d, at::Tensor m, int64_t group, c10::optional<at::Tensor> norm_weight,
                          c10::optional<at::Tensor> bias, int64_t in, int64_t out) {
    Linear l;
    l.w4 = w;
    l.sz = d;
    l.m = m;
    l.group = group;
    if (norm_weight) l.in_scale = *norm_weight;
    l.bias = bias;
    l.in = in;
    l.out = out;
    return l;
  }

  void place(int64_t layer, int64_t kind, const Linear& l) {
    if (layer < 0) {
      head_ = l;
      return;
    }
    if ((int64_t)layers_.size() <= layer) layers_.resize(layer + 1);
    auto& slots = layers_[layer];
    if ((int64_t)slots.size() < 4) slots.resize(4);
    slots[kind] = l;
  }

  // int4: x [N, in] in bf16 through the group-wise kernel, back to fp32 (Int4Linear._mm).
  at::Tensor mm4(Linear& l, const at::Tensor& x2) {
    if (l.q4) return chatsmith_q4::linear(x2, l.w4, l.sz, l.m, l.bias, c10::nullopt, 0.0);
    if (l.q8) return chatsmith_q4::linear8(x2, l.w4, l.sz, l.bias, c10::nullopt, 0.0);
    auto y = at::_weight_int4pack_mm_for_cpu(x2.to(at::kBFloat16), l.w4, l.group, l.sz).to(at::kFloat);
    return l.bias ? y + *l.bias : y;
  }

  at::Tensor unit(Linear& l, const at::Tensor& x2, const at::Tensor& m) {
    const int64_t n = x2.size(0);
    if (l.buf.size(0) < n + 1) {
      l.buf = pinned_buffer(std::max<int64_t>(n + 1, 2 * l.buf.size(0)), l.in);
    }
    auto buf = l.buf.slice(0, 0, n + 1);
    auto rows = buf.slice(0, 1);
    at::div_out(rows, x2, m);
    std::vector<c10::IValue> stack{buf, l.packed, reduce_range_};
    op_.callBoxed(&stack);
    return stack[0].toTensor().slice(0, 1);
  }

  at::Tensor plain(Linear& l, const at::Tensor& x) {
    auto shape = x.sizes().vec();
    auto x2 = x.reshape({-1, shape.back()});
    if (l.group) {
      shape.back() = l.out;
      return mm4(l, x2).reshape(shape);
    }
    x2 = x2 * l.in_scale;
    auto m = at::linalg_vector_norm(x2, std::numeric_limits<double>::infinity(), {-1}, true).clamp_min_(1e-30);
    auto y = unit(l, x2, m) * m;
    if (l.bias) y = y + *l.bias;
    shape.back() = l.out;
    return y.reshape(shape);
  }

  at::Tensor after_rms_norm(Linear& l, const at::Tensor& x) {
    auto shape = x.sizes().vec();
    const int64_t H = shape.back();
    auto x2 = x.reshape({-1, H});
    if (l.q4) {  // the RMSNorm runs inside the kernel's activation quantization
      shape.back() = l.out;
      return chatsmith_q4::linear(x2, l.w4, l.sz, l.m, l.bias, l.in_scale, eps_).reshape(shape);
    }
    if (l.q8) {
      shape.back() = l.out;
      return chatsmith_q4::linear8(x2, l.w4, l.sz, l.bias, l.in_scale, eps_).reshape(shape);
    }
    if (l.group) {
      shape.back() = l.out;
      return mm4(l, at::rms_norm(x2, {H}, l.in_scale, eps_)).reshape(shape);
    }
    auto n2 = at::linalg_vector_norm(x2, 2, {-1}, true);
    auto xw = x2 * l.in_scale;
    auto m = at::linalg_vector_norm(xw, std::numeric_limits<double>::infinity(), {-1}, true).clamp_min_(1e-30);
    auto denom = at::hypot(n2, at::scalar_tensor(std::sqrt((double)H * eps_), at::kFloat));
    auto y = unit(l, xw, m) * (m / denom);
    if (l.bias) y = y + *l.bias;
    shape.back() = l.out;
    return y.reshape(shape);
  }

  int64_t nh_, nkv_, hd_;
  double eps_;
  bool reduce_range_;
  c10::OperatorHandle op_;
  std::vector<std::vector<Linear>> layers_;
  Linear head_;
  std::vector<int64_t> gate_up_sizes_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q8_linear", &chatsmith_q4::linear8, "rms_norm(x) [M, K] W^T (+ bias) for int8 blocks of 32 (Q8_0)",
        py::arg("x"), py::arg("w"), py::arg("d"), py::arg("bias"), py::arg("norm") = py::none(),
        py::arg("eps") = 0.0, py::call_guard<py::gil_scoped_release>());
  m.def("q4_set_parallel", &chatsmith_q4::set_parallel, "whether the int4/int8-block matmuls split rows over threads");
  m.def("q4_supported", &chatsmith_q4::supported, "whether this CPU runs chatsmith's int4 kernel (AVX512-VNNI)");
  m.def("q4_linear", &chatsmith_q4::linear, "rms_norm(x) [M, K] W^T (+ bias) for int4 codes, scales and offsets",
        py::arg("x"), py::arg("w"), py::arg("d"), py::arg("m"), py::arg("bias"), py::arg("norm") = py::none(),
        py::arg("eps") = 0.0, py::call_guard<py::gil_scoped_release>());
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<int64_t, int64_t, int64_t, double, bool>())
      .def("add_linear", &Decoder::add_linear)
      .def("add_linear4", &Decoder::add_linear4)
      .def("add_linear_q4", &Decoder::add_linear_q4)
      .def("add_linear_q8", &Decoder::add_linear_q8)
      .def("set_gate_up_sizes", &Decoder::set_gate_up_sizes)
      .def("prefill", &Decoder::prefill, py::call_guard<py::gil_scoped_release>())
      .def("decode", &Decoder::decode, py::call_guard<py::gil_scoped_release>());
}
