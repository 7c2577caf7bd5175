// What the CPU kernels' sources share (cpu_gemv.cpp: the GEMV op, the float and weight-only int8 formats, the
// streaming read; cpu_gemv_w8a8.cpp: int8 weights times int8 activations; cpu_attention.cpp: one-query
// attention over a key/value cache). Built together as one extension by dsr1_sdk/kernels/cpu.py.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
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

// The weight formats (cpu.py's FORMATS) and, for the vector paths, a vector of weights as fp32.
enum Fmt { kInt8 = 0, kBf16 = 1, kFp16 = 2, kFp32 = 3, kW8A8 = 4 };

inline int elem_bytes(Fmt f) { return f == kInt8 || f == kW8A8 ? 1 : (f == kFp32 ? 4 : 2); }

template <Fmt F>
constexpr int64_t kBytes = F == kInt8 ? 1 : (F == kFp32 ? 4 : 2);

template <Fmt F>
DSR1_AVX512 inline __m512 load16(const uint8_t* w, int64_t k, __mmask16 keep, bool masked) {
  if constexpr (F == kInt8) {
    const __m128i b = masked ? _mm_maskz_loadu_epi8(keep, w + k)
                             : _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  } else if constexpr (F == kBf16) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(w) + k;
    const __m256i h = masked ? _mm256_maskz_loadu_epi16(keep, p)
                             : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else if constexpr (F == kFp16) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(w) + k;
    const __m256i h = masked ? _mm256_maskz_loadu_epi16(keep, p)
                             : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_cvtph_ps(h);
  } else {
    const float* p = reinterpret_cast<const float*>(w) + k;
    return masked ? _mm512_maskz_loadu_ps(keep, p) : _mm512_loadu_ps(p);
  }
}

// ---- AVX2 + FMA + F16C: 8 weights per vector -----------------------------------------------------

template <Fmt F>
DSR1_AVX2 inline __m256 load8(const uint8_t* w, int64_t k) {
  if constexpr (F == kInt8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  } else if constexpr (F == kBf16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint16_t*>(w) + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (F == kFp16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint16_t*>(w) + k));
    return _mm256_cvtph_ps(h);
  } else {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(w) + k);
  }
}

DSR1_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <Fmt F>
inline float weight_at(const uint8_t* w, int64_t k) {
  if constexpr (F == kInt8) {
    return static_cast<float>(reinterpret_cast<const int8_t*>(w)[k]);
  } else if constexpr (F == kBf16) {
    const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(w)[k]) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  } else if constexpr (F == kFp16) {
    return static_cast<float>(c10::Half(reinterpret_cast<const uint16_t*>(w)[k], c10::Half::from_bits()));
  } else {
    return reinterpret_cast<const float*>(w)[k];
  }
}

bool has_avx512();
bool has_avx512_vnni();
bool has_avx2();

// The path a call names ("auto": the fastest this CPU runs); a wrong name is a one-line error. vnni: for fmt w8a8.
Path parse_path(c10::string_view name, bool vnni = false);

// out (M, N) fp32 = x (M, K) fp32 · W (N, K)ᵀ on the calling thread, for M ≤ kMaxTile and a float format (fp32,
// bf16, fp16) whose rows lie ldw bytes apart: the decode attention's q · kᵀ (cpu_attention.cpp).
void rows_into(Fmt f, Path p, const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t ldw, int64_t N,
               float* out);

// out (M, N) fp32 = int8_per_token(x) · W (N, K)ᵀ · s_x · scales, x fp32 (M, K) and W int8, both contiguous;
// scales fp32 (N,). Exactly the w8a8 plugin's torch formulation (see cpu_gemv_w8a8.cpp).
void w8a8_gemv(const float* x, int64_t M, int64_t K, const int8_t* w, int64_t N, const float* scales, Path p,
               float* out);

}  // namespace dsr1_gemv
