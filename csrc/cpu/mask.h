// How the CPU kernels read a torch bool mask: as bytes, nonzero = valid.
//
// torch writes 0 or 1 into a bool tensor, but a uint8 tensor viewed as bool
// (`mask.view(torch.bool)`) can hold any byte, and torch's own ops take a nonzero byte as
// true. Loaded as a C++ bool, a byte other than 0 or 1 is undefined behaviour (UBSan
// reports it), and counting the bytes would count a 2 twice: every kernel reads masks
// through this one function and tests `!= 0`.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace vapo {

inline const uint8_t* mask_bytes(const at::Tensor& mask) {
  return reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
}

}  // namespace vapo
