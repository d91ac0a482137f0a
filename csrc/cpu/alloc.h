// Large CPU outputs on transparent huge pages.
//
// A fresh multi-megabyte output is page-faulted in 4 KiB at a time on first touch; for
// GAE at 512 x 16k (two 33 MB outputs) that cost 20 ms of a 32 ms call. glibc serves such
// sizes with a fresh mmap every time, and torch asks for huge pages only when the
// THP_MEM_ALLOC_ENABLE environment variable was set before its first allocation, so the
// kernels ask for them here: 2 MiB-aligned memory with MADV_HUGEPAGE (advice only).
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/safe_numerics.h>

#include <cstdlib>
#include <limits>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace vapo {

inline at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  constexpr size_t kHugePage = size_t(2) << 20;
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  // The byte count, unless it overflows (then at::empty, which refuses such sizes: a
  // wrapped count would hand a kernel a tensor larger than its memory).
  uint64_t numel = 0, bytes64 = 0;
  if (c10::safe_multiplies_u64(sizes, &numel) ||
      c10::mul_overflows(numel, static_cast<uint64_t>(at::elementSize(dtype)), &bytes64) ||
      bytes64 > std::numeric_limits<size_t>::max() - kHugePage) {
    return at::empty(sizes, options);
  }
  const size_t bytes = static_cast<size_t>(bytes64);
  if (bytes < 2 * kHugePage) return at::empty(sizes, options);
  const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* ptr = std::aligned_alloc(kHugePage, rounded);
  if (ptr == nullptr) return at::empty(sizes, options);
#ifdef __linux__
  (void)madvise(ptr, rounded, MADV_HUGEPAGE);  // a refusal only costs the speed-up
#endif
  at::Tensor out = at::from_blob(ptr, sizes, [](void* p) { std::free(p); }, options);
  // Keep torch's debugging contract: with deterministic algorithms and
  // fill_uninitialized_memory on, uninitialised outputs are NaN (tests rely on it).
  auto& ctx = at::globalContext();
  if (ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory() &&
      at::isFloatingType(dtype)) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

}  // namespace vapo
