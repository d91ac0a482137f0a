// Portable vector helpers shared by the CPU kernels (GCC/Clang vector extensions).
//
// Kernels are compiled once per ISA through target attributes on their entry points;
// these helpers are always inlined into each of them, so every ISA gets code for its own
// vector width instead of calling a baseline copy.
#pragma once

#include <cstdint>
#include <cstring>

// Vectors wider than the baseline ISA are passed between always-inlined helpers only;
// the ABI note GCC prints for them does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VAPO_X86_MULTIVERSION 1
#define VAPO_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define VAPO_X86_MULTIVERSION 0
#endif

#define VAPO_INLINE __attribute__((always_inline)) inline

namespace vapo {

template <typename T, int W>
struct VecOf {
  typedef T type __attribute__((vector_size(sizeof(T) * W)));
};
template <typename T, int W>
using Vec = typename VecOf<T, W>::type;

template <typename V, typename T>
VAPO_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // unaligned vector load
  return v;
}

template <typename V, typename T>
VAPO_INLINE void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename T, int W>
VAPO_INLINE Vec<T, W> splat(T x) {
  Vec<T, W> v;
  for (int k = 0; k < W; ++k) v[k] = x;
  return v;
}

}  // namespace vapo
