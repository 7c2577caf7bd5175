// One-query attention over a key/value cache on the CPU (decode): for each batch row b and key/value head h,
//   out[b, h, g] = softmax(scale · q[b, h, g] · K[b, h]ᵀ) · V[b, h]      for the G query heads g that share h,
// with q (B, Hkv, G, D), K and V (B, Hkv, S, D) in fp32, bf16 or fp16 (all one dtype), computed in fp32.
//
// Why it exists: torch's CPU attention kernel is written for long query blocks; for one query against a few
// hundred keys its set-up (blocking, buffers, a parallel region per call) cost more than the arithmetic, and a
// decode step calls it once per layer. Here a (b, h) pair is one task of at::parallel_for (or a range of its
// keys, when there are fewer pairs than threads: one sequence of a model with one or two key/value heads), its
// scores are the GEMV rows of cpu_gemv.cpp (the G queries against each key row, read once: K is the "weight"),
// and the weighted sum of V runs over 64 columns at a time in registers. K and V may be views of a larger cache
// (any strides, the last one 1); nothing is copied. Paths as the GEMV's: AVX-512, AVX2 + FMA + F16C, plain C++.
#include "cpu_gemv.h"

#include <c10/util/BFloat16.h>

#include <cmath>
#include <limits>
#include <vector>

namespace dsr1_gemv {
namespace {

Fmt fmt_of(at::ScalarType t) { return t == at::kBFloat16 ? kBf16 : (t == at::kHalf ? kFp16 : kFp32); }

// Fewest keys a range gets when one sequence's keys are split across threads.
constexpr int64_t kMinRangeKeys = 256;

float value_at(Fmt f, const uint8_t* p, int64_t j) {
  return f == kBf16 ? weight_at<kBf16>(p, j) : (f == kFp16 ? weight_at<kFp16>(p, j) : weight_at<kFp32>(p, j));
}

// out (G, D) = p (G, S) · V (S, D), V rows ldv bytes apart: four vectors of columns at a time, every key row's
// vectors loaded once per query head (a head's V is small enough to stay in L1/L2 between heads).
template <Fmt F>
DSR1_AVX512 void pv_avx512(const float* p, int64_t G, int64_t S, const uint8_t* v, int64_t ldv, int64_t D,
                           float* out) {
  for (int64_t g = 0; g < G; ++g) {
    const float* pg = p + g * S;
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      __mmask16 keep[4];
      bool masked[4];
      for (int j = 0; j < 4; ++j) {
        const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, D - d0 - 16 * j));
        masked[j] = left < 16;
        keep[j] = static_cast<__mmask16>((1u << left) - 1);
      }
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t s = 0; s < S; ++s) {
        const __m512 ps = _mm512_set1_ps(pg[s]);
        const uint8_t* row = v + s * ldv;
        for (int j = 0; j < 4; ++j)
          acc[j] = _mm512_fmadd_ps(ps, load16<F>(row, d0 + 16 * j, keep[j], masked[j]), acc[j]);
      }
      for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(out + g * D + d0 + 16 * j, keep[j], acc[j]);
    }
  }
}

template <Fmt F>
DSR1_AVX2 void pv_avx2(const float* p, int64_t G, int64_t S, const uint8_t* v, int64_t ldv, int64_t D, float* out) {
  const int64_t Dv = D - D % 8;  // vector columns; the D % 8 left go one by one
  for (int64_t g = 0; g < G; ++g) {
    const float* pg = p + g * S;
    for (int64_t d0 = 0; d0 < Dv; d0 += 32) {
      const int n = static_cast<int>(std::min<int64_t>(4, (Dv - d0) / 8));
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t s = 0; s < S; ++s) {
        const __m256 ps = _mm256_set1_ps(pg[s]);
        const uint8_t* row = v + s * ldv;
        for (int j = 0; j < n; ++j) acc[j] = _mm256_fmadd_ps(ps, load8<F>(row, d0 + 8 * j), acc[j]);
      }
      for (int j = 0; j < n; ++j) _mm256_storeu_ps(out + g * D + d0 + 8 * j, acc[j]);
    }
    for (int64_t d = Dv; d < D; ++d) {
      float t = 0.0f;
      for (int64_t s = 0; s < S; ++s) t += pg[s] * weight_at<F>(v + s * ldv, d);
      out[g * D + d] = t;
    }
  }
}

template <Fmt F>
void pv_scalar(const float* p, int64_t G, int64_t S, const uint8_t* v, int64_t ldv, int64_t D, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    float* o = out + g * D;
    std::fill(o, o + D, 0.0f);
    for (int64_t s = 0; s < S; ++s) {
      const float w = p[g * S + s];
      for (int64_t d = 0; d < D; ++d) o[d] += w * weight_at<F>(v + s * ldv, d);
    }
  }
}

template <Fmt F>
void pv(Path path, const float* p, int64_t G, int64_t S, const uint8_t* v, int64_t ldv, int64_t D, float* out) {
  if (path == kAvx512) {
    pv_avx512<F>(p, G, S, v, ldv, D, out);
  } else if (path == kAvx2) {
    pv_avx2<F>(p, G, S, v, ldv, D, out);
  } else {
    pv_scalar<F>(p, G, S, v, ldv, D, out);
  }
}

void pv(Fmt f, Path path, const float* p, int64_t G, int64_t S, const uint8_t* v, int64_t ldv, int64_t D,
        float* out) {
  if (f == kBf16) {
    pv<kBf16>(path, p, G, S, v, ldv, D, out);
  } else if (f == kFp16) {
    pv<kFp16>(path, p, G, S, v, ldv, D, out);
  } else {
    pv<kFp32>(path, p, G, S, v, ldv, D, out);
  }
}

// Each row of scores (G, n) as exp(score − the row's maximum), left unnormalized; the maxima go to top, the
// sums to sum (a key range's part of the softmax, merged with the other ranges' by merge_ranges).
void softmax_part(float* scores, int64_t G, int64_t n, float* top, float* sum) {
  for (int64_t g = 0; g < G; ++g) {
    float* r = scores + g * n;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < n; ++s) m = std::max(m, r[s]);
    float t = 0.0f;
    for (int64_t s = 0; s < n; ++s) t += (r[s] = std::exp(r[s] - m));
    top[g] = m;
    sum[g] = t;
  }
}

// n fp32 values · scale into out (fp32, bf16 or fp16 by f).
void store_scaled(const float* values, int64_t n, float scale, Fmt f, uint8_t* out) {
  for (int64_t d = 0; d < n; ++d) {
    const float x = values[d] * scale;
    if (f == kFp32) {
      reinterpret_cast<float*>(out)[d] = x;
    } else if (f == kBf16) {
      reinterpret_cast<c10::BFloat16*>(out)[d] = c10::BFloat16(x);
    } else {
      reinterpret_cast<c10::Half*>(out)[d] = c10::Half(x);
    }
  }
}

// The ranges' parts of each (pair, query head) as one row of out (fp32, bf16 or fp16 by f):
//   out = Σ_r e^(m_r − M) acc_r / Σ_r e^(m_r − M) l_r,   M the largest maximum m_r of the ranges.
// acc (pairs, ranges, G, D), top and sum (pairs, ranges, G) as the tasks left them.
void merge_ranges(const float* acc, const float* top, const float* sum, int64_t pairs, int64_t ranges, int64_t G,
                  int64_t D, Fmt f, uint8_t* out) {
  std::vector<float> row(static_cast<size_t>(D));
  const int64_t es = elem_bytes(f);
  for (int64_t i = 0; i < pairs; ++i) {
    for (int64_t g = 0; g < G; ++g) {
      float m = -std::numeric_limits<float>::infinity(), total = 0.0f;
      for (int64_t r = 0; r < ranges; ++r) m = std::max(m, top[(i * ranges + r) * G + g]);
      std::fill(row.begin(), row.end(), 0.0f);
      for (int64_t r = 0; r < ranges; ++r) {
        const int64_t at = (i * ranges + r) * G + g;
        const float w = std::exp(top[at] - m);
        total += w * sum[at];
        for (int64_t d = 0; d < D; ++d) row[d] += w * acc[at * D + d];
      }
      store_scaled(row.data(), D, 1.0f / total, f, out + (i * G + g) * D * es);
    }
  }
}

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "CPU decode attention takes q (B, Hkv, G, D) and k, v (B, Hkv, S, D), got ", q.sym_sizes(), ", ",
              k.sym_sizes(), ", ", v.sym_sizes());
  const auto t = q.scalar_type();
  TORCH_CHECK((t == at::kFloat || t == at::kBFloat16 || t == at::kHalf) && k.scalar_type() == t &&
                  v.scalar_type() == t,
              "CPU decode attention takes q, k and v of one float dtype (float32, bfloat16, float16), got ",
              q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.sym_sizes() == v.sym_sizes() && k.sym_size(0) == q.sym_size(0) && k.sym_size(1) == q.sym_size(1) &&
                  k.sym_size(3) == q.sym_size(3),
              "CPU decode attention: k and v must be (B, Hkv, S, D) = (", q.sym_size(0), ", ", q.sym_size(1),
              ", S, ", q.sym_size(3), ") for q ", q.sym_sizes(), ", got ", k.sym_sizes(), " and ", v.sym_sizes());
  TORCH_CHECK(k.sym_stride(3) == 1 && v.sym_stride(3) == 1,
              "CPU decode attention reads k and v rows in place: their last dimension must be contiguous");
}

at::Tensor attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v, double scale,
                     c10::string_view path_name) {
  check(q_in, k, v);
  TORCH_CHECK(k.size(2) >= 1, "CPU decode attention needs at least one key, got S = 0");
  const Path path = parse_path(path_name);
  TORCH_CHECK(q_in.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "CPU decode attention runs on CPU tensors, got q on ", q_in.device(), ", k on ", k.device(),
              ", v on ", v.device());
  const at::Tensor q = q_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), S = k.size(2);
  at::Tensor out = at::empty({B, H, G, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || H == 0 || G == 0 || D == 0) return out;
  const Fmt f = fmt_of(q.scalar_type());
  const int64_t es = elem_bytes(f);
  const uint8_t* kp = static_cast<const uint8_t*>(k.data_ptr());
  const uint8_t* vp = static_cast<const uint8_t*>(v.data_ptr());
  const uint8_t* qp = static_cast<const uint8_t*>(q.data_ptr());
  uint8_t* op = static_cast<uint8_t*>(out.data_ptr());
  const float sc = static_cast<float>(scale);
  // Tasks are (b, h, key range). With fewer (b, h) pairs than threads (one sequence of a model with one or two
  // key/value heads) the keys are split, at least kMinRangeKeys each, so every thread has work: each range keeps
  // its unnormalized weighted sum of V, its maxima and its sums, and merge_ranges combines them. Unsplit, each
  // task normalizes and writes its own rows.
  const int64_t pairs = B * H, threads = at::get_num_threads();
  int64_t ranges =
      pairs >= threads ? 1 : std::min((threads + pairs - 1) / pairs, std::max<int64_t>(1, S / kMinRangeKeys));
  const int64_t per = (S + ranges - 1) / ranges;
  ranges = (S + per - 1) / per;
  const bool split = ranges > 1;
  std::vector<float> part_acc(split ? static_cast<size_t>(pairs * ranges * G * D) : 0),
      part_top(split ? pairs * ranges * G : 0), part_sum(split ? pairs * ranges * G : 0);
  at::parallel_for(0, pairs * ranges, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf, sbuf, obuf;
    float* qf = aligned(qbuf, static_cast<size_t>(G * D));
    float* scores = aligned(sbuf, static_cast<size_t>(G * per + 2 * G));
    float* own_top = scores + G * per;
    float* own_sum = own_top + G;
    float* own_acc = split ? nullptr : aligned(obuf, static_cast<size_t>(G * D));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / ranges, s0 = (task % ranges) * per, n = std::min(per, S - s0);
      const int64_t b = i / H, h = i % H;
      const uint8_t* qi = qp + i * G * D * es;
      for (int64_t j = 0; j < G * D; ++j) qf[j] = sc * value_at(f, qi, j);
      const uint8_t* ki = kp + (b * k.stride(0) + h * k.stride(1) + s0 * k.stride(2)) * es;
      const uint8_t* vi = vp + (b * v.stride(0) + h * v.stride(1) + s0 * v.stride(2)) * es;
      for (int64_t g0 = 0; g0 < G; g0 += kMaxTile)  // q · kᵀ: the G queries against every key row of the range
        rows_into(f, path, qf + g0 * D, std::min<int64_t>(kMaxTile, G - g0), D, ki, k.stride(2) * es, n,
                  scores + g0 * n);
      float* top = split ? part_top.data() + task * G : own_top;
      float* sum = split ? part_sum.data() + task * G : own_sum;
      softmax_part(scores, G, n, top, sum);
      float* acc = split ? part_acc.data() + task * G * D : own_acc;
      pv(f, path, scores, G, n, vi, v.stride(2) * es, D, acc);
      if (!split)  // the whole softmax: normalize and write the rows here, in parallel
        for (int64_t g = 0; g < G; ++g) store_scaled(acc + g * D, D, 1.0f / sum[g], f, op + (i * G + g) * D * es);
    }
  });
  if (split) merge_ranges(part_acc.data(), part_top.data(), part_sum.data(), pairs, ranges, G, D, f, op);
  return out;
}

at::Tensor attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                          c10::string_view path) {
  check(q, k, v);
  return at::empty_symint(q.sym_sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace
}  // namespace dsr1_gemv

TORCH_LIBRARY_FRAGMENT(dsr1_sdk, m) {
  m.def("cpu_decode_attention(Tensor q, Tensor k, Tensor v, float scale, str path) -> Tensor");
}
TORCH_LIBRARY_IMPL(dsr1_sdk, CPU, m) { m.impl("cpu_decode_attention", &dsr1_gemv::attention); }
TORCH_LIBRARY_IMPL(dsr1_sdk, Meta, m) { m.impl("cpu_decode_attention", &dsr1_gemv::attention_meta); }
