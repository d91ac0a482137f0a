// From logits to the PPO / VAPO loss and d loss / d logits in one pass over the rows
// (vapo_kernels/ops/logits_loss.py, reference_logits_kernel, has the contract).
//
// Rows are taken in blocks small enough to stay in cache (kCacheBytes of logits, at most
// kMaxRows rows; one row when a row alone is larger). Per block: the log-prob kernel's
// forward per row (max logit, log normaliser, entropy, target log-prob: logits read from
// memory once), the
// token-loss tiles on those few tokens (loss terms, metrics, d loss / d logp and
// d loss / d H), then the log-prob backward per row, which reads the row again while it
// is still in cache and writes its gradient (over the logits when out is the logits).
// The per-token values live in block-sized stack arrays: nothing per token goes to
// memory, and the logits cross the memory bus once in, the gradient once out.
//
// The block layout depends on N, V and the dtype only, and block sums are added in block
// order: the result is the same bits for any number of threads.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "../ops.h"
#include "mask.h"
#include "logprobs_rows.h"
#include "token_loss_block.h"

namespace vapo {
namespace {

constexpr int64_t kCacheBytes = 256 * 1024;  // about half an L2: the row block plus tiles
constexpr int64_t kMaxRows = 256;            // bounds the per-block stack arrays

void check_tokens(const char* fn, const char* name, const at::Tensor& t, int64_t n,
                  at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 &&
                  t.size(0) == n && t.is_contiguous(),
              fn, ": ", name, " must be a contiguous (", n, ",) CPU tensor of dtype ", dtype,
              ", got shape ", t.sizes(), " and dtype ", t.scalar_type());
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

}  // namespace

at::Tensor logits_loss_cpu(const at::Tensor& logits, const at::Tensor& targets,
                           const at::Tensor& old_logp, const at::Tensor& advantages,
                           const std::optional<at::Tensor>& ref_logp,
                           const std::optional<at::Tensor>& is_weights, const at::Tensor& valid,
                           const at::Tensor& offsets,
                           const std::optional<at::Tensor>& seq_weight,
                           const std::optional<at::Tensor>& lm_weight,
                           const std::vector<double>& params, double temperature,
                           const std::optional<at::Tensor>& out) {
  // The Python op validates everything; these checks guard direct callers of the binding.
  const char* fn = "logits_loss_cpu";
  const int64_t* y = check_logits_and_targets(fn, logits, targets, temperature);
  const int64_t n = logits.size(0), vocab = logits.size(1), z_stride = logits.stride(0);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_tokens(fn, "old_logp", old_logp, n, acc);
  check_tokens(fn, "advantages", advantages, n, acc);
  if (ref_logp.has_value()) check_tokens(fn, "ref_logp", *ref_logp, n, acc);
  if (is_weights.has_value()) check_tokens(fn, "is_weights", *is_weights, n, acc);
  check_tokens(fn, "valid", valid, n, at::kBool);
  TORCH_CHECK(static_cast<int>(params.size()) == NUM_PARAMS, fn, ": params must hold ",
              static_cast<int>(NUM_PARAMS), " floats, got ", params.size());
  const int rollout = rollout_level(fn, params);
  TORCH_CHECK(rollout == 0 || is_weights.has_value(), fn,
              ": the rollout correction (params[P_ROLLOUT_IS] > 0) needs the rollout log-probs "
              "in is_weights");
  const double kl_kind = params[P_KL_KIND];
  TORCH_CHECK(kl_kind == 0 || kl_kind == 1 || kl_kind == 2 || kl_kind == 3 || kl_kind == 4, fn,
              ": params[P_KL_KIND] must be 0 (off), 1 (k1), 2 (abs), 3 (k2) or 4 (k3), got ",
              kl_kind);
  const int64_t* off = check_offsets(fn, offsets, n);
  const int64_t num_seqs = offsets.size(0) - 1;
  if (seq_weight.has_value()) check_tokens(fn, "seq_weight", *seq_weight, num_seqs, acc);
  if (lm_weight.has_value()) check_tokens(fn, "lm_weight", *lm_weight, num_seqs, acc);
  if (out.has_value()) check_grad_out(fn, logits, *out);

  const int64_t row_bytes = std::max<int64_t>(1, vocab * logits.element_size());
  const int64_t rows_per_block = std::clamp<int64_t>(kCacheBytes / row_bytes, 1, kMaxRows);
  const int64_t num_blocks = (n + rows_per_block - 1) / rows_per_block;
  std::vector<LossSums> parts(static_cast<size_t>(num_blocks));
  const uint8_t* keep = mask_bytes(valid);
  const double entropy_coef = params[P_ENTROPY_COEF];

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "logits_loss_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* z = logits.data_ptr<scalar_t>();
    scalar_t* o = out.has_value() ? out->data_ptr<scalar_t>() : nullptr;
    const int64_t o_stride = out.has_value() ? out->stride(0) : 0;
    LossBlock<T> shared;
    shared.old_logp = old_logp.data_ptr<T>();
    shared.adv = advantages.data_ptr<T>();
    shared.ref_logp = opt_ptr<T>(ref_logp);
    shared.isw = opt_ptr<T>(is_weights);
    shared.valid = keep;
    shared.offsets = off;
    shared.num_seqs = num_seqs;
    std::vector<T> token_mean;
    shared.seq_weight = sequence_weights<T>(seq_weight, keep,
                                            n, num_seqs, token_mean);
    shared.lm_weight = opt_ptr<T>(lm_weight);
    // The rollout correction's sequence levels: the per-sequence weights first (they
    // need no logits, only old_logp and the rollout log-probs in is_weights).
    std::vector<T> seq_rollout_weight;
    if (rollout > 1) {
      seq_rollout_weight = rollout_sequence_weights<T, T>(
          shared.old_logp, shared.isw, keep, off, num_seqs,
          rollout);
      shared.seq_rollout_weight = seq_rollout_weight.data();
    }

    at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
      std::array<T, kMaxRows> logp, entropy, row_max, log_norm, g_logp, g_entropy;
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * rows_per_block, r1 = std::min(n, r0 + rows_per_block);
        for (int64_t r = r0; r < r1; ++r) {
          RowStats st{0.0, 0.0, 0.0, 0.0};  // the contract's values for rows that do not count
          // A target of -100 on a valid row is outside the contract (the op folds it into
          // the row's validity): such a row's log-prob is 0 here, and z[-100] is never read.
          if (keep[r] && y[r] != kIgnoreIndex) {
            st = logprob_row_forward(z + r * z_stride, vocab, y[r], temperature);
          }
          logp[r - r0] = static_cast<T>(st.logp);
          entropy[r - r0] = static_cast<T>(st.entropy);
          row_max[r - r0] = static_cast<T>(st.m);
          log_norm[r - r0] = static_cast<T>(st.log_norm);
        }
        // The token-loss block reads its per-token arrays relative to r0 and the batch's
        // inputs (old_logp, ...) at their global index: offset those pointers to r0.
        LossBlock<T> block = shared;
        block.begin = r0;
        block.end = r1;
        block.logp = logp.data();
        block.entropy = entropy.data();
        block.old_logp = shared.old_logp + r0;
        block.adv = shared.adv + r0;
        block.ref_logp = shared.ref_logp != nullptr ? shared.ref_logp + r0 : nullptr;
        block.isw = shared.isw != nullptr ? shared.isw + r0 : nullptr;
        block.valid = keep + r0;
        block.g_logp = o != nullptr ? g_logp.data() : nullptr;
        block.g_entropy = o != nullptr ? g_entropy.data() : nullptr;
        token_loss_block<T>(block, params, parts[static_cast<size_t>(blk)]);
        if (o == nullptr) continue;
        for (int64_t r = r0; r < r1; ++r) {
          scalar_t* orow = o + r * o_stride;
          if (!keep[r] || y[r] == kIgnoreIndex) {
            std::fill(orow, orow + vocab, static_cast<scalar_t>(0));  // logits never read
            continue;
          }
          // The values the log-prob backward would read back from the forward's
          // outputs, rounded to T as they would be there.
          const double gh = entropy_coef != 0 ? static_cast<double>(g_entropy[r - r0]) : 0.0;
          logprob_row_backward(z + r * z_stride, orow, vocab, y[r], temperature,
                               static_cast<double>(row_max[r - r0]),
                               static_cast<double>(log_norm[r - r0]),
                               static_cast<double>(entropy[r - r0]),
                               static_cast<double>(g_logp[r - r0]), gh);
        }
      }
    });
  });
  return reduce_loss_sums(parts, acc, rollout != 0);
}

}  // namespace vapo
