// fp32 linear layers on AVX-512 CPUs from a "panel" weight layout, for decode-sized batches.
//
// Layout: an (N, K) weight becomes P = ceil(N / 64) panels of (K, 64) floats, each contiguous:
// panel p holds output columns [64 p, 64 p + 64) for every k, zero-padded past N. One panel is
// streamed from memory exactly once per call however many rows x has: the rows are taken 8 at a
// time against the panel while it sits in L2. Each k step prefetches the panel 8 steps (2 KiB)
// ahead, which is what lets a few-row product stream at DRAM speed: MKL and oneDNN leave the
// weight stream and the multiply-adds unoverlapped at 8 rows (see dsr1_device_cpu/panels.py for
// the figures). Panels are split across torch's intra-op threads (at::parallel_for), so the
// thread count follows torch.set_num_threads.
//
// Built at first use by torch.utils.cpp_extension.load (dsr1_device_cpu/panels.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kPanel = 64;     // output columns per panel: 4 zmm registers
constexpr int64_t kPrefetch = 8;   // k steps ahead (8 x 256 bytes)

// out[m, n0:n0+cols] = x[m, :] @ panel (+ bias) for M rows; x rows are ldx apart, out rows N apart.
template <int M>
__attribute__((target("avx512f"))) void panel_rows(
    const float* x, int64_t ldx, int64_t K, const float* panel, const float* bias,
    float* out, int64_t N, int64_t n0, int64_t cols) {
  __m512 acc[M][4];
  for (int m = 0; m < M; ++m) {
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* b = panel + k * kPanel;
    const char* ahead = reinterpret_cast<const char*>(b + kPrefetch * kPanel);
    _mm_prefetch(ahead, _MM_HINT_T0);
    _mm_prefetch(ahead + 64, _MM_HINT_T0);
    _mm_prefetch(ahead + 128, _MM_HINT_T0);
    _mm_prefetch(ahead + 192, _MM_HINT_T0);
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
    const __m512 b2 = _mm512_loadu_ps(b + 32), b3 = _mm512_loadu_ps(b + 48);
    for (int m = 0; m < M; ++m) {
      const __m512 a = _mm512_set1_ps(x[m * ldx + k]);
      acc[m][0] = _mm512_fmadd_ps(a, b0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(a, b1, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(a, b2, acc[m][2]);
      acc[m][3] = _mm512_fmadd_ps(a, b3, acc[m][3]);
    }
  }
  for (int j = 0; j < 4; ++j) {
    const int64_t left = cols - 16 * j;  // columns of this register that exist (N need not be a multiple of 64)
    if (left <= 0) break;
    const __mmask16 keep = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    const __m512 add = bias ? _mm512_maskz_loadu_ps(keep, bias + n0 + 16 * j) : _mm512_setzero_ps();
    for (int m = 0; m < M; ++m) {
      _mm512_mask_storeu_ps(out + m * N + n0 + 16 * j, keep, _mm512_add_ps(acc[m][j], add));
    }
  }
}

using RowsFn = void (*)(const float*, int64_t, int64_t, const float*, const float*, float*, int64_t, int64_t, int64_t);
constexpr RowsFn kRows[9] = {nullptr, panel_rows<1>, panel_rows<2>, panel_rows<3>, panel_rows<4>,
                             panel_rows<5>, panel_rows<6>, panel_rows<7>, panel_rows<8>};

}  // namespace

// (N, K) fp32 weight (any strides) -> (P, K, 64) panels, contiguous; written in place, panel by
// panel, so packing holds no copy beyond the result.
torch::Tensor pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat, "panel pack: (N, K) float32 weight expected");
  const int64_t n = weight.size(0), k = weight.size(1), p = (n + kPanel - 1) / kPanel;
  const int64_t sn = weight.stride(0), sk = weight.stride(1);
  auto panels = torch::empty({p, k, kPanel}, weight.options());
  const float* w = weight.data_ptr<float>();
  float* out = panels.data_ptr<float>();
  at::parallel_for(0, p, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t cols = std::min(kPanel, n - i * kPanel);
      for (int64_t kk = 0; kk < k; ++kk) {
        float* dst = out + (i * k + kk) * kPanel;
        const float* src = w + i * kPanel * sn + kk * sk;
        for (int64_t c = 0; c < cols; ++c) dst[c] = src[c * sn];
        for (int64_t c = cols; c < kPanel; ++c) dst[c] = 0.0f;
      }
    }
  });
  return panels;
}

// x (M, K) fp32 contiguous, panels (P, K, 64), bias (N,) or empty -> (M, N).
torch::Tensor mm(const torch::Tensor& x, const torch::Tensor& panels, const torch::Tensor& bias, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat, "panel mm: contiguous (M, K) float32 x expected");
  TORCH_CHECK(panels.dim() == 3 && panels.is_contiguous() && panels.size(1) == x.size(1) && panels.size(2) == kPanel,
              "panel mm: panels must be (P, K, 64) with K = x.size(1)");
  TORCH_CHECK(panels.size(0) * kPanel >= n && panels.size(0) * kPanel < n + kPanel, "panel mm: N does not match the panels");
  TORCH_CHECK(!bias.defined() || bias.numel() == 0 || (bias.is_contiguous() && bias.numel() == n), "panel mm: bias must be (N,)");
  const int64_t m = x.size(0), k = x.size(1), p = panels.size(0);
  auto out = torch::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = panels.data_ptr<float>();
  const float* bp = bias.defined() && bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, p, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* panel = wp + i * k * kPanel;
      const int64_t n0 = i * kPanel, cols = std::min(kPanel, n - n0);
      for (int64_t r = 0; r < m; r += 8) {
        const int64_t rows = std::min<int64_t>(8, m - r);
        kRows[rows](xp + r * k, k, k, panel, bp, op + r * n, n, n0, cols);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("pack", &pack, "(N, K) fp32 weight -> (P, K, 64) panels");
  module.def("mm", &mm, "x (M, K) @ panels -> (M, N), plus bias");
}
