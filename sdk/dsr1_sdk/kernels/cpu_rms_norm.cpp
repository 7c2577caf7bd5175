// RMSNorm of a few rows on the CPU (decode): out = weight · round_x(x · rsqrt(mean(x²) + eps)), as transformers'
// LlamaRMSNorm computes it: the sum in fp32, the normalized row rounded to x's dtype, then the product with the
// weight in the dtype the two promote to (fp32 · bf16 → fp32, bf16 · bf16 → bf16).
//
// Why it exists: torch's CPU rms_norm is a composite of half a dozen dispatcher ops (pow, mean, add, rsqrt, mul,
// casts), about 18 µs per call for a 768-wide row, and eager decode calls it twice per layer and token; this
// is one call of a plain loop. A decode row is a few KB, so one thread, no vector paths: the loops are written
// for the compiler to vectorize (eight partial sums, no reassociation needed).
#include "cpu_gemv.h"

#include <c10/util/BFloat16.h>

#include <cmath>

namespace dsr1_gemv {
namespace {

template <typename T>
float as_float(T v) {
  return static_cast<float>(v);
}

template <typename X, typename W, typename O>
void norm_rows(const X* x, const W* w, O* out, int64_t rows, int64_t C, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const X* xr = x + r * C;
    float part[8] = {};
    int64_t c = 0;
    for (; c + 8 <= C; c += 8)
      for (int j = 0; j < 8; ++j) part[j] += as_float(xr[c + j]) * as_float(xr[c + j]);
    float ss = 0.0f;
    for (; c < C; ++c) ss += as_float(xr[c]) * as_float(xr[c]);
    for (int j = 0; j < 8; ++j) ss += part[j];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(C) + eps);
    O* o = out + r * C;
    for (c = 0; c < C; ++c) {
      const float normed = as_float(X(as_float(xr[c]) * inv));  // rounded to x's dtype, as .to(x.dtype)
      o[c] = O(as_float(w[c]) * normed);
    }
  }
}

void check(const at::Tensor& x, const at::Tensor& weight) {
  const auto ok = [](at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; };
  TORCH_CHECK(x.dim() >= 1 && ok(x.scalar_type()) && ok(weight.scalar_type()),
              "CPU rms_norm takes float x (..., C) and a float weight (C,), got ", x.scalar_type(), " ",
              x.sym_sizes(), " and ", weight.scalar_type(), " ", weight.sym_sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.sym_size(0) == x.sym_size(-1), "CPU rms_norm: the weight must be (",
              x.sym_size(-1), ",) for x ", x.sym_sizes(), ", got ", weight.sym_sizes());
}

template <typename X, typename W>
void dispatch_out(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, int64_t rows, int64_t C, float eps) {
  const X* xp = x.data_ptr<X>();
  const W* wp = w.data_ptr<W>();
  switch (out.scalar_type()) {
    case at::kFloat: norm_rows(xp, wp, out.data_ptr<float>(), rows, C, eps); break;
    case at::kBFloat16: norm_rows(xp, wp, out.data_ptr<c10::BFloat16>(), rows, C, eps); break;
    default: norm_rows(xp, wp, out.data_ptr<c10::Half>(), rows, C, eps); break;
  }
}

template <typename X>
void dispatch_w(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, int64_t rows, int64_t C, float eps) {
  switch (w.scalar_type()) {
    case at::kFloat: dispatch_out<X, float>(x, w, out, rows, C, eps); break;
    case at::kBFloat16: dispatch_out<X, c10::BFloat16>(x, w, out, rows, C, eps); break;
    default: dispatch_out<X, c10::Half>(x, w, out, rows, C, eps); break;
  }
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  check(x_in, weight_in);
  TORCH_CHECK(x_in.device().is_cpu() && weight_in.device().is_cpu(), "CPU rms_norm runs on CPU tensors, got x on ",
              x_in.device(), " and the weight on ", weight_in.device());
  const at::Tensor x = x_in.contiguous(), w = weight_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::promote_types(x.scalar_type(), w.scalar_type())));
  const int64_t C = x.size(-1), rows = C == 0 ? 0 : x.numel() / C;
  const float e = static_cast<float>(eps);
  switch (x.scalar_type()) {
    case at::kFloat: dispatch_w<float>(x, w, out, rows, C, e); break;
    case at::kBFloat16: dispatch_w<c10::BFloat16>(x, w, out, rows, C, e); break;
    default: dispatch_w<c10::Half>(x, w, out, rows, C, e); break;
  }
  return out;
}

at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check(x, weight);
  return at::empty_symint(x.sym_sizes(), x.options().dtype(at::promote_types(x.scalar_type(), weight.scalar_type())));
}

}  // namespace
}  // namespace dsr1_gemv

TORCH_LIBRARY_FRAGMENT(dsr1_sdk, m) { m.def("cpu_rms_norm(Tensor x, Tensor weight, float eps) -> Tensor"); }
TORCH_LIBRARY_IMPL(dsr1_sdk, CPU, m) { m.impl("cpu_rms_norm", &dsr1_gemv::rms_norm); }
TORCH_LIBRARY_IMPL(dsr1_sdk, Meta, m) { m.impl("cpu_rms_norm", &dsr1_gemv::rms_norm_meta); }
