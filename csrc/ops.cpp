// The pybind11 module of the JIT-built extension: binds each backend kernel.
#include <torch/csrc/utils/pybind.h>

#include "ops.h"
#include "cpu/alloc.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vapo_kernels C++ (CPU) and CUDA kernels";
  m.def("gae_scan_cpu", &vapo::gae_scan_cpu, "two-lambda GAE reverse scan (CPU)");
  m.def("valid_counts_cpu", &vapo::valid_counts_cpu, "valid tokens per sequence (CPU)");
  m.def("adaptive_coefficients_cpu", &vapo::adaptive_coefficients_cpu,
        "gamma * length-adaptive lambda_policy per sequence (CPU)");
  m.def("masked_whiten_cpu", &vapo::masked_whiten_cpu, "masked whitening (CPU)");
  m.def("token_logprobs_fwd_cpu", &vapo::token_logprobs_fwd_cpu, "token log-probs, entropy, (max logit, log normaliser) (CPU)");
  m.def("token_logprobs_bwd_cpu", &vapo::token_logprobs_bwd_cpu, "token log-probs backward, may be in place (CPU)");
  m.def("token_loss_cpu", &vapo::token_loss_cpu, "fused PPO/VAPO token loss (CPU)");
  m.def("empty_like_cpu", [](const at::Tensor& like) {
    return vapo::empty_cpu_output(like.sizes(), like.scalar_type());
  }, "uninitialised CPU tensor like `like`, large ones on transparent huge pages");
  m.def("loss_from_gradients", &vapo::loss_from_gradients, "autograd node of a loss from its kernel-written input gradients (any device)");
  m.def("logits_loss_cpu", &vapo::logits_loss_cpu, "log-probs + PPO/VAPO loss + logits gradient in one pass (CPU)");
#ifdef VAPO_WITH_CUDA
  m.def("gae_scan_cuda", &vapo::gae_scan_cuda, "two-lambda GAE reverse scan (CUDA)");
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
