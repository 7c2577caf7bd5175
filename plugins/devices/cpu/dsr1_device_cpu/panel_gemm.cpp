// fp32 linear layers on AVX-512 CPUs from a "panel" weight layout, for decode-sized batches.
//
// Layout: an (N, K) weight becomes P = ceil(N / 64) panels of (K, 64) floats, each contiguous:
// panel p holds output columns [64 p, 64 p + 64) for every k, zero-padded past N. One panel is
// streamed from memory exactly once per call however many rows x has: up to 8 rows go in one pass,
// more in 6-row tiles against the panel while it sits in L2. Each k step prefetches the panel 8 steps (2 KiB)
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
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace {

constexpr int64_t kPanel = 64;     // output columns per panel: 4 zmm registers
constexpr int64_t kPrefetch = 8;   // k steps ahead (8 x 256 bytes)
// Rows per tile past 8 rows: 6 x 4 accumulators + 4 weight registers + 1 broadcast fit the 32 zmm
// registers (8 rows spill, which costs little at decode, where the weight stream dominates, and
// 25 % at prefill sizes: 512 rows of tiny-125m's matmuls took 381 ms in 8-row tiles, 286 in 6-row).
constexpr int64_t kTileRows = 6;
constexpr int64_t kHugePage = 2 << 20;  // bytes of an x86-64 transparent huge page

// out[m, n0 : n0 + cols] = x[m, :] @ panels (+ bias) for M rows and NP adjacent panels (panel q
// starts panel_stride floats after panel q - 1); x rows are ldx apart, out rows N apart, and cols
// counts the output columns that exist from n0 (N need not be a multiple of 64).
template <int M, int NP>
__attribute__((target("avx512f"))) void panel_rows(
    const float* x, int64_t ldx, int64_t K, const float* panel, int64_t panel_stride, const float* bias,
    float* out, int64_t N, int64_t n0, int64_t cols) {
  __m512 acc[NP][M][4];
  for (int q = 0; q < NP; ++q) {
    for (int m = 0; m < M; ++m) {
      for (int j = 0; j < 4; ++j) acc[q][m][j] = _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int q = 0; q < NP; ++q) {
      const float* b = panel + q * panel_stride + k * kPanel;
      const char* ahead = reinterpret_cast<const char*>(b + kPrefetch * kPanel);
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + 64, _MM_HINT_T0);
      _mm_prefetch(ahead + 128, _MM_HINT_T0);
      _mm_prefetch(ahead + 192, _MM_HINT_T0);
      const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
      const __m512 b2 = _mm512_loadu_ps(b + 32), b3 = _mm512_loadu_ps(b + 48);
      for (int m = 0; m < M; ++m) {
        const __m512 a = _mm512_set1_ps(x[m * ldx + k]);
        acc[q][m][0] = _mm512_fmadd_ps(a, b0, acc[q][m][0]);
        acc[q][m][1] = _mm512_fmadd_ps(a, b1, acc[q][m][1]);
        acc[q][m][2] = _mm512_fmadd_ps(a, b2, acc[q][m][2]);
        acc[q][m][3] = _mm512_fmadd_ps(a, b3, acc[q][m][3]);
      }
    }
  }
  for (int q = 0; q < NP; ++q) {
    for (int j = 0; j < 4; ++j) {
      const int64_t col = q * kPanel + 16 * j, left = cols - col;  // columns of this register that exist
      if (left <= 0) break;
      const __mmask16 keep = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
      const __m512 add = bias ? _mm512_maskz_loadu_ps(keep, bias + n0 + col) : _mm512_setzero_ps();
      for (int m = 0; m < M; ++m) {
        _mm512_mask_storeu_ps(out + m * N + n0 + col, keep, _mm512_add_ps(acc[q][m][j], add));
      }
    }
  }
}

using RowsFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, const float*, float*, int64_t,
                        int64_t, int64_t);
// one panel, 1 to 8 rows
constexpr RowsFn kRows[9] = {nullptr, panel_rows<1, 1>, panel_rows<2, 1>, panel_rows<3, 1>, panel_rows<4, 1>,
                             panel_rows<5, 1>, panel_rows<6, 1>, panel_rows<7, 1>, panel_rows<8, 1>};
// two panels at once, 1 or 2 rows: two weight streams per thread keep more loads in flight, which
// is what a matrix-vector product is bound by (tiny-125m, 1 row: 12.9 ms per token against 14.0 ms
// with one stream and 14.1 ms for MKL's kn)
constexpr RowsFn kPairRows[3] = {nullptr, panel_rows<1, 2>, panel_rows<2, 2>};

// A 1-D float tensor of n elements for weights. From 2 MiB up it starts on a 2 MiB boundary and its
// pages are marked for transparent huge pages before anything touches them, so the kernel streams
// it with 512x fewer page-table walks (tiny-125m at batch 1: 5-7 % faster decode). torch does the
// same for every buffer when THP_MEM_ALLOC_ENABLE=1 was set before its first allocation, which
// `import dsr1` arranges only when it comes before `import torch`; this covers the other order.
// The slack before the boundary is never touched, so it takes address space, not memory.
torch::Tensor huge_page_empty(int64_t n, const torch::TensorOptions& options) {
  const int64_t bytes = n * static_cast<int64_t>(sizeof(float));
  if (bytes < kHugePage) return torch::empty({n}, options);
  auto storage = torch::empty({n + kHugePage / static_cast<int64_t>(sizeof(float))}, options);
  const auto base = reinterpret_cast<uintptr_t>(storage.data_ptr<float>());
  const uintptr_t aligned = (base + kHugePage - 1) & ~static_cast<uintptr_t>(kHugePage - 1);
#ifdef __linux__
  madvise(reinterpret_cast<void*>(aligned), static_cast<size_t>(bytes) & ~static_cast<size_t>(kHugePage - 1),
          MADV_HUGEPAGE);  // whole huge pages inside the weight; advice only: failure changes nothing
#endif
  return storage.narrow(0, static_cast<int64_t>((aligned - base) / sizeof(float)), n);
}

}  // namespace

// (N, K) fp32 weight (any strides) -> (P, K, 64) panels, contiguous; written in place, panel by
// panel, so packing holds no copy beyond the result.
torch::Tensor pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat, "panel pack: (N, K) float32 weight expected");
  const int64_t n = weight.size(0), k = weight.size(1), p = (n + kPanel - 1) / kPanel;
  const int64_t sn = weight.stride(0), sk = weight.stride(1);
  auto panels = huge_page_empty(p * k * kPanel, weight.options()).view({p, k, kPanel});
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
  const int64_t stride = k * kPanel;
  if (m <= 2) {  // matrix-vector sized: panels in pairs (the odd last one alone)
    at::parallel_for(0, (p + 1) / 2, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const int64_t i = 2 * g, n0 = i * kPanel, cols = std::min(2 * kPanel, n - n0);
        (i + 1 < p ? kPairRows[m] : kRows[m])(xp, k, k, wp + i * stride, stride, bp, op, n, n0, cols);
      }
    });
    return out;
  }
  at::parallel_for(0, p, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* panel = wp + i * stride;
      const int64_t n0 = i * kPanel, cols = std::min(kPanel, n - n0);
      if (m <= 8) {  // decode: every row in one pass over the panel
        kRows[m](xp, k, k, panel, stride, bp, op, n, n0, cols);
        continue;
      }
      for (int64_t r = 0; r < m; r += kTileRows) {  // prefill: the panel stays in L2 across row tiles
        const int64_t rows = std::min(kTileRows, m - r);
        kRows[rows](xp + r * k, k, k, panel, stride, bp, op + r * n, n, n0, cols);
      }
    }
  });
  return out;
}

// The shape of mm's result, for torch.compile's tracing (which runs no kernel).
torch::Tensor mm_meta(const torch::Tensor& x, const torch::Tensor& panels, const torch::Tensor& bias, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "panel mm: (M, K) float32 x expected");
  return torch::empty_symint({x.sym_size(0), c10::SymInt(n)}, x.options());
}

// An op, not only a Python function: a compiled decode step keeps it as one call instead of breaking its graph.
TORCH_LIBRARY(dsr1_device_cpu, m) { m.def("panel_mm(Tensor x, Tensor panels, Tensor bias, int n) -> Tensor"); }
TORCH_LIBRARY_IMPL(dsr1_device_cpu, CPU, m) { m.impl("panel_mm", &mm); }
TORCH_LIBRARY_IMPL(dsr1_device_cpu, Meta, m) { m.impl("panel_mm", &mm_meta); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("pack", &pack, "(N, K) fp32 weight -> (P, K, 64) panels");
}
