// Declarations of every kernel entry point bound into the Python extension.
// The schema of each op lives in Python (vapo_kernels/ops/*.py, torch.library); these
// functions are the backend kernels behind it and follow the "kernel contract" written
// in the op module's reference_kernel docstring.
#pragma once
// Only the Tensor type here: every kernel file includes this, and <torch/extension.h>
// (pybind11, Python and all of torch's C++ API) costs ~25 s of compile per file; only
// ops.cpp, which binds the kernels, needs the pybind11 type casters.
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace vapo {

// GAE: two-lambda reverse scan over ragged sequences (vapo_kernels/ops/gae.py).
std::tuple<at::Tensor, at::Tensor> gae_scan_cpu(
    const at::Tensor& rewards, const at::Tensor& values,
    const std::optional<at::Tensor>& mask, const at::Tensor& offsets,
    const at::Tensor& coef_policy, const at::Tensor& coef_critic, double gamma,
    bool skip_masked);

// Valid (mask = 1) tokens per sequence: (S,) int64.
at::Tensor valid_counts_cpu(const at::Tensor& mask, const at::Tensor& offsets);

// gamma * VAPO's length-adaptive lambda_policy per sequence: (S,) in dtype (float32/64).
at::Tensor adaptive_coefficients_cpu(const std::optional<at::Tensor>& mask,
                                     const at::Tensor& offsets, double alpha, double gamma,
                                     at::ScalarType dtype);

// Masked whitening over all valid tokens; returns (out, number of valid tokens).
std::tuple<at::Tensor, at::Tensor> masked_whiten_cpu(const at::Tensor& x,
                                                     const std::optional<at::Tensor>& mask,
                                                     bool unbiased, double eps, bool shift_mean);

// Token log-probs / entropy / stats (N, 2) = (max logit, log normaliser) from logits, and
// their backward from those written into `out` (which may be the logits themselves)
// (vapo_kernels/ops/token_logprobs.py).
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& valid,
    double temperature);
void token_logprobs_bwd_cpu(const at::Tensor& grad_logp,
                            const std::optional<at::Tensor>& grad_entropy,
                            const at::Tensor& logits, const at::Tensor& targets,
                            const std::optional<at::Tensor>& valid, const at::Tensor& stats,
                            const at::Tensor& entropy, double temperature, at::Tensor out);

// Fused PPO / VAPO token loss: (loss, sums, grad_logp, grad_values, grad_entropy)
// (vapo_kernels/ops/loss_spec.py, reference_kernel). Absent terms' tensors are None.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_loss_cpu(
    const std::optional<at::Tensor>& logp, const std::optional<at::Tensor>& old_logp,
    const std::optional<at::Tensor>& advantages, const std::optional<at::Tensor>& values,
    const std::optional<at::Tensor>& old_values, const std::optional<at::Tensor>& returns,
    const std::optional<at::Tensor>& ref_logp, const std::optional<at::Tensor>& entropy,
    const std::optional<at::Tensor>& is_weights, const std::optional<at::Tensor>& mask,
    const at::Tensor& offsets, const std::optional<at::Tensor>& seq_weight,
    const std::optional<at::Tensor>& lm_weight, const std::vector<double>& params,
    bool need_grad);

// Token log-probs, the loss above and d loss / d logits in one pass over the rows:
// returns the sums; the gradient goes to `out` (may be logits) unless None
// (vapo_kernels/ops/logits_loss.py, reference_logits_kernel).
at::Tensor logits_loss_cpu(const at::Tensor& logits, const at::Tensor& targets,
                           const at::Tensor& old_logp, const at::Tensor& advantages,
                           const std::optional<at::Tensor>& ref_logp,
                           const std::optional<at::Tensor>& is_weights, const at::Tensor& valid,
                           const at::Tensor& offsets,
                           const std::optional<at::Tensor>& seq_weight,
                           const std::optional<at::Tensor>& lm_weight,
                           const std::vector<double>& params, double temperature,
                           const std::optional<at::Tensor>& out);

#ifdef VAPO_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> gae_scan_cuda(
    const at::Tensor& rewards, const at::Tensor& values,
    const std::optional<at::Tensor>& mask, const at::Tensor& offsets,
    const at::Tensor& coef_policy, const at::Tensor& coef_critic, double gamma,
    bool skip_masked);
#endif

// A loss (0-d) whose backward is grads[i] * grad_loss for inputs[i] (cast to its dtype,
// in its shape): the autograd node of the loss kernels, which write their input
// gradients in the forward pass (csrc/loss_node.cpp). donated: the grads' buffers were
// given up by their owner (inplace_backward's logits) and may be scaled in place.
at::Tensor loss_from_gradients(const at::Tensor& loss, const std::vector<at::Tensor>& inputs,
                               const std::vector<at::Tensor>& grads, const std::string& op,
                               bool donated);

}  // namespace vapo
