// What the CPU GEMV's two sources share (cpu_gemv.cpp: the op, the float and weight-only int8 formats, the
// streaming read; cpu_gemv_w8a8.cpp: int8 weights times int8 activations). Built together as one extension
// by dsr1_sdk/kernels/cpu.py.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace dsr1_gemv {

enum Path { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

constexpr int kMaxTile = 8;                 // rows of x per pass over W; more rows take more passes
constexpr int64_t kThreadBytes = 1 << 16;   // least weight bytes worth a thread of their own

#define DSR1_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define DSR1_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define DSR1_AVX2 __attribute__((target("avx2,fma,f16c")))

// R: weight rows per step, as many as keep R·M accumulators + R weights + 1 x in `regs` registers (at most 4).
constexpr int rows_for(int m, int regs) { return std::max(1, std::min(4, (regs - 1) / (m + 1))); }

// The cache line at byte `at` of each row of the next block of R rows (contiguous after this block), so a
// block's rows arrive while this one is multiplied: without it one thread read int8 at half the speed of a
// plain stream. Past the last row it prefetches memory nobody reads, which cannot fault. (Two to eight blocks
// ahead read no faster over tiny-125m's layers on the EPYC measured.)
template <int R>
inline void prefetch_next(const uint8_t* w, int64_t ldw, int64_t at) {
  for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (R + r) * ldw + at), _MM_HINT_T0);
}

// n elements of `buffer` starting at a 64-byte boundary (one cache line): the kernels load x with unaligned
// vector loads, and a row of x that straddles cache lines made every load touch two (8 rows of int8 ran 1.5x
// slower from a malloc'd buffer than from torch's aligned one).
template <typename T>
T* aligned(std::vector<T>& buffer, size_t n) {
  buffer.resize(n + 64 / sizeof(T));
  const uintptr_t at = reinterpret_cast<uintptr_t>(buffer.data());
  return reinterpret_cast<T*>((at + 63) & ~static_cast<uintptr_t>(63));
}

bool has_avx512();
bool has_avx512_vnni();
bool has_avx2();

// out (M, N) fp32 = int8_per_token(x) · W (N, K)ᵀ · s_x · scales, x fp32 (M, K) and W int8, both contiguous;
// scales fp32 (N,). Exactly the w8a8 plugin's torch formulation (see cpu_gemv_w8a8.cpp).
void w8a8_gemv(const float* x, int64_t M, int64_t K, const int8_t* w, int64_t N, const float* scales, Path p,
               float* out);

}  // namespace dsr1_gemv
