// Per-row log-prob kernels of logprobs.cpp, for kernels that fuse more work per row
// (logits_loss.cpp): the same code paths as vapo::token_logprobs, one row at a time on
// the calling thread.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace vapo {

constexpr int64_t kIgnoreIndex = -100;
// The temperatures the kernels take: vapo_kernels/ops/token_logprobs.py's
// TEMPERATURE_RANGE (tests/test_cpp_kernels.py checks they agree).
constexpr double kMinTemperature = 1e-6, kMaxTemperature = 1e6;

// A valid row summarised, exactly as token_logprobs_fwd_cpu writes it: the max logit m,
// log_norm = log sum exp((z - m) / tau) (so lse = m / tau + log_norm), the entropy and
// the target's log-prob (logp <= 0, entropy >= 0). The backward takes (m, log_norm), not
// lse, so that it measures every logit from the max as the forward did.
struct RowStats {
  double m, log_norm, entropy, logp;
};

template <typename scalar_t>
RowStats logprob_row_forward(const scalar_t* z, int64_t vocab, int64_t target, double tau);

// Writes d loss / d z of the row into out (which may be z itself) given the row's
// (m, log_norm, entropy) from the forward and the gradients of the loss with respect to
// the row's log-prob and entropy, as token_logprobs_bwd_cpu.
template <typename scalar_t>
void logprob_row_backward(const scalar_t* z, scalar_t* out, int64_t vocab, int64_t target,
                          double tau, double m, double log_norm, double entropy,
                          double g_logp, double g_entropy);

// Checks shared by the kernels that take logits: returns the targets pointer. Every
// target must index its row or be -100 (masked rows included: never a read outside).
const int64_t* check_logits_and_targets(const char* fn, const at::Tensor& logits,
                                        const at::Tensor& targets, double temperature);

// `out` must be an (N, V) CPU tensor in logits' dtype, contiguous along V, whose rows do
// not overlap, and either logits itself (in place: each block is read before it is
// written) or disjoint from it.
void check_grad_out(const char* fn, const at::Tensor& logits, const at::Tensor& out);

}  // namespace vapo
