// The one check of the kernels' sequence offsets (S + 1 int64 entries, 0 = offsets[0] <=
// ... <= offsets[S] = N), shared by every CPU binding that takes them. The Python ops
// validate user input; this guards direct callers of the bindings (the kernels' contract).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace vapo {

// Returns the offsets' data; fn names the binding in the error.
const int64_t* check_offsets(const char* fn, const at::Tensor& offsets, int64_t n);

}  // namespace vapo
