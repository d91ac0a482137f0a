// The block algorithm of the CUDA GAE scan, written once for two executors:
//
//  * the GPU (gae_scan.cu wraps it in a __global__ kernel with a context whose shuffles
//    are __shfl_*_sync and whose barrier is __syncthreads), and
//  * a host emulator (tests/cuda_host/gae_emulator.cpp) that runs every "thread" of a
//    block as a std::thread, with shuffles and barriers built from std::barrier.
//
// So the scan order, the chunk carries, the partial-group edges, the shared-memory
// protocol and the vector/scalar load paths that run on the GPU are the very code the
// host test exercises; only the context (shuffle/barrier primitives) differs. Every
// multiply-add is written as an explicit fma and every other operation through
// mul/add/sub helpers that nvcc may not contract, so host and device round identically.
//
// Maths (per sequence, reverse in time; see vapo_kernels/ops/gae.py):
//   F_t   = next-valid value at or after t (skip mode: last valid V; zero mode: V' = m?V:0)
//   E_t   = F_{t+1}                      (F at the sequence end = 0)
//   d_t   = r_t + gamma*E_t - V_t        (zero mode: r', V' with masked slots as 0)
//   A_t   = act_t ? c*A_{t+1} + d_t : A_{t+1}   (act = valid in skip mode, always in zero)
// F is an associative "lowest flagged element wins" scan, A an affine scan with
// composites (g, u): x -> g*x + u. Both are computed per chunk of blockDim*kItems
// tokens: each thread folds kItems contiguous tokens serially, a warp-shuffle scan
// combines the 32 lanes, warp 0 combines the warp totals through shared memory, and a
// carry links the chunks, which walk from the end of the sequence to its start.
//
// Masked-slot garbage (huge values, NaN) only ever meets selects, never a multiply by
// the mask, and the combination tree does not depend on the data, so valid outputs are
// bit-for-bit independent of what masked slots hold.
#pragma once

#include <cuda_fp16.h>  // __half2float: host-callable too, so the emulator shares it

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define VAPO_HD __host__ __device__ __forceinline__
#define VAPO_UNROLL _Pragma("unroll")
#else
#define VAPO_HD inline
#define VAPO_UNROLL _Pragma("GCC unroll 16")
#endif

namespace vapo {
namespace gae_block {

constexpr int kWarp = 32;
constexpr int kMaxWarps = 32;  // blockDim.x <= 1024

// ---------------------------------------------------------------------------------------
// Rounding-exact arithmetic. On the device, __fmul_rn/__fadd_rn are never fused into an
// FMA by nvcc, and fma() is a single fused op on both sides: host and GPU give the same
// bits, which is what lets a GPU test compare the kernel with the emulator bit for bit.

VAPO_HD float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
VAPO_HD double mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
VAPO_HD float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
VAPO_HD double add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
VAPO_HD float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
VAPO_HD double sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
VAPO_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
VAPO_HD double fma_rn(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// ---------------------------------------------------------------------------------------
// Storage types. Inputs travel as raw 32-bit words (a "tile") and are converted only when
// used, so a prefetched tile is just registers waiting on loads in flight: converting at
// load time would stall on the load right away.

struct BFloat16 {};  // tags: the host has no __nv_bfloat16 arithmetic, and needs none
struct Float16 {};

VAPO_HD float word_as_float(uint32_t w) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(w);
#else
  float f;
  std::memcpy(&f, &w, 4);
  return f;
#endif
}

// Output values as 32-bit words for the vector stores.
VAPO_HD void to_words(float x, uint32_t* w) {
#if defined(__CUDA_ARCH__)
  w[0] = __float_as_uint(x);
#else
  std::memcpy(w, &x, 4);
#endif
}
VAPO_HD void to_words(double x, uint32_t* w) {
#if defined(__CUDA_ARCH__)
  w[0] = static_cast<uint32_t>(__double2loint(x));
  w[1] = static_cast<uint32_t>(__double2hiint(x));
#else
  std::memcpy(w, &x, 8);
#endif
}

template <class S>
struct Storage;

template <>
struct Storage<float> {
  using Acc = float;
  static constexpr int kBytes = 4;
  static constexpr int kItems = 8;  // 32 B of input per thread: two 16-byte loads
  VAPO_HD static Acc get(const uint32_t* w, int j) { return word_as_float(w[j]); }
};

template <>
struct Storage<double> {
  using Acc = double;
  static constexpr int kBytes = 8;
  static constexpr int kItems = 4;  // 32 B per thread as for float; halves the registers
  VAPO_HD static Acc get(const uint32_t* w, int j) {
    const uint64_t bits = (uint64_t(w[2 * j + 1]) << 32) | w[2 * j];
#if defined(__CUDA_ARCH__)
    return __longlong_as_double(static_cast<long long>(bits));
#else
    double d;
    std::memcpy(&d, &bits, 8);
    return d;
#endif
  }
};

template <>
struct Storage<BFloat16> {
  using Acc = float;
  static constexpr int kBytes = 2;
  static constexpr int kItems = 8;  // one 16-byte load per thread
  // bf16 is the top half of a float32: widening is a shift, exact by construction.
  VAPO_HD static Acc get(const uint32_t* w, int j) {
    return word_as_float(((w[j >> 1] >> (16 * (j & 1))) & 0xffffu) << 16);
  }
};

template <>
struct Storage<Float16> {
  using Acc = float;
  static constexpr int kBytes = 2;
  static constexpr int kItems = 8;
  VAPO_HD static Acc get(const uint32_t* w, int j) {
    const unsigned short h = static_cast<unsigned short>((w[j >> 1] >> (16 * (j & 1))) & 0xffffu);
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(h));
#else
    __half_raw raw;
    raw.x = h;
    return __half2float(__half(raw));
#endif
  }
};

// ---------------------------------------------------------------------------------------
// Kernel arguments (device pointers on the GPU, host pointers in the emulator).

template <class Acc>
struct Args {
  const unsigned char* rewards;  // (N,) storage dtype
  const unsigned char* values;   // (N,) storage dtype
  const unsigned char* mask;     // (N,) bytes, 0 = masked; ignored unless HAS_MASK
  const int64_t* offsets;        // (S + 1,)
  const Acc* coef_policy;        // (S,)
  const Acc* coef_critic;        // (S,)
  Acc* adv;                      // (N,)
  Acc* ret;                      // (N,)
  Acc gamma;
  // All base pointers aligned for the vector accesses of a whole group (16 B for data,
  // kItems B for the mask). Checked by the launcher; false falls back to scalar accesses.
  bool aligned;
};

// Block-size cap of a storage type: float64 tiles take twice the registers, so its
// kernel is compiled for 512 threads (up to 128 registers) instead of 1024 (64).
template <class S>
constexpr int max_threads() {
  return Storage<S>::kBytes == 8 ? 512 : 1024;
}

inline bool aligned_to(const void* p, uintptr_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// The launcher's argument block, shared by the CUDA launcher and the host emulator.
template <class S>
inline Args<typename Storage<S>::Acc> make_args(const void* rewards, const void* values,
                                                const void* mask, const int64_t* offsets,
                                                const void* coef_policy, const void* coef_critic,
                                                double gamma, void* adv, void* ret) {
  using Acc = typename Storage<S>::Acc;
  Args<Acc> a;
  a.rewards = static_cast<const unsigned char*>(rewards);
  a.values = static_cast<const unsigned char*>(values);
  a.mask = static_cast<const unsigned char*>(mask);
  a.offsets = offsets;
  a.coef_policy = static_cast<const Acc*>(coef_policy);
  a.coef_critic = static_cast<const Acc*>(coef_critic);
  a.adv = static_cast<Acc*>(adv);
  a.ret = static_cast<Acc*>(ret);
  a.gamma = static_cast<Acc>(gamma);
  // Group g starts at byte g*kItems*size of each array, a multiple of 16 for the data and
  // of kItems for the mask: aligned base pointers make every interior group aligned. A
  // tensor with a storage offset (a slice) can break this; it then takes scalar accesses.
  a.aligned = aligned_to(rewards, 16) && aligned_to(values, 16) && aligned_to(adv, 16) &&
              aligned_to(ret, 16) && aligned_to(mask, Storage<S>::kItems);
  return a;
}

// 16/8/4-byte accesses of `bytes` contiguous bytes at an address aligned to the access.
template <int kBytesTotal>
VAPO_HD void load_words(const unsigned char* p, uint32_t* w) {
#if defined(__CUDA_ARCH__)
  if constexpr (kBytesTotal % 16 == 0) {
    VAPO_UNROLL
    for (int i = 0; i < kBytesTotal / 16; ++i) {
      const uint4 q = __ldg(reinterpret_cast<const uint4*>(p) + i);
      w[4 * i] = q.x;
      w[4 * i + 1] = q.y;
      w[4 * i + 2] = q.z;
      w[4 * i + 3] = q.w;
    }
  } else if constexpr (kBytesTotal == 8) {
    const uint2 q = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = q.x;
    w[1] = q.y;
  } else {
    static_assert(kBytesTotal == 4, "group sizes are 4, 8 or a multiple of 16 bytes");
    w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
  }
#else
  std::memcpy(w, p, kBytesTotal);
#endif
}

template <int kBytesTotal>
VAPO_HD void store_words(unsigned char* p, const uint32_t* w) {
#if defined(__CUDA_ARCH__)
  static_assert(kBytesTotal % 16 == 0, "output groups are 32 bytes");
  VAPO_UNROLL
  for (int i = 0; i < kBytesTotal / 16; ++i) {
    reinterpret_cast<uint4*>(p)[i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
  }
#else
  std::memcpy(p, w, kBytesTotal);
#endif
}

// One element's bytes into its place in the word array (the scalar path of edge groups).
template <int kSize>
VAPO_HD void load_element(const unsigned char* p, int j, uint32_t* w) {
  if constexpr (kSize == 1) {
    w[j >> 2] |= uint32_t(*p) << (8 * (j & 3));
  } else if constexpr (kSize == 2) {
    w[j >> 1] |= uint32_t(*reinterpret_cast<const unsigned short*>(p)) << (16 * (j & 1));
  } else if constexpr (kSize == 4) {
    w[j] = *reinterpret_cast<const uint32_t*>(p);
  } else {
    static_assert(kSize == 8, "element sizes are 1, 2, 4 or 8 bytes");
    w[2 * j] = reinterpret_cast<const uint32_t*>(p)[0];
    w[2 * j + 1] = reinterpret_cast<const uint32_t*>(p)[1];
  }
}

template <class S>
struct Tile {
  static constexpr int kItems = Storage<S>::kItems;
  static constexpr int kWords = kItems * Storage<S>::kBytes / 4;
  uint32_t r[kWords];
  uint32_t v[kWords];
  uint32_t m[kItems / 4];
};

// Loads group `grp` (tokens [grp*kItems, grp*kItems + kItems)) of the sequence [s, e).
// Groups are aligned to absolute token indices, not to the sequence start, so that the
// groups inside a sequence are vector-aligned whatever the offsets are; the (at most
// two) groups that straddle a sequence edge take the guarded scalar path.
template <class S, bool HAS_MASK, class Acc>
VAPO_HD void load_tile(const Args<Acc>& a, int64_t grp, int64_t g_first, int64_t s, int64_t e,
                       Tile<S>& t) {
  constexpr int I = Storage<S>::kItems;
  constexpr int B = Storage<S>::kBytes;
  const int64_t base = grp * I;
  if (a.aligned && grp >= g_first && base >= s && base + I <= e) {
    load_words<I * B>(a.rewards + base * B, t.r);
    load_words<I * B>(a.values + base * B, t.v);
    if constexpr (HAS_MASK) load_words<I>(a.mask + base, t.m);
    return;
  }
  VAPO_UNROLL
  for (int i = 0; i < Tile<S>::kWords; ++i) t.r[i] = t.v[i] = 0u;
  VAPO_UNROLL
  for (int i = 0; i < I / 4; ++i) t.m[i] = 0u;
  VAPO_UNROLL
  for (int j = 0; j < I; ++j) {
    const int64_t idx = base + j;
    if (idx >= s && idx < e) {  // false for every token of an idle thread (grp < g_first)
      load_element<B>(a.rewards + idx * B, j, t.r);
      load_element<B>(a.values + idx * B, j, t.v);
      if constexpr (HAS_MASK) load_element<1>(a.mask + idx, j, t.m);
    }
  }
}

template <class Acc, int I>
VAPO_HD void store_group(const Args<Acc>& a, int64_t grp, uint32_t in_bits, const Acc* adv,
                         const Acc* ret) {
  const int64_t base = grp * I;
  if (in_bits == (1u << I) - 1u && a.aligned) {
    constexpr int kW = sizeof(Acc) / 4;
    uint32_t w[I * kW];
    VAPO_UNROLL
    for (int j = 0; j < I; ++j) to_words(adv[j], w + j * kW);
    store_words<I * sizeof(Acc)>(reinterpret_cast<unsigned char*>(a.adv + base), w);
    VAPO_UNROLL
    for (int j = 0; j < I; ++j) to_words(ret[j], w + j * kW);
    store_words<I * sizeof(Acc)>(reinterpret_cast<unsigned char*>(a.ret + base), w);
    return;
  }
  VAPO_UNROLL
  for (int j = 0; j < I; ++j) {
    if (in_bits & (1u << j)) {
      a.adv[base + j] = adv[j];
      a.ret[base + j] = ret[j];
    }
  }
}

// ---------------------------------------------------------------------------------------
// The two scan monoids. combine(lo, hi): the composite of a segment `lo` followed (in
// index order) by a segment `hi`; as the scan runs backwards, hi is applied first.

// Next-valid value: the lowest-index flagged element of a segment wins.
template <class Acc>
struct NextValid {
  using Value = Acc;
  int flag;
  Acc value;
  VAPO_HD static NextValid identity() { return {0, Acc(0)}; }
  VAPO_HD static NextValid combine(const NextValid& lo, const NextValid& hi) {
    return lo.flag ? lo : hi;  // a select: no arithmetic touches the losing value
  }
  VAPO_HD Value apply(Value x) const { return flag ? value : x; }
  template <class Ctx>
  VAPO_HD NextValid shfl_down(Ctx& ctx, int d) const {
    return {ctx.shfl_down(flag, d), ctx.shfl_down(value, d)};
  }
  template <class Ctx>
  VAPO_HD static Value shfl_down_value(Ctx& ctx, Value x, int d) { return ctx.shfl_down(x, d); }
  template <class Ctx>
  VAPO_HD static Value shfl_value(Ctx& ctx, Value x, int src) { return ctx.shfl(x, src); }
};

template <class Acc>
struct Pair {
  Acc policy, critic;
};

// Two affine maps x -> g*x + u that share the shuffles (policy and critic lambdas).
template <class Acc>
struct Affine2 {
  using Value = Pair<Acc>;
  Acc gp, up, gc, uc;
  VAPO_HD static Affine2 identity() { return {Acc(1), Acc(0), Acc(1), Acc(0)}; }
  VAPO_HD static Affine2 combine(const Affine2& lo, const Affine2& hi) {
    return {mul(lo.gp, hi.gp), fma_rn(lo.gp, hi.up, lo.up), mul(lo.gc, hi.gc),
            fma_rn(lo.gc, hi.uc, lo.uc)};
  }
  VAPO_HD Value apply(Value x) const { return {fma_rn(gp, x.policy, up), fma_rn(gc, x.critic, uc)}; }
  template <class Ctx>
  VAPO_HD Affine2 shfl_down(Ctx& ctx, int d) const {
    return {ctx.shfl_down(gp, d), ctx.shfl_down(up, d), ctx.shfl_down(gc, d), ctx.shfl_down(uc, d)};
  }
  template <class Ctx>
  VAPO_HD static Value shfl_down_value(Ctx& ctx, Value x, int d) {
    return {ctx.shfl_down(x.policy, d), ctx.shfl_down(x.critic, d)};
  }
  template <class Ctx>
  VAPO_HD static Value shfl_value(Ctx& ctx, Value x, int src) {
    return {ctx.shfl(x.policy, src), ctx.shfl(x.critic, src)};
  }
};

template <class Acc>
struct Shared {
  NextValid<Acc> f_total[kMaxWarps];  // per-warp composites of the next-valid scan
  Acc f_enter[kMaxWarps];             // next-valid value entering each warp from above
  Affine2<Acc> a_total[kMaxWarps];
  Pair<Acc> a_enter[kMaxWarps];
};

// Lane l ends with the composite of lanes l..31 (a suffix scan: later lanes hold later
// tokens). Five shuffle rounds; a lane whose partner is past lane 31 keeps its value
// (shfl_down returns the caller's own value there, which must not be combined).
template <class C, class Ctx>
VAPO_HD C warp_suffix_scan(Ctx& ctx, int lane, C x) {
  VAPO_UNROLL
  for (int d = 1; d < kWarp; d <<= 1) {
    const C other = x.shfl_down(ctx, d);
    if (lane + d < kWarp) x = C::combine(x, other);
  }
  return x;
}

// Given each thread's warp-suffix composite `incl`, returns the scan value entering the
// thread from above (at its highest token), and advances `carry` (the value entering the
// chunk from the chunk above; meaningful in warp 0, which alone reads and updates it)
// to the value leaving the chunk at its lowest token.
//
// Two barriers. The shared arrays of the two scans are distinct, and every read of one
// of them is separated from its next write by at least one barrier of the other scan, so
// the chunk loop needs no extra barrier (checked under ThreadSanitizer in the emulator).
template <class C, class Ctx>
VAPO_HD typename C::Value block_enter(Ctx& ctx, const C& incl, C* total,
                                      typename C::Value* enter, typename C::Value& carry) {
  using Value = typename C::Value;
  const int tid = ctx.tid();
  const int lane = tid & (kWarp - 1);
  const int warp = tid / kWarp;
  const int nwarps = ctx.nthreads() / kWarp;
  if (lane == 0) total[warp] = incl;
  ctx.sync();
  if (warp == 0) {
    C t = lane < nwarps ? total[lane] : C::identity();
    t = warp_suffix_scan(ctx, lane, t);
    const Value low = t.apply(carry);  // value leaving warp `lane` at its lowest token
    const Value up = C::shfl_down_value(ctx, low, 1);
    if (lane < nwarps) enter[lane] = lane == nwarps - 1 ? carry : up;
    carry = C::shfl_value(ctx, low, 0);
  }
  ctx.sync();
  const Value x = enter[warp];
  const Value low = incl.apply(x);
  const Value up = C::shfl_down_value(ctx, low, 1);
  return lane == kWarp - 1 ? x : up;
}

// ---------------------------------------------------------------------------------------
// One sequence, one block. Ctx provides tid(), nthreads() (a multiple of 32, <= 1024),
// sync(), shfl_down(x, d) and shfl(x, src) with CUDA's semantics for width 32.

template <class S, bool SKIP, bool HAS_MASK, class Ctx>
VAPO_HD void gae_sequence(Ctx& ctx, Shared<typename Storage<S>::Acc>& sh,
                          const Args<typename Storage<S>::Acc>& a, int64_t seq) {
  using St = Storage<S>;
  using Acc = typename St::Acc;
  constexpr int I = St::kItems;
  // Without a mask both modes are the same computation; the launcher picks SKIP then.
  static_assert(HAS_MASK || SKIP, "maskless launches use the SKIP instantiation");

  const int64_t s = a.offsets[seq];
  const int64_t e = a.offsets[seq + 1];
  if (e <= s) return;  // empty sequence: block-uniform, before any barrier
  const Acc cp = a.coef_policy[seq];
  const Acc cc = a.coef_critic[seq];
  const Acc gamma = a.gamma;
  const int tid = ctx.tid();
  const int nthr = ctx.nthreads();
  const int lane = tid & (kWarp - 1);

  const int64_t g_first = s / I;  // groups are aligned to absolute token indices
  const int64_t g_last = (e - 1) / I;
  const int64_t nchunks = (g_last - g_first + nthr) / nthr;
  // Chunk k covers the k-th block of nthr groups counted from the end; thread tid holds
  // the tid-th of them, so a higher thread holds later tokens.
  const int64_t top = g_last - (nthr - 1 - tid);

  Acc carry_f = Acc(0);  // F and A entering the chunk from above (read in warp 0 only)
  Pair<Acc> carry_a = {Acc(0), Acc(0)};

  Tile<S> cur, next{};  // next zeroed: the last iteration copies it without loading it
  load_tile<S, HAS_MASK>(a, top, g_first, s, e, cur);
  for (int64_t k = 0; k < nchunks; ++k) {
    const int64_t grp = top - k * nthr;
    // Software pipelining: the next chunk's loads are in flight during this chunk's
    // scans and stores (a long sequence is one block's serial walk, so its latency shows).
    if (k + 1 < nchunks) load_tile<S, HAS_MASK>(a, grp - nthr, g_first, s, e, next);

    const int64_t base = grp * I;
    uint32_t in_bits = 0u, valid_bits = 0u;
    VAPO_UNROLL
    for (int j = 0; j < I; ++j) {
      const bool in = grp >= g_first && base + j >= s && base + j < e;
      const bool m = HAS_MASK ? ((cur.m[j >> 2] >> (8 * (j & 3))) & 0xffu) != 0u : true;
      in_bits |= uint32_t(in) << j;
      valid_bits |= uint32_t(in && m) << j;
    }
    // flag = token takes part in the scans: valid tokens in skip mode (masked ones are
    // skipped), every token of the sequence in zero mode (masked ones count as V = r = 0).
    const uint32_t act_bits = SKIP ? valid_bits : in_bits;

    Acc v[I];
    VAPO_UNROLL
    for (int j = 0; j < I; ++j) v[j] = St::get(cur.v, j);

    // Pass 1: next-valid value; a flagged token offers its V (0 if masked, zero mode).
    NextValid<Acc> f = NextValid<Acc>::identity();
    VAPO_UNROLL
    for (int j = I - 1; j >= 0; --j) {
      if (act_bits & (1u << j)) f = {1, (valid_bits & (1u << j)) ? v[j] : Acc(0)};
    }
    f = warp_suffix_scan(ctx, lane, f);
    Acc next_value = block_enter(ctx, f, sh.f_total, sh.f_enter, carry_f);

    // delta per token (walking down from the thread's last token, as the recurrence
    // does), then the thread's affine composite of both lambdas.
    Acc delta[I];
    VAPO_UNROLL
    for (int j = I - 1; j >= 0; --j) {
      const bool valid = valid_bits & (1u << j);
      const Acc r = St::get(cur.r, j);
      const Acc rr = SKIP ? r : (valid ? r : Acc(0));
      const Acc vv = valid ? v[j] : Acc(0);  // skip mode reads delta on valid tokens only
      delta[j] = sub(fma_rn(gamma, next_value, rr), vv);
      if (act_bits & (1u << j)) next_value = vv;
    }
    Affine2<Acc> g = Affine2<Acc>::identity();
    VAPO_UNROLL
    for (int j = I - 1; j >= 0; --j) {
      if (act_bits & (1u << j)) g = Affine2<Acc>::combine({cp, delta[j], cc, delta[j]}, g);
    }
    // Pass 2: both advantage scans share the shuffles and the barriers.
    g = warp_suffix_scan(ctx, lane, g);
    Pair<Acc> adv_run = block_enter(ctx, g, sh.a_total, sh.a_enter, carry_a);

    Acc adv[I], ret[I];
    VAPO_UNROLL
    for (int j = I - 1; j >= 0; --j) {
      if (act_bits & (1u << j)) {  // a skipped token reports the running values unchanged
        adv_run.policy = fma_rn(cp, adv_run.policy, delta[j]);
        adv_run.critic = fma_rn(cc, adv_run.critic, delta[j]);
      }
      // Returns add the token's own V: raw in skip mode (as verl), V' in zero mode.
      const Acc vret = SKIP ? v[j] : ((valid_bits & (1u << j)) ? v[j] : Acc(0));
      adv[j] = adv_run.policy;
      ret[j] = add(adv_run.critic, vret);
    }
    store_group<Acc, I>(a, grp, in_bits, adv, ret);
    cur = next;
  }
}

}  // namespace gae_block
}  // namespace vapo
