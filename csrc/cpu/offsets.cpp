#include "offsets.h"

#include <c10/util/Exception.h>

namespace vapo {

const int64_t* check_offsets(const char* fn, const at::Tensor& offsets, int64_t n) {
  TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == at::kLong &&
                  offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.is_contiguous(),
              fn, ": offsets must be a contiguous int64 CPU tensor of S + 1 entries");
  const int64_t num_seqs = offsets.size(0) - 1;
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[num_seqs] == n, fn,
              ": offsets must start at 0 and end at N = ", n, ", got ", off[0], " and ",
              off[num_seqs]);
  for (int64_t s = 0; s < num_seqs; ++s) {
    TORCH_CHECK(off[s] <= off[s + 1], fn, ": offsets must be non-decreasing, but offsets[",
                s + 1, "] = ", off[s + 1], " < offsets[", s, "] = ", off[s]);
  }
  return off;
}

}  // namespace vapo
