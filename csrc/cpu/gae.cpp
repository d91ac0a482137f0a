// Two-lambda GAE reverse scan on the CPU (see vapo_kernels/ops/gae.py for the maths).
//
// Work is split into chunks of tokens. A sequence that is short, or one of many, is one
// chunk and is scanned serially by one thread. When there are fewer sequences than
// threads, long sequences are cut into several chunks so one 128k-token sequence still
// uses every core:
//   pass 1 (parallel): each chunk but the first of its sequence computes how its
//          carry-out depends on its carry-in. The map is affine:
//          A_out = a0 + w * (gamma * V_in + c * A_in) when the chunk has a valid token
//          (w = c^(valid tokens - 1)), identity otherwise;
//   carry  (serial, per sequence, over its few chunks): chain the summaries right to left;
//   pass 2 (parallel): rescan every chunk from its true carry-in, writing the outputs.
// Pass 1 re-reads the inputs once; that is the price of parallelism inside a sequence.
//
// The per-token step uses selects, never multiplies by the mask, so huge values or NaN
// stored in masked slots cannot change a valid output.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "mask.h"
#include "alloc.h"
#include "offsets.h"

namespace vapo {
namespace {

constexpr int64_t kMinChunk = 16384;  // below this, splitting costs more than it gains

template <typename acc_t>
struct Carry {
  acc_t next_value = 0;  // value of the next valid token (0 past the end)
  acc_t adv = 0;         // running advantage, lambda_policy
  acc_t ret = 0;         // running advantage, lambda_critic
};

// Scan tokens [begin, end) backwards from `carry`; writes outputs when `out_adv` is set,
// otherwise only returns the carry-out. `weight_p`/`weight_c` receive c^(valid-1), the
// sensitivity of the first valid token's advantage to the carry-in term.
template <typename scalar_t, typename acc_t, bool kHasMask, bool kSkip>
Carry<acc_t> scan_chunk(const scalar_t* rewards, const scalar_t* values, const uint8_t* mask,
                        int64_t begin, int64_t end, acc_t coef_p, acc_t coef_c, acc_t gamma,
                        Carry<acc_t> carry, acc_t* out_adv, acc_t* out_ret, acc_t* weight_p,
                        acc_t* weight_c, bool* any_valid) {
  acc_t next_value = carry.next_value, adv = carry.adv, ret = carry.ret;
  acc_t wp = 1, wc = 1;
  bool seen = false;
  for (int64_t t = end - 1; t >= begin; --t) {
    const bool valid = kHasMask ? mask[t] != 0 : true;
    acc_t r = static_cast<acc_t>(rewards[t]);
    acc_t v = static_cast<acc_t>(values[t]);
    if (!kSkip) {  // OpenRLHF: masked tokens count as r = V = 0
      r = valid ? r : acc_t(0);
      v = valid ? v : acc_t(0);
    }
    const acc_t delta = r + gamma * next_value - v;
    const acc_t new_adv = delta + coef_p * adv;
    const acc_t new_ret = delta + coef_c * ret;
    const bool take = kSkip ? valid : true;
    if (weight_p != nullptr && take) {
      wp = seen ? wp * coef_p : wp;
      wc = seen ? wc * coef_c : wc;
      seen = true;
    }
    adv = take ? new_adv : adv;
    ret = take ? new_ret : ret;
    next_value = take ? v : next_value;
    if (out_adv != nullptr) {
      out_adv[t] = adv;
      out_ret[t] = ret + v;
    }
  }
  if (weight_p != nullptr) {
    *weight_p = wp;
    *weight_c = wc;
    *any_valid = seen;
  }
  return {next_value, adv, ret};
}

struct Chunk {
  int64_t seq, begin, end;
};

template <typename scalar_t, bool kHasMask, bool kSkip>
void run(const at::Tensor& rewards, const at::Tensor& values, const uint8_t* mask,
         const at::Tensor& offsets, const at::Tensor& coef_policy,
         const at::Tensor& coef_critic, double gamma_d, at::Tensor& adv, at::Tensor& ret) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* r = rewards.data_ptr<scalar_t>();
  const scalar_t* v = values.data_ptr<scalar_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const acc_t* cp = coef_policy.data_ptr<acc_t>();
  const acc_t* cc = coef_critic.data_ptr<acc_t>();
  acc_t* out_a = adv.data_ptr<acc_t>();
  acc_t* out_r = ret.data_ptr<acc_t>();
  const acc_t gamma = static_cast<acc_t>(gamma_d);
  const int64_t num_seqs = offsets.size(0) - 1;

  // Plan the chunks: split sequences only when there are too few to fill the threads.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t splits_wanted = num_seqs >= 4 * threads ? 1 : (4 * threads + num_seqs - 1) / std::max<int64_t>(num_seqs, 1);
  std::vector<Chunk> chunks;
  std::vector<int64_t> first_chunk(num_seqs + 1);
  for (int64_t s = 0; s < num_seqs; ++s) {
    first_chunk[s] = static_cast<int64_t>(chunks.size());
    const int64_t len = off[s + 1] - off[s];
    const int64_t pieces = std::max<int64_t>(1, std::min(splits_wanted, len / kMinChunk));
    for (int64_t p = 0; p < pieces; ++p) {
      // len * p in 128 bits: a length near 2^63 must not wrap (the same cut otherwise).
      const auto cut = [&](int64_t q) {
        return off[s] + static_cast<int64_t>(static_cast<__int128>(len) * q / pieces);
      };
      chunks.push_back({s, cut(p), cut(p + 1)});
    }
  }
  first_chunk[num_seqs] = static_cast<int64_t>(chunks.size());
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  std::vector<Carry<acc_t>> carry_in(num_chunks);  // zero carries: the end of a sequence

  if (num_chunks > num_seqs) {
    // Pass 1: affine summary of every chunk that hands a carry to a chunk on its left.
    std::vector<Carry<acc_t>> local(num_chunks);
    std::vector<acc_t> wp(num_chunks, 1), wc(num_chunks, 1);
    std::vector<char> any_valid(num_chunks, 0);
    at::parallel_for(0, num_chunks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const Chunk& c = chunks[i];
        if (i == first_chunk[c.seq]) continue;
        bool seen = false;
        local[i] = scan_chunk<scalar_t, acc_t, kHasMask, kSkip>(
            r, v, mask, c.begin, c.end, cp[c.seq], cc[c.seq], gamma, Carry<acc_t>{}, nullptr,
            nullptr, &wp[i], &wc[i], &seen);
        any_valid[i] = seen;
      }
    });
    // Chain right to left inside each sequence.
    for (int64_t s = 0; s < num_seqs; ++s) {
      for (int64_t i = first_chunk[s + 1] - 1; i > first_chunk[s]; --i) {
        const Carry<acc_t>& in = carry_in[i];
        Carry<acc_t> out = in;
        if (any_valid[i]) {
          out.next_value = local[i].next_value;
          out.adv = local[i].adv + wp[i] * (gamma * in.next_value + cp[s] * in.adv);
          out.ret = local[i].ret + wc[i] * (gamma * in.next_value + cc[s] * in.ret);
        }
        carry_in[i - 1] = out;
      }
    }
  }

  // Pass 2: the real scan, from each chunk's true carry-in.
  at::parallel_for(0, num_chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const Chunk& c = chunks[i];
      scan_chunk<scalar_t, acc_t, kHasMask, kSkip>(r, v, mask, c.begin, c.end, cp[c.seq],
                                                   cc[c.seq], gamma, carry_in[i], out_a,
                                                   out_r, nullptr, nullptr, nullptr);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gae_scan_cpu(
    const at::Tensor& rewards, const at::Tensor& values,
    const std::optional<at::Tensor>& mask, const at::Tensor& offsets,
    const at::Tensor& coef_policy, const at::Tensor& coef_critic, double gamma,
    bool skip_masked) {
  // The Python op validates everything; these checks guard direct callers of the binding.
  TORCH_CHECK(rewards.device().is_cpu() && values.device().is_cpu(), "gae_scan_cpu: CPU tensors");
  TORCH_CHECK(rewards.is_contiguous() && values.is_contiguous() &&
                  rewards.sizes() == values.sizes() && rewards.dtype() == values.dtype(),
              "gae_scan_cpu: rewards and values must be contiguous tensors of one shape and dtype");
  check_offsets("gae_scan_cpu", offsets, rewards.numel());
  const int64_t num_seqs = offsets.size(0) - 1;
  const auto acc_dtype = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coef_policy.device().is_cpu() && coef_critic.device().is_cpu() &&
                  coef_policy.scalar_type() == acc_dtype && coef_critic.scalar_type() == acc_dtype &&
                  coef_policy.numel() == num_seqs && coef_critic.numel() == num_seqs &&
                  coef_policy.is_contiguous() && coef_critic.is_contiguous(),
              "gae_scan_cpu: coefficients must be contiguous (S,) CPU tensors in the output dtype");
  const uint8_t* mask_ptr = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->device().is_cpu() && mask->scalar_type() == at::kBool &&
                    mask->is_contiguous() && mask->sizes() == rewards.sizes(),
                "gae_scan_cpu: mask must be a contiguous bool CPU tensor of rewards' shape");
    mask_ptr = mask_bytes(*mask);
  }
  auto adv = empty_cpu_output(rewards.sizes(), acc_dtype);
  auto ret = empty_cpu_output(rewards.sizes(), acc_dtype);
  if (rewards.numel() == 0) return {adv, ret};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "gae_scan_cpu", [&] {
    if (mask_ptr != nullptr && skip_masked) {
      run<scalar_t, true, true>(rewards, values, mask_ptr, offsets, coef_policy, coef_critic, gamma, adv, ret);
    } else if (mask_ptr != nullptr) {
      run<scalar_t, true, false>(rewards, values, mask_ptr, offsets, coef_policy, coef_critic, gamma, adv, ret);
    } else {
      // Without a mask both semantics coincide.
      run<scalar_t, false, true>(rewards, values, mask_ptr, offsets, coef_policy, coef_critic, gamma, adv, ret);
    }
  });
  return {adv, ret};
}

}  // namespace vapo

namespace vapo {

// Valid tokens per sequence, for VAPO's length-adaptive lambda. torch's bool -> int64
// row sum ran at ~0.3 GB/s here (25 ms at 512 x 16k, twice the scan itself); a byte
// loop per sequence, which gcc widens into vector adds, is memory-bound.
at::Tensor valid_counts_cpu(const at::Tensor& mask, const at::Tensor& offsets) {
  TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == at::kBool && mask.dim() == 1 &&
                  mask.is_contiguous(),
              "valid_counts_cpu: mask must be a contiguous 1-D bool CPU tensor");
  const int64_t* off = check_offsets("valid_counts_cpu", offsets, mask.numel());
  const int64_t num_seqs = offsets.size(0) - 1;
  auto counts = at::empty({num_seqs}, offsets.options());
  int64_t* out = counts.data_ptr<int64_t>();
  const uint8_t* m = mask_bytes(mask);
  at::parallel_for(0, num_seqs, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t s = lo; s < hi; ++s) {
      int64_t count = 0;
      for (int64_t t = off[s]; t < off[s + 1]; ++t) count += m[t] != 0;
      out[s] = count;
    }
  });
  return counts;
}

// VAPO's length-adaptive gamma * lambda_policy per sequence, gamma * (1 - 1 / max(alpha l,
// 1)) with l its valid tokens, in float64 and rounded once to dtype: the reference's
// arithmetic step for step (so the two agree bit for bit), in one call instead of the
// eight small tensor ops that cost more than the GAE scan at micro-batch sizes.
at::Tensor adaptive_coefficients_cpu(const std::optional<at::Tensor>& mask,
                                     const at::Tensor& offsets, double alpha, double gamma,
                                     at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "adaptive_coefficients_cpu: dtype must be float32 or float64");
  const uint8_t* m = nullptr;
  int64_t n = 0;  // tokens: the mask's; without one, any end of the offsets
  if (mask.has_value()) {
    TORCH_CHECK(mask->device().is_cpu() && mask->scalar_type() == at::kBool &&
                    mask->dim() == 1 && mask->is_contiguous(),
                "adaptive_coefficients_cpu: mask must be a contiguous 1-D bool CPU tensor");
    m = mask_bytes(*mask);
    n = mask->numel();
  } else if (offsets.device().is_cpu() && offsets.scalar_type() == at::kLong &&
             offsets.dim() == 1 && offsets.numel() >= 1 &&
             offsets.is_contiguous()) {  // else check_offsets refuses them
    n = offsets.data_ptr<int64_t>()[offsets.numel() - 1];
  }
  const int64_t* off = check_offsets("adaptive_coefficients_cpu", offsets, n);
  const int64_t num_seqs = offsets.size(0) - 1;
  auto out = at::empty({num_seqs}, offsets.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "adaptive_coefficients_cpu", [&] {
    scalar_t* coef = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_seqs, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t s = lo; s < hi; ++s) {
        int64_t count = off[s + 1] - off[s];
        if (m != nullptr) {
          count = 0;
          for (int64_t t = off[s]; t < off[s + 1]; ++t) count += m[t] != 0;
        }
        // As the reference: scaled = l * alpha clamped at 1, then gamma * (1 + -(1 / scaled)).
        const double scaled = std::max(static_cast<double>(count) * alpha, 1.0);
        coef[s] = static_cast<scalar_t>(gamma * (1.0 + -(1.0 / scaled)));
      }
    });
  });
  return out;
}

}  // namespace vapo
