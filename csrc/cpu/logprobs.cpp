// Token log-probs and entropy on the CPU (vapo_kernels/ops/token_logprobs.py has the maths and,
// in the docstrings of reference_forward / reference_backward, the kernel contract).
//
// Forward, per row, one pass over memory: the row is walked in blocks of kBlock logits
// small enough to stay in L1. Each block is read twice from cache - once for its maximum
// (cheap), once for the exponentials - and folds into a running (M, S, W):
//   M = max z seen so far,   S = sum exp(x),   W = sum exp(x) * x,   x = (z - M) / tau,
// rescaled by exp(dM / tau) when M grows. Then log_norm = log S and
// entropy = log S - W / S: W is taken relative to the max, so the entropy of a row of
// huge logits (+-1e4) is not the difference of two huge numbers. A row too long for the
// threads available is cut into segments whose (M, S, W) merge the same way. The row's
// stats (M, log_norm) go to the backward (lse = M / tau + log_norm is never formed).
//
// Backward, per element, with t = (z - M) / tau - log_norm = log p:
//   dz = (g_lp * (onehot - p) + g_H * p * (E_s - s)) / tau = p * (c1 - g_H / tau * t)
// where E_s - s = -(t + H) and c1 = -(g_lp + g_H * H) / tau; the target's onehot term is
// patched in afterwards from its logit, read before its part of the row is written (the
// output may be the logits themselves). t is measured from the max as in the forward:
// z - M is exact near the max, so a dominant logit gets t = 0 and p = 1 exactly, where
// z / tau - lse subtracted two numbers ~1e4 with ~ulp(1e4) of rounding each in float
// (a gradient ~1e-4 off at tau = 1.3, ~1e-3 at tau = 0.7).
//
// The exponential is the cost. GCC does not vectorise libm's expf without -ffast-math,
// so the float path uses its own: 2^k * exp(r) with k = round(x / ln2) and a degree-7
// Taylor polynomial for |r| <= ln2 / 2 (truncation 8e-9 relative, below fp32 rounding),
// results below e^-87 flushed to 0. It is written with GCC/Clang vector extensions so
// that the code is vectorised whatever the optimiser decides, and compiled three times
// (SSE2 baseline, AVX2+FMA, AVX-512) with the widest one the CPU supports and torch's
// ATEN_CPU_CAPABILITY allows picked at run time. fp64 logits use std::exp lane by lane:
// they are for tests and references, where accuracy matters more than speed.
//
// -inf logits give exp = 0 and, since x is clamped to a finite floor before it multiplies
// exp(x), never 0 * inf = NaN. NaN logits give NaN outputs (+inf ones too, like
// torch.logsumexp): the exp pass carries a NaN into the sums, and a block the max pass
// would skip (its other logits all -inf) makes the row's partial NaN.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/native/DispatchStub.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "mask.h"
#include "logprobs_rows.h"
#include "simd.h"

#if VAPO_X86_MULTIVERSION
#include <immintrin.h>
#endif

#if VAPO_X86_MULTIVERSION
#define VAPO_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#endif

namespace vapo {
namespace {

constexpr int64_t kBlock = 1024;         // logits per block: a 4 KiB fp32 tile, stays in L1
constexpr int64_t kMinSegment = 16384;   // shortest piece of a row worth a thread of its own
constexpr int64_t kMinWorkPerTask = 32768;  // logits per parallel_for grain

// Domain of the exponential. Clamping with selects keeps NaN (both compares are false)
// and maps -inf to a finite floor whose exp is 0, so exp(x) * x is 0, not NaN. For
// float the bounds also keep 2^k a normal number (|k| <= 127).
template <typename T>
struct ExpDomain;
template <>
struct ExpDomain<float> {
  static constexpr float lo = -88.0f, hi = 88.0f;
};
template <>
struct ExpDomain<double> {
  static constexpr double lo = -1000.0, hi = 1000.0;
};

template <typename T, int W>
VAPO_INLINE Vec<T, W> clamp_exp_arg(const Vec<T, W>& v) {
  const Vec<T, W> lo = splat<T, W>(ExpDomain<T>::lo), hi = splat<T, W>(ExpDomain<T>::hi);
  const Vec<T, W> x = v < lo ? lo : v;
  return x > hi ? hi : x;
}

// exp of clamped arguments (see clamp_exp_arg), vectorised.
template <int W>
VAPO_INLINE Vec<float, W> vexp(const Vec<float, W>& x) {
  using VF = Vec<float, W>;
  using VU = Vec<uint32_t, W>;
  // Adding 1.5 * 2^23 rounds x / ln2 to an integer k held in the low mantissa bits.
  constexpr float kRound = 12582912.0f;
  constexpr float kLog2e = 1.44269504088896341f;
  // ln2 split in two so that k * kLn2Hi is exact for |k| <= 127 (kLn2Hi has 9 bits).
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440054690583e-4f;
  const VF t = x * kLog2e + kRound;
  const VF k = t - kRound;
  VF r = x - k * kLn2Hi;
  r = r - k * kLn2Lo;
  VF p = r * (1.0f / 5040.0f) + (1.0f / 720.0f);
  p = p * r + (1.0f / 120.0f);
  p = p * r + (1.0f / 24.0f);
  p = p * r + (1.0f / 6.0f);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^k from the bits of t: (k + 127) << 23 is the float exponent field. Unsigned
  // arithmetic, so that the garbage bits of a NaN wrap instead of overflowing.
  const VU bits = ((VU)t - (0x4B400000u - 127u)) << 23;
  const VF e = p * (VF)bits;
  const VF zero = {};
  return x < splat<float, W>(-87.0f) ? zero : e;  // 2^k would leave the normal range
}

template <int W>
VAPO_INLINE Vec<double, W> vexp(const Vec<double, W>& x) {
  Vec<double, W> e;
  for (int k = 0; k < W; ++k) e[k] = std::exp(x[k]);
  return e;
}

template <typename T, int W>
VAPO_INLINE double hsum(const Vec<T, W>& v) {
  double s = 0;
  for (int k = 0; k < W; ++k) s += static_cast<double>(v[k]);
  return s;
}

// Max of z[0, n); NaN is skipped (it still reaches the outputs through the exp pass).
template <typename T, int W>
VAPO_INLINE T block_max(const T* z, int64_t n) {
  using V = Vec<T, W>;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  // Four independent chains: one would be bound by the latency of the compare.
  V m0 = splat<T, W>(kNegInf), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    const V a = load<V>(z + i), b = load<V>(z + i + W);
    const V c = load<V>(z + i + 2 * W), d = load<V>(z + i + 3 * W);
    m0 = a > m0 ? a : m0;
    m1 = b > m1 ? b : m1;
    m2 = c > m2 ? c : m2;
    m3 = d > m3 ? d : m3;
  }
  for (; i + W <= n; i += W) {
    const V a = load<V>(z + i);
    m0 = a > m0 ? a : m0;
  }
  m0 = m1 > m0 ? m1 : m0;
  m2 = m3 > m2 ? m3 : m2;
  m0 = m2 > m0 ? m2 : m0;
  T m = kNegInf;
  for (int k = 0; k < W; ++k) m = m0[k] > m ? m0[k] : m;
  for (; i < n; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

// One vector of the forward sums: vs += exp(x), vw += exp(x) * x, x = (z - m) * inv_tau.
template <typename T, int W>
VAPO_INLINE void exp_sums_step(const Vec<T, W>& z, const Vec<T, W>& m, const Vec<T, W>& inv_tau,
                               Vec<T, W>& vs, Vec<T, W>& vw) {
  const Vec<T, W> x = clamp_exp_arg<T, W>((z - m) * inv_tau);
  const Vec<T, W> e = vexp<W>(x);
  vs += e;
  vw += e * x;
}

// Adds sum exp(x) and sum exp(x) * x over z[0, n), x = (z - m) * inv_tau, to s and w.
template <typename T, int W>
VAPO_INLINE void block_exp_sums(const T* z, int64_t n, T m, T inv_tau, double& s, double& w) {
  using V = Vec<T, W>;
  const V vm = splat<T, W>(m), vt = splat<T, W>(inv_tau);
  V vs = {}, vw = {};
  int64_t i = 0;
  for (; i + W <= n; i += W) exp_sums_step<T, W>(load<V>(z + i), vm, vt, vs, vw);
  if (i < n) {  // tail padded with -inf, whose exp is 0
    T buf[W];
    std::fill(buf, buf + W, -std::numeric_limits<T>::infinity());
    std::copy(z + i, z + n, buf);
    exp_sums_step<T, W>(load<V>(buf), vm, vt, vs, vw);
  }
  s += hsum<T, W>(vs);
  w += hsum<T, W>(vw);
}

// One vector of the backward: p * (c1 - gh * t), t = (z - m) * inv_tau - log_norm,
// p = exp(t).
template <typename T, int W>
VAPO_INLINE Vec<T, W> grad_step(const Vec<T, W>& z, const Vec<T, W>& m,
                                const Vec<T, W>& inv_tau, const Vec<T, W>& log_norm,
                                const Vec<T, W>& c1, const Vec<T, W>& gh) {
  const Vec<T, W> t = clamp_exp_arg<T, W>((z - m) * inv_tau - log_norm);
  return vexp<W>(t) * (c1 - gh * t);
}

// out[i] = grad_step(z[i]) for i < n. Reads each vector before writing it, so out == z
// is fine.
template <typename T, int W>
VAPO_INLINE void block_grad(const T* z, T* out, int64_t n, T m, T inv_tau, T log_norm, T c1,
                            T gh) {
  using V = Vec<T, W>;
  const V vm = splat<T, W>(m), vt = splat<T, W>(inv_tau), vl = splat<T, W>(log_norm);
  const V vc = splat<T, W>(c1), vg = splat<T, W>(gh);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    store(out + i, grad_step<T, W>(load<V>(z + i), vm, vt, vl, vc, vg));
  }
  if (i < n) {
    T buf[W] = {};
    std::copy(z + i, z + n, buf);
    const V g = grad_step<T, W>(load<V>(buf), vm, vt, vl, vc, vg);
    std::memcpy(buf, &g, sizeof(V));
    std::copy(buf, buf + (n - i), out + i);
  }
}

// A row, or a segment of one, summarised: M (in logit units), S and W relative to M.
struct Partial {
  double m = -std::numeric_limits<double>::infinity();
  double s = 0, w = 0;
};

// Re-expresses p relative to a larger max: x shifts by d = (p.m - m) / tau <= 0.
inline void rebase(Partial& p, double m, double tau) {
  if (p.m > -std::numeric_limits<double>::infinity()) {  // else S = W = 0 already
    const double d = (p.m - m) / tau;
    const double c = std::exp(d);
    p.w = c * (p.w + d * p.s);
    p.s = c * p.s;
  }
  p.m = m;
}

// A segment that held a NaN logit: the row's outputs are NaN (see forward_segment).
inline Partial nan_partial() {
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  return {kNaN, kNaN, kNaN};
}

inline Partial merge(Partial a, const Partial& b, double tau) {
  if (std::isnan(b.m)) return b;  // NaN wins, before the -inf tests below drop it
  if (std::isnan(a.m)) return a;
  if (!(b.m > -std::numeric_limits<double>::infinity())) return a;
  if (!(a.m > -std::numeric_limits<double>::infinity())) return b;
  Partial c = b;
  const double m = std::max(a.m, b.m);
  rebase(a, m, tau);
  rebase(c, m, tau);
  return {m, a.s + c.s, a.w + c.w};
}

// The row's outputs from its merged partial and its target logit. Relative to the max,
// so no rounding of M / tau lands on logp or the entropy. std::min / std::max with the
// value first keep NaN, like torch's clamp. Every logit -inf (invalid input): what the
// reference gives (m = log_norm = -inf, entropy 0, logp NaN).
inline RowStats row_stats(const Partial& p, double z_y, double tau) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  if (p.m == -kInf) return {-kInf, -kInf, 0.0, std::numeric_limits<double>::quiet_NaN()};
  const double log_s = std::log(p.s);
  return {p.m, log_s, std::max(log_s - p.w / p.s, 0.0), std::min((z_y - p.m) / tau - log_s, 0.0)};
}

#if VAPO_X86_MULTIVERSION
// fp16 <-> fp32 by the F16C instructions, 8 at a time; return how many were converted.
// Plain (not always-inline) functions: an AVX2 body cannot be forced into the
// baseline-ISA helpers below, but can be inlined into the AVX2/AVX-512 entry points.
VAPO_TARGET_AVX2 int64_t half_to_float_f16c(const c10::Half* in, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  return i;
}

VAPO_TARGET_AVX2 int64_t float_to_half_f16c(const float* in, int64_t n, c10::Half* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  return i;
}
#endif

// Pointer to z[0, n) in the accumulation type: z itself, or a converted copy in `tile`.
// GCC vectorises the bf16 conversions (shifts) by itself but not c10's fp16 ones, which
// branch; where F16C is there the hardware converts (IEEE round to nearest even, as c10).
template <typename scalar_t, typename T, int kBytes>
VAPO_INLINE const T* as_acc(const scalar_t* z, int64_t n, T* tile) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return z;
  } else {
    int64_t i = 0;
#if VAPO_X86_MULTIVERSION
    if constexpr (std::is_same_v<scalar_t, c10::Half> && kBytes >= 32) {
      i = half_to_float_f16c(z, n, tile);
    }
#endif
    for (; i < n; ++i) tile[i] = static_cast<T>(z[i]);
    return tile;
  }
}

template <typename scalar_t, typename T, int kBytes>
VAPO_INLINE void from_acc(const T* tile, int64_t n, scalar_t* out) {
  int64_t i = 0;
#if VAPO_X86_MULTIVERSION
  if constexpr (std::is_same_v<scalar_t, c10::Half> && kBytes >= 32) {
    i = float_to_half_f16c(tile, n, out);
  }
#endif
  for (; i < n; ++i) out[i] = static_cast<scalar_t>(tile[i]);
}

template <typename scalar_t, int kBytes>
VAPO_INLINE Partial forward_segment(const scalar_t* z, int64_t n, double tau) {
  using T = at::opmath_type<scalar_t>;
  constexpr int W = kBytes / sizeof(T);
  const T inv_tau = static_cast<T>(1.0 / tau);
  alignas(64) T tile[std::is_same_v<scalar_t, T> ? 1 : kBlock];
  Partial acc;
  for (int64_t lo = 0; lo < n; lo += kBlock) {
    const int64_t len = std::min(kBlock, n - lo);
    const T* blk = as_acc<scalar_t, T, kBytes>(z + lo, len, tile);
    const T bm = block_max<T, W>(blk, len);  // NaN skipped: the exp pass carries it
    if (!(bm > -std::numeric_limits<T>::infinity())) {  // all -inf: adds nothing - unless
      for (int64_t i = 0; i < len; ++i) {                // a NaN is there, which no pass
        if (blk[i] != blk[i]) return nan_partial();      // would read
      }
      continue;
    }
    if (bm > acc.m) rebase(acc, bm, tau);
    block_exp_sums<T, W>(blk, len, static_cast<T>(acc.m), inv_tau, acc.s, acc.w);
  }
  return acc;
}

template <typename scalar_t, int kBytes>
VAPO_INLINE void backward_segment(const scalar_t* z, scalar_t* out, int64_t n, double tau,
                                  double m, double log_norm, double c1, double gh) {
  using T = at::opmath_type<scalar_t>;
  constexpr int W = kBytes / sizeof(T);
  const T inv_tau = static_cast<T>(1.0 / tau);
  // m is a logit (exact in T); log_norm is small, so its rounding to T costs ~1e-7.
  const T m_t = static_cast<T>(m), ln_t = static_cast<T>(log_norm);
  const T c1_t = static_cast<T>(c1), gh_t = static_cast<T>(gh);
  if constexpr (std::is_same_v<scalar_t, T>) {
    block_grad<T, W>(z, out, n, m_t, inv_tau, ln_t, c1_t, gh_t);
  } else {
    // Whole block converted in before any of it is written: in-place safe.
    alignas(64) T tile[kBlock];
    for (int64_t lo = 0; lo < n; lo += kBlock) {
      const int64_t len = std::min(kBlock, n - lo);
      as_acc<scalar_t, T, kBytes>(z + lo, len, tile);
      block_grad<T, W>(tile, tile, len, m_t, inv_tau, ln_t, c1_t, gh_t);
      from_acc<scalar_t, T, kBytes>(tile, len, out + lo);
    }
  }
}

// One entry point per ISA; the helpers above are inlined into each.
template <typename scalar_t>
Partial forward_base(const scalar_t* z, int64_t n, double tau) {
  return forward_segment<scalar_t, 16>(z, n, tau);
}
template <typename scalar_t>
void backward_base(const scalar_t* z, scalar_t* out, int64_t n, double tau, double m,
                   double log_norm, double c1, double gh) {
  backward_segment<scalar_t, 16>(z, out, n, tau, m, log_norm, c1, gh);
}

#if VAPO_X86_MULTIVERSION
template <typename scalar_t>
VAPO_TARGET_AVX2 Partial forward_avx2(const scalar_t* z, int64_t n, double tau) {
  return forward_segment<scalar_t, 32>(z, n, tau);
}
template <typename scalar_t>
VAPO_TARGET_AVX2 void backward_avx2(const scalar_t* z, scalar_t* out, int64_t n, double tau,
                                    double m, double log_norm, double c1, double gh) {
  backward_segment<scalar_t, 32>(z, out, n, tau, m, log_norm, c1, gh);
}
template <typename scalar_t>
VAPO_TARGET_AVX512 Partial forward_avx512(const scalar_t* z, int64_t n, double tau) {
  return forward_segment<scalar_t, 64>(z, n, tau);
}
template <typename scalar_t>
VAPO_TARGET_AVX512 void backward_avx512(const scalar_t* z, scalar_t* out, int64_t n,
                                        double tau, double m, double log_norm, double c1,
                                        double gh) {
  backward_segment<scalar_t, 64>(z, out, n, tau, m, log_norm, c1, gh);
}
#endif

enum class Isa { kBase, kAvx2, kAvx512 };

// Widest ISA that the CPU has and torch's ATEN_CPU_CAPABILITY allows (a user capping
// torch at AVX2, e.g. against AVX-512 downclocking, caps these kernels too).
Isa cpu_isa() {
#if VAPO_X86_MULTIVERSION
  static const Isa isa = [] {
    const std::string cap = at::get_cpu_capability();
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512vl");
    if (avx512 && cap.rfind("AVX512", 0) == 0) return Isa::kAvx512;
    if (avx2 && (cap.rfind("AVX2", 0) == 0 || cap.rfind("AVX512", 0) == 0)) return Isa::kAvx2;
    return Isa::kBase;
  }();
  return isa;
#else
  return Isa::kBase;
#endif
}

template <typename scalar_t>
using ForwardFn = Partial (*)(const scalar_t*, int64_t, double);
template <typename scalar_t>
using BackwardFn = void (*)(const scalar_t*, scalar_t*, int64_t, double, double, double, double,
                            double);

template <typename scalar_t>
ForwardFn<scalar_t> pick_forward() {
#if VAPO_X86_MULTIVERSION
  switch (cpu_isa()) {
    case Isa::kAvx512: return &forward_avx512<scalar_t>;
    case Isa::kAvx2: return &forward_avx2<scalar_t>;
    default: break;
  }
#endif
  return &forward_base<scalar_t>;
}

template <typename scalar_t>
BackwardFn<scalar_t> pick_backward() {
#if VAPO_X86_MULTIVERSION
  switch (cpu_isa()) {
    case Isa::kAvx512: return &backward_avx512<scalar_t>;
    case Isa::kAvx2: return &backward_avx2<scalar_t>;
    default: break;
  }
#endif
  return &backward_base<scalar_t>;
}

// The gradient of a row, or of the piece [lo, lo + len) of one: every element through
// the backward segment, then the target's onehot term patched in from its logit, read
// before the piece is written (out may be the logits). yl: the target relative to lo;
// (m, log_norm, h) the row's stats and entropy from the forward.
template <typename scalar_t>
void backward_piece(BackwardFn<scalar_t> segment, const scalar_t* z, scalar_t* out, int64_t len,
                    int64_t yl, double tau, double m, double log_norm, double h, double glp,
                    double gh) {
  const double inv_tau = 1.0 / tau;
  const bool has_target = yl >= 0 && yl < len;
  const double z_y = has_target ? static_cast<double>(z[yl]) : 0.0;
  // The forward's shift: m, or 0 for a row of -inf logits (whose gradient is then NaN,
  // as its logp is) or with a +inf one; inf - inf would be NaN.
  const double shift = std::isfinite(m) ? m : 0.0;
  segment(z, out, len, tau, shift, log_norm, -(glp + gh * h) * inv_tau, gh * inv_tau);
  if (has_target) {
    const double t_y = (z_y - shift) / tau - log_norm;
    const double p_y = std::exp(t_y);
    const double ent_term = p_y > 0 ? gh * p_y * (-t_y - h) : 0.0;  // 0, not 0 * inf
    out[yl] = static_cast<scalar_t>((glp * (1.0 - p_y) + ent_term) * inv_tau);
  }
}

// How rows are cut: whole rows when there are enough to feed the threads, else each row
// into `segments` pieces of `seg_len` logits (a multiple of kBlock).
struct Plan {
  int64_t segments, seg_len, grain;
};

Plan plan(int64_t rows, int64_t vocab) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t segments = 1;
  if (rows < 2 * threads) {
    const int64_t wanted = (2 * threads + std::max<int64_t>(rows, 1) - 1) / std::max<int64_t>(rows, 1);
    segments = std::max<int64_t>(1, std::min(wanted, vocab / kMinSegment));
  }
  int64_t seg_len = std::max<int64_t>(1, (vocab + segments - 1) / segments);
  if (segments > 1) {
    seg_len = (seg_len + kBlock - 1) / kBlock * kBlock;
    segments = (vocab + seg_len - 1) / seg_len;
  }
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerTask / seg_len);
  return {segments, seg_len, grain};
}

at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Shared checks of both directions; returns the validity mask pointer (or nullptr).
const uint8_t* check_inputs(const char* fn, const at::Tensor& logits, const at::Tensor& targets,
                         const std::optional<at::Tensor>& valid, double temperature) {
  check_logits_and_targets(fn, logits, targets, temperature);
  const int64_t n = logits.size(0);
  if (!valid.has_value()) return nullptr;
  TORCH_CHECK(valid->device().is_cpu() && valid->scalar_type() == at::kBool &&
                  valid->dim() == 1 && valid->size(0) == n && valid->is_contiguous(),
              fn, ": valid must be a contiguous bool (N,) tensor, N = ", n);
  return mask_bytes(*valid);
}

void check_row_vector(const char* fn, const char* name, const at::Tensor& t, int64_t n,
                      at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 &&
                  t.size(0) == n && t.is_contiguous(),
              fn, ": ", name, " must be a contiguous (N,) CPU tensor of dtype ", dtype,
              ", N = ", n);
}

}  // namespace

const int64_t* check_logits_and_targets(const char* fn, const at::Tensor& logits,
                                        const at::Tensor& targets, double temperature) {
  TORCH_CHECK(logits.device().is_cpu() && targets.device().is_cpu(), fn, ": CPU tensors only");
  TORCH_CHECK(logits.dim() == 2, fn, ": logits must be (N, V), got ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              fn, ": logits must be fp16, bf16, fp32 or fp64, got ", dt);
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) <= 1, fn,
              ": logits must be contiguous along the vocabulary (last) dimension");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == n &&
                  targets.is_contiguous(),
              fn, ": targets must be a contiguous int64 (N,) tensor, N = ", n);
  // The Python ops' TEMPERATURE_RANGE (token_logprobs.py; a test checks they agree):
  // outside it 1 / temperature in float is 0 or inf, and -inf padding times it NaN.
  TORCH_CHECK(temperature >= kMinTemperature && temperature <= kMaxTemperature, fn,
              ": temperature must lie in [", kMinTemperature, ", ", kMaxTemperature, "], got ",
              temperature);
  const int64_t* y = targets.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(y[r] == kIgnoreIndex || (y[r] >= 0 && y[r] < vocab), fn,
                ": targets must lie in [0, V=", vocab, ") or equal -100, got ", y[r],
                " at row ", r);
  }
  return y;
}

void check_grad_out(const char* fn, const at::Tensor& logits, const at::Tensor& out) {
  const int64_t n = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == logits.scalar_type() &&
                  out.sizes() == logits.sizes() && (out.stride(1) == 1 || vocab <= 1),
              fn, ": out must be an (N, V) CPU tensor in logits' dtype, contiguous along V");
  if (n == 0 || vocab == 0) return;
  TORCH_CHECK(n == 1 || out.stride(0) >= vocab, fn, ": out rows must not overlap");
  // In place is fine (each block is read before it is written) only when out IS logits;
  // any other overlap would read gradients already written over logits.
  const int64_t es = logits.element_size();
  const char* zb = static_cast<const char*>(logits.data_ptr());
  const char* ob = static_cast<const char*>(out.data_ptr());
  const char* ze = zb + ((n - 1) * logits.stride(0) + vocab) * es;
  const char* oe = ob + ((n - 1) * out.stride(0) + vocab) * es;
  const bool same = zb == ob && (n == 1 || logits.stride(0) == out.stride(0));
  TORCH_CHECK(same || oe <= zb || ze <= ob, fn,
              ": out must be logits itself (in-place) or not overlap it");
}

template <typename scalar_t>
RowStats logprob_row_forward(const scalar_t* z, int64_t vocab, int64_t target, double tau) {
  static const ForwardFn<scalar_t> segment = pick_forward<scalar_t>();
  return row_stats(segment(z, vocab, tau), static_cast<double>(z[target]), tau);
}

template <typename scalar_t>
void logprob_row_backward(const scalar_t* z, scalar_t* out, int64_t vocab, int64_t target,
                          double tau, double m, double log_norm, double entropy,
                          double g_logp, double g_entropy) {
  static const BackwardFn<scalar_t> segment = pick_backward<scalar_t>();
  backward_piece(segment, z, out, vocab, target, tau, m, log_norm, entropy, g_logp, g_entropy);
}

#define VAPO_ROW_API(T)                                                                  \
  template RowStats logprob_row_forward<T>(const T*, int64_t, int64_t, double);          \
  template void logprob_row_backward<T>(const T*, T*, int64_t, int64_t, double, double,  \
                                        double, double, double, double);
VAPO_ROW_API(float)
VAPO_ROW_API(double)
VAPO_ROW_API(c10::Half)
VAPO_ROW_API(c10::BFloat16)
#undef VAPO_ROW_API

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& valid,
    double temperature) {
  const char* fn = "token_logprobs_fwd_cpu";
  const uint8_t* keep = check_inputs(fn, logits, targets, valid, temperature);
  const int64_t n = logits.size(0), vocab = logits.size(1), row_stride = logits.stride(0);
  const auto opts = logits.options().dtype(acc_dtype(logits));
  auto logp = at::empty({n}, opts), entropy = at::empty({n}, opts);
  auto stats = at::empty({n, 2}, opts);  // (m, log_norm) per row, for the backward
  if (n == 0) return {logp, entropy, stats};
  const int64_t* y = targets.data_ptr<int64_t>();
  const Plan pl = plan(n, vocab);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_fwd_cpu", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* z = logits.data_ptr<scalar_t>();
    out_t* o_logp = logp.data_ptr<out_t>();
    out_t* o_ent = entropy.data_ptr<out_t>();
    out_t* o_stats = stats.data_ptr<out_t>();
    const ForwardFn<scalar_t> segment = pick_forward<scalar_t>();
    auto ignored = [&](int64_t r) { return y[r] == kIgnoreIndex || (keep != nullptr && !keep[r]); };

    auto finish = [&](int64_t r, const Partial& p) {
      if (ignored(r)) {
        o_logp[r] = o_ent[r] = o_stats[2 * r] = o_stats[2 * r + 1] = 0;
        return;
      }
      const RowStats st = row_stats(p, static_cast<double>(z[r * row_stride + y[r]]), temperature);
      o_logp[r] = static_cast<out_t>(st.logp);
      o_ent[r] = static_cast<out_t>(st.entropy);
      o_stats[2 * r] = static_cast<out_t>(st.m);  // a logit: exact in out_t
      o_stats[2 * r + 1] = static_cast<out_t>(st.log_norm);
    };

    if (pl.segments == 1) {
      at::parallel_for(0, n, pl.grain, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          finish(r, ignored(r) ? Partial{} : segment(z + r * row_stride, vocab, temperature));
        }
      });
    } else {
      // Few long rows: every (row, segment) is a task; the partials merge per row.
      std::vector<Partial> parts(n * pl.segments);
      at::parallel_for(0, n * pl.segments, pl.grain, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t r = t / pl.segments, lo = (t % pl.segments) * pl.seg_len;
          if (ignored(r)) continue;
          parts[t] = segment(z + r * row_stride + lo, std::min(pl.seg_len, vocab - lo), temperature);
        }
      });
      for (int64_t r = 0; r < n; ++r) {
        Partial p;
        for (int64_t k = 0; k < pl.segments; ++k) p = merge(p, parts[r * pl.segments + k], temperature);
        finish(r, p);
      }
    }
  });
  return {logp, entropy, stats};
}

void token_logprobs_bwd_cpu(const at::Tensor& grad_logp,
                            const std::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits, const at::Tensor& targets,
                            const std::optional<at::Tensor>& valid, const at::Tensor& stats,
                            const at::Tensor& entropy, double temperature, at::Tensor out) {
  const char* fn = "token_logprobs_bwd_cpu";
  const uint8_t* keep = check_inputs(fn, logits, targets, valid, temperature);
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const auto acc = acc_dtype(logits);
  check_row_vector(fn, "grad_logp", grad_logp, n, acc);
  if (grad_entropy.has_value()) check_row_vector(fn, "grad_entropy", *grad_entropy, n, acc);
  TORCH_CHECK(stats.device().is_cpu() && stats.scalar_type() == acc && stats.dim() == 2 &&
                  stats.size(0) == n && stats.size(1) == 2 && stats.is_contiguous(),
              fn, ": stats must be a contiguous (N, 2) CPU tensor of dtype ", acc, ", N = ", n,
              " (the forward's (max logit, log normaliser) per row)");
  check_row_vector(fn, "entropy", entropy, n, acc);
  check_grad_out(fn, logits, out);
  if (n == 0 || vocab == 0) return;
  const int64_t z_stride = logits.stride(0), o_stride = out.stride(0);
  const int64_t* y = targets.data_ptr<int64_t>();
  const Plan pl = plan(n, vocab);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* z = logits.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t* g_lp = grad_logp.data_ptr<acc_t>();
    const acc_t* g_h = grad_entropy.has_value() ? grad_entropy->data_ptr<acc_t>() : nullptr;
    const acc_t* stats_p = stats.data_ptr<acc_t>();
    const acc_t* ent_p = entropy.data_ptr<acc_t>();
    const BackwardFn<scalar_t> segment = pick_backward<scalar_t>();

    at::parallel_for(0, n * pl.segments, pl.grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r = t / pl.segments, lo = (t % pl.segments) * pl.seg_len;
        const int64_t len = std::min(pl.seg_len, vocab - lo);
        const scalar_t* zr = z + r * z_stride + lo;
        scalar_t* orow = o + r * o_stride + lo;
        if (y[r] == kIgnoreIndex || (keep != nullptr && !keep[r])) {
          std::fill(orow, orow + len, static_cast<scalar_t>(0));  // logits never read
          continue;
        }
        backward_piece(segment, zr, orow, len, y[r] - lo, temperature,
                       static_cast<double>(stats_p[2 * r]), static_cast<double>(stats_p[2 * r + 1]),
                       static_cast<double>(ent_p[r]),
                       static_cast<double>(g_lp[r]),
                       g_h != nullptr ? static_cast<double>(g_h[r]) : 0.0);
      }
    });
  });
}

}  // namespace vapo
