// The token-loss terms of loss.cpp over one block of tokens, for kernels that produce
// the log-probs themselves (logits_loss.cpp): the same tiles, rules and sums as
// vapo::token_loss, on inputs already in the compute type T (float, or double).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

// P_* (params) and S_* (sums) slots, NUM_PARAMS and NUM_SUMS: generated from
// vapo_kernels/_loss_layout.py, the one definition every backend reads.
#include "loss_layout.h"
#include "offsets.h"

namespace vapo {

// One block's sums, combined across blocks in block order by reduce_loss_sums.
struct LossSums {
  double sums[NUM_SUMS];
  double ratio_min, ratio_max;
  double rollout_min, rollout_max;  // the rollout IS weights' extremes (correction on)
};

// Tokens [begin, end) of a batch. Per-token arrays hold tokens [begin, end) (index
// t - begin); offsets (S + 1) and the per-sequence weights are the batch's. The policy
// term (logp, old_logp, advantages) is always on; ref_logp (with params' KL kind > 0),
// entropy, is_weights and lm_weight switch their terms on; g_logp / g_entropy (null:
// not written) receive the gradients, 0 on masked tokens. With the rollout correction on
// (params[P_ROLLOUT_IS] > 0) isw holds the rollout log-probs, and at the sequence levels
// seq_rollout_weight the batch's per-sequence weights (rollout_sequence_weights).
template <typename T>
struct LossBlock {
  int64_t begin = 0, end = 0;
  const T *logp = nullptr, *old_logp = nullptr, *adv = nullptr, *ref_logp = nullptr,
          *entropy = nullptr, *isw = nullptr;
  const uint8_t* valid = nullptr;  // mask bytes (mask_bytes): nonzero = valid
  const int64_t* offsets = nullptr;
  int64_t num_seqs = 0;
  const T* seq_weight = nullptr;
  const T* lm_weight = nullptr;
  const T* seq_rollout_weight = nullptr;
  T *g_logp = nullptr, *g_entropy = nullptr;
};

template <typename T>
void token_loss_block(const LossBlock<T>& block, const std::vector<double>& params,
                      LossSums& out);

// The (NUM_SUMS,) sums tensor of the kernel contract from the blocks' sums, added in
// block order (the same bits whatever the number of threads). `rollout`: the rollout
// correction is on (its min / max slots are +-inf identities when no token is valid,
// 0 when it is off).
at::Tensor reduce_loss_sums(const std::vector<LossSums>& parts, at::ScalarType dtype,
                            bool rollout);

// The per-sequence weights a loss kernel reads: `seq_weight`'s data, or, when it is None,
// the token mean - 1 / max(1, valid tokens) on every sequence, in double and rounded once
// (the reference's bits) - written to `uniform`. `valid`: n bytes, or null (all valid).
template <typename T>
const T* sequence_weights(const std::optional<at::Tensor>& seq_weight, const uint8_t* valid,
                          int64_t n, int64_t num_seqs, std::vector<T>& uniform) {
  if (seq_weight.has_value()) return seq_weight->data_ptr<T>();
  const int64_t count = valid == nullptr ? n : n - std::count(valid, valid + n, uint8_t{0});
  const double mean = 1.0 / static_cast<double>(std::max<int64_t>(count, 1));
  uniform.assign(static_cast<size_t>(num_seqs), static_cast<T>(mean));
  return uniform.data();
}

// The 0-d loss from the sums (LOSS_TERMS of loss_layout.h), in float64 from the sums as
// rounded to their dtype, then rounded once: the bits of the reference's loss_total.
at::Tensor loss_from_sums(const at::Tensor& sums, const std::vector<double>& params);

// The rollout correction's level in params (0 off, 1 token, 2 sequence, 3 geometric),
// checked (`fn` names the kernel in the error).
int rollout_level(const char* fn, const std::vector<double>& params);

// Per-sequence weights exp(u_s) (before truncation or rejection) of the rollout
// correction's sequence levels, over the valid tokens of each sequence (valid: null =
// all), e_t = clamp(old - rollout, -20, 20) in T: level 2 (sequence) u = clamp(sum e,
// -20, 20), level 3 (geometric) u = sum e / count (0 for a sequence without valid
// tokens). A sequence's sum is taken in double in a fixed order, so the result does not
// depend on the number of threads.
template <typename scalar_t, typename T>
std::vector<T> rollout_sequence_weights(const scalar_t* old_logp, const scalar_t* rollout_logp,
                                        const uint8_t* valid, const int64_t* offsets,
                                        int64_t num_seqs, int level);

}  // namespace vapo
