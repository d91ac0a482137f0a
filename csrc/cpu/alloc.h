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
#include <c10/util/accumulate.h>

#include <cstdlib>
#include <limits>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace vapo {

inline at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  constexpr size_t kHugePage = size_t(2) << 20;
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  const size_t bytes = c10::multiply_integers(sizes) * at::elementSize(dtype);
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
