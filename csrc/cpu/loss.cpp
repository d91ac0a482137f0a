// Fused PPO / VAPO token loss on the CPU (vapo_kernels/ops/loss_spec.py: the formulas are in
// the module docstring, the kernel contract in reference_kernel's docstring, the exact
// per-token values and gradients - torch's tie rules included - in _policy_terms,
// _value_terms and _kl_terms).
//
// One read of every input, one write of every gradient. The tokens are cut into chunks
// of kChunk tokens (a fixed size: the cut, and so every rounding, does not depend on the
// number of threads); chunks run in parallel and each finds its first sequence by binary
// search in the offsets, so one 1M-token sequence and a million empty ones cost the same
// as any other layout.
//
// A chunk is walked in tiles of kTileBytes per input, small enough that all of a tile's
// buffers stay in L1: the inputs of a tile are first converted to the compute type
// (float; double for fp64) with masked slots replaced by 0 - selects, never products,
// so NaN or 1e30 in a masked slot cannot reach anything - then each term (policy,
// value, KL, entropy, LM) runs as one branch-free loop over the tile, specialised on its
// options (dual clip, importance weights, rollout correction level and mode, value-clip
// form, KL kind). GCC's vectoriser
// gives up on loops this branchy, so they are written with GCC / Clang vector
// extensions, W lanes wide. Each loop sums its terms in W-lane registers of the compute
// type over the tile (16 tokens per lane with AVX2, 32 with SSE2: the fp32 partial sums
// stay short) and adds them into per-chunk double lanes at the end of the tile; a
// chunk's lanes are summed in a fixed order, then the chunks in chunk order. Hence sums
// and gradients are bitwise reproducible across runs and thread counts. (Across
// instruction sets they may differ in the last bits: the lane count differs, and GCC
// contracts a * b + c into an FMA where the ISA has one.)
//
// The float exponential is a polynomial one (as in logprobs.cpp: GCC does not vectorise
// libm's expf), about 1 ulp from expf; fp64 uses std::exp. The kernel is compiled for
// SSE2 and for AVX2 + FMA + F16C, which runs where the CPU and torch's
// ATEN_CPU_CAPABILITY allow it. (No AVX-512 build: GCC 12 expands 512-bit vector
// compares in always-inline helpers lane by lane, and at 256 bits the kernel is within a
// small factor of memory bandwidth.)
//
// Rollout correction (params[P_ROLLOUT_IS] > 0; is_weights then holds the rollout
// log-probs): a tile loop before the policy term turns the rollout log-probs into the
// weights it multiplies by (and sums their metrics). The sequence levels need a
// sequence's whole sum of log-ratios before any of its weights: a first pass over the
// sequences (rollout_sequence_weights, parallel over sequences, reading old_logp and
// rollout_logp only) writes one weight per sequence, which the tiles then read like
// the aggregation weights. With the correction off none of this runs (one flag per tile).

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
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../ops.h"
#include "mask.h"
#include "alloc.h"

#include "simd.h"
#include "token_loss_block.h"

#if VAPO_X86_MULTIVERSION
#include <immintrin.h>
#endif

namespace vapo {
namespace {

constexpr int64_t kChunk = 8192;  // tokens per parallel task: fixed, for reproducible sums
constexpr int kTileBytes = 512;   // per input buffer: a tile is 128 fp32 / 64 fp64 tokens
constexpr int kMaxW = 8;          // widest vector: 8 fp32 lanes (AVX2)

enum class ValueForm { kNone, kVerl, kOpenRLHF };

// The options, and the constants in the compute type T (as torch casts Python scalars to
// the dtype of the tensor they meet).
template <typename T>
struct Config {
  bool policy = false, dual = false, isw = false, value = false, kl = false, entropy = false,
       lm = false, has_logp = false;
  int rollout = 0;            // rollout correction level (0 off; isw holds rollout log-probs)
  bool rollout_mask = false;  // reject weights outside [lower, upper] (else truncate)
  T rollout_upper = 0, rollout_lower = 0;
  ValueForm value_form = ValueForm::kNone;
  int kl_kind = 0;
  bool kl_straight = false;
  T clamp = 0, lo = 0, hi = 0, dual_clip = 0, value_eps = 0;
  T vf_coef = 0, kl_coef = 0, neg_entropy_coef = 0, lm_coef = 0;
};

template <typename scalar_t, typename T>
struct Args {
  const scalar_t *logp = nullptr, *old_logp = nullptr, *adv = nullptr, *values = nullptr,
                 *old_values = nullptr, *returns = nullptr, *ref_logp = nullptr,
                 *entropy = nullptr, *isw = nullptr;
  const uint8_t* mask = nullptr;  // torch bool: one byte, 0 or 1
  int64_t base = 0;               // the token arrays above (and gradients) start at token base
  const int64_t* off = nullptr;
  int64_t num_seqs = 0;
  const T* seq_weight = nullptr;
  const T* lm_weight = nullptr;
  const T* seq_rollout_weight = nullptr;  // rollout correction, sequence levels: exp(u_s)
  T *g_logp = nullptr, *g_values = nullptr, *g_entropy = nullptr;  // null: not written
  Config<T> cfg;
};

// What a chunk hands to the final reduction.
using ChunkSums = LossSums;

// One tile of tokens in the compute type.
template <typename T>
struct Tile {
  static constexpr int kN = kTileBytes / static_cast<int>(sizeof(T));
  alignas(64) T valid[kN];  // 1 valid, 0 masked (and padding)
  alignas(64) T w[kN];      // aggregation weight, 0 on masked tokens
  alignas(64) T wlm[kN];    // LM weight, 0 on masked tokens
  alignas(64) T lp[kN];
  alignas(64) T old[kN];
  alignas(64) T adv[kN];
  alignas(64) T isw[kN];  // IS weights (rollout correction: log-probs, then weights)
  alignas(64) T v[kN];
  alignas(64) T ov[kN];
  alignas(64) T ret[kN];
  alignas(64) T ref[kN];
  alignas(64) T ent[kN];
  alignas(64) T g_lp[kN];
  alignas(64) T g_v[kN];
  alignas(64) T g_e[kN];
  // Last: the buffers above keep the offsets they had before the correction came.
  alignas(64) T rsw[kN];  // rollout correction, sequence levels: the sequence's weight
  alignas(64) T lr[kN];     // the policy term's clamped log-ratios and ratios, for its
  alignas(64) T ratio[kN];  // metrics loops
};

// A chunk's running sums: double lanes (lane = token index mod W within each tile).
template <typename T>
struct ChunkAcc {
  double lanes[NUM_SUMS][kMaxW] = {};
  T ratio_min[kMaxW], ratio_max[kMaxW];
  T rollout_min[kMaxW], rollout_max[kMaxW];
};

// ---- vectors ----------------------------------------------------------------------------

// Adds the W lanes of v to lanes[0, W) in double.
template <typename T, int W>
VAPO_INLINE void flush(double* lanes, const Vec<T, W>& v) {
  for (int k = 0; k < W; ++k) lanes[k] += static_cast<double>(v[k]);
}

// ---- torch's elementwise rules (scalars and vectors alike) ------------------------------

// torch.maximum / minimum: a NaN operand wins.
template <typename V>
VAPO_INLINE V t_max(V a, V b) {
  return ((a > b) | (a != a)) ? a : b;
}
template <typename V>
VAPO_INLINE V t_min(V a, V b) {
  return ((a < b) | (a != a)) ? a : b;
}
// torch.clamp(x, lo, hi) for lo <= hi: NaN passes through.
template <typename V>
VAPO_INLINE V t_clamp(V x, V lo, V hi) {
  const V y = x < lo ? lo : x;
  return y > hi ? hi : y;
}
// Where torch.clamp(x, lo, hi) passes its gradient: 1 inside, bounds included.
template <typename V>
VAPO_INLINE V in_range(V x, V lo, V hi, V one, V zero) {
  return ((x >= lo) & (x <= hi)) ? one : zero;
}
// Folds a tile's lane-wise running min / max into a chunk's lane extremes.
template <typename T, int W>
VAPO_INLINE void flush_extremes(T* lane_min, T* lane_max, const Vec<T, W>& lo,
                                const Vec<T, W>& hi) {
  for (int k = 0; k < W; ++k) {
    lane_min[k] = t_min(lane_min[k], lo[k]);
    lane_max[k] = t_max(lane_max[k], hi[k]);
  }
}
// Gradient of max(a, b) from those of a and b: a tie splits evenly.
template <typename V>
VAPO_INLINE V tie_split(V a, V b, V ga, V gb, V half) {
  const V tie = half * (ga + gb);
  return a > b ? ga : (b > a ? gb : tie);
}

// exp for float lanes: 2^k * p(r), k = round(x / ln2), r = x - k ln2, p the degree-7
// Taylor polynomial (truncation 5e-9 relative on |r| <= ln2 / 2); 2^k is applied as two
// normal factors so that results overflow to inf and underflow gradually as expf does.
// NaN stays NaN.
template <int W>
VAPO_INLINE Vec<float, W> vexp(Vec<float, W> x) {
  using VF = Vec<float, W>;
  using VU = Vec<uint32_t, W>;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // 9 bits: k * kLn2Hi is exact for |k| < 2^15
  constexpr float kLn2Lo = -2.12194440054690583e-4f;
  const VF lo = splat<float, W>(-104.0f), hi = splat<float, W>(89.0f);
  x = x < lo ? lo : x;  // exp(-104) is below the least subnormal: 0 either way
  x = x > hi ? hi : x;  // exp(89) > FLT_MAX: inf either way
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
  // k (two's complement) from the low mantissa bits of t, split as k1 + k2 with both
  // halves in the normal exponent range. Unsigned arithmetic: NaN's garbage bits wrap
  // (p is NaN then anyway).
  const VU ki = (VU)t - 0x4B400000u;
  const VU k1 = ((ki + 0x80000000u) >> 1) - 0x40000000u;  // floor(k / 2)
  const VU k2 = ki - k1;
  const VF s1 = (VF)((k1 + 127u) << 23), s2 = (VF)((k2 + 127u) << 23);
  return (p * s1) * s2;
}

template <int W>
VAPO_INLINE Vec<double, W> vexp(Vec<double, W> x) {
  Vec<double, W> e;
  for (int k = 0; k < W; ++k) e[k] = std::exp(x[k]);
  return e;
}

// expm1(x) - x given e = exp(x) (k3 of a log-ratio x). e - 1 - x cancels for small |x|:
// at |x| ~ 1e-3, float32 keeps a few digits of x^2 / 2. Below |x| = 1/2 a series
// x^2 (1/2 + x/6 + ... + x^6/8!) (truncation < 1e-10 relative); fp64 uses std::expm1.
template <int W>
VAPO_INLINE Vec<float, W> expm1_minus_x(Vec<float, W> x, Vec<float, W> e) {
  using VF = Vec<float, W>;
  VF p = x * (1.0f / 40320.0f) + (1.0f / 5040.0f);
  p = p * x + (1.0f / 720.0f);
  p = p * x + (1.0f / 120.0f);
  p = p * x + (1.0f / 24.0f);
  p = p * x + (1.0f / 6.0f);
  p = p * x + 0.5f;
  const VF small = x * x * p, big = (e - 1.0f) - x;
  const VF zero = splat<float, W>(0.0f), half = splat<float, W>(0.5f);
  const VF ax = x < zero ? -x : x;
  return ax < half ? small : big;
}

template <int W>
VAPO_INLINE Vec<double, W> expm1_minus_x(Vec<double, W> x, Vec<double, W>) {
  Vec<double, W> r;
  for (int k = 0; k < W; ++k) r[k] = std::expm1(x[k]) - x[k];
  return r;
}

// Constants of a tile loop, broadcast once.
template <typename T, int W>
struct Splats {
  using V = Vec<T, W>;
  V zero = splat<T, W>(T(0)), one = splat<T, W>(T(1)), half = splat<T, W>(T(0.5));
  V inf = splat<T, W>(std::numeric_limits<T>::infinity());
};

// ---- the terms: one loop each over a tile of nr tokens (a multiple of W) ----------------
//
// Padding tokens are invalid with zero inputs and weights: they add (+-)0 to every sum,
// +-inf to the ratio extremes, and their gradients are never stored.

template <typename T, int W, bool kDual, bool kIsw>
VAPO_INLINE void policy_tile(Tile<T>& b, int nr, const Config<T>& c, ChunkAcc<T>& acc) {
  // Three loops over the tile: the loss and its gradient (storing the clamped log-ratios
  // and the ratios), then the clip counts with the ratio's sum and extremes, then the
  // approx-KL sums. In one loop the nine running sums and the constants need more vector
  // registers than AVX2 has (16): GCC spilled them to the stack on every iteration, and
  // the split measured 15-20% faster per token (fp32, 64 x 4k, one thread, old and new
  // builds timed in turn). Each sum runs over the same lanes in the same order: the same
  // bits (checked against the one-loop build on policy, dual-clip, value and KL calls).
  using V = Vec<T, W>;
  const Splats<T, W> k;
  const V clamp = splat<T, W>(c.clamp), neg_clamp = -clamp;
  const V lo = splat<T, W>(c.lo), hi = splat<T, W>(c.hi);
  {
    const V dual_clip = splat<T, W>(c.dual_clip);
    V s_pg = k.zero, s_dual = k.zero;
    for (int i = 0; i < nr; i += W) {
      const V adv = load<V>(b.adv + i);
      const V na = -adv;
      const V raw = load<V>(b.lp + i) - load<V>(b.old + i);
      const V log_ratio = t_clamp(raw, neg_clamp, clamp);
      const V ratio = vexp<W>(log_ratio);
      store(b.lr + i, log_ratio);
      store(b.ratio + i, ratio);
      const V unclipped = na * ratio;
      const V clipped = na * t_clamp(ratio, lo, hi);
      V pg = t_max(unclipped, clipped);
      V d_ratio =
          tie_split(unclipped, clipped, na, na * in_range(ratio, lo, hi, k.one, k.zero), k.half);
      if constexpr (kDual) {
        // min(pg, floor), floor constant in logp: full gradient below, half at a tie.
        const auto valid = load<V>(b.valid + i) != k.zero;
        const V floor = na * dual_clip;
        const auto negative = adv < k.zero;
        const auto dual = negative & (pg > floor);
        const V half = k.half * d_ratio;
        const V below = pg < floor ? d_ratio : (pg > floor ? k.zero : half);
        d_ratio = negative ? below : d_ratio;
        pg = negative ? t_min(pg, floor) : pg;
        s_dual += (valid & dual) ? k.one : k.zero;
      }
      V grad = d_ratio * ratio * in_range(raw, neg_clamp, clamp, k.one, k.zero);
      if constexpr (kIsw) {
        const V isw = load<V>(b.isw + i);
        pg = pg * isw;
        grad = grad * isw;
      }
      const V w = load<V>(b.w + i);
      s_pg += w * pg;
      store(b.g_lp + i, load<V>(b.g_lp + i) + w * grad);
    }
    flush<T, W>(acc.lanes[S_PG], s_pg);
    if constexpr (kDual) flush<T, W>(acc.lanes[S_DUAL_CLIP], s_dual);
  }
  {
    V s_low = k.zero, s_high = k.zero, s_ratio = k.zero, r_min = k.inf, r_max = -k.inf;
    for (int i = 0; i < nr; i += W) {
      const V na = -load<V>(b.adv + i);
      const V ratio = load<V>(b.ratio + i);
      const auto valid = load<V>(b.valid + i) != k.zero;
      const auto was_clipped = na * t_clamp(ratio, lo, hi) > na * ratio;
      s_low += (valid & was_clipped & (ratio < lo)) ? k.one : k.zero;
      s_high += (valid & was_clipped & (ratio > hi)) ? k.one : k.zero;
      s_ratio += valid ? ratio : k.zero;
      r_min = t_min(r_min, valid ? ratio : k.inf);
      r_max = t_max(r_max, valid ? ratio : -k.inf);
    }
    flush<T, W>(acc.lanes[S_CLIP_LOW], s_low);
    flush<T, W>(acc.lanes[S_CLIP_HIGH], s_high);
    flush<T, W>(acc.lanes[S_RATIO_SUM], s_ratio);
    flush_extremes<T, W>(acc.ratio_min, acc.ratio_max, r_min, r_max);
  }
  V s_nlr = k.zero, s_k3 = k.zero;
  for (int i = 0; i < nr; i += W) {
    const V log_ratio = load<V>(b.lr + i);
    const auto valid = load<V>(b.valid + i) != k.zero;
    s_nlr += valid ? -log_ratio : k.zero;
    s_k3 += valid ? expm1_minus_x<W>(log_ratio, load<V>(b.ratio + i)) : k.zero;
  }
  flush<T, W>(acc.lanes[S_NEG_LOG_RATIO], s_nlr);
  flush<T, W>(acc.lanes[S_K3], s_k3);
}

// The rollout correction: b.isw holds the rollout log-probs on entry and the weights the
// policy term multiplies by on exit (0 on masked tokens). kSeq: the sequence levels
// (the raw weight is the sequence's, in b.rsw); kMask: reject weights outside
// [lower, upper] (else truncate at upper). The comparisons keep a NaN weight (neither
// truncated nor rejected), so a NaN in a valid slot reaches the loss.
template <typename T, int W, bool kSeq, bool kMask>
VAPO_INLINE void rollout_tile(Tile<T>& b, int nr, const Config<T>& c, ChunkAcc<T>& acc) {
  using V = Vec<T, W>;
  const Splats<T, W> k;
  const V bound = splat<T, W>(T(20));
  const V upper = splat<T, W>(c.rollout_upper), lower = splat<T, W>(c.rollout_lower);
  V s_raw = k.zero, s_w = k.zero, s_out = k.zero, s_kl = k.zero, s_k3 = k.zero,
    w_min = k.inf, w_max = -k.inf;
  for (int i = 0; i < nr; i += W) {
    const auto valid = load<V>(b.valid + i) != k.zero;
    // Masked and padding tokens hold old = rollout = 0 here: e = 0, no select needed.
    const V e = t_clamp(load<V>(b.old + i) - load<V>(b.isw + i), -bound, bound);
    V raw, ee;
    if constexpr (kSeq) {
      raw = load<V>(b.rsw + i);
      ee = vexp<W>(e);
    } else {
      raw = vexp<W>(e);
      ee = raw;
    }
    V w;
    if constexpr (kMask) {
      const auto out = (raw < lower) | (raw > upper);
      w = out ? k.zero : raw;
      s_out += (valid & out) ? k.one : k.zero;
    } else {
      w = t_min(raw, upper);
      s_out += (valid & (raw > upper)) ? k.one : k.zero;
    }
    store(b.isw + i, valid ? w : k.zero);
    s_raw += valid ? raw : k.zero;
    s_w += valid ? w : k.zero;
    s_kl -= e;
    s_k3 += valid ? expm1_minus_x<W>(e, ee) : k.zero;
    w_min = t_min(w_min, valid ? raw : k.inf);
    w_max = t_max(w_max, valid ? raw : -k.inf);
  }
  flush<T, W>(acc.lanes[S_ROLLOUT_IS_RAW], s_raw);
  flush<T, W>(acc.lanes[S_ROLLOUT_IS_WEIGHT], s_w);
  flush<T, W>(acc.lanes[S_ROLLOUT_IS_OUT], s_out);
  flush<T, W>(acc.lanes[S_ROLLOUT_KL], s_kl);
  flush<T, W>(acc.lanes[S_ROLLOUT_K3], s_k3);
  flush_extremes<T, W>(acc.rollout_min, acc.rollout_max, w_min, w_max);
}

// s_ret .. s_err_sq: the critic's explained variance from this pass, as sums of R and
// R - v shifted by the chunk's `shift` (its first valid token's values, see
// chunk_impl): deviations of the size of the spread, whose squares fp32 holds exactly
// enough even where |R| is far above the spread. Masked and padding tokens add 0.
template <typename T>
struct ValueShift {
  T ret = 0, err = 0;
};

template <typename T, int W, ValueForm kForm>
VAPO_INLINE void value_tile(Tile<T>& b, int nr, const Config<T>& c, const ValueShift<T>& shift,
                            ChunkAcc<T>& acc) {
  using V = Vec<T, W>;
  const Splats<T, W> k;
  const V eps = splat<T, W>(c.value_eps), neg_eps = -eps, vf_coef = splat<T, W>(c.vf_coef);
  const V shift_ret = splat<T, W>(shift.ret), shift_err = splat<T, W>(shift.err);
  V s_vf = k.zero, s_clip = k.zero, s_ret = k.zero, s_ret_sq = k.zero, s_err = k.zero,
    s_err_sq = k.zero;
  for (int i = 0; i < nr; i += W) {
    const V v = load<V>(b.v + i), ret = load<V>(b.ret + i);
    const auto valid = load<V>(b.valid + i) != k.zero;
    const V err = v - ret;
    const V unclipped = err * err;
    // R - v is exactly -(v - R): rounding is symmetric.
    const V d_ret = valid ? ret - shift_ret : k.zero, d_err = valid ? -err - shift_err : k.zero;
    s_ret += d_ret;
    s_ret_sq += d_ret * d_ret;
    s_err += d_err;
    s_err_sq += d_err * d_err;
    V vf, grad;
    if constexpr (kForm == ValueForm::kNone) {
      vf = k.half * unclipped;
      grad = err;
    } else {
      const V ov = load<V>(b.ov + i);
      V v_clipped, d_clip;
      if constexpr (kForm == ValueForm::kOpenRLHF) {
        const V step = v - ov;
        v_clipped = ov + t_clamp(step, neg_eps, eps);
        d_clip = in_range(step, neg_eps, eps, k.one, k.zero);
      } else {  // verl's clip_by_value: max(min(v, old + eps), old - eps)
        const V hi = ov + eps, lo = ov - eps;
        const V upper = t_min(v, hi);
        const V d_upper = v < hi ? k.one : (v > hi ? k.zero : k.half);
        v_clipped = t_max(upper, lo);
        d_clip = d_upper * (upper > lo ? k.one : (upper < lo ? k.zero : k.half));
      }
      const V err_clipped = v_clipped - ret;
      const V clipped = err_clipped * err_clipped;
      // d/dv of 0.5 * max(...): the factor 2 of each square cancels the 0.5.
      grad = tie_split(unclipped, clipped, err, err_clipped * d_clip, k.half);
      vf = k.half * t_max(unclipped, clipped);
      s_clip += (valid & (clipped > unclipped)) ? k.one : k.zero;
    }
    const V w = load<V>(b.w + i);
    s_vf += w * vf;
    store(b.g_v + i, vf_coef * w * grad);
  }
  flush<T, W>(acc.lanes[S_VF], s_vf);
  if constexpr (kForm != ValueForm::kNone) flush<T, W>(acc.lanes[S_VF_CLIP], s_clip);
  flush<T, W>(acc.lanes[S_RETURNS], s_ret);
  flush<T, W>(acc.lanes[S_RETURNS_SQ], s_ret_sq);
  flush<T, W>(acc.lanes[S_VALUE_ERR], s_err);
  flush<T, W>(acc.lanes[S_VALUE_ERR_SQ], s_err_sq);
}

template <typename T, int W, int kKind>
VAPO_INLINE void kl_tile(Tile<T>& b, int nr, const Config<T>& c, ChunkAcc<T>& acc) {
  using V = Vec<T, W>;
  const Splats<T, W> k;
  const V kl_coef = splat<T, W>(c.kl_coef);
  const V twenty = splat<T, W>(T(20)), ten = splat<T, W>(T(10));
  const bool straight = c.kl_straight;
  V s_kl = k.zero;
  for (int i = 0; i < nr; i += W) {
    const V diff = load<V>(b.lp + i) - load<V>(b.ref + i);
    V value, grad;
    if constexpr (kKind == 1) {  // k1
      value = diff;
      grad = k.one;
    } else if constexpr (kKind == 2) {  // abs; torch.sign(0) = 0 (and sign(NaN) = 0)
      value = diff < k.zero ? -diff : diff;
      grad = diff > k.zero ? k.one : (diff < k.zero ? -k.one : k.zero);
    } else if constexpr (kKind == 3) {  // k2
      value = k.half * diff * diff;
      grad = diff;
    } else {  // k3 (low_var_kl): log-ratio clamped to [-20, 20], value to [-10, 10]
      const V log_ratio = t_clamp(-diff, -twenty, twenty);
      const V e = vexp<W>(log_ratio);
      const V raw = expm1_minus_x<W>(log_ratio, e);
      value = t_clamp(raw, -ten, ten);
      grad = -(raw + log_ratio) * in_range(-diff, -twenty, twenty, k.one, k.zero) *
             in_range(raw, -ten, ten, k.one, k.zero);
    }
    if (straight) grad = diff;  // '+': the gradient of k2
    const V w = load<V>(b.w + i);
    s_kl += w * value;
    store(b.g_lp + i, load<V>(b.g_lp + i) + kl_coef * w * grad);
  }
  flush<T, W>(acc.lanes[S_KL], s_kl);
}

template <typename T, int W>
VAPO_INLINE void entropy_tile(Tile<T>& b, int nr, const Config<T>& c, ChunkAcc<T>& acc) {
  using V = Vec<T, W>;
  const V neg_coef = splat<T, W>(c.neg_entropy_coef);
  V s = splat<T, W>(T(0));
  for (int i = 0; i < nr; i += W) {
    const V w = load<V>(b.w + i);
    s += w * load<V>(b.ent + i);
    store(b.g_e + i, neg_coef * w);
  }
  flush<T, W>(acc.lanes[S_ENTROPY], s);
}

// sums[S_LM] = -sum(w_lm * logp): the sign is applied once, at the end.
template <typename T, int W>
VAPO_INLINE void lm_tile(Tile<T>& b, int nr, const Config<T>& c, ChunkAcc<T>& acc) {
  using V = Vec<T, W>;
  const V lm_coef = splat<T, W>(c.lm_coef);
  V s = splat<T, W>(T(0));
  for (int i = 0; i < nr; i += W) {
    const V wlm = load<V>(b.wlm + i);
    s += wlm * load<V>(b.lp + i);
    store(b.g_lp + i, load<V>(b.g_lp + i) - lm_coef * wlm);
  }
  flush<T, W>(acc.lanes[S_LM], s);
}

template <typename T, int W>
VAPO_INLINE void count_tile(const Tile<T>& b, int nr, ChunkAcc<T>& acc) {
  using V = Vec<T, W>;
  V s = splat<T, W>(T(0));
  for (int i = 0; i < nr; i += W) s += load<V>(b.valid + i);
  flush<T, W>(acc.lanes[S_TOKENS], s);
}

// ---- a chunk ----------------------------------------------------------------------------

#if VAPO_X86_MULTIVERSION
// fp16 -> fp32 by F16C, 8 at a time; returns how many were converted. A plain function:
// an AVX2 body cannot be inlined into the baseline-ISA helpers, but can be into the AVX2
// entry point.
VAPO_TARGET_AVX2 int half_to_float_f16c(const c10::Half* in, int n, float* out) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  return i;
}
#endif

// Converts src[0, n) to T with masked slots replaced by 0 (a select: garbage stays out),
// and zero-fills the padding [n, nr).
template <typename scalar_t, typename T, int kBytes>
VAPO_INLINE void load_clean(const scalar_t* src, const T* valid, int n, int nr, T* dst) {
  int i = 0;
#if VAPO_X86_MULTIVERSION
  if constexpr (std::is_same_v<scalar_t, c10::Half> && kBytes >= 32) {
    // c10's fp16 -> fp32 conversion branches and does not vectorise; F16C does it exactly.
    i = half_to_float_f16c(src, n, dst);
    for (int j = i; j < n; ++j) dst[j] = static_cast<T>(src[j]);
    for (int j = 0; j < n; ++j) dst[j] = valid[j] != T(0) ? dst[j] : T(0);
    i = n;
  }
#endif
  for (; i < n; ++i) {
    const T x = static_cast<T>(src[i]);
    dst[i] = valid[i] != T(0) ? x : T(0);
  }
  for (i = n; i < nr; ++i) dst[i] = T(0);
}

template <typename T>
VAPO_INLINE void store_grad(const T* g, const T* valid, int n, T* out) {
  for (int i = 0; i < n; ++i) out[i] = valid[i] != T(0) ? g[i] : T(0);
}

// A chunk's sums of d = x - shift and d^2 over its n valid tokens -> the sum of x and the
// centred sum of squares about the chunk's mean (in double, exact enough: d is small).
inline void unshift(double& sum, double& sum_sq, double n, double shift) {
  if (n <= 0) {
    sum = sum_sq = 0;
    return;
  }
  sum_sq = std::max(0.0, sum_sq - sum * sum / n);
  sum += n * shift;
}

template <typename scalar_t, typename T, int kBytes>
VAPO_INLINE void chunk_impl(const Args<scalar_t, T>& a, int64_t begin, int64_t end,
                                 ChunkSums& out) {
  constexpr int kN = Tile<T>::kN;
  constexpr int W = kBytes / static_cast<int>(sizeof(T));  // lanes of the tile loops
  static_assert(kN % W == 0 && W <= kMaxW, "a tile is a whole number of vectors");
  constexpr T kInf = std::numeric_limits<T>::infinity();
  const Config<T>& c = a.cfg;
  Tile<T> b;
  ChunkAcc<T> acc;
  std::fill(acc.ratio_min, acc.ratio_min + kMaxW, kInf);
  std::fill(acc.ratio_max, acc.ratio_max + kMaxW, -kInf);
  std::fill(acc.rollout_min, acc.rollout_min + kMaxW, kInf);
  std::fill(acc.rollout_max, acc.rollout_max + kMaxW, -kInf);
  const bool seq_level = c.rollout > 1;  // the rollout weight is the sequence's

  // The sequence holding token `begin`: off[s] <= begin < off[s + 1] (empty ones skipped).
  int64_t s = std::upper_bound(a.off, a.off + a.num_seqs + 1, begin) - a.off - 1;
  ValueShift<T> shift;
  if (c.value) {  // the chunk's first valid token (none: no shift, nothing is summed)
    int64_t t = begin;
    while (t < end && a.mask != nullptr && a.mask[t - a.base] == 0) ++t;
    if (t < end) {
      shift.ret = static_cast<T>(a.returns[t - a.base]);
      shift.err = shift.ret - static_cast<T>(a.values[t - a.base]);
    }
  }

  for (int64_t t0 = begin; t0 < end; t0 += kN) {
    const int n = static_cast<int>(std::min<int64_t>(kN, end - t0));
    const int64_t i0 = t0 - a.base;  // where the tile starts in the token arrays
    const int nr = (n + W - 1) / W * W;  // the vector loops run to nr; padding is invalid
    // Weights, by runs of one sequence.
    for (int64_t pos = t0; pos < t0 + n;) {
      while (a.off[s + 1] <= pos) ++s;
      const int64_t stop = std::min<int64_t>(a.off[s + 1], t0 + n);
      const T ws = a.seq_weight[s];
      for (int64_t p = pos; p < stop; ++p) b.w[p - t0] = ws;
      if (c.lm) {
        const T wl = a.lm_weight[s];
        for (int64_t p = pos; p < stop; ++p) b.wlm[p - t0] = wl;
      }
      if (seq_level) {
        const T ws_raw = a.seq_rollout_weight[s];
        for (int64_t p = pos; p < stop; ++p) b.rsw[p - t0] = ws_raw;
      }
      pos = stop;
    }
    if (a.mask != nullptr) {
      const uint8_t* m = a.mask + i0;
      for (int i = 0; i < n; ++i) b.valid[i] = m[i] != 0 ? T(1) : T(0);
    } else {
      for (int i = 0; i < n; ++i) b.valid[i] = T(1);
    }
    for (int i = n; i < nr; ++i) b.valid[i] = b.w[i] = b.wlm[i] = b.rsw[i] = T(0);
    for (int i = 0; i < n; ++i) b.w[i] = b.valid[i] != T(0) ? b.w[i] : T(0);
    if (c.lm) {
      for (int i = 0; i < n; ++i) b.wlm[i] = b.valid[i] != T(0) ? b.wlm[i] : T(0);
    }
    count_tile<T, W>(b, nr, acc);
    if (c.has_logp) {
      load_clean<scalar_t, T, kBytes>(a.logp + i0, b.valid, n, nr, b.lp);
      std::fill(b.g_lp, b.g_lp + nr, T(0));
    }

    if (c.policy) {
      load_clean<scalar_t, T, kBytes>(a.old_logp + i0, b.valid, n, nr, b.old);
      load_clean<scalar_t, T, kBytes>(a.adv + i0, b.valid, n, nr, b.adv);
      if (c.isw) load_clean<scalar_t, T, kBytes>(a.isw + i0, b.valid, n, nr, b.isw);
      if (c.rollout != 0) {  // turns the rollout log-probs in b.isw into weights
        if (c.rollout_mask) {
          if (seq_level) rollout_tile<T, W, true, true>(b, nr, c, acc);
          else rollout_tile<T, W, false, true>(b, nr, c, acc);
        } else {
          if (seq_level) rollout_tile<T, W, true, false>(b, nr, c, acc);
          else rollout_tile<T, W, false, false>(b, nr, c, acc);
        }
      }
      if (c.dual) {
        if (c.isw) policy_tile<T, W, true, true>(b, nr, c, acc);
        else policy_tile<T, W, true, false>(b, nr, c, acc);
      } else {
        if (c.isw) policy_tile<T, W, false, true>(b, nr, c, acc);
        else policy_tile<T, W, false, false>(b, nr, c, acc);
      }
    }
    if (c.value) {
      load_clean<scalar_t, T, kBytes>(a.values + i0, b.valid, n, nr, b.v);
      load_clean<scalar_t, T, kBytes>(a.returns + i0, b.valid, n, nr, b.ret);
      switch (c.value_form) {
        case ValueForm::kNone:
          value_tile<T, W, ValueForm::kNone>(b, nr, c, shift, acc);
          break;
        case ValueForm::kVerl:
          load_clean<scalar_t, T, kBytes>(a.old_values + i0, b.valid, n, nr, b.ov);
          value_tile<T, W, ValueForm::kVerl>(b, nr, c, shift, acc);
          break;
        case ValueForm::kOpenRLHF:
          load_clean<scalar_t, T, kBytes>(a.old_values + i0, b.valid, n, nr, b.ov);
          value_tile<T, W, ValueForm::kOpenRLHF>(b, nr, c, shift, acc);
          break;
      }
      if (a.g_values != nullptr) store_grad(b.g_v, b.valid, n, a.g_values + i0);
    }
    if (c.kl) {
      load_clean<scalar_t, T, kBytes>(a.ref_logp + i0, b.valid, n, nr, b.ref);
      switch (c.kl_kind) {
        case 1: kl_tile<T, W, 1>(b, nr, c, acc); break;
        case 2: kl_tile<T, W, 2>(b, nr, c, acc); break;
        case 3: kl_tile<T, W, 3>(b, nr, c, acc); break;
        default: kl_tile<T, W, 4>(b, nr, c, acc); break;
      }
    }
    if (c.entropy) {
      load_clean<scalar_t, T, kBytes>(a.entropy + i0, b.valid, n, nr, b.ent);
      entropy_tile<T, W>(b, nr, c, acc);
      if (a.g_entropy != nullptr) store_grad(b.g_e, b.valid, n, a.g_entropy + i0);
    }
    if (c.lm) lm_tile<T, W>(b, nr, c, acc);
    if (a.g_logp != nullptr) store_grad(b.g_lp, b.valid, n, a.g_logp + i0);
  }

  for (int k = 0; k < NUM_SUMS; ++k) {
    double sum = 0;
    for (int l = 0; l < kMaxW; ++l) sum += acc.lanes[k][l];
    out.sums[k] = sum;
  }
  if (c.value) {
    unshift(out.sums[S_RETURNS], out.sums[S_RETURNS_SQ], out.sums[S_TOKENS], shift.ret);
    unshift(out.sums[S_VALUE_ERR], out.sums[S_VALUE_ERR_SQ], out.sums[S_TOKENS], shift.err);
  }
  T lo = kInf, hi = -kInf, w_lo = kInf, w_hi = -kInf;
  for (int l = 0; l < kMaxW; ++l) {
    lo = t_min(lo, acc.ratio_min[l]);
    hi = t_max(hi, acc.ratio_max[l]);
    w_lo = t_min(w_lo, acc.rollout_min[l]);
    w_hi = t_max(w_hi, acc.rollout_max[l]);
  }
  out.ratio_min = static_cast<double>(lo);
  out.ratio_max = static_cast<double>(hi);
  out.rollout_min = static_cast<double>(w_lo);
  out.rollout_max = static_cast<double>(w_hi);
}

// One entry point per instruction set; the helpers above are inlined into each.
template <typename scalar_t, typename T>
void chunk_base(const Args<scalar_t, T>& a, int64_t begin, int64_t end, ChunkSums& out) {
  chunk_impl<scalar_t, T, 16>(a, begin, end, out);
}

#if VAPO_X86_MULTIVERSION
template <typename scalar_t, typename T>
VAPO_TARGET_AVX2 void chunk_avx2(const Args<scalar_t, T>& a, int64_t begin, int64_t end,
                               ChunkSums& out) {
  chunk_impl<scalar_t, T, 32>(a, begin, end, out);
}
#endif

enum class Isa { kBase, kAvx2 };

// AVX2 where the CPU has it and torch's ATEN_CPU_CAPABILITY allows it (as logprobs.cpp).
Isa cpu_isa() {
#if VAPO_X86_MULTIVERSION
  static const Isa isa = [] {
    const std::string cap = at::get_cpu_capability();
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    if (avx2 && (cap.rfind("AVX2", 0) == 0 || cap.rfind("AVX512", 0) == 0)) return Isa::kAvx2;
    return Isa::kBase;
  }();
  return isa;
#else
  return Isa::kBase;
#endif
}

template <typename scalar_t, typename T>
using ChunkFn = void (*)(const Args<scalar_t, T>&, int64_t, int64_t, ChunkSums&);

template <typename scalar_t, typename T>
ChunkFn<scalar_t, T> pick_chunk() {
#if VAPO_X86_MULTIVERSION
  if (cpu_isa() == Isa::kAvx2) return &chunk_avx2<scalar_t, T>;
#endif
  return &chunk_base<scalar_t, T>;
}

// The options from `params` (P_*) and which inputs are present.
template <typename T>
Config<T> make_config(const std::vector<double>& params, bool has_logp, bool policy, bool isw,
                      bool value, bool kl, bool entropy, bool lm) {
  Config<T> c;
  const double value_clip = params[P_VALUE_CLIP];
  c.has_logp = has_logp;
  c.policy = policy;
  c.dual = params[P_DUAL_CLIP] > 0;
  c.isw = policy && isw;
  c.value = value;
  c.value_form = value_clip < 0 ? ValueForm::kNone
                 : params[P_VALUE_CLIP_OPENRLHF] != 0 ? ValueForm::kOpenRLHF
                                                      : ValueForm::kVerl;
  c.kl = kl;
  c.kl_kind = kl ? static_cast<int>(params[P_KL_KIND]) : 0;
  c.kl_straight = params[P_KL_STRAIGHT] != 0;
  c.entropy = entropy;
  c.lm = lm;
  c.clamp = static_cast<T>(params[P_RATIO_CLAMP]);
  c.lo = static_cast<T>(1.0 - params[P_CLIP_LOW]);
  c.hi = static_cast<T>(1.0 + params[P_CLIP_HIGH]);
  c.dual_clip = static_cast<T>(params[P_DUAL_CLIP]);
  c.value_eps = static_cast<T>(value_clip);
  c.vf_coef = static_cast<T>(params[P_VF_COEF]);
  c.kl_coef = static_cast<T>(params[P_KL_COEF]);
  c.neg_entropy_coef = static_cast<T>(-params[P_ENTROPY_COEF]);
  c.lm_coef = static_cast<T>(params[P_LM_COEF]);
  c.rollout = c.isw ? static_cast<int>(params[P_ROLLOUT_IS]) : 0;
  c.rollout_mask = params[P_ROLLOUT_IS_MASK] != 0;
  c.rollout_upper = static_cast<T>(params[P_ROLLOUT_IS_UPPER]);
  c.rollout_lower = static_cast<T>(params[P_ROLLOUT_IS_LOWER]);
  return c;
}

// ---- checks ------------------------------------------------------------------------------

constexpr const char* kFn = "token_loss_cpu";

// A token tensor: None, or a contiguous float CPU tensor of the common dtype and shape (any
// shape: the tokens are its elements in memory order, as the offsets count them).
const at::Tensor* check_token(const char* name, const std::optional<at::Tensor>& t,
                              const at::Tensor*& first, const char*& first_name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device().is_cpu(), kFn, ": ", name, " must be a CPU tensor, got ", t->device());
  const auto dt = t->scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              kFn, ": ", name, " must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK(t->is_contiguous(), kFn, ": ", name, " must be contiguous");
  if (first == nullptr) {
    first = &*t;
    first_name = name;
  } else {
    TORCH_CHECK(dt == first->scalar_type(), kFn, ": ", name, " has dtype ", dt, " but ",
                first_name, " has ", first->scalar_type(), " (token tensors share one dtype)");
    TORCH_CHECK(t->sizes() == first->sizes(), kFn, ": ", name, " has shape ", t->sizes(),
                " but ", first_name, " has ", first->sizes());
  }
  return &*t;
}

void check_weights(const char* name, const at::Tensor& t, int64_t num_seqs, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 &&
                  t.size(0) == num_seqs && t.is_contiguous(),
              kFn, ": ", name, " must be a contiguous (S,) CPU tensor of dtype ", dtype,
              " (the output dtype), S = ", num_seqs, "; got shape ", t.sizes(), " and dtype ",
              t.scalar_type());
}

template <typename scalar_t>
const scalar_t* ptr(const at::Tensor* t) {
  return t == nullptr ? nullptr : t->data_ptr<scalar_t>();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_loss_cpu(
    const std::optional<at::Tensor>& logp, const std::optional<at::Tensor>& old_logp,
    const std::optional<at::Tensor>& advantages, const std::optional<at::Tensor>& values,
    const std::optional<at::Tensor>& old_values, const std::optional<at::Tensor>& returns,
    const std::optional<at::Tensor>& ref_logp, const std::optional<at::Tensor>& entropy,
    const std::optional<at::Tensor>& is_weights, const std::optional<at::Tensor>& mask,
    const at::Tensor& offsets, const std::optional<at::Tensor>& seq_weight,
    const std::optional<at::Tensor>& lm_weight, const std::vector<double>& params,
    bool need_grad) {
  // The Python op validates everything; these checks guard direct callers of the binding.
  TORCH_CHECK(static_cast<int>(params.size()) == NUM_PARAMS, kFn, ": params must hold ",
              static_cast<int>(NUM_PARAMS), " floats, got ", params.size());
  const int rollout = rollout_level(kFn, params);
  const at::Tensor* first = nullptr;
  const char* first_name = nullptr;
  const at::Tensor* t_logp = check_token("logp", logp, first, first_name);
  const at::Tensor* t_old = check_token("old_logp", old_logp, first, first_name);
  const at::Tensor* t_adv = check_token("advantages", advantages, first, first_name);
  const at::Tensor* t_values = check_token("values", values, first, first_name);
  const at::Tensor* t_old_values = check_token("old_values", old_values, first, first_name);
  const at::Tensor* t_returns = check_token("returns", returns, first, first_name);
  const at::Tensor* t_ref = check_token("ref_logp", ref_logp, first, first_name);
  const at::Tensor* t_entropy = check_token("entropy", entropy, first, first_name);
  const at::Tensor* t_isw = check_token("is_weights", is_weights, first, first_name);
  TORCH_CHECK(t_logp != nullptr || t_values != nullptr || t_entropy != nullptr, kFn,
              ": needs at least one of logp, values or entropy");
  const int64_t n = first->numel();
  const auto in_dtype = first->scalar_type();
  const auto out_dtype = in_dtype == at::kDouble ? at::kDouble : at::kFloat;

  const uint8_t* mask_ptr = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->device().is_cpu() && mask->scalar_type() == at::kBool &&
                    mask->sizes() == first->sizes() && mask->is_contiguous(),
                kFn, ": mask must be a contiguous bool CPU tensor of shape ", first->sizes(),
                " (", first_name, "'s); got shape ", mask->sizes(), " and dtype ",
                mask->scalar_type());
    mask_ptr = mask_bytes(*mask);
  }
  const int64_t* off = check_offsets(kFn, offsets, n);
  const int64_t num_seqs = offsets.size(0) - 1;
  if (seq_weight.has_value()) check_weights("seq_weight", *seq_weight, num_seqs, out_dtype);
  if (lm_weight.has_value()) check_weights("lm_weight", *lm_weight, num_seqs, out_dtype);

  // Which terms run, and what each needs (reference_kernel's contract).
  const bool policy = t_adv != nullptr;
  TORCH_CHECK(!policy || (t_logp != nullptr && t_old != nullptr), kFn,
              ": the policy term (advantages given) needs logp and old_logp");
  const bool value = t_returns != nullptr;
  const double value_clip = params[P_VALUE_CLIP];
  TORCH_CHECK(!value || (t_values != nullptr && (value_clip < 0 || t_old_values != nullptr)),
              kFn, ": the value term (returns given) needs values, and old_values unless "
              "params[P_VALUE_CLIP] < 0");
  const bool kl = t_ref != nullptr && params[P_KL_KIND] > 0;
  if (kl) {
    const double kind = params[P_KL_KIND];
    TORCH_CHECK(kind == 1 || kind == 2 || kind == 3 || kind == 4, kFn,
                ": params[P_KL_KIND] must be 0 (off), 1 (k1), 2 (abs), 3 (k2) or 4 (k3), got ",
                kind);
    TORCH_CHECK(t_logp != nullptr, kFn, ": the KL term (ref_logp given) needs logp");
  }
  const bool lm = lm_weight.has_value();
  TORCH_CHECK(!lm || t_logp != nullptr, kFn, ": the LM term (lm_weight given) needs logp");
  TORCH_CHECK(rollout == 0 || (policy && t_isw != nullptr), kFn,
              ": the rollout correction (params[P_ROLLOUT_IS] > 0) needs the policy term and "
              "the rollout log-probs in is_weights");

  auto grad_or_empty = [&](bool wanted) {
    return wanted && need_grad ? empty_cpu_output(first->sizes(), out_dtype)
                               : at::empty({0}, at::TensorOptions().dtype(out_dtype));
  };
  at::Tensor g_logp = grad_or_empty(t_logp != nullptr);
  at::Tensor g_values = grad_or_empty(value);
  at::Tensor g_entropy = grad_or_empty(t_entropy != nullptr);

  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  std::vector<ChunkSums> parts(static_cast<size_t>(num_chunks));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in_dtype, "token_loss_cpu", [&] {
    using T = at::opmath_type<scalar_t>;  // float, or double for fp64
    Args<scalar_t, T> a;
    a.logp = ptr<scalar_t>(t_logp);
    a.old_logp = ptr<scalar_t>(t_old);
    a.adv = ptr<scalar_t>(t_adv);
    a.values = ptr<scalar_t>(t_values);
    a.old_values = ptr<scalar_t>(t_old_values);
    a.returns = ptr<scalar_t>(t_returns);
    a.ref_logp = ptr<scalar_t>(t_ref);
    a.entropy = ptr<scalar_t>(t_entropy);
    a.isw = ptr<scalar_t>(t_isw);
    a.mask = mask_ptr;
    a.off = off;
    a.num_seqs = num_seqs;
    std::vector<T> token_mean;  // no seq_weight: counting here saves the op two tensor calls
    a.seq_weight = sequence_weights<T>(seq_weight, mask_ptr, n, num_seqs, token_mean);
    a.lm_weight = lm ? lm_weight->data_ptr<T>() : nullptr;
    a.g_logp = g_logp.numel() ? g_logp.data_ptr<T>() : nullptr;
    a.g_values = g_values.numel() ? g_values.data_ptr<T>() : nullptr;
    a.g_entropy = g_entropy.numel() ? g_entropy.data_ptr<T>() : nullptr;
    a.cfg = make_config<T>(params, t_logp != nullptr, policy, t_isw != nullptr, value, kl,
                           t_entropy != nullptr, lm);
    std::vector<T> seq_rollout_weight;
    if (rollout > 1) {
      seq_rollout_weight = rollout_sequence_weights<scalar_t, T>(a.old_logp, a.isw, mask_ptr,
                                                                 off, num_seqs, rollout);
      a.seq_rollout_weight = seq_rollout_weight.data();
    }

    const ChunkFn<scalar_t, T> chunk = pick_chunk<scalar_t, T>();
    at::parallel_for(0, num_chunks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        chunk(a, i * kChunk, std::min(n, (i + 1) * kChunk), parts[static_cast<size_t>(i)]);
      }
    });
  });

  const at::Tensor sums = reduce_loss_sums(parts, out_dtype, rollout != 0);
  return {loss_from_sums(sums, params), sums, g_logp, g_values, g_entropy};
}

at::Tensor loss_from_sums(const at::Tensor& sums, const std::vector<double>& params) {
  // In float64 from the rounded sums, like the reference's loss_total: the same bits.
  double loss = 0;
  for (int k = 0; k < NUM_TERMS; ++k) {
    const double coef = TERM_PARAM[k] < 0 ? 1.0 : params[TERM_PARAM[k]];
    const double sum = sums.scalar_type() == at::kDouble ? sums.data_ptr<double>()[TERM_SUM[k]]
                                                         : sums.data_ptr<float>()[TERM_SUM[k]];
    loss += TERM_SIGN[k] * coef * sum;
  }
  auto out = at::empty({}, at::TensorOptions().dtype(sums.scalar_type()));
  if (sums.scalar_type() == at::kDouble) {
    *out.data_ptr<double>() = loss;
  } else {
    *out.data_ptr<float>() = static_cast<float>(loss);
  }
  return out;
}

int rollout_level(const char* fn, const std::vector<double>& params) {
  const double level = params[P_ROLLOUT_IS];
  TORCH_CHECK(level == 0 || level == 1 || level == 2 || level == 3, fn,
              ": params[P_ROLLOUT_IS] must be 0 (off), 1 (token), 2 (sequence) or 3 "
              "(geometric), got ", level);
  return static_cast<int>(level);
}

template <typename scalar_t, typename T>
std::vector<T> rollout_sequence_weights(const scalar_t* old_logp, const scalar_t* rollout_logp,
                                        const uint8_t* valid, const int64_t* offsets,
                                        int64_t num_seqs, int level) {
  constexpr int kLanes = 8;  // independent partial sums: no chain of dependent adds
  std::vector<T> weight(static_cast<size_t>(num_seqs));
  const int64_t n = offsets[num_seqs];
  // About 16k tokens per task: short batches stay on one thread.
  const int64_t grain = std::max<int64_t>(1, num_seqs * 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, num_seqs, grain, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      double total[kLanes] = {};
      double count[kLanes] = {};
      const int64_t begin = offsets[s], end = offsets[s + 1];
      // Token t of the sequence goes to lane (t - begin) mod kLanes.
      auto add = [&](int64_t t, int lane) {
        // A select, never a product: garbage in a masked slot is never added.
        const bool ok = valid == nullptr || valid[t] != 0;
        const T e = t_clamp(static_cast<T>(old_logp[t]) - static_cast<T>(rollout_logp[t]),
                            T(-20), T(20));
        total[lane] += ok ? static_cast<double>(e) : 0.0;
        count[lane] += ok ? 1.0 : 0.0;
      };
      int64_t t = begin;
      for (; t + kLanes <= end; t += kLanes) {
        for (int l = 0; l < kLanes; ++l) add(t + l, l);
      }
      for (int l = 0; t < end; ++t, ++l) add(t, l);
      double sum = 0, valid_count = 0;
      for (int l = 0; l < kLanes; ++l) {  // a fixed order: the same bits on any threads
        sum += total[l];
        valid_count += count[l];
      }
      const double mean = sum / std::max(valid_count, 1.0);
      const T u = level == 2 ? t_clamp(static_cast<T>(sum), T(-20), T(20)) : static_cast<T>(mean);
      weight[static_cast<size_t>(s)] = static_cast<T>(std::exp(static_cast<double>(u)));
    }
  });
  return weight;
}

template std::vector<float> rollout_sequence_weights<float, float>(
    const float*, const float*, const uint8_t*, const int64_t*, int64_t, int);
template std::vector<double> rollout_sequence_weights<double, double>(
    const double*, const double*, const uint8_t*, const int64_t*, int64_t, int);

at::Tensor reduce_loss_sums(const std::vector<LossSums>& parts, at::ScalarType dtype,
                            bool rollout) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  double total[NUM_SUMS] = {};
  double ratio_min = kInf, ratio_max = -kInf, rollout_min = kInf, rollout_max = -kInf;
  double tokens = 0;
  for (const LossSums& p : parts) {
    // The centred sums of squares merge by Chan et al.'s rule (each block's is about its
    // own mean), before the plain sums they read take this block in.
    const double n = p.sums[S_TOKENS];
    if (n > 0 && tokens > 0) {
      for (const auto [sum, sq] : {std::pair{S_RETURNS, S_RETURNS_SQ},
                                   std::pair{S_VALUE_ERR, S_VALUE_ERR_SQ}}) {
        const double delta = p.sums[sum] / n - total[sum] / tokens;
        total[sq] += delta * delta * (tokens * n / (tokens + n));
      }
    }
    tokens += n;
    for (int k = 0; k < NUM_SUMS; ++k) total[k] += p.sums[k];
    ratio_min = t_min(ratio_min, p.ratio_min);
    ratio_max = t_max(ratio_max, p.ratio_max);
    rollout_min = t_min(rollout_min, p.rollout_min);
    rollout_max = t_max(rollout_max, p.rollout_max);
  }
  total[S_LM] = -total[S_LM];
  total[S_RATIO_MIN] = ratio_min;
  total[S_RATIO_MAX] = ratio_max;
  total[S_ROLLOUT_IS_MIN] = rollout ? rollout_min : 0.0;
  total[S_ROLLOUT_IS_MAX] = rollout ? rollout_max : 0.0;
  auto sums = at::empty({NUM_SUMS}, at::TensorOptions().dtype(dtype));
  if (dtype == at::kDouble) {
    double* o = sums.data_ptr<double>();
    for (int k = 0; k < NUM_SUMS; ++k) o[k] = total[k];
  } else {
    float* o = sums.data_ptr<float>();
    for (int k = 0; k < NUM_SUMS; ++k) o[k] = static_cast<float>(total[k]);
  }
  return sums;
}

template <typename T>
void token_loss_block(const LossBlock<T>& block, const std::vector<double>& params,
                      LossSums& out) {
  TORCH_CHECK(static_cast<int>(params.size()) == NUM_PARAMS, "token_loss_block: params must hold ",
              static_cast<int>(NUM_PARAMS), " floats, got ", params.size());
  Args<T, T> a;
  a.logp = block.logp;
  a.old_logp = block.old_logp;
  a.adv = block.adv;
  a.ref_logp = block.ref_logp;
  a.entropy = block.entropy;
  a.isw = block.isw;
  a.mask = block.valid;
  a.base = block.begin;
  a.off = block.offsets;
  a.num_seqs = block.num_seqs;
  a.seq_weight = block.seq_weight;
  a.lm_weight = block.lm_weight;
  a.seq_rollout_weight = block.seq_rollout_weight;
  a.g_logp = block.g_logp;
  a.g_entropy = block.g_entropy;
  const bool kl = block.ref_logp != nullptr && params[P_KL_KIND] > 0;
  a.cfg = make_config<T>(params, true, true, block.isw != nullptr, false, kl,
                         block.entropy != nullptr, block.lm_weight != nullptr);
  static const ChunkFn<T, T> chunk = pick_chunk<T, T>();
  chunk(a, block.begin, block.end, out);
}

template void token_loss_block<float>(const LossBlock<float>&, const std::vector<double>&,
                                      LossSums&);
template void token_loss_block<double>(const LossBlock<double>&, const std::vector<double>&,
                                       LossSums&);

}  // namespace vapo
