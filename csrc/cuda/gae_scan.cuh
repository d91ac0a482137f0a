// Launcher of the CUDA GAE scan (kernel in gae_scan.cu, block algorithm in
// gae_scan_block.cuh). Free of torch headers on purpose: the .cu must compile with a bare
// `nvcc` on a machine without a CUDA build of torch, and the torch glue
// (gae_cuda.cpp) is the only file that sees both worlds.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace vapo {
namespace gpu {

// Storage dtype of rewards/values. Accumulation and outputs are float32, or float64 for
// float64 inputs (the kernel contract of vapo_kernels/ops/gae.py::reference_kernel).
enum GaeDType : int { kGaeFloat32 = 0, kGaeBFloat16 = 1, kGaeFloat16 = 2, kGaeFloat64 = 3 };

// Two-lambda GAE reverse scan over ragged sequences, one thread block per sequence.
//
//   rewards, values: (num_tokens,) of `dtype`; mask: (num_tokens,) bytes (0 = masked) or
//   nullptr (all valid); offsets: (num_seqs + 1,) int64 with 0 = offsets[0] <= ... <=
//   offsets[num_seqs] = num_tokens; coef_policy, coef_critic: (num_seqs,) gamma*lambda in
//   the output dtype; adv, ret: (num_tokens,) outputs in the output dtype.
//   skip_masked: true = verl multi-turn carry, false = zero masked V and r.
//   threads: block size, a multiple of 32 in [32, 1024], or 0 to let the launcher choose;
//   float64 inputs run at most 512 (larger requests are lowered to 512).
//
// All pointers are device pointers; nothing is synchronised. Returns a cudaError_t value
// (cudaSuccess == 0; cudaErrorInvalidValue for bad arguments).
int gae_scan_launch(const void* rewards, const void* values, const bool* mask,
                    const int64_t* offsets, int64_t num_seqs, int64_t num_tokens,
                    const void* coef_policy, const void* coef_critic, double gamma,
                    bool skip_masked, int dtype, void* adv, void* ret, int threads,
                    cudaStream_t stream);

// The block size gae_scan_launch picks when threads == 0 (exposed for benchmarks/tests).
int gae_scan_default_threads(int64_t num_seqs, int64_t num_tokens, int dtype, int sm_count);

}  // namespace gpu
}  // namespace vapo
