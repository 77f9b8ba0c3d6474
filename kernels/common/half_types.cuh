// 2-byte storage types of the CUDA kernels. The shared per-element headers convert with
// static_cast<acc_t>(x) on load and static_cast<T>(acc) on store; __half / __nv_bfloat16 lose both
// conversions under torch's -D__CUDA_NO_HALF_CONVERSIONS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__,
// so half-precision data goes through these wrappers, with an explicit conversion each way (round to
// nearest even on store). They have the layout of the CUDA types. Torch-free, like every kernel here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace talk3d {
namespace cuda {

struct Half16 {
  unsigned short bits;
  Half16() = default;
  __host__ __device__ __forceinline__ explicit Half16(float x) : bits(__half_as_ushort(__float2half_rn(x))) {}
  __host__ __device__ __forceinline__ explicit operator float() const {
    return __half2float(__ushort_as_half(bits));
  }
};

struct BFloat16 {
  unsigned short bits;
  BFloat16() = default;
  __host__ __device__ __forceinline__ explicit BFloat16(float x)
      : bits(__bfloat16_as_ushort(__float2bfloat16_rn(x))) {}
  __host__ __device__ __forceinline__ explicit operator float() const {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  }
};

static_assert(sizeof(Half16) == sizeof(__half) && alignof(Half16) <= alignof(__half), "layout");
static_assert(sizeof(BFloat16) == sizeof(__nv_bfloat16) && alignof(BFloat16) <= alignof(__nv_bfloat16),
              "layout");

}  // namespace cuda
}  // namespace talk3d
