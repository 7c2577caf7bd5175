// int8 weights times int8 activations on the CPU for decode-sized calls: the w8a8 plugin's product
//   y = (q · Wᵀ) · s_x · s_w,   q = round(x / s_x),   s_x = max(max|x_row| / 127, 1e-12) per row of x,
// done operation for operation as its torch formulation does (the same fp32 division, round half to even,
// exact int32 sums, the same two fp32 products in the same order), so the result is the same bit for bit.
//
// Why it exists beside the weight-only int8 kernel: with both operands int8, one AVX-512 VNNI instruction
// (vpdpbusd) multiplies 64 weight bytes into 16 int32 sums, where converting weights to fp32 takes three
// instructions per 16, which on two cores left the weight-only kernel below the memory's read speed.
// vpdpbusd multiplies unsigned by signed bytes, so x is stored as q + 128 and 128 · Σ w (summed by a second
// vpdpbusd against ones, once per weight row and pass) is taken off at the end. The AVX2 path (no VNNI on
// most CPUs without AVX-512) multiplies |q| by w carrying q's sign with vpmaddubsw (a pair sums to at most
// 2 · 127 · 127, so nothing saturates) and widens with vpmaddwd. Threads split the weight rows as in
// cpu_gemv.cpp; all M rows of x (at most kMaxTile per pass) meet each weight vector once.
#include "cpu_gemv.h"

#include <cmath>
#include <vector>

namespace dsr1_gemv {
namespace {

constexpr float kQmax = 127.0f;
// K up to which Σ (q + 128) · w fits an int32: 255 · 127 · K < 2^31.
constexpr int64_t kMaxK = 65536;

// q = clamp(round(x / sc)) for k in [from, K): round half to even (the default rounding mode), as torch.round.
void quantize_tail(const float* x, int64_t from, int64_t K, float sc, int8_t* q) {
  for (int64_t k = from; k < K; ++k)
    q[k] = static_cast<int8_t>(std::min(std::max(std::nearbyint(x[k] / sc), -kQmax), kQmax));
}

// One row, eight at a time: the same division and rounding as quantize_tail (without AVX2, nearbyint is a libm
// call per element, a few microseconds per token at these widths).
DSR1_AVX2 void quantize_avx2(const float* x, int64_t K, float sc, int8_t* q) {
  const __m256 d = _mm256_set1_ps(sc), lo = _mm256_set1_ps(-kQmax), hi = _mm256_set1_ps(kQmax);
  int64_t k = 0;
  alignas(32) int32_t lanes[8];
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), d),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                       _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi)));
    for (int i = 0; i < 8; ++i) q[k + i] = static_cast<int8_t>(lanes[i]);
  }
  quantize_tail(x, k, K, sc, q);
}

// Each row of x → int8 q (zero from K to Kp) and its scale: the plugin's int8_per_token, step for step.
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t Kp, int8_t* q, float* s) {
  const bool avx2 = has_avx2();
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float amax = 0.0f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
    const float sc = std::max(amax / kQmax, 1e-12f);
    int8_t* qr = q + m * Kp;
    if (avx2) {
      quantize_avx2(xr, K, sc, qr);
    } else {
      quantize_tail(xr, 0, K, sc, qr);
    }
    std::fill(qr + K, qr + Kp, 0);
    s[m] = sc;
  }
}

// The fp32 result of one dot product, as torch's `acc.float() * xs * scales` rounds it.
inline float rescale(int32_t dot, float sx, float sw) { return static_cast<float>(dot) * sx * sw; }

// out[m, n0 + r] for m < M, r < R. xu: (M, Kp) q + 128 as unsigned bytes; W rows ldw bytes apart.
template <int M, int R>
DSR1_AVX512_VNNI void rows_vnni(const uint8_t* xu, int64_t Kp, int64_t K, const int8_t* w, int64_t ldw,
                                const float* sx, const float* scales, float* out, int64_t N, int64_t n0) {
  __m512i acc[R][M], comp[R];
  for (int r = 0; r < R; ++r) {
    comp[r] = _mm512_setzero_si512();
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_si512();
  }
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t k = 0; k < K; k += 64) {
    prefetch_next<R>(reinterpret_cast<const uint8_t*>(w), ldw, k);
    const int64_t left = K - k;
    const __mmask64 keep = left >= 64 ? ~0ULL : ((1ULL << left) - 1);  // the tail's weights read as 0
    __m512i wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = _mm512_maskz_loadu_epi8(keep, w + r * ldw + k);
      comp[r] = _mm512_dpbusd_epi32(comp[r], ones, wv[r]);
    }
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_loadu_si512(xu + m * Kp + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbusd_epi32(acc[r][m], xv, wv[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const int32_t bias = 128 * _mm512_reduce_add_epi32(comp[r]);
    for (int m = 0; m < M; ++m)
      out[m * N + n0 + r] = rescale(_mm512_reduce_add_epi32(acc[r][m]) - bias, sx[m], scales[n0 + r]);
  }
}

DSR1_AVX2 inline int32_t hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// As rows_vnni with xq: (M, Kp) q as signed bytes.
template <int M, int R>
DSR1_AVX2 void rows_avx2(const int8_t* xq, int64_t Kp, int64_t K, const int8_t* w, int64_t ldw, const float* sx,
                         const float* scales, float* out, int64_t N, int64_t n0) {
  __m256i acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if ((k & 63) == 0) prefetch_next<R>(reinterpret_cast<const uint8_t*>(w), ldw, k);
    __m256i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw + k));
    for (int m = 0; m < M; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * Kp + k));
      const __m256i ax = _mm256_abs_epi8(xv);
      for (int r = 0; r < R; ++r) {
        const __m256i pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[r], xv));  // q·w, two per int16
        acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      int32_t dot = hsum8i(acc[r][m]);
      for (int64_t j = k; j < K; ++j) dot += int32_t{xq[m * Kp + j]} * int32_t{w[r * ldw + j]};  // K % 32 tail
      out[m * N + n0 + r] = rescale(dot, sx[m], scales[n0 + r]);
    }
}

template <int M, int R>
void rows_scalar(const int8_t* xq, int64_t Kp, int64_t K, const int8_t* w, int64_t ldw, const float* sx,
                 const float* scales, float* out, int64_t N, int64_t n0) {
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      int32_t dot = 0;
      for (int64_t j = 0; j < K; ++j) dot += int32_t{xq[m * Kp + j]} * int32_t{w[r * ldw + j]};
      out[m * N + n0 + r] = rescale(dot, sx[m], scales[n0 + r]);
    }
}

// x is passed as bytes: q + 128 for the VNNI path, q for the others.
using RowsFn = void (*)(const int8_t*, int64_t, int64_t, const int8_t*, int64_t, const float*, const float*, float*,
                        int64_t, int64_t);

template <int M, int R>
void vnni_entry(const int8_t* x, int64_t Kp, int64_t K, const int8_t* w, int64_t ldw, const float* sx,
                const float* scales, float* out, int64_t N, int64_t n0) {
  rows_vnni<M, R>(reinterpret_cast<const uint8_t*>(x), Kp, K, w, ldw, sx, scales, out, N, n0);
}

struct Kernel {
  RowsFn many, one;
  int rows;
};

template <int M>
Kernel kernel_for(Path p) {
  switch (p) {
    case kAvx512: {
      constexpr int R = rows_for(M + 1, 32);  // + the R compensation sums
      return {&vnni_entry<M, R>, &vnni_entry<M, 1>, R};
    }
    case kAvx2: {
      constexpr int R = rows_for(M, 12);  // + |x|, the signed weight and the pair sums per step
      return {&rows_avx2<M, R>, &rows_avx2<M, 1>, R};
    }
    default:
      return {&rows_scalar<M, 1>, &rows_scalar<M, 1>, 1};
  }
}

Kernel pick(Path p, int m) {
  switch (m) {
    case 1: return kernel_for<1>(p);
    case 2: return kernel_for<2>(p);
    case 3: return kernel_for<3>(p);
    case 4: return kernel_for<4>(p);
    case 5: return kernel_for<5>(p);
    case 6: return kernel_for<6>(p);
    case 7: return kernel_for<7>(p);
    default: return kernel_for<8>(p);
  }
}

}  // namespace

void w8a8_gemv(const float* x, int64_t M, int64_t K, const int8_t* w, int64_t N, const float* scales, Path p,
               float* out) {
  TORCH_CHECK(K <= kMaxK, "CPU GEMV fmt 'w8a8' sums in int32 and takes K up to ", kMaxK, ", got ", K);
  const int64_t Kp = (K + 63) / 64 * 64;  // whole 64-byte vectors of x for the VNNI path
  std::vector<int8_t> q_buffer;
  int8_t* q = aligned(q_buffer, static_cast<size_t>(M * Kp));
  std::vector<float> sx(static_cast<size_t>(M));
  quantize_rows(x, M, K, Kp, q, sx.data());
  if (p == kAvx512)  // q + 128 as an unsigned byte is q with its top bit flipped
    for (int64_t i = 0; i < M * Kp; ++i) q[i] = static_cast<int8_t>(static_cast<uint8_t>(q[i]) ^ 0x80u);
  const int64_t grain = std::max<int64_t>(1, kThreadBytes / K);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxTile) {
      const int mt = static_cast<int>(std::min<int64_t>(kMaxTile, M - m0));
      const Kernel kn = pick(p, mt);
      const int8_t* xt = q + m0 * Kp;
      float* ot = out + m0 * N;
      int64_t n = begin;
      for (; n + kn.rows <= end; n += kn.rows) kn.many(xt, Kp, K, w + n * K, K, sx.data() + m0, scales, ot, N, n);
      for (; n < end; ++n) kn.one(xt, Kp, K, w + n * K, K, sx.data() + m0, scales, ot, N, n);
    }
  });
}

}  // namespace dsr1_gemv
