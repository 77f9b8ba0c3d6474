// The launchers' switch from a storage-dtype code to a storage type. Every kernel family has its own
// dtype enum (FieldDType, CompositeDType) with the same enumerators; each picks its own 2-byte types
// (the CUDA ones, or the wrappers of half_types.cuh). Torch-free, like every kernel here.
#pragma once

#include <cuda_runtime.h>

namespace talk3d {
namespace cuda {

// fn(S{}) for the storage type S of `dtype` (the value only carries the type): float, Half, BF16 or
// double for kF32, kF16, kBF16 and kF64.
template <typename Half, typename BF16, typename DType, typename Fn>
cudaError_t dispatch_storage(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kF32:
      return fn(float{});
    case DType::kF16:
      return fn(Half{});
    case DType::kBF16:
      return fn(BF16{});
    case DType::kF64:
      return fn(double{});
  }
  return cudaErrorInvalidValue;
}

// Accumulation type of a storage type: float, double for double data.
template <typename S>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

}  // namespace cuda
}  // namespace talk3d
