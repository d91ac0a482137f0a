// CUDA GAE scan: the __global__ wrapper around gae_scan_block.cuh and its launcher.
// No torch headers: this file compiles with a bare `nvcc -c -arch=sm_90 -std=c++17`.
//
// Launch shape: a 1-D grid with one block per sequence (no 65535 limit on the number of
// sequences), blockDim.x threads each holding kItems contiguous tokens (8 for 2- and
// 4-byte inputs, 4 for float64: 16-32 B of each input per thread, i.e. 16-byte loads).
#include "gae_scan.cuh"
#include "gae_scan_block.cuh"

#include <cuda_runtime.h>

namespace vapo {
namespace gpu {
namespace {

namespace gb = vapo::gae_block;

// Shuffles and barrier of a real block. All 32 lanes of a warp take part in every
// shuffle (the block algorithm keeps control flow warp-uniform around them), so the
// full mask is always right.
struct DeviceCtx {
  __device__ __forceinline__ int tid() const { return static_cast<int>(threadIdx.x); }
  __device__ __forceinline__ int nthreads() const { return static_cast<int>(blockDim.x); }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  template <class T>
  __device__ __forceinline__ T shfl_down(T x, int d) const {
    return __shfl_down_sync(0xffffffffu, x, d);
  }
  template <class T>
  __device__ __forceinline__ T shfl(T x, int src) const {
    return __shfl_sync(0xffffffffu, x, src);
  }
};

// Launch bounds: 64 registers per thread at most, so that a 1024-thread block fits an SM
// and four 256-thread blocks do too (the 512-sequence case keeps all its blocks resident
// in one wave). float64 is compiled for 512 threads instead (see gb::max_threads).
constexpr int kMaxThreads = 1024;

template <class S, bool SKIP, bool HAS_MASK>
__global__ void __launch_bounds__(gb::max_threads<S>())
    gae_scan_kernel(const gb::Args<typename gb::Storage<S>::Acc> args) {
  __shared__ gb::Shared<typename gb::Storage<S>::Acc> shared;
  DeviceCtx ctx;
  gb::gae_sequence<S, SKIP, HAS_MASK>(ctx, shared, args, static_cast<int64_t>(blockIdx.x));
}

template <class S>
cudaError_t launch_typed(const void* rewards, const void* values, const bool* mask,
                         const int64_t* offsets, int64_t num_seqs, const void* coef_policy,
                         const void* coef_critic, double gamma, bool skip_masked, void* adv,
                         void* ret, int threads, cudaStream_t stream) {
  const auto args = gb::make_args<S>(rewards, values, mask, offsets, coef_policy, coef_critic,
                                     gamma, adv, ret);
  if (threads > gb::max_threads<S>()) threads = gb::max_threads<S>();
  const dim3 grid(static_cast<unsigned>(num_seqs));
  const dim3 block(static_cast<unsigned>(threads));
  if (mask == nullptr) {
    // With every token valid the two mask modes are the same computation.
    gae_scan_kernel<S, true, false><<<grid, block, 0, stream>>>(args);
  } else if (skip_masked) {
    gae_scan_kernel<S, true, true><<<grid, block, 0, stream>>>(args);
  } else {
    gae_scan_kernel<S, false, true><<<grid, block, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

int items_for(int dtype) { return dtype == kGaeFloat64 ? 4 : 8; }

int pow2_ceil(int64_t x) {
  int p = 1;
  while (p < x && p < (1 << 30)) p <<= 1;
  return p;
}

}  // namespace

int gae_scan_default_threads(int64_t num_seqs, int64_t num_tokens, int dtype, int sm_count) {
  if (num_seqs <= 0) return 256;
  const int64_t avg_len = (num_tokens + num_seqs - 1) / num_seqs;
  const int64_t avg_groups = (avg_len + items_for(dtype) - 1) / items_for(dtype);
  // No wider than an average sequence needs: threads past its end cost scan work and move
  // no data. At least 64: one-warp blocks would cap an SM at 32 warps (32 blocks/SM).
  int cap = 256;
  // Few sequences (under two blocks per SM): each block walks its sequence alone, so the
  // per-chunk latency is what shows; a wider block moves more bytes per chunk. 256 is the
  // default otherwise: 4 such blocks fit an SM at <= 64 registers, so 512 sequences on
  // 132 SMs are all resident in one wave.
  if (sm_count > 0 && num_seqs < 2 * static_cast<int64_t>(sm_count)) cap = kMaxThreads;
  int t = pow2_ceil(avg_groups);
  if (t < 64) t = 64;
  if (t > cap) t = cap;
  return t;
}

int gae_scan_launch(const void* rewards, const void* values, const bool* mask,
                    const int64_t* offsets, int64_t num_seqs, int64_t num_tokens,
                    const void* coef_policy, const void* coef_critic, double gamma,
                    bool skip_masked, int dtype, void* adv, void* ret, int threads,
                    cudaStream_t stream) {
  if (num_seqs < 0 || num_tokens < 0 || num_seqs > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (num_seqs == 0 || num_tokens == 0) return cudaSuccess;
  if (rewards == nullptr || values == nullptr || offsets == nullptr || coef_policy == nullptr ||
      coef_critic == nullptr || adv == nullptr || ret == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (threads == 0) {
    int device = 0, sms = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    threads = gae_scan_default_threads(num_seqs, num_tokens, dtype, sms);
  }
  if (threads < 32 || threads > kMaxThreads || threads % 32 != 0) return cudaErrorInvalidValue;

  switch (dtype) {
    case kGaeFloat32:
      return launch_typed<float>(rewards, values, mask, offsets, num_seqs, coef_policy,
                                 coef_critic, gamma, skip_masked, adv, ret, threads, stream);
    case kGaeBFloat16:
      return launch_typed<gb::BFloat16>(rewards, values, mask, offsets, num_seqs, coef_policy,
                                        coef_critic, gamma, skip_masked, adv, ret, threads,
                                        stream);
    case kGaeFloat16:
      return launch_typed<gb::Float16>(rewards, values, mask, offsets, num_seqs, coef_policy,
                                       coef_critic, gamma, skip_masked, adv, ret, threads,
                                       stream);
    case kGaeFloat64:
      return launch_typed<double>(rewards, values, mask, offsets, num_seqs, coef_policy,
                                  coef_critic, gamma, skip_masked, adv, ret, threads, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace gpu
}  // namespace vapo
