// Torch glue of the CUDA GAE scan: checks the kernel contract's inputs, allocates the
// outputs and launches gae_scan_launch (gae_scan.cu) on the current stream. Compiled only
// with a CUDA build of torch (see vapo_kernels/_backends.py::_build).
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, whose CUDAContextLight.h
// pulls in cuBLAS/cuSPARSE/cuSOLVER headers that a bare toolkit may not ship);
// c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream forwards to.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <string>

#include "gae_scan.cuh"
#include "ops.h"

namespace vapo {
namespace {

using namespace vapo::gpu;  // the launcher's dtype codes

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kGaeFloat32;
    case at::kBFloat16:
      return kGaeBFloat16;
    case at::kHalf:
      return kGaeFloat16;
    case at::kDouble:
      return kGaeFloat64;
    default:
      TORCH_CHECK(false, "gae_scan_cuda: rewards/values must be float16, bfloat16, float32 or "
                         "float64, got ", t);
  }
  return -1;
}

// VAPO_GAE_CUDA_THREADS overrides the block size (tests exercise 32..1024 threads with
// small inputs; benchmarks tune it). Unset or 0: the launcher's heuristic.
int threads_override() {
  const char* env = std::getenv("VAPO_GAE_CUDA_THREADS");
  if (env == nullptr || *env == '\0') return 0;
  const int t = std::atoi(env);
  TORCH_CHECK(t == 0 || (t >= 32 && t <= 1024 && t % 32 == 0),
              "VAPO_GAE_CUDA_THREADS must be 0 or a multiple of 32 in [32, 1024], got '", env,
              "'");
  return t;
}

void check_tokens(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device() == device, "gae_scan_cuda: ", name, " is on ", t.device(),
              " but rewards is on ", device);
  TORCH_CHECK(t.is_contiguous(), "gae_scan_cuda: ", name, " must be contiguous");
}

void check_vector(const at::Tensor& t, const char* name, const at::Device& device) {
  check_tokens(t, name, device);
  TORCH_CHECK(t.dim() == 1, "gae_scan_cuda: ", name, " must be 1-D, got ", t.dim(), "-D");
}

}  // namespace
}  // namespace vapo

// Defined by its qualified name: a signature that drifts from the declaration in ops.h
// is then a compile error here rather than an undefined symbol when the module loads.
std::tuple<at::Tensor, at::Tensor> vapo::gae_scan_cuda(
    const at::Tensor& rewards, const at::Tensor& values,
    const std::optional<at::Tensor>& mask, const at::Tensor& offsets,
    const at::Tensor& coef_policy, const at::Tensor& coef_critic, double gamma,
    bool skip_masked) {
  TORCH_CHECK(rewards.is_cuda(), "gae_scan_cuda: rewards must be a CUDA tensor, got ",
              rewards.device());
  const at::Device device = rewards.device();
  // The token tensors may have any shape (tokens in memory order); the rest are vectors.
  check_tokens(rewards, "rewards", device);
  check_tokens(values, "values", device);
  check_vector(offsets, "offsets", device);
  check_vector(coef_policy, "coef_policy", device);
  check_vector(coef_critic, "coef_critic", device);
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(),
              "gae_scan_cuda: rewards and values must have the same dtype, got ",
              rewards.scalar_type(), " and ", values.scalar_type());
  const int dtype = dtype_code(rewards.scalar_type());
  const int64_t n = rewards.numel();
  TORCH_CHECK(values.sizes() == rewards.sizes(), "gae_scan_cuda: values has shape ",
              values.sizes(), " but rewards has ", rewards.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "gae_scan_cuda: offsets must be int64, got ",
              offsets.scalar_type());
  TORCH_CHECK(offsets.numel() >= 1, "gae_scan_cuda: offsets needs S + 1 >= 1 entries");
  const int64_t num_seqs = offsets.numel() - 1;
  const at::ScalarType out_dtype = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* c : {&coef_policy, &coef_critic}) {
    TORCH_CHECK(c->scalar_type() == out_dtype, "gae_scan_cuda: coefficients must be ",
                out_dtype, " (the output dtype), got ", c->scalar_type());
    TORCH_CHECK(c->numel() == num_seqs, "gae_scan_cuda: coefficients need one entry per "
                "sequence (", num_seqs, "), got ", c->numel());
  }
  const bool* mask_ptr = nullptr;
  if (mask.has_value()) {
    check_tokens(*mask, "mask", device);
    TORCH_CHECK(mask->scalar_type() == at::kBool, "gae_scan_cuda: mask must be bool, got ",
                mask->scalar_type());
    TORCH_CHECK(mask->sizes() == rewards.sizes(), "gae_scan_cuda: mask has shape ",
                mask->sizes(), " but rewards has ", rewards.sizes());
    mask_ptr = mask->data_ptr<bool>();
  }

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor adv = at::empty(rewards.sizes(), rewards.options().dtype(out_dtype));
  at::Tensor ret = at::empty(rewards.sizes(), rewards.options().dtype(out_dtype));
  if (n == 0 || num_seqs == 0) return {adv, ret};

  // Offsets are trusted here (the op checks them on the host unless VAPO_VALIDATE=0):
  // reading them back would cost a device sync per call.
  const int err = vapo::gpu::gae_scan_launch(
      rewards.data_ptr(), values.data_ptr(), mask_ptr, offsets.data_ptr<int64_t>(), num_seqs, n,
      coef_policy.data_ptr(), coef_critic.data_ptr(), gamma, skip_masked, dtype, adv.data_ptr(),
      ret.data_ptr(), threads_override(), c10::cuda::getCurrentCUDAStream(device.index()).stream());
  TORCH_CHECK(err == 0, "gae_scan_cuda: kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {adv, ret};
}
