// Weight-only GEMV on the CPU for decode-sized calls: y (M, N) = x (M, K) · W (N, K)ᵀ [· scales].
//
// W is row-major (N, K), as the quant plugins store it, in one of four formats: int8 (one fp32 scale
// per output channel), bf16, fp16 or fp32; a fifth, w8a8 (int8 activations too), is cpu_gemv_w8a8.cpp's.
// At decode the cost of a linear layer is reading W, so each
// weight byte is read once per call: a thread takes R weight rows at a time, converts each vector of
// them to fp32 in registers (int8: sign-extend + cvt; bf16: zero-extend + shift by 16; fp16: cvtph)
// and multiplies it into all M rows of x (R·M fp32 accumulators, FMA), so M rows cost one pass over W.
// R follows the register file: R·M accumulators + R weight vectors + one x vector fit 32 zmm / 16 ymm.
// While a block of R rows is multiplied, the next block's rows are prefetched (prefetch_next).
// Rows of W are split across torch's intra-op threads (at::parallel_for), so torch.set_num_threads
// governs it.
//
// Three paths, picked at run time from the CPU's features (or forced by the caller, so tests reach
// each on any machine): AVX-512 (f, bw, vl: masked K tails), AVX2 + FMA + F16C (scalar K tail), and
// plain C++. Each vector function carries its own target attribute instead of -march=native: one
// build serves every machine of a torch build (the cache is keyed by torch, not by CPU).
//
// stream_read(buffer) reads a buffer with plain vector loads (and a prefetch 4 KiB ahead) on all threads:
// the bandwidth probe's "stream" way, the read speed the kernels above are judged against.
//
// Built at first use by torch.utils.cpp_extension.load (dsr1_sdk/kernels/cpu.py).
#include "cpu_gemv.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <string>
#include <vector>

namespace dsr1_gemv {

bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool has_avx512_vnni() { return has_avx512() && __builtin_cpu_supports("avx512vnni"); }
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

namespace {

// ---- AVX-512: 16 weights per vector ----------------------------------------------------------------

// out[m, n0 + r] = x[m] · W[n0 + r] (· scale) for m < M, r < R; W rows are ldw bytes apart.
template <Fmt F, int M, int R>
DSR1_AVX512 void rows_avx512(const float* x, int64_t K, const uint8_t* w, int64_t ldw, const float* scales,
                             float* out, int64_t N, int64_t n0) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (((k * kBytes<F>) & 63) == 0) prefetch_next<R>(w, ldw, k * kBytes<F>);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load16<F>(w + r * ldw, k, 0, false);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  if (k < K) {  // the last K % 16 columns, masked (zeros contribute nothing)
    const __mmask16 keep = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load16<F>(w + r * ldw, k, keep, true);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(keep, x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const float s = scales ? scales[n0 + r] : 1.0f;
    for (int m = 0; m < M; ++m) out[m * N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]) * s;
  }
}

// ---- AVX2 + FMA + F16C: 8 weights per vector -----------------------------------------------------

template <Fmt F, int M, int R>
DSR1_AVX2 void rows_avx2(const float* x, int64_t K, const uint8_t* w, int64_t ldw, const float* scales, float* out,
                         int64_t N, int64_t n0) {
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (((k * kBytes<F>) & 63) == 0) prefetch_next<R>(w, ldw, k * kBytes<F>);
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load8<F>(w + r * ldw, k);
    for (int m = 0; m < M; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const float s = scales ? scales[n0 + r] : 1.0f;
    for (int m = 0; m < M; ++m) {
      float t = hsum8(acc[r][m]);
      for (int64_t j = k; j < K; ++j) t += weight_at<F>(w + r * ldw, j) * x[m * K + j];  // K % 8 tail
      out[m * N + n0 + r] = t * s;
    }
  }
}

// ---- plain C++ -----------------------------------------------------------------------------------

template <Fmt F, int M, int R>
void rows_scalar(const float* x, int64_t K, const uint8_t* w, int64_t ldw, const float* scales, float* out,
                 int64_t N, int64_t n0) {
  for (int r = 0; r < R; ++r) {
    float acc[M] = {};
    const uint8_t* row = w + r * ldw;
    for (int64_t k = 0; k < K; ++k) {
      const float wk = weight_at<F>(row, k);
      for (int m = 0; m < M; ++m) acc[m] += wk * x[m * K + k];
    }
    const float s = scales ? scales[n0 + r] : 1.0f;
    for (int m = 0; m < M; ++m) out[m * N + n0 + r] = acc[m] * s;
  }
}

// ---- dispatch ------------------------------------------------------------------------------------

using RowsFn = void (*)(const float*, int64_t, const uint8_t*, int64_t, const float*, float*, int64_t, int64_t);

struct Kernel {
  RowsFn many;  // R rows of W at a time
  RowsFn one;   // the N % R rows left over
  int rows;     // R
};

template <Fmt F, int M>
Kernel kernel_for(Path p) {
  switch (p) {
    case kAvx512: {
      constexpr int R = rows_for(M, 32);
      return {&rows_avx512<F, M, R>, &rows_avx512<F, M, 1>, R};
    }
    case kAvx2: {
      constexpr int R = rows_for(M, 16);
      return {&rows_avx2<F, M, R>, &rows_avx2<F, M, 1>, R};
    }
    default:
      return {&rows_scalar<F, M, 1>, &rows_scalar<F, M, 1>, 1};
  }
}

template <Fmt F>
Kernel kernel_for(Path p, int m) {
  switch (m) {
    case 1: return kernel_for<F, 1>(p);
    case 2: return kernel_for<F, 2>(p);
    case 3: return kernel_for<F, 3>(p);
    case 4: return kernel_for<F, 4>(p);
    case 5: return kernel_for<F, 5>(p);
    case 6: return kernel_for<F, 6>(p);
    case 7: return kernel_for<F, 7>(p);
    default: return kernel_for<F, 8>(p);
  }
}

Kernel pick(Fmt f, Path p, int m) {
  switch (f) {
    case kInt8: return kernel_for<kInt8>(p, m);
    case kBf16: return kernel_for<kBf16>(p, m);
    case kFp16: return kernel_for<kFp16>(p, m);
    default: return kernel_for<kFp32>(p, m);
  }
}

// w8a8's AVX-512 path is built on VNNI's int8 dot products; every other format's on AVX-512 F/BW/VL/DQ.
bool runs_avx512(bool vnni) { return vnni ? has_avx512_vnni() : has_avx512(); }

Path best_path(bool vnni) { return runs_avx512(vnni) ? kAvx512 : (has_avx2() ? kAvx2 : kScalar); }

}  // namespace

Path parse_path(c10::string_view name, bool vnni) {
  if (name == "auto") return best_path(vnni);
  if (name == "avx512") {
    TORCH_CHECK(runs_avx512(vnni), "CPU GEMV path 'avx512' cannot run ", vnni ? "fmt 'w8a8' " : "",
                "on this CPU (it needs AVX-512 F/BW/VL/DQ", vnni ? " and VNNI" : "", ")");
    return kAvx512;
  }
  if (name == "avx2") {
    TORCH_CHECK(has_avx2(), "CPU GEMV path 'avx2' cannot run on this CPU (it needs AVX2, FMA and F16C)");
    return kAvx2;
  }
  TORCH_CHECK(name == "scalar", "CPU GEMV path '", std::string(name),
              "' is not a CPU GEMV path; use one of auto, avx512, avx2, scalar");
  return kScalar;
}

namespace {

Fmt parse_fmt(c10::string_view name) {
  if (name == "int8") return kInt8;
  if (name == "bf16") return kBf16;
  if (name == "fp16") return kFp16;
  if (name == "w8a8") return kW8A8;
  TORCH_CHECK(name == "fp32", "CPU GEMV fmt '", std::string(name),
              "' is unknown; use one of int8, bf16, fp16, fp32, w8a8");
  return kFp32;
}

constexpr at::ScalarType kWeightType[] = {at::kChar, at::kBFloat16, at::kHalf, at::kFloat, at::kChar};

// torch's Python name of a dtype (c10::toString says "Char" for int8)
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    default: return c10::toString(t);
  }
}

bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// Shapes and dtypes of a call (both the CPU and the meta kernel check them); returns the format.
Fmt check(const at::Tensor& x, c10::string_view fmt_name, const at::Tensor& weight,
          const c10::optional<at::Tensor>& scales) {
  const Fmt f = parse_fmt(fmt_name);
  const std::string fmt(fmt_name);
  TORCH_CHECK(weight.scalar_type() == kWeightType[f] && weight.dim() == 2, "CPU GEMV fmt '", fmt, "' takes a 2-D ",
              dtype_name(kWeightType[f]), " weight (N, K), got ", dtype_name(weight.scalar_type()), " ",
              weight.sizes());
  TORCH_CHECK(x.dim() == 2 && is_float(x.scalar_type()) && x.size(1) == weight.size(1),
              "CPU GEMV x must be a 2-D float tensor (M, ", weight.size(1), "), got ",
              dtype_name(x.scalar_type()), " ", x.sizes());
  if (f == kInt8 || f == kW8A8) {
    TORCH_CHECK(scales.has_value() && scales->dim() == 1 && scales->size(0) == weight.size(0) &&
                    is_float(scales->scalar_type()),
                "CPU GEMV fmt '", fmt, "' takes float scales of shape (", weight.size(0), ",)");
  } else {
    TORCH_CHECK(!scales.has_value(), "CPU GEMV fmt '", fmt, "' takes no scales");
  }
  return f;
}

// A float tensor's values as fp32: its own memory when it is contiguous fp32, else converted into `buffer`. A
// plain loop, not Tensor::to: per layer and token, the dispatcher's cost was most of a small layer's overhead.
const float* as_float(const at::Tensor& t, std::vector<float>& buffer) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t.data_ptr<float>();
  const at::Tensor c = t.contiguous();
  const size_t n = static_cast<size_t>(c.numel());
  float* out = aligned(buffer, n);
  if (c.scalar_type() == at::kBFloat16) {
    const c10::BFloat16* p = c.data_ptr<c10::BFloat16>();
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
  } else if (c.scalar_type() == at::kHalf) {
    const c10::Half* p = c.data_ptr<c10::Half>();
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
  } else {
    const float* p = c.data_ptr<float>();
    std::copy(p, p + n, out);
  }
  return out;
}

// n fp32 `values` rounded to out's dtype (bf16 or fp16; round to nearest even, as Tensor::to).
void store(const float* values, size_t n, at::Tensor& out) {
  if (out.scalar_type() == at::kBFloat16) {
    c10::BFloat16* p = out.data_ptr<c10::BFloat16>();
    for (size_t i = 0; i < n; ++i) p[i] = c10::BFloat16(values[i]);
  } else {
    c10::Half* p = out.data_ptr<c10::Half>();
    for (size_t i = 0; i < n; ++i) p[i] = c10::Half(values[i]);
  }
}

void gemv_into(Fmt f, Path p, const float* xp, int64_t M, int64_t K, const at::Tensor& w, int64_t N, const float* s,
               float* op);

// y (M, N) in x's dtype; x and scales are read as fp32 (converted here when they are not), the weight as it is.
at::Tensor gemv(const at::Tensor& x, c10::string_view fmt_name, const at::Tensor& weight,
                const c10::optional<at::Tensor>& scales, c10::string_view path_name) {
  const Fmt f = check(x, fmt_name, weight, scales);
  const Path p = parse_path(path_name, f == kW8A8);
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "CPU GEMV runs on CPU tensors, got x on ",
              x.device(), " and the weight on ", weight.device());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor out = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  std::vector<float> x_buffer, s_buffer, out_buffer;
  const float* xp = as_float(x, x_buffer);
  const float* s = scales.has_value() ? as_float(*scales, s_buffer) : nullptr;
  const bool fp32 = x.scalar_type() == at::kFloat;
  float* op = fp32 ? out.data_ptr<float>() : aligned(out_buffer, static_cast<size_t>(M * N));
  gemv_into(f, p, xp, M, K, weight.contiguous(), N, s, op);
  if (!fp32) store(op, static_cast<size_t>(M * N), out);
  return out;
}

// out (M, N) fp32 = x (M, K) fp32 · W (N, K)ᵀ in format f.
void gemv_into(Fmt f, Path p, const float* xp, int64_t M, int64_t K, const at::Tensor& w, int64_t N, const float* s,
               float* op) {
  if (f == kW8A8) {
    w8a8_gemv(xp, M, K, w.data_ptr<int8_t>(), N, s, p, op);
    return;
  }
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  const int64_t ldw = K * elem_bytes(f);
  const int64_t grain = std::max<int64_t>(1, kThreadBytes / ldw);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxTile) {  // each tile of 8 rows is one pass over this thread's W rows
      const int mt = static_cast<int>(std::min<int64_t>(kMaxTile, M - m0));
      const Kernel kn = pick(f, p, mt);
      const float* xt = xp + m0 * K;
      float* ot = op + m0 * N;
      int64_t n = begin;
      for (; n + kn.rows <= end; n += kn.rows) kn.many(xt, K, wp + n * ldw, ldw, s, ot, N, n);
      for (; n < end; ++n) kn.one(xt, K, wp + n * ldw, ldw, s, ot, N, n);
    }
  });
}

}  // namespace

void rows_into(Fmt f, Path p, const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t ldw, int64_t N,
               float* out) {
  const Kernel kn = pick(f, p, static_cast<int>(M));
  int64_t n = 0;
  for (; n + kn.rows <= N; n += kn.rows) kn.many(x, K, w + n * ldw, ldw, nullptr, out, N, n);
  for (; n < N; ++n) kn.one(x, K, w + n * ldw, ldw, nullptr, out, N, n);
}

namespace {

at::Tensor gemv_meta(const at::Tensor& x, c10::string_view fmt, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& scales, c10::string_view path) {
  check(x, fmt, weight, scales);
  return at::empty({x.size(0), weight.size(0)}, x.options());
}

// ---- streaming read ------------------------------------------------------------------------------

// Bytes ahead that the vector reads prefetch: on the 2-core EPYC this was written on, the hardware prefetchers
// alone left two threads near the speed of one (bench/results/cpu-gemv/ has the figures).
constexpr int64_t kStreamAhead = 4096;

// The checksum of every path: the sum of the buffer's little-endian 64-bit words, plus its last n % 8 bytes.
uint64_t sum_scalar(const uint8_t* p, int64_t n) {
  uint64_t t = 0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    t += v;
  }
  for (; i < n; ++i) t += p[i];
  return t;
}

DSR1_AVX512 uint64_t sum_avx512(const uint8_t* p, int64_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 256 <= n; i += 256) {
    for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(p + i + kStreamAhead + 64 * l), _MM_HINT_T0);
    a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_loadu_si512(p + i + 64));
    a2 = _mm512_add_epi64(a2, _mm512_loadu_si512(p + i + 128));
    a3 = _mm512_add_epi64(a3, _mm512_loadu_si512(p + i + 192));
  }
  const uint64_t t = _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
  return t + sum_scalar(p + i, n - i);
}

DSR1_AVX2 uint64_t sum_avx2(const uint8_t* p, int64_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    _mm_prefetch(reinterpret_cast<const char*>(p + i + kStreamAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + i + kStreamAhead + 64), _MM_HINT_T0);
    a0 = _mm256_add_epi64(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                     _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + sum_scalar(p + i, n - i);
}

// buffer read on all threads; the checksum (sum_scalar's) keeps the reads from being dropped.
int64_t stream_read(const at::Tensor& buffer, const std::string& path_name) {
  TORCH_CHECK(buffer.device().is_cpu() && buffer.is_contiguous(), "stream_read reads a contiguous CPU tensor");
  const Path p = parse_path(path_name);
  const uint8_t* base = static_cast<const uint8_t*>(buffer.data_ptr());
  const int64_t bytes = buffer.numel() * buffer.element_size();
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (bytes + kChunk - 1) / kChunk;
  std::vector<uint64_t> part(static_cast<size_t>(std::max<int64_t>(chunks, 1)), 0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const int64_t lo = begin * kChunk, hi = std::min(bytes, end * kChunk);
    part[begin] = p == kAvx512 ? sum_avx512(base + lo, hi - lo)
                               : (p == kAvx2 ? sum_avx2(base + lo, hi - lo) : sum_scalar(base + lo, hi - lo));
  });
  uint64_t t = 0;
  for (uint64_t v : part) t += v;
  return static_cast<int64_t>(t);
}

std::vector<std::string> paths(const std::string& fmt) {
  std::vector<std::string> out;
  if (runs_avx512(fmt == "w8a8")) out.push_back("avx512");
  if (has_avx2()) out.push_back("avx2");
  out.push_back("scalar");
  return out;
}

}  // namespace
}  // namespace dsr1_gemv

TORCH_LIBRARY_FRAGMENT(dsr1_sdk, m) {
  m.def("cpu_gemv(Tensor x, str fmt, Tensor weight, Tensor? scales, str path) -> Tensor");
}
TORCH_LIBRARY_IMPL(dsr1_sdk, CPU, m) { m.impl("cpu_gemv", &dsr1_gemv::gemv); }
TORCH_LIBRARY_IMPL(dsr1_sdk, Meta, m) { m.impl("cpu_gemv", &dsr1_gemv::gemv_meta); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("stream_read", &dsr1_gemv::stream_read, "checksum of a buffer read with vector loads on all threads",
        py::arg("buffer"), py::arg("path") = "auto");
  m.def("paths", &dsr1_gemv::paths, "the dispatch paths this CPU can run for fmt, fastest first",
        py::arg("fmt") = "");
  m.attr("MAX_TILE") = dsr1_gemv::kMaxTile;
}
